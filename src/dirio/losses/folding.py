"""The folding penalty: a hinge on the Jacobian determinant of ``x -> x + u(x)``.

``det(I + du/dx) <= 0`` is where a map folds (the evaluators' ``% det <= 0``). The smoothness
regularizers (:mod:`dirio.losses.regularizers`) only discourage folds through large derivatives
everywhere; :class:`Folding` penalises the determinant itself, and only where it falls below a
margin, so it leaves an unfolded field alone. Its gradient is non-zero at those few voxels only,
so the backward pass visits just them (:class:`_FoldingHinge`): the cofactors of the Jacobian at
each active voxel (its adjugate, :func:`dirio.core.fields.adjugate_of_entries`), scattered onto the displacement through the difference stencil.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch.autograd.function import once_differentiable

from dirio.core.fields import adjugate_of_entries, determinant_of_entries
from dirio.losses.field_regularizer import Regularizer, check_field, spacing_tuple

__all__ = ["Folding", "corner_stencils", "stencil_determinant", "STENCILS"]

#: Difference stencils of the Jacobian along each axis ``a`` at an interior voxel ``x``:
#: ``(u[x + plus e_a] - u[x + minus e_a]) / (divisor h_a)`` as (plus, minus, divisor).
STENCILS = {"central": (1, -1, 2.0), "forward": (1, 0, 1.0), "backward": (0, -1, 1.0)}


def _axis_stencils(stencil: str | tuple[str, ...], ndim: int) -> list[tuple[int, int, float]]:
    """``(plus, minus, divisor)`` of each axis: one stencil name for every axis, or one name per axis
    (e.g. ``("forward", "backward", "forward")``: a corner determinant of the voxel's cube)."""
    names = (stencil,) * ndim if isinstance(stencil, str) else tuple(stencil)
    if len(names) != ndim or any(name not in STENCILS for name in names):
        raise ValueError(f"unknown Jacobian stencil {stencil!r}; choose one of {', '.join(STENCILS)} "
                         f"(or one per axis)")
    return [STENCILS[name] for name in names]


def corner_stencils(ndim: int) -> tuple[tuple[str, ...], ...]:
    """The ``2**ndim`` corner stencils: forward or backward differences chosen per axis. Their
    determinants are the corner tetrahedra of the non-diffeomorphic volume (NDV,
    :mod:`dirio.evaluation.jacobian`): an oscillation along one axis against another can fold them
    while the central, all-forward and all-backward determinants stay positive."""
    return tuple(itertools.product(("forward", "backward"), repeat=ndim))


def _check(disp: torch.Tensor, stencil: str | tuple[str, ...]) -> int:
    ndim = check_field(disp)
    _axis_stencils(stencil, ndim)
    if any(n < 3 for n in disp.shape[2:]):
        raise ValueError(f"the Jacobian needs at least 3 voxels per axis, got {tuple(disp.shape[2:])}")
    return ndim


def _interior_jacobian(disp: torch.Tensor, steps: Sequence[float], stencil: str | tuple[str, ...],
                       columns: dict | None = None) -> list[list[torch.Tensor]]:
    """``jac[c][a] = delta_ca + d u_c / d x_a`` on the interior voxels, each ``(B, *(S - 2))``.

    ``columns``: a dict shared by the stencils of one field, which then compute each axis's
    difference once (the corner stencils reuse the forward and backward ones).
    """
    ndim = disp.dim() - 2
    jac_columns = []
    for a, (plus, minus, divisor) in enumerate(_axis_stencils(stencil, ndim)):
        key = (a, plus, minus)
        if columns is not None and key in columns:
            jac_columns.append(columns[key])
            continue
        n = disp.shape[2 + a]
        derivative = (disp.narrow(2 + a, 1 + plus, n - 2) - disp.narrow(2 + a, 1 + minus, n - 2)) / (divisor * steps[a])
        for b in range(ndim):
            if b != a:
                derivative = derivative.narrow(2 + b, 1, disp.shape[2 + b] - 2)
        column = [derivative[:, c] + (1.0 if a == c else 0.0) for c in range(ndim)]
        if columns is not None:
            columns[key] = column
        jac_columns.append(column)
    return [[jac_columns[a][c] for a in range(ndim)] for c in range(ndim)]


def stencil_determinant(disp: torch.Tensor, spacing: float | Sequence[float] | None = None,
                         stencil: str | tuple[str, ...] = "central") -> torch.Tensor:
    """``det(I + du/dx)`` by finite differences on the interior voxels (differentiable).

    Args:
        disp: ``(B, ndim, *S)`` field in fine voxels (``ndim`` 2 or 3, every side at least 3).
        spacing: grid spacing per axis in fine voxels.
        stencil: ``"central"``: ``(u[x + e_a] - u[x - e_a]) / (2 h_a)`` (the evaluator's Jacobian,
            :mod:`dirio.evaluation.jacobian`); ``"forward"``: ``(u[x + e_a] - u[x]) / h_a``;
            ``"backward"``: ``(u[x] - u[x - e_a]) / h_a`` (two corner tetrahedra of the
            non-diffeomorphic volume; the central stencil cannot see an odd-even oscillation fold);
            or one of those per axis (:func:`corner_stencils`).
    Returns:
        ``(B, *(S - 2))``: the determinant at every voxel one away from each border. 1 for a
        translation, ``det(I + A)`` for ``u = A x``.
    """
    ndim = _check(disp, stencil)
    return determinant_of_entries(_interior_jacobian(disp, spacing_tuple(spacing, ndim), stencil))


def _shared_determinant(jac: list[list[torch.Tensor]], stencil: str | tuple[str, ...], minors: dict) -> torch.Tensor:
    """``det(jac)`` expanded along its first column. In 3D the 2x2 minors of the other two columns
    are kept in ``minors``, keyed by those columns' differences, so the stencils of one slab that
    share them (the corner stencils: 4 pairs for 8 stencils) compute them once."""
    ndim = len(jac)
    if ndim != 3:
        return determinant_of_entries(jac)
    axes = _axis_stencils(stencil, ndim)
    key = tuple((a, *axes[a][:2]) for a in (1, 2))
    minor = minors.get(key)
    if minor is None:
        (_, b, c), (_, e, f), (_, h, i) = jac
        minor = minors[key] = (e * i - f * h, b * i - c * h, b * f - c * e)
    return jac[0][0] * minor[0] - jac[1][0] * minor[1] + jac[2][0] * minor[2]


#: Elements of one component of a slab of the field (rows of the first spatial axis per slab).
_SLAB_ELEMENTS = 1 << 18


def _slab_rows(disp: torch.Tensor) -> int:
    """Interior rows of the first spatial axis per slab (all of them off the CPU: one pass)."""
    if disp.device.type != "cpu":
        return max(disp.shape[2] - 2, 1)
    per_row = disp.shape[0] * math.prod(disp.shape[3:])
    return max(1, _SLAB_ELEMENTS // max(per_row, 1))


class _FoldingHinge(torch.autograd.Function):
    """``sum_stencils mean_x relu(margin - det)`` with a backward pass over the active voxels only.

    The forward (slab by slab along the first spatial axis) keeps, per stencil, the flat grid
    indices of the interior voxels where ``det < margin`` and the Jacobian there; the backward adds
    ``-grad / N * cofactor`` onto the two voxels of each difference (one ``index_add_`` per stencil).
    """

    @staticmethod
    def forward(ctx, disp, steps, margin, stencils):
        interior = (disp.shape[0], *(n - 2 for n in disp.shape[2:]))
        count = math.prod(interior)
        total = disp.new_zeros((), dtype=torch.float64)
        found = {stencil: [] for stencil in stencils}  # (flat index, jac at it) per slab
        rows = _slab_rows(disp)
        grid_strides = _contiguous_strides(disp.shape)
        with torch.no_grad():
            # slabs of interior rows along the first spatial axis (with a one-row halo each side),
            # so that the ~20 temporaries of a determinant stay small and are reused
            for start in range(0, interior[1], rows):
                slab = disp.narrow(2, start, min(rows, interior[1] - start) + 2)
                columns, minors = {}, {}
                for stencil in stencils:
                    jac = _interior_jacobian(slab, steps, stencil, columns)
                    det = _shared_determinant(jac, stencil, minors)
                    active = det < margin
                    if not bool(active.any()):
                        continue
                    total += (margin - det[active]).sum(dtype=torch.float64)
                    local, grid = _active_indices(active, start, grid_strides)
                    found[stencil].append((grid, [[torch.take(j, local) for j in row] for row in jac]))
        saved = []
        for stencil, parts in found.items():
            if parts:
                ndim = len(parts[0][1])
                values = [[torch.cat([p[1][c][a] for p in parts]) for a in range(ndim)] for c in range(ndim)]
                saved.append((stencil, torch.cat([p[0] for p in parts]), values))
        ctx.saved = saved
        ctx.steps, ctx.count, ctx.shape = steps, count, disp.shape
        return (total / count).to(disp.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        shape, steps = ctx.shape, ctx.steps
        ndim = len(shape) - 2
        out = grad.new_zeros(shape)
        strides = _contiguous_strides(shape)
        for stencil, index, jac in ctx.saved:
            axes = _axis_stencils(stencil, ndim)
            adjugate = adjugate_of_entries(jac)  # d det / d jac[c][a] = adjugate[a][c]
            targets, weights = [], []
            for c in range(ndim):
                at_channel = index + c * strides[1]
                for a, (plus, minus, divisor) in enumerate(axes):
                    # d value / d u_c[x + plus e_a] = -cof / (divisor h_a N); the minus voxel the opposite
                    weight = adjugate[a][c] * (-grad / (ctx.count * divisor * steps[a]))
                    targets += [at_channel + plus * strides[2 + a], at_channel + minus * strides[2 + a]]
                    weights += [weight, -weight]
            out.view(-1).index_add_(0, torch.cat(targets), torch.cat(weights))
        return out, None, None, None


def _contiguous_strides(shape) -> list[int]:
    """Element strides of a contiguous tensor of ``shape``."""
    strides = [1] * len(shape)
    for k in range(len(shape) - 2, -1, -1):
        strides[k] = strides[k + 1] * shape[k + 1]
    return strides


def _active_indices(active: torch.Tensor, start: int, strides: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of a slab's active interior voxels: into the slab's (contiguous) determinant,
    and into the whole ``(B, ndim, *S)`` field at channel 0; the slab begins at interior row ``start``."""
    index = active.nonzero(as_tuple=True)
    local = torch.zeros_like(index[0])
    grid = index[0] * strides[0]
    for k, (position, size) in enumerate(zip(index, active.shape)):
        local = local * size + position
        if k:
            grid = grid + (position + 1 + (start if k == 1 else 0)) * strides[k + 1]
    return local, grid


class Folding(Regularizer):
    """Folding penalty: ``mean_x max(0, margin - det(I + du/dx))`` over the interior voxels.

    0 wherever the map keeps at least ``margin`` of the local volume (a translation, any smooth
    field), so unlike the smoothness terms it leaves an unfolded field alone and pushes only where
    the map folds (``det <= 0``) or nearly does. ``stencils="all"`` sums the hinge of the central,
    forward and backward determinants (:func:`stencil_determinant`): the central one alone is
    blind to an odd-even oscillation, which an unsmoothed field can then grow. ``"corners"`` sums
    the central and every corner determinant (:func:`corner_stencils`; 9 in 3D), which also sees an
    oscillation along one axis against another, the folds of the non-diffeomorphic volume's corner
    tetrahedra. Units: a volume ratio; invariant to the grid size for a field with constant
    derivatives. ``margin`` in (0, 1]. Used by the refinement of network fields
    (:mod:`dirio.methods.refine`, with ``"corners"``).
    """

    name = "folding"

    def __init__(self, margin: float = 0.1, stencils: str = "all"):
        if not 0.0 < float(margin) <= 1.0:
            raise ValueError(f"folding margin must be in (0, 1], got {margin!r}")
        if stencils not in ("all", "corners", *STENCILS):
            raise ValueError(f"folding stencils must be all, corners, {', '.join(STENCILS)}, got {stencils!r}")
        self.margin = float(margin)
        self.stencils = stencils

    def __call__(self, disp, spacing=None):
        ndim = check_field(disp)
        names = _stencil_names(self.stencils, ndim)
        _check(disp, names[0])
        return _FoldingHinge.apply(disp, spacing_tuple(spacing, ndim), self.margin, names)


def _stencil_names(stencils: str, ndim: int) -> tuple:
    """The determinants a :class:`Folding` of ``stencils`` sums, by stencil (a name or one per axis)."""
    if stencils == "all":
        return tuple(STENCILS)
    if stencils == "corners":
        return ("central", *corner_stencils(ndim))
    return (stencils,)


def folding_reference(disp: torch.Tensor, spacing=None, margin: float = 0.1, stencils: str = "all") -> torch.Tensor:
    """:class:`Folding` by plain autograd (the specification the sparse backward is tested against)."""
    names = _stencil_names(stencils, disp.dim() - 2)
    return sum(torch.relu(margin - stencil_determinant(disp, spacing, name)).mean() for name in names)
