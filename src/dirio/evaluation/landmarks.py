"""Target registration error (TRE) of corresponding keypoints, as the Learn2Reg evaluator's ``compute_tre``.

Inputs follow the conventions of :mod:`dirio.evaluation` (numpy arrays; fields ``(*S, ndim)`` in voxels).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from dirio.core.points import sample_displacement
from dirio.evaluation._checks import as_field, check_same_shape, spacing_array


def _as_points(points, ndim: int, name: str) -> np.ndarray:
    """Validate ``(N, ndim)`` voxel coordinates (an empty input gives ``(0, ndim)``)."""
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, ndim))
    if array.ndim != 2 or array.shape[1] != ndim:
        raise ValueError(f"{name} must have shape (N, {ndim}), got {array.shape}")
    return array


def tre(
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    disp: np.ndarray,
    spacing: Sequence[float],
    order: int = 3,
) -> np.ndarray:
    """Target registration error per point pair, in mm: ``||(p_f + u(p_f) - p_m) * spacing||``.

    ``u`` is sampled at the fixed points by ``scipy.ndimage.map_coordinates`` with spline
    ``order`` (3: cubic B-spline with prefiltering, the evaluator's default; 1: trilinear) and its
    default boundary mode (``"constant"``: zero displacement far outside the grid). The sampling is
    :func:`dirio.core.points.sample_displacement`. Learn2Reg
    multiplies by the moving image's spacing; fixed and moving share a grid here.

    Args:
        fixed_points, moving_points: ``(N, ndim)`` voxel coordinates ``(i, j, k)`` of corresponding
            points in the fixed and moving image.
        disp: ``(*S, ndim)`` displacement in voxels.
        spacing: voxel size (mm) per axis.
        order: interpolation order, 0 to 5.
    Returns:
        ``(N,)`` float64 errors in mm, >= 0, lower is better.
    """
    field = as_field(disp)
    ndim = field.shape[-1]
    fixed = _as_points(fixed_points, ndim, "fixed_points")
    moving = _as_points(moving_points, ndim, "moving_points")
    check_same_shape("fixed_points", fixed, "moving_points", moving)
    if order not in range(6):
        raise ValueError(f"interpolation order must be an integer from 0 to 5, got {order!r}")
    scale = spacing_array(spacing, ndim)
    if fixed.shape[0] == 0:
        return np.zeros(0)
    # one sampling for TRE and ``dirio transform-points`` (same numbers to the last bit)
    sampled = sample_displacement(field, fixed, order)
    return np.linalg.norm((fixed + sampled - moving) * scale, axis=1)
