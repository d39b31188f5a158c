"""Masks used by filling: the image outside a mask takes the intensity of the nearest voxel inside.

This is the other way to use a mask (ConvexAdam's): instead of restricting the similarity to the
mask, the image is made featureless outside it, so that structures outside (the chest wall, the
table) pull on nothing, while local descriptors (MIND) near the boundary still see a continuous
image. The mask is eroded by one voxel first, so that partial-volume boundary voxels are filled too.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def fill_outside_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with every voxel outside the (eroded) mask set to its nearest inside voxel's value.

    Args:
        image: ``(*S)`` array (2D or 3D), any float dtype.
        mask: ``(*S)`` array, nonzero inside.
    Returns:
        ``(*S)`` float32 array; ``image`` unchanged (as float32) when the mask is empty or full.
        The mask is eroded by one voxel (3^ndim neighbourhood; not at the image border) unless
        that would empty it.
    """
    inside = np.asarray(mask) != 0
    if inside.shape != image.shape:
        raise ValueError(f"mask shape {inside.shape} differs from image shape {image.shape}")
    if not inside.any() or inside.all():
        return np.asarray(image, dtype=np.float32).copy()
    # the image border is not the mask's boundary: voxels beyond it count as inside
    eroded = ndimage.binary_erosion(inside, structure=np.ones((3,) * inside.ndim, dtype=bool), border_value=1)
    if eroded.any():
        inside = eroded
    nearest = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
    return np.asarray(image, dtype=np.float32)[tuple(nearest)]
