"""The inverse of a displacement field, its residual, and inverse consistency: pure tensor functions.

Conventions (see :mod:`dirio.core.fields`): a field ``u`` is ``(B, ndim, *S)`` in voxels of its
grid and means the map ``x -> x + u(x)`` (a fixed-grid point ``x`` corresponds to the moving-grid
point ``x + u(x)``; images are pull-warped, ``warped(x) = moving(x + u(x))``). Its inverse ``v`` is
defined on the grid of the points it maps (the moving grid; dirio registers images on one grid,
so both have the shape ``S``) and satisfies ``x = y + v(y)`` whenever ``y = x + u(x)``, i.e.
``v(y) + u(y + v(y)) = 0``.

* :func:`invert_displacement`: the fixed-point step ``v_1(y) = -u(y)`` (the iteration
  ``v_{k+1}(y) = -u(y + v_k(y))`` of Chen et al., Med. Phys. 2008), then Newton steps on
  ``v + u(id + v) = 0`` (or fixed-point steps throughout); it converges where ``x -> x + u(x)`` is
  one-to-one, which smooth registration fields are almost everywhere; where the field folds there
  is no inverse and the residual stays large there.
* :func:`invert_velocity`: the exact inverse of the flow of a stationary velocity field:
  ``exp(v)^-1 = exp(-v)``, integrated by the same scaling and squaring.
* :func:`inverse_residual`: ``|v(y) + u(y + v(y))|`` per voxel, in voxels.
* :func:`inverse_consistency`: ``|u_fwd(x) + u_inv(x + u_fwd(x))|`` per voxel, in mm.

``u`` is sampled between voxels by (bi/tri)linear interpolation with border padding (a point
outside the grid takes the displacement of the nearest border voxel), as every warp of dirio.
Beyond the grid the padded field is constant, so a voxel whose inverse leaves the grid can show
a small residual without being inverted; the inverse consistency (measured the other way round)
catches it.
Every tensor stays on the input's device; nothing is copied to the host but the scalars that
:func:`field_statistics` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dirio.core.fields import (adjugate_of_entries, compose, determinant, identity_grid, integrate_velocity,
                               jacobian_matrix, sample, warp)

# Default stopping rule of the fixed-point iteration: at most this many iterations, fewer once the
# change of ``v`` in one iteration (= the residual of the previous iterate) is below the tolerance
# (voxels) at all but a fraction DEFAULT_UNCONVERGED_FRACTION of the voxels. Where the field folds
# (or sends points off the grid) the iteration does not converge: without that allowance a few such
# voxels would always run it to its limit. The iteration count bounds the time (one resampling of
# the field, and with Newton steps of its Jacobian, per iteration): on the OASIS brain field of
# benchmarks/inverse_accuracy.py (0.013 % det <= 0, which never converges) the mean residual after
# 6 / 10 / 15 / 30 steps was 0.028 / 0.0014 / 9e-5 / < 1e-4 voxel and the round trip 0.097 / 0.073 /
# 0.070 / 0.070 mm: 20 steps are within 0.001 mm of converged; smooth fields stop after 5-6.
DEFAULT_ITERATIONS = 20
DEFAULT_TOLERANCE_VOXELS = 1e-3
DEFAULT_UNCONVERGED_FRACTION = 1e-4
# Newton steps (see invert_displacement) are taken where det(I + grad u) at y + v(y) exceeds
# NEWTON_MIN_DET (elsewhere, near folds, the fixed-point step) and are at most
# NEWTON_MAX_STEP_VOXELS long (a trust region: without it a few voxels of the OASIS brain field of
# benchmarks/inverse_accuracy.py were thrown 124 voxels away). Both chosen on that field.
NEWTON_MIN_DET = 0.2
NEWTON_MAX_STEP_VOXELS = 1.0


@dataclass
class InverseField:
    """An inverse displacement and how well it inverts the forward one.

    Attributes:
        field: ``(B, ndim, *S)`` inverse displacement ``v`` in voxels of the moving grid.
        residual: ``(B, *S)`` ``|v(y) + u(y + v(y))|`` in voxels, per voxel of the moving grid.
        iterations: fixed-point iterations run (0 for an exact inverse).
        method: ``"fixed-point"`` or ``"exact"`` (the transform's own inverse, e.g. a negated velocity).
    """

    field: torch.Tensor
    residual: torch.Tensor
    iterations: int
    method: str

    def summary(self) -> dict:
        """JSON-ready ``{"method", "iterations", "residual_voxels_mean", "residual_voxels_max"}``."""
        stats = field_statistics(self.residual)
        return {"method": self.method, "iterations": int(self.iterations),
                "residual_voxels_mean": stats["mean"], "residual_voxels_max": stats["max"]}


def _check_field(disp: torch.Tensor, name: str) -> None:
    if disp.dim() not in (4, 5) or disp.shape[1] != disp.dim() - 2:
        raise ValueError(f"{name} must have shape (B, ndim, *S) with ndim = 2 or 3, got {tuple(disp.shape)}")


def inverse_residual(disp: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """How far ``inverse`` is from inverting ``disp``: ``|v(y) + u(y + v(y))|`` per voxel.

    Args:
        disp: ``(B, ndim, *S)`` forward displacement ``u`` in voxels.
        inverse: ``(B, ndim, *S)`` candidate inverse ``v`` in voxels (same grid).
    Returns:
        ``(B, *S)`` Euclidean norm in voxels, >= 0 (0: exact inverse at that voxel).
    """
    _check_field(disp, "disp")
    _check_field(inverse, "inverse")
    if disp.shape != inverse.shape:
        raise ValueError(f"disp {tuple(disp.shape)} and inverse {tuple(inverse.shape)} differ in shape")
    # compose(first=u, second=v) = v + u o (id + v): the map y -> y + v(y) -> that point + u(.)
    return torch.linalg.vector_norm(compose(disp, inverse), dim=1)


def invert_displacement(disp: torch.Tensor, iterations: int = DEFAULT_ITERATIONS,
                        tolerance: float = DEFAULT_TOLERANCE_VOXELS, init: torch.Tensor | None = None,
                        unconverged_fraction: float = DEFAULT_UNCONVERGED_FRACTION,
                        newton: bool = True) -> InverseField:
    """Invert a displacement field: solve ``v(y) + u(y + v(y)) = 0`` at every voxel ``y``.

    The first iterate is the fixed-point step from ``init`` (default 0): ``v_1 = -u(y + v_0(y))``.
    Then, with ``newton`` (the default), Newton steps on that equation:
    ``v <- v - J(y + v)^-1 r(y)`` with the residual ``r = v + u(y + v)`` and ``J = I + grad u``
    (central differences, sampled like ``u``), falling back to the fixed-point step ``v <- v - r``
    where ``det J <= NEWTON_MIN_DET`` (near a fold), each step at most ``NEWTON_MAX_STEP_VOXELS``
    long. Without ``newton``, every step is the fixed-point step ``v_{k+1}(y) = -u(y + v_k(y))``,
    whose error shrinks by ``|grad u|`` per step: slowly where a real field compresses or expands
    strongly (on the OASIS brain field of ``benchmarks/inverse_accuracy.py``: mean residual 0.18
    voxel after 30 steps, against 0.0014 after 10 steps with Newton steps).

    Stops after ``iterations``, or earlier once the step is at most ``tolerance`` (largest
    component) at all voxels but a fraction ``unconverged_fraction`` of them. The residual of the
    returned field is computed anew (one more resampling); its maximum shows the voxels that did
    not converge.

    Args:
        disp: ``(B, ndim, *S)`` forward displacement ``u`` in voxels.
        iterations: largest number of steps (the first fixed-point step included), >= 1.
        tolerance: stopping tolerance in voxels, >= 0 (0: always run ``iterations``).
        init: optional ``(B, ndim, *S)`` starting inverse.
        unconverged_fraction: fraction of voxels, in [0, 1), allowed above the tolerance when
            stopping (voxels in folds or sent off the grid never converge).
        newton: Newton steps after the first (else fixed-point steps throughout).
    Returns:
        An :class:`InverseField` (``method`` ``"newton"`` or ``"fixed-point"``), every tensor on
        ``disp``'s device.
    """
    _check_field(disp, "disp")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    if not 0 <= unconverged_fraction < 1:
        raise ValueError(f"unconverged_fraction must lie in [0, 1), got {unconverged_fraction!r}")
    ndim = disp.shape[1]
    with torch.no_grad():
        inverse = torch.zeros_like(disp) if init is None else init.to(device=disp.device, dtype=disp.dtype)
        stacked = identity = None
        if newton:  # u and its Jacobian, sampled together at y + v(y)
            stacked = torch.cat([disp, jacobian_matrix(disp).flatten(1, 2)], dim=1)
            identity = identity_grid(disp.shape[2:], device=disp.device, dtype=disp.dtype).unsqueeze(0)
        ran = 0
        for ran in range(1, int(iterations) + 1):
            if newton and ran > 1:
                sampled = sample(stacked, identity + inverse)
                residual = inverse + sampled[:, :ndim]
                step = _newton_step(sampled[:, ndim:].unflatten(1, (ndim, ndim)), residual)
            else:  # the fixed-point step: v - (v + u(y + v)) = -u(y + v)
                step = inverse + warp(disp, inverse)
            inverse = inverse - step
            moved = step.abs().amax(dim=1) > tolerance  # (B, *S): not converged yet
            if tolerance > 0 and float(moved.float().mean()) <= unconverged_fraction:
                break
        return InverseField(inverse, inverse_residual(disp, inverse), ran, "newton" if newton else "fixed-point")


def _newton_step(jac: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``J^-1 r`` per voxel (``r`` where ``det J <= NEWTON_MIN_DET``), shortened to ``NEWTON_MAX_STEP_VOXELS``.

    Args:
        jac: ``(B, n, n, *S)`` Jacobians ``[:, c, a] = d(x + u)_c / dx_a``; residual: ``(B, n, *S)``.
    Returns:
        ``(B, n, *S)`` step in voxels.
    """
    n = residual.shape[1]
    det = determinant(jac)
    adjugate = adjugate_of_entries([[jac[:, r, k] for k in range(n)] for r in range(n)])
    safe = det > NEWTON_MIN_DET
    scale = torch.where(safe, 1.0 / torch.where(safe, det, torch.ones_like(det)), torch.zeros_like(det))
    newton = torch.stack([sum(adjugate[r][k] * residual[:, k] for k in range(n)) * scale for r in range(n)], dim=1)
    step = torch.where(safe.unsqueeze(1), newton, residual)
    length = torch.linalg.vector_norm(step, dim=1, keepdim=True)
    return step * torch.clamp(NEWTON_MAX_STEP_VOXELS / length.clamp_min(1e-12), max=1.0)


def invert_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Displacement of the inverse flow of a stationary velocity field: ``exp(-v)`` by scaling and squaring.

    Args:
        velocity: ``(B, ndim, *S)`` velocity in voxels per unit time.
        steps: squarings, as used for the forward flow (:func:`dirio.core.fields.integrate_velocity`).
    Returns:
        ``(B, ndim, *S)`` displacement ``v`` with ``x + v(x)`` the time-1 flow of ``-velocity``.
    """
    _check_field(velocity, "velocity")
    return integrate_velocity(-velocity, steps)


def inverse_consistency(forward: torch.Tensor, inverse: torch.Tensor,
                        spacing: Sequence[float] | None = None) -> torch.Tensor:
    """Inverse-consistency error ``|u_fwd(x) + u_inv(x + u_fwd(x))|`` per voxel of the fixed grid, in mm.

    A point ``x`` sent through the forward map and back through the inverse lands at
    ``x + u_fwd(x) + u_inv(x + u_fwd(x))``; this is its distance from ``x``.

    Args:
        forward: ``(B, ndim, *S)`` forward displacement in voxels (fixed grid).
        inverse: ``(B, ndim, *S)`` inverse displacement in voxels (moving grid, same shape).
        spacing: voxel size in mm per axis (``None``: 1, the result is then in voxels).
    Returns:
        ``(B, *S)`` errors in mm, >= 0.
    """
    _check_field(forward, "forward")
    _check_field(inverse, "inverse")
    if forward.shape != inverse.shape:
        raise ValueError(f"forward {tuple(forward.shape)} and inverse {tuple(inverse.shape)} differ in shape")
    error = compose(inverse, forward)  # u_fwd + u_inv o (id + u_fwd)
    ndim = forward.shape[1]
    if spacing is not None:
        if len(spacing) != ndim:
            raise ValueError(f"spacing needs {ndim} values, got {tuple(spacing)}")
        scale = torch.tensor([float(h) for h in spacing], device=error.device, dtype=error.dtype)
        error = error * scale.view(1, ndim, *([1] * ndim))
    return torch.linalg.vector_norm(error, dim=1)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of all ``values`` with linear interpolation between order statistics
    (numpy's default), for tensors of any size (``torch.quantile`` refuses more than 2**24 values).

    Returns:
        A 0-d tensor on ``values``' device.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must lie in [0, 1], got {q!r}")
    flat = values.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("quantile of an empty tensor")
    position = (n - 1) * q
    lower = int(position)
    upper = min(lower + 1, n - 1)
    low = torch.kthvalue(flat, lower + 1).values
    if upper == lower:
        return low
    high = torch.kthvalue(flat, upper + 1).values
    return low + (high - low) * (position - lower)


def field_statistics(errors: torch.Tensor) -> dict:
    """``{"mean", "p95", "max"}`` of a per-voxel error map as Python floats (one host copy of three numbers)."""
    stats = torch.stack([errors.mean(), quantile(errors, 0.95), errors.amax()]).double().cpu().tolist()
    return {"mean": stats[0], "p95": stats[1], "max": stats[2]}


def inverse_consistency_summary(forward: torch.Tensor, inverse: torch.Tensor,
                                spacing: Sequence[float] | None = None) -> dict:
    """JSON-ready ``{"inverse_consistency_mm_mean", "inverse_consistency_mm_p95", "inverse_consistency_mm_max"}``
    of :func:`inverse_consistency` over the whole grid."""
    stats = field_statistics(inverse_consistency(forward, inverse, spacing))
    return {f"inverse_consistency_mm_{key}": value for key, value in stats.items()}
