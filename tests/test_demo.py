"""The demo (the README's first command) on the MNI152 template shipped with nilearn."""

import json

import numpy as np
import pytest

pytest.importorskip("nilearn", reason="the demo data ships with nilearn (a dependency of dirio)")

from dirio.apps.demo import load_template, run_demo  # noqa: E402


def test_template_loads_with_tissue_labels_at_the_asked_resolution():
    t1, labels, affine = load_template(resolution=4.0)
    assert t1.dtype == np.float32 and 0.0 <= t1.min() and t1.max() == pytest.approx(1.0)
    assert set(np.unique(labels)) == {0, 1, 2}
    # align_corners resampling: spacing (n - 1) / (n' - 1) stays within a few % of the target.
    assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), 4.0, rtol=0.03)
    # Grey matter is darker than white matter in a T1 image.
    assert t1[labels == 1].mean() < t1[labels == 2].mean()


@pytest.mark.slow
def test_demo_registers_the_known_warp_and_writes_its_outputs(tmp_path, capsys):
    summary = run_demo(tmp_path, resolution=3.0)
    assert summary["dice_after"] > summary["dice_before"] + 0.05
    assert summary["endpoint_error_after_mm"] < 0.5 * summary["endpoint_error_before_mm"]
    assert summary["percent_nonpositive_jacobian"] < 0.01
    assert json.loads((tmp_path / "demo.json").read_text())["dice_after"] == summary["dice_after"]
    assert (tmp_path / "report_fixed_moving.png").stat().st_size > 10_000
    assert "tissue Dice" in capsys.readouterr().out
