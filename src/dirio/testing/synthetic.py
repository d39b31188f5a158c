"""Synthetic registration problems with a known answer: smooth random fields and warped pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from scipy.ndimage import gaussian_filter

from dirio.core.fields import warp


def smooth_random_field(
    shape: Sequence[int], sigma: float = 14.0, max_displacement: float = 8.0, seed: int = 0
) -> torch.Tensor:
    """A smooth random displacement: Gaussian-smoothed white noise, scaled to a given maximum.

    Each component is independent N(0, 1) noise smoothed with a Gaussian of standard deviation
    ``sigma`` voxels; the field is then scaled so that the largest absolute component over the
    whole grid equals ``max_displacement`` voxels.

    Args:
        shape: spatial shape (2 or 3 ints).
    Returns:
        ``(1, ndim, *shape)`` float32 displacement in voxels.
    """
    rng = np.random.default_rng(seed)
    # scipy's recursive-free separable filter with mirror boundaries: replicated borders would
    # create large correlated values at the edges and put the maximum there.
    smooth = np.stack([gaussian_filter(rng.standard_normal(tuple(shape)), sigma, mode="mirror") for _ in shape])
    smooth *= max_displacement / np.abs(smooth).max()
    return torch.from_numpy(smooth.astype(np.float32))[None]


@dataclass
class SyntheticPair:
    """A pair built from one image by a known warp.

    ``fixed(x) = image(x + true_disp(x))`` and ``moving = image``, so the displacement that
    registers ``moving`` to ``fixed`` (pull convention) is exactly ``true_disp``.
    Arrays are numpy: images ``S`` float32, labels ``S`` integer, ``true_disp`` ``(*S, ndim)``.
    """

    fixed: np.ndarray
    moving: np.ndarray
    true_disp: np.ndarray
    fixed_labels: np.ndarray | None = None
    moving_labels: np.ndarray | None = None


def warped_pair(
    image: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    sigma: float = 14.0,
    max_displacement: float = 8.0,
    noise_std: float = 0.01,
    seed: int = 0,
) -> SyntheticPair:
    """Build a registration pair with a known smooth deformation from one image (and its labels).

    The fixed image is the image warped by :func:`smooth_random_field` (trilinear; labels by
    nearest neighbour); independent Gaussian noise of standard deviation ``noise_std`` is added
    to both images (after the warp), with a generator seeded by ``seed``.
    """
    shape = image.shape
    disp = smooth_random_field(shape, sigma=sigma, max_displacement=max_displacement, seed=seed)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    fixed = warp(tensor, disp)[0, 0].numpy()
    rng = np.random.default_rng(seed + 1)
    fixed = (fixed + rng.normal(0.0, noise_std, shape)).astype(np.float32)
    moving = (np.asarray(image, dtype=np.float32) + rng.normal(0.0, noise_std, shape)).astype(np.float32)
    fixed_labels = moving_labels = None
    if labels is not None:
        label_tensor = torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64))[None, None]
        fixed_labels = warp(label_tensor, disp, mode="nearest")[0, 0].numpy().astype(labels.dtype)
        moving_labels = np.asarray(labels)
    true_disp = np.ascontiguousarray(disp[0].numpy().transpose(*range(1, len(shape) + 1), 0))
    return SyntheticPair(fixed, moving, true_disp, fixed_labels, moving_labels)


def endpoint_error(disp: np.ndarray, true_disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean Euclidean distance (voxels) between two ``(*S, ndim)`` fields, optionally inside ``mask``."""
    error = np.linalg.norm(np.asarray(disp) - np.asarray(true_disp), axis=-1)
    if mask is not None:
        error = error[np.asarray(mask, dtype=bool)]
    return float(error.mean())


def textured_pair(shape: Sequence[int] = (36, 36, 36), shift: float = 4.0, amplitude: float = 3.0,
                  seed: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small 3D pair of smoothed-noise texture in [0, 255] (uint8) with a known smooth motion.

    ``fixed`` is Gaussian-smoothed (sigma 1.5 voxels) normal noise scaled to [0, 1];
    ``moving(x) = fixed(x - u(x))`` (trilinear, edge values beyond the border) with
    ``u_a(x) = amplitude * sin(2 pi x_{a+1} / shape[0]) + shift * [a == 0]`` (voxels), so the pull
    field registering ``moving`` to ``fixed`` is about ``-u``: a few cells of ConvexAdam's discrete
    step and a smooth residual for its Adam stage. Both are quantised to uint8. Used by
    ``tests/test_convexadam_agreement.py`` and ``benchmarks/convexadam_reference.py``.

    Returns:
        ``fixed``, ``moving`` ``(*shape)`` uint8 and ``u`` ``(*shape, 3)`` float32 voxels.
    """
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(seed)
    image = gaussian_filter(rng.normal(size=tuple(shape)), 1.5)
    image = (image - image.min()) / (image.max() - image.min())
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    u = [amplitude * np.sin(2 * np.pi * grid[(a + 1) % 3] / shape[0]) + (shift if a == 0 else 0.0) for a in range(3)]
    moving = map_coordinates(image, [g - d for g, d in zip(grid, u)], order=1, mode="nearest")

    def quantise(a):
        return np.clip(np.rint(255 * a), 0, 255).astype(np.uint8)

    return quantise(image), quantise(moving), np.stack(u, axis=-1).astype(np.float32)


def oblique_affine(angle_degrees: float, spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """A 4x4 voxel -> world (mm) affine of an oblique, anisotropic grid: voxel sizes ``spacing``
    (3 values, mm), rotated by ``angle_degrees`` about the world z axis, voxel 0 at ``origin`` (mm)."""
    angle = np.radians(angle_degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([float(h) for h in spacing])
    affine[:3, 3] = [float(o) for o in origin]
    return affine
