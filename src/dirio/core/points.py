"""Points mapped through a displacement field, in either direction: pure numpy functions.

Conventions: a field ``disp`` is ``(*S, ndim)`` in voxels (the Learn2Reg on-disk layout, see
:mod:`dirio.core.fields`); points are ``(N, ndim)`` voxel coordinates ``(i, j, k)`` of the field's
grid. The field maps a fixed-grid point ``x`` to the moving-grid point ``x + u(x)`` (the pull
convention of the images, ``warped(x) = moving(x + u(x))``, read for points), so

* :func:`displace_points` maps fixed -> moving: ``y = x + u(x)``;
* :func:`invert_points` maps moving -> fixed: the ``x`` with ``x + u(x) = y``, by the fixed-point
  iteration ``x_{k+1} = y - u(x_k)`` at the points only (no inverse field is needed).

``u`` is sampled at the points by :func:`scipy.ndimage.map_coordinates` with spline ``order``
(3: cubic B-spline with prefiltering, the Learn2Reg evaluator's choice; 1: trilinear) and its
``"constant"`` boundary mode (zero displacement far outside the grid), exactly as the TRE of
:func:`dirio.evaluation.landmarks.tre` samples it: that function calls :func:`sample_displacement`.
The spline coefficients are computed once per call (:func:`spline_coefficients`), so the
iteration costs one cheap evaluation at ``N`` points per step. Points are few; this runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_MODE = "constant"  # map_coordinates' default, the Learn2Reg evaluator's


def _check(disp: np.ndarray, points: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    field = np.asarray(disp, dtype=np.float64)
    ndim = field.shape[-1]
    if field.ndim != ndim + 1 or ndim not in (2, 3):
        raise ValueError(f"disp must have shape (*S, ndim) with ndim = 2 or 3, got {field.shape}")
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        array = np.zeros((0, ndim))
    if array.ndim != 2 or array.shape[1] != ndim:
        raise ValueError(f"points must have shape (N, {ndim}), got {array.shape}")
    if order not in range(6):
        raise ValueError(f"interpolation order must be an integer from 0 to 5, got {order!r}")
    return field, array


def spline_coefficients(disp: np.ndarray, order: int = 3) -> list[np.ndarray]:
    """Per component, what :func:`scipy.ndimage.map_coordinates` interpolates: the spline
    coefficients of ``disp[..., d]`` (``order > 1``, ``"constant"`` mode, float64: what
    ``map_coordinates(..., prefilter=True)`` computes internally) or the values themselves."""
    field = np.asarray(disp, dtype=np.float64)
    if order <= 1:
        return [field[..., d] for d in range(field.shape[-1])]
    return [ndimage.spline_filter(field[..., d], order, output=np.float64, mode=_MODE) for d in range(field.shape[-1])]


def _sample(coefficients: list[np.ndarray], points: np.ndarray, order: int) -> np.ndarray:
    if points.shape[0] == 0:
        return np.zeros((0, len(coefficients)))
    return np.stack([ndimage.map_coordinates(c, points.T, order=order, mode=_MODE, prefilter=False)
                     for c in coefficients], axis=1)


def sample_displacement(disp: np.ndarray, points: np.ndarray, order: int = 3) -> np.ndarray:
    """``u`` at the points: ``(N, ndim)`` float64 voxels (see the module docstring for the interpolation)."""
    field, array = _check(disp, points, order)
    return _sample(spline_coefficients(field, order), array, order)


def displace_points(points: np.ndarray, disp: np.ndarray, order: int = 3) -> np.ndarray:
    """Fixed-grid points -> moving-grid points: ``x + u(x)``, ``(N, ndim)`` float64 voxels."""
    field, array = _check(disp, points, order)
    return array + _sample(spline_coefficients(field, order), array, order)


@dataclass
class InvertedPoints:
    """Result of :func:`invert_points`.

    Attributes:
        points: ``(N, ndim)`` fixed-grid voxel coordinates ``x`` found for the moving points ``y``.
        residual: ``(N,)`` ``|x + u(x) - y|`` in voxels (0: exact).
        iterations: iterations run.
    """

    points: np.ndarray
    residual: np.ndarray
    iterations: int


def invert_points(points: np.ndarray, disp: np.ndarray, order: int = 3, iterations: int = 100,
                  tolerance: float = 1e-6) -> InvertedPoints:
    """Moving-grid points -> fixed-grid points: solve ``x + u(x) = y`` per point.

    Fixed-point iteration ``x_0 = y``, ``x_{k+1} = y - u(x_k)``, stopped when the largest change
    is at most ``tolerance`` voxels or after ``iterations``; it converges where the map
    ``x -> x + u(x)`` is one-to-one and ``u`` is a contraction (smooth fields), with the residual
    of each point reported (a point in a fold or pushed out of the grid keeps a large one).

    Args:
        points: ``(N, ndim)`` moving-grid voxel coordinates ``y``.
        disp: ``(*S, ndim)`` forward field (fixed grid) in voxels.
        order: interpolation order of ``u`` (as :func:`displace_points`).
    Returns:
        :class:`InvertedPoints`.
    """
    field, target = _check(disp, points, order)
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    coefficients = spline_coefficients(field, order)
    current = target.copy()
    ran = 0
    for ran in range(1, int(iterations) + 1):
        updated = target - _sample(coefficients, current, order)
        change = float(np.abs(updated - current).max()) if len(current) else 0.0
        current = updated
        if change <= tolerance:
            break
    residual = np.linalg.norm(current + _sample(coefficients, current, order) - target, axis=1)
    return InvertedPoints(current, residual, ran)
