"""Specification of dirio's distribution: ``python -m build`` makes an sdist and a wheel that ``twine
check`` accepts, the wheel carries the packaged LapIRN weights with their licence and attribution, and
installed into a fresh virtual environment (with ``-c constraints.txt``, from the machine's package
index; torch is the pinned CPU build) it runs ``dirio --version``, ``dirio demo`` and ``dirio register
--method network`` from a folder outside the repository.

Slow (a few minutes: the build, then one environment for the whole module, reused by every test).
Skipped, with the reason, when ``build`` or ``twine`` (the ``test`` extra) is missing.
"""

from __future__ import annotations

import email
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import dirio

REPOSITORY = Path(__file__).resolve().parents[1]
PRETRAINED = REPOSITORY / "src" / "dirio" / "transforms" / "networks" / "pretrained"

pytestmark = pytest.mark.slow

try:
    import build  # noqa: F401
    import twine  # noqa: F401

    MISSING = None
except ImportError as error:
    MISSING = f"{error.name} is not installed (the 'test' extra: pip install -c constraints.txt -e '.[test]')"


def _run(command, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, command))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel of the working tree, built as a user would (isolated build environment)."""
    if MISSING:
        pytest.skip(MISSING)
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, REPOSITORY])
    return out


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    (found,) = dist.glob("dirio-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Iterator[Path]:
    """A fresh virtual environment with nothing but the wheel and its dependencies (pinned versions):
    ``pip install dirio-*.whl`` as a user would type it."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", root / "env"])
    python = root / "env" / "bin" / "python"
    # No pip cache: the environment is about 2 GB (torch) and is removed after the module, so that
    # pytest's kept base folders of earlier runs do not fill the disk.
    _run([python, "-m", "pip", "install", "--quiet", "--no-cache-dir", "-c", REPOSITORY / "constraints.txt", wheel])
    yield root / "env"
    shutil.rmtree(root, ignore_errors=True)


def _env() -> dict:
    """The environment of a command run in the fresh venv: two threads, nothing from this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    return env


def test_sdist_and_wheel_pass_twine_check_and_name_the_one_version(dist, wheel):
    sdists = list(dist.glob("dirio-*.tar.gz"))
    assert len(sdists) == 1
    result = _run([sys.executable, "-m", "twine", "check", "--strict", sdists[0], wheel])
    assert result.stdout.count("PASSED") == 2, result.stdout
    assert wheel.name.startswith(f"dirio-{dirio.__version__}-") and sdists[0].name == f"dirio-{dirio.__version__}.tar.gz"


def test_wheel_metadata_has_the_spdx_licence_and_the_version(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(name))
        licences = [n for n in archive.namelist() if "/licenses/" in n]
    assert metadata["Version"] == dirio.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get("License") is None  # the deprecated free-text field is gone
    assert any(n.endswith("/licenses/LICENSE") for n in licences)
    assert any(n.endswith("pretrained/LICENSE.md") for n in licences)
    assert "Requires-Dist: torch" in str(metadata)


def test_wheel_carries_the_pretrained_weights_with_licence_and_attribution(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        packaged = {path.name: archive.read(f"dirio/transforms/networks/pretrained/{path.name}")
                    for path in PRETRAINED.iterdir() if path.is_file()}
    assert {"LapIRN_disp_fea7.pth", "LICENSE.md", "README.md"} <= set(packaged)
    for name, content in packaged.items():
        assert content == (PRETRAINED / name).read_bytes(), name
    assert b"MIT License" in packaged["LICENSE.md"] and b"Mok" in packaged["README.md"]
    assert {"dirio/viz/templates/report.css", "dirio/viz/templates/report.js"} <= names


def test_installed_dirio_version_comes_from_the_installed_package(venv, tmp_path):
    result = _run([venv / "bin" / "dirio", "--version"], cwd=tmp_path, env=_env())
    assert result.stdout.strip() == f"dirio {dirio.__version__}"
    where = _run([venv / "bin" / "python", "-c", "import dirio; print(dirio.__file__)"], cwd=tmp_path, env=_env())
    assert Path(where.stdout.strip()).is_relative_to(venv)  # not this checkout's src/


def test_installed_demo_registers_the_template_pair(venv, tmp_path):
    out = tmp_path / "demo-out"
    _run([venv / "bin" / "dirio", "demo", "-o", out, "--quiet"], cwd=tmp_path, env=_env())
    assert (out / "report_fixed_moving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "demo.json").read_text())
    assert summary["dice_after"] > summary["dice_before"] + 0.05  # the known warp is undone
    assert summary["endpoint_error_after_mm"] < 0.5 * summary["endpoint_error_before_mm"]
    disp = nib.load(out / "disp_fixed_moving.nii.gz")
    assert disp.shape[-1] == 3 and np.isfinite(disp.get_fdata()).all()


def _write_pair(folder: Path) -> None:
    """A small ellipsoid pair (40 x 48 x 40, 1.5 mm voxels) with two labels and a known smooth warp."""
    from dirio.testing.synthetic import warped_pair

    shape = (40, 48, 40)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt((grid[0] / 0.7) ** 2 + (grid[1] / 0.8) ** 2 + (grid[2] / 0.6) ** 2)
    image = np.clip(1.2 - radius, 0, 1).astype(np.float32)
    labels = (radius < 0.5).astype(np.int16) + (radius < 0.8).astype(np.int16)
    pair = warped_pair(image, labels, sigma=6.0, max_displacement=3.0, seed=3)
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    for name, data in [("fixed", pair.fixed), ("moving", pair.moving), ("fixed_seg", pair.fixed_labels),
                       ("moving_seg", pair.moving_labels)]:
        nib.save(nib.Nifti1Image(data, affine), folder / f"{name}.nii.gz")


def test_installed_network_method_uses_the_packaged_weights(venv, tmp_path):
    """``dirio register --method network`` in the fresh environment gives the field that this checkout's
    API gives with the source tree's weights: the wheel's weights are the packaged model, loaded."""
    _write_pair(tmp_path)
    for name in ("LapIRN_disp_fea7.pth", "LICENSE.md", "README.md"):
        installed = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / \
            "dirio" / "transforms" / "networks" / "pretrained" / name
        assert hashlib.sha256(installed.read_bytes()).digest() == hashlib.sha256((PRETRAINED / name).read_bytes()).digest()
    result = _run([venv / "bin" / "dirio", "register", "fixed.nii.gz", "moving.nii.gz", "-o", "out", "--method",
                   "network", "--fixed-labels", "fixed_seg.nii.gz", "--moving-labels", "moving_seg.nii.gz",
                   "--no-figure", "--quiet"], cwd=tmp_path, env=_env())
    assert "Traceback" not in result.stderr
    disp = nib.load(tmp_path / "out" / "disp_fixed_moving.nii.gz").get_fdata(dtype=np.float32)
    assert disp.shape == (40, 48, 40, 3)
    assert np.isfinite(disp).all() and np.abs(disp).max() > 0.1  # the network moved something

    from dirio.api import register
    from dirio.io.images import load_image

    expected = register(load_image(tmp_path / "fixed.nii.gz"), load_image(tmp_path / "moving.nii.gz"),
                        method="network", device="cpu", progress=False).disp
    np.testing.assert_allclose(disp, expected, atol=1e-3)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert re.search(r'"network"', json.dumps(metrics))
