"""Helpers shared by the registration networks: padding an input to the size an architecture needs.

Networks that halve their grid ``n`` times need every spatial size to be a multiple of ``2**n``.
They never resize the user's image: they pad it (:func:`pad_to_multiple`) and crop the field they
predict back to the input grid (:func:`crop`). Padding adds whole voxels around the image, so a
displacement in voxels means the same thing on the padded and on the cropped grid.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def padding_for(shape: Sequence[int], multiple: int) -> list[tuple[int, int]]:
    """Voxels to add before and after each axis to reach the next multiple of ``multiple``.

    The padding is split evenly, the odd voxel going after: ``before = total // 2``.

    Args:
        shape: spatial shape ``S``.
        multiple: the size every axis must be a multiple of (>= 1).
    Returns:
        One ``(before, after)`` pair per axis, in axis order.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    pairs = []
    for n in shape:
        total = (-n) % multiple
        pairs.append((total // 2, total - total // 2))
    return pairs


def pad_to_multiple(
    image: torch.Tensor, multiple: int, value: float = 0.0
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Pad ``(B, C, *S)`` with the constant ``value`` so that every spatial size is a multiple of ``multiple``.

    Returns:
        The padded image and the per-axis ``(before, after)`` padding (:func:`padding_for`), to give
        to :func:`crop`. When nothing needs padding the image itself is returned.
    """
    pairs = padding_for(image.shape[2:], multiple)
    if not any(before or after for before, after in pairs):
        return image, pairs
    flat = []
    # F.pad lists the last axis first.
    for before, after in reversed(pairs):
        flat += [before, after]
    return F.pad(image, flat, mode="constant", value=value), pairs


def crop(tensor: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Undo :func:`pad_to_multiple`: remove ``(before, after)`` voxels from each spatial axis of ``(B, C, *S)``."""
    index = [slice(None), slice(None)]
    for (before, after), n in zip(pairs, tensor.shape[2:]):
        index.append(slice(before, n - after))
    return tensor[tuple(index)]
