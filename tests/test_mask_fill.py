"""Masks used by filling (``mask_use: fill``, :mod:`dirio.core.mask_fill`)."""

import numpy as np
import pytest

from dirio.api import register
from dirio.core.mask_fill import fill_outside_mask


def test_outside_takes_the_half_resolution_nearest_interior_value_upsampled_as_convexadam():
    """ConvexAdam's fill (dirio.core.mask_fill) by hand on an image that varies along k only."""
    image = np.broadcast_to(np.arange(5, dtype=np.float32), (7, 9, 5)).copy()  # I(i, j, k) = k
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[1:6, 2:8, 0:5] = 1  # interior (3x3x3 mean > 0.9, edge values repeated): [2:5, 3:7, 0:5]
    filled = fill_outside_mask(image, mask)
    np.testing.assert_array_equal(filled[2:5, 3:7, :], image[2:5, 3:7, :])
    # on the half grid (k = 0, 2, 4) the nearest interior voxel has the same k: values 0, 2, 4;
    # upsampled by 2 (linear, align_corners=False: full k sits at k / 2 - 0.25, clamped at 0):
    # max(k - 0.5, 0)
    expected = np.array([0.0, 0.5, 1.5, 2.5, 3.5], dtype=np.float32)
    for voxel in ((0, 0), (6, 8), (1, 4), (3, 8)):  # corners, a mask face voxel (not interior), a side
        np.testing.assert_allclose(filled[voxel], expected, rtol=0, atol=1e-6)


def test_empty_full_and_too_thin_masks():
    image = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(fill_outside_mask(image, np.zeros(image.shape)), image)
    np.testing.assert_array_equal(fill_outside_mask(image, np.ones(image.shape)), image)
    thin = np.zeros(image.shape)
    thin[2, 3, 1:6] = 1  # no interior (and none on the half grid): the mask as given, full resolution
    filled = fill_outside_mask(image, thin)
    np.testing.assert_array_equal(filled[2, 3, 1:6], image[2, 3, 1:6])
    assert filled[0, 0, 0] == image[2, 3, 1]
    with pytest.raises(ValueError, match="mask shape"):
        fill_outside_mask(image, np.ones((5, 6, 8)))


def test_register_with_filled_masks_equals_registering_the_filled_images_without_masks():
    generator = np.random.default_rng(1)
    fixed = generator.uniform(size=(20, 22, 24)).astype(np.float32)
    moving = np.roll(fixed, 1, axis=0) + 0.05 * generator.normal(size=fixed.shape).astype(np.float32)
    mask = np.zeros(fixed.shape, dtype=np.uint8)
    mask[4:16, 5:18, 6:20] = 1
    options = dict(preset="lung-ct", normalise="minmax", levels=(2,), iterations=(5,), device="cpu", progress=False)
    filled = register(fixed, moving, fixed_mask=mask, moving_mask=mask, mask_use="fill", **options)
    # the same normalisation first: min-max of the whole image, then the fill
    lo, hi = [float(v) for v in (fixed.min(), fixed.max())], [float(v) for v in (moving.min(), moving.max())]
    by_hand = register(fill_outside_mask((fixed - lo[0]) / (lo[1] - lo[0]), mask),
                       fill_outside_mask((moving - hi[0]) / (hi[1] - hi[0]), mask), normalise="none",
                       **{k: v for k, v in options.items() if k != "normalise"}, auto_mask="none")
    np.testing.assert_allclose(filled.disp, by_hand.disp, atol=1e-5)
    restricted = register(fixed, moving, fixed_mask=mask, moving_mask=mask, **options)
    assert np.abs(restricted.disp - filled.disp).max() > 1e-3
