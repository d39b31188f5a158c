"""Masks used by filling (``mask_use: fill``, :mod:`dirio.core.mask_fill`)."""

import numpy as np
import pytest

from dirio.api import register
from dirio.core.mask_fill import fill_outside_mask


def test_outside_takes_the_nearest_inside_value_after_a_one_voxel_erosion():
    image = np.arange(7 * 9 * 5, dtype=np.float32).reshape(7, 9, 5)
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[1:6, 2:8, 0:5] = 1  # eroded by one voxel, not at the image border: [2:5, 3:7, 0:5]
    filled = fill_outside_mask(image, mask)
    np.testing.assert_array_equal(filled[2:5, 3:7, :], image[2:5, 3:7, :])
    # nearest inside voxels, by hand: the corner (0, 0, 0) -> (2, 3, 0); (6, 4, 2) -> (4, 4, 2); (3, 8, 4) -> (3, 6, 4)
    assert filled[0, 0, 0] == image[2, 3, 0]
    assert filled[6, 4, 2] == image[4, 4, 2]
    assert filled[3, 8, 4] == image[3, 6, 4]
    # a boundary voxel of the mask itself is filled too
    assert filled[1, 4, 2] == image[2, 4, 2]


def test_empty_full_and_too_thin_masks():
    image = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    np.testing.assert_array_equal(fill_outside_mask(image, np.zeros(image.shape)), image)
    np.testing.assert_array_equal(fill_outside_mask(image, np.ones(image.shape)), image)
    thin = np.zeros(image.shape)
    thin[2, 3, 1:6] = 1  # erosion would empty it: the mask is used as given
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
