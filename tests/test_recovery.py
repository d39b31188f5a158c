"""Registration recovers a known smooth deformation of a real brain (voxelmorph test scan).

The scan is taken at half resolution (80x96x112, every second voxel) to keep the test fast;
the deformation is the benchmark's (Gaussian-smoothed noise), scaled to that grid.
"""

from pathlib import Path

import numpy as np
import pytest

from dirio.api import register
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian
from dirio.evaluation.overlap import dice_per_label, mean_dice, warp_labels
from dirio.testing.synthetic import endpoint_error, warped_pair

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voxelmorph-brain"


@pytest.fixture(scope="module")
def brain():
    if not (DATA / "test_scan_vol.nii.gz").exists():
        pytest.skip(f"real data not found at {DATA} (../shared/data beside the repository)")
    import nibabel as nib

    image = np.asarray(nib.load(DATA / "test_scan_vol.nii.gz").dataobj, dtype=np.float32)[::2, ::2, ::2]
    labels = np.asarray(nib.load(DATA / "test_scan_seg.nii.gz").dataobj).astype(np.int16)[::2, ::2, ::2]
    label_ids = [int(v) for v in np.load(DATA / "labels.npz")["labels"]]
    return np.ascontiguousarray(image), np.ascontiguousarray(labels), label_ids


@pytest.mark.slow
def test_brain_preset_recovers_a_known_smooth_deformation(brain):
    image, labels, label_ids = brain
    pair = warped_pair(image, labels, sigma=7.0, max_displacement=4.0, seed=5)
    result = register(pair.fixed, pair.moving, preset="brain-mri", levels=(2, 1), iterations=(60, 30),
                      device="cpu", progress=False)
    inside = pair.fixed_labels > 0
    before = endpoint_error(np.zeros_like(result.disp), pair.true_disp, inside)
    after = endpoint_error(result.disp, pair.true_disp, inside)
    assert after <= 0.3 * before, f"endpoint error {before:.3f} -> {after:.3f} voxels"

    dice_before = mean_dice(dice_per_label(pair.fixed_labels, pair.moving_labels, label_ids))
    dice_after = mean_dice(dice_per_label(pair.fixed_labels, warp_labels(pair.moving_labels, result.disp), label_ids))
    assert dice_after > dice_before + 0.1, (dice_before, dice_after)
    assert fraction_nonpositive_jacobian(result.disp) < 1e-4


def test_an_aligned_pair_stays_aligned(brain):
    image, labels, label_ids = brain
    image, labels = image[::2, ::2, ::2].copy(), labels[::2, ::2, ::2].copy()
    result = register(image, image, preset="brain-mri", levels=(4, 2), iterations=(20, 10), device="cpu", progress=False)
    warped = warp_labels(labels, result.disp)
    assert mean_dice(dice_per_label(labels, warped, label_ids)) > 0.9
    assert fraction_nonpositive_jacobian(result.disp) == 0.0
