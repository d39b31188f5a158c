"""Masks used by filling: the image outside a mask takes the intensity of the nearest voxel inside.

This is the other way to use a mask (ConvexAdam's): instead of restricting the similarity to the
mask, the image is made featureless outside it, so that structures outside (the chest wall, the
table) pull on nothing, while local descriptors (MIND) near the boundary still see a continuous
image. The fill follows ConvexAdam's ``convex_adam_MIND.extract_features`` (Siebert, Hansen &
Heinrich, convexAdam 0.2.0), so that dirio's ``convex-adam`` sees the reference's images:

1. the mask's *interior*: voxels whose 3^ndim neighbourhood (replicate padding at the image
   border) is more than 90 % inside the mask (:data:`INTERIOR_FRACTION`; a voxel with at most 2 of
   its 27 neighbours outside in 3D);
2. on the grid of every second voxel (``image[::2, ::2, ::2]``), every voxel takes the value of the
   nearest interior voxel of that grid (exact Euclidean distance transform);
3. that half-resolution image is upsampled by 2 (linear, ``align_corners=False``, cropped to the
   image's shape) and the interior voxels take back their own values.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# ConvexAdam's interior test: the 3x3x3 mean of the mask above 0.9 (its ``avg3(mask) > 0.9``).
INTERIOR_FRACTION = 0.9


def mask_interior(mask: np.ndarray) -> np.ndarray:
    """Boolean ``(*S)``: the mean of ``mask != 0`` over the 3^ndim neighbourhood (edge values
    repeated beyond the image border) exceeds :data:`INTERIOR_FRACTION`."""
    inside = (np.asarray(mask) != 0).astype(np.float32)
    return ndimage.uniform_filter(inside, size=3, mode="nearest") > INTERIOR_FRACTION


def fill_outside_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with every voxel outside the mask's interior filled from its nearest interior voxel
    on the half-resolution grid, upsampled (see the module docstring).

    Args:
        image: ``(*S)`` array (2D or 3D), any float dtype.
        mask: ``(*S)`` array, nonzero inside.
    Returns:
        ``(*S)`` float32 array; ``image`` unchanged (as float32) when the mask is empty or full.
        When the interior is empty (a mask thinner than 3 voxels) the mask itself is used, and
        when the half-resolution grid holds none of it, the fill is done at full resolution.
    """
    image = np.asarray(image, dtype=np.float32)
    inside = np.asarray(mask) != 0
    if inside.shape != image.shape:
        raise ValueError(f"mask shape {inside.shape} differs from image shape {image.shape}")
    if not inside.any() or inside.all():
        return image.copy()
    interior = mask_interior(inside)
    if not interior.any():
        interior = inside
    every_second = tuple(slice(None, None, 2) for _ in range(image.ndim))
    coarse = interior[every_second]
    if not coarse.any():
        nearest = ndimage.distance_transform_edt(~interior, return_distances=False, return_indices=True)
        return image[tuple(nearest)]
    nearest = ndimage.distance_transform_edt(~coarse, return_distances=False, return_indices=True)
    half = torch.from_numpy(np.ascontiguousarray(image[every_second][tuple(nearest)]))[None, None]
    mode = "trilinear" if image.ndim == 3 else "bilinear"
    up = F.interpolate(half, scale_factor=2, mode=mode, align_corners=False)[0, 0].numpy()
    filled = np.ascontiguousarray(up[tuple(slice(0, n) for n in image.shape)])
    filled[interior] = image[interior]
    return filled
