"""How gradients are cut into units (scopes) and projected onto each other's normal planes, and
the diagnostics of a projection; the combination rules (:mod:`dirio.optim.combine`) use them.

Scope of the inner products (:class:`Scope`), for ``pcgrad`` and ``surgery``:

* ``global``: one inner product over all parameters, flattened (the PCGrad paper).
* ``level``: one inner product per pyramid level. The engine optimises one level at a time, each
  with its own parameter tensor(s), and a rule only sees the current level's parameters, so for
  dirio's engine this is the same set of numbers as ``global``; the name exists so that the
  choice reads as what it means for a multi-level run.
* ``tensor``: one inner product per parameter tensor (GSMorph's layer-wise rule for networks).
  A dense field is a single tensor, so for dense IO ``tensor`` equals ``global``.
* ``block``: for the parameters the transform tags as spatial fields ``(B, C, *S)`` (a dense
  field ``(1, ndim, *S)``; see ``Transform.spatial_parameters``), one inner product per spatial
  block of ``block_size`` voxels per axis of the parameter grid, all components of the block
  together (edge blocks are smaller); every other parameter (a Conv3d weight) is one unit. Everything is computed with reshapes and reductions, no loop over blocks.
  Reasoning: a global inner product of two dense-field gradients is a sum of local terms whose
  signs differ from place to place (the similarity pulls the field towards detail at edges, the
  regularizer pulls it back; in flat regions the similarity gradient is ~0). A single global
  decision projects everywhere or nowhere; per block, the projection happens only where the two
  objectives conflict locally and leaves the rest of the field untouched. A block (not a voxel)
  is the unit because the regularizer's gradient is a local second difference: per voxel its
  sign flips at the scale of one voxel and the decision would be noise; the default of 8 voxels
  is a little more than the 5-voxel support of the parameter smoothing and of the LNCC window at
  the finest level. Measured (benchmarks/combine_rules.py): blocks of 4, 8 and 16 voxels give
  the same accuracy and regularity within noise, and ~90 % of the active blocks conflict at the
  finest level -- near the weighted-sum equilibrium the two gradients are opposite locally as
  well as globally, so the local decision rarely differs from the global one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

SCOPES = ("global", "level", "tensor", "block")
# Default block edge in parameter-grid voxels (see the module docstring for why 8).
DEFAULT_BLOCK_SIZE = 8
# A unit's squared gradient norm below this fraction of the objective's total is rounding noise.
NOISE_FLOOR = 1e-12


# --- scopes: how gradients are cut into units with one inner product each --------------------------


def block_sums(values: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sums of ``values`` over blocks of ``block_size`` voxels per axis.

    Args:
        values: ``(*S)`` tensor (any number of axes).
        block_size: block edge in voxels (>= 1); the last block along an axis may be smaller.
    Returns:
        ``(*ceil(S / block_size))`` tensor of block sums.
    """
    shape = values.shape
    counts = [math.ceil(n / block_size) for n in shape]
    padding: list[int] = []
    for n, c in zip(reversed(shape), reversed(counts)):
        padding += [0, c * block_size - n]
    if any(padding):
        values = F.pad(values, padding)
    split: list[int] = []
    for c in counts:
        split += [c, block_size]
    return values.reshape(split).sum(dim=tuple(range(1, 2 * len(shape), 2)))


def block_map(coefficients: torch.Tensor, block_size: int, shape: Sequence[int]) -> torch.Tensor:
    """Spread one value per block back onto the voxels: the inverse layout of :func:`block_sums`.

    Args:
        coefficients: ``(*ceil(S / block_size))`` one value per block.
        shape: the voxel grid ``S``.
    Returns:
        ``(*S)`` tensor: every voxel holds its block's value.
    """
    counts = coefficients.shape
    view: list[int] = []
    expanded: list[int] = []
    for c in counts:
        view += [c, 1]
        expanded += [c, block_size]
    full = coefficients.reshape(view).expand(expanded).reshape([c * block_size for c in counts])
    return full[tuple(slice(0, n) for n in shape)]


def _flags(spatial: Sequence[bool] | None, count: int) -> list[bool]:
    """Per-parameter spatial flags; ``None`` means no parameter is a spatial field."""
    return [False] * count if spatial is None else [bool(s) for s in spatial]


class Scope:
    """Cuts a list of parameter gradients into units; each unit gets its own inner product.

    Args:
        kind: ``"global"``, ``"level"``, ``"tensor"`` or ``"block"`` (see the module docstring).
        block_size: block edge in parameter-grid voxels for ``"block"``.
    """

    def __init__(self, kind: str = "global", block_size: int = DEFAULT_BLOCK_SIZE):
        if kind not in SCOPES:
            raise ValueError(f"unknown scope {kind!r}; choose one of {', '.join(SCOPES)}")
        if int(block_size) != block_size or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.kind = kind
        self.block_size = int(block_size)

    def unit_count(self, tensors: Sequence[torch.Tensor], spatial: Sequence[bool] | None = None) -> int:
        """Number of units the gradients of ``tensors`` are cut into (``spatial``: per-tensor flags)."""
        if self.kind in ("global", "level"):
            return 1
        if self.kind == "tensor":
            return len(tensors)
        flags = _flags(spatial, len(tensors))
        return sum(
            math.prod(math.ceil(n / self.block_size) for n in t.shape[2:]) if s else 1 for t, s in zip(tensors, flags)
        )

    def dots(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], spatial: Sequence[bool] | None = None
             ) -> torch.Tensor:
        """Inner products ``<a, b>`` per unit: ``(U,)``; they sum to the global inner product."""
        if self.kind in ("global", "level"):
            return sum((x * y).sum() for x, y in zip(a, b)).reshape(1)
        if self.kind == "tensor":
            return torch.stack([(x * y).sum() for x, y in zip(a, b)])
        parts = []
        for x, y, s in zip(a, b, _flags(spatial, len(a))):
            if s:
                parts.append(block_sums((x * y).sum(dim=(0, 1)), self.block_size).reshape(-1))
            else:
                parts.append((x * y).sum().reshape(1))
        return torch.cat(parts)

    def axpy(self, coefficients: torch.Tensor, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor],
             spatial: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """``y + c_u * x`` with each unit's coefficient ``c_u`` applied to its part of ``x``.

        Args:
            coefficients: ``(U,)`` one coefficient per unit.
            x, y: gradients, one tensor per parameter.
            spatial: per-parameter spatial flags (``block`` scope).
        """
        if self.kind in ("global", "level"):
            return [yy + coefficients[0] * xx for xx, yy in zip(x, y)]
        if self.kind == "tensor":
            return [yy + coefficients[i] * xx for i, (xx, yy) in enumerate(zip(x, y))]
        out, start = [], 0
        for xx, yy, s in zip(x, y, _flags(spatial, len(x))):
            if s:
                spatial = xx.shape[2:]
                counts = [math.ceil(n / self.block_size) for n in spatial]
                count = math.prod(counts)
                local = block_map(coefficients[start:start + count].reshape(counts), self.block_size, spatial)
                out.append(yy + local * xx)
                start += count
            else:
                out.append(yy + coefficients[start] * xx)
                start += 1
        return out


# --- the projection ---------------------------------------------------------------------------------


@dataclass
class Projection:
    """Result of :func:`project_conflicting`.

    Attributes:
        grads: the projected gradients, same layout as the input (``K`` lists of tensors).
        projected: ``(K, U)`` bool, the units where each objective's gradient was projected.
        conflict: ``(U,)`` bool, the units where some pair of the original gradients conflicts.
        norms: ``K`` tensors ``(U,)``, squared norms of the original gradients per unit.
        dots: ``{(i, j): (U,)}`` inner products of the original gradients per unit (``i != j``).
    """

    grads: list[list[torch.Tensor]]
    projected: torch.Tensor
    conflict: torch.Tensor
    norms: list[torch.Tensor]
    dots: dict[tuple[int, int], torch.Tensor]


def project_conflicting(
    grads: Sequence[Sequence[torch.Tensor]],
    scope: Scope,
    priorities: torch.Tensor | None = None,
    order: Sequence[int] | None = None,
    spatial: Sequence[bool] | None = None,
) -> Projection:
    """Project conflicting gradients onto each other's normal planes, unit by unit.

    Objective ``i`` is projected, in turn for every other objective ``j`` (in ``order``) that it
    may be projected onto, when its current gradient conflicts with ``G_j`` (negative inner
    product in that unit): ``G_i <- G_i - <G_i, G_j> / ||G_j||^2 G_j`` (always onto the original
    ``G_j``, as in PCGrad). After one such projection ``<G_i, G_j> = 0`` in that unit; gradients
    that do not conflict are returned unchanged.

    Args:
        grads: ``K`` objectives, each a list of per-parameter gradient tensors (already weighted).
        scope: how the parameters are cut into units.
        priorities: ``(K, U)``; objective ``i`` may be projected onto ``j`` in unit ``u`` only
            where ``priorities[j, u] > priorities[i, u]`` (so the highest-priority objective of a
            unit is never projected and, for two objectives, exactly the lower one is). ``None``:
            every objective may be projected onto every other (Yu et al.'s original PCGrad).
        order: the order in which ``j`` is visited for each ``i`` (default ``0 .. K-1``).
        spatial: per-parameter spatial flags (``block`` scope).
    Returns:
        A :class:`Projection`.
    """
    count = len(grads)
    order = list(range(count)) if order is None else list(order)
    norms = [scope.dots(g, g, spatial) for g in grads]
    tiny = torch.finfo(norms[0].dtype).tiny
    pair_dots: dict[tuple[int, int], torch.Tensor] = {}
    for i in range(count):
        for j in range(i + 1, count):
            pair_dots[i, j] = pair_dots[j, i] = scope.dots(grads[i], grads[j], spatial)
    significant = [n > NOISE_FLOOR * n.sum() for n in norms]
    conflict = torch.zeros_like(norms[0], dtype=torch.bool)
    for value in pair_dots.values():
        conflict |= value < 0
    projected = [list(g) for g in grads]
    projected_mask = torch.zeros(count, norms[0].numel(), dtype=torch.bool, device=norms[0].device)
    for i in range(count):
        touched = False
        for j in order:
            if j == i:
                continue
            # the first projection of G_i uses the precomputed inner product of the originals
            dot = pair_dots[i, j] if not touched else scope.dots(projected[i], grads[j], spatial)
            # a unit where G_j is numerical noise (squared norm below 1e-12 of its total, e.g. the
            # exactly-zero regularizer gradient of a network's last bias) defines no direction
            allowed = (dot < 0) & significant[j]
            if priorities is not None:
                allowed = allowed & (priorities[j] > priorities[i])
            if not bool(allowed.any()):
                continue
            coefficient = torch.where(allowed, -dot / norms[j].clamp_min(tiny), torch.zeros_like(dot))
            projected[i] = scope.axpy(coefficient, grads[j], projected[i], spatial)
            projected_mask[i] |= allowed
            touched = True
    return Projection(projected, projected_mask, conflict, norms, pair_dots)


# --- diagnostics ---------------------------------------------------------------------------------------


class ConflictLog:
    """Running count of the run's conflicting steps (for ``conflict_rate``)."""

    def __init__(self):
        self.steps = 0
        self.conflicts = 0.0

    def add(self, conflict_fraction: float) -> float:
        """Record one step's conflict fraction; return the mean over the steps so far."""
        self.steps += 1
        self.conflicts += conflict_fraction
        return self.conflicts / self.steps


def cosine_from_products(dot: float, norm_a: float, norm_b: float) -> float:
    """Cosine from an inner product and two squared norms, in [-1, 1]; NaN when a vector is zero."""
    if norm_a <= 0.0 or norm_b <= 0.0:
        return float("nan")
    return max(-1.0, min(1.0, dot / math.sqrt(norm_a * norm_b)))


def _active_fraction(mask: torch.Tensor, active: torch.Tensor) -> float:
    """Fraction of the active units where ``mask`` holds (0 when no unit is active)."""
    count = int(active.sum())
    return float((mask & active).sum()) / count if count else 0.0


def projection_diagnostics(result: Projection, names: Sequence[str], log: ConflictLog,
                           data_count: int = 1) -> dict[str, float]:
    """The per-iteration diagnostics of a projection (objectives ``0 .. data_count-1`` are the data terms).

    ``cosine``: global cosine between the data terms' gradient and the sum of the others (from
    the per-unit products, which sum to the global ones); ``grad_norm_<name>``; ``conflict``:
    fraction of active units with a conflicting pair; ``conflict_rate``: its mean over the steps
    so far; ``projected_similarity`` / ``projected_regularizer``: fraction of active units where
    a data gradient / some other gradient was projected. A unit is active when the data gradient
    and at least one other gradient are nonzero in it.
    """
    count = len(result.norms)
    d = data_count
    norms = [float(n.sum()) for n in result.norms]

    def pair_sum(group_a, group_b):
        return sum(float(result.dots[i, j].sum()) for i in group_a for j in group_b if i != j)

    data, others_idx = range(d), range(d, count)
    data_norm = sum(norms[:d]) + 2.0 * sum(float(result.dots[i, j].sum()) for i in data for j in data if i < j)
    dot = pair_sum(data, others_idx)
    others = sum(norms[d:]) + 2.0 * sum(
        float(result.dots[i, j].sum()) for i in others_idx for j in others_idx if i < j
    )
    out = {"cosine": cosine_from_products(dot, data_norm, others)}
    out.update({f"grad_norm_{name}": math.sqrt(max(n, 0.0)) for name, n in zip(names, norms)})
    nonzero_other = torch.zeros_like(result.conflict)
    for n in result.norms[d:]:
        nonzero_other |= n > 0
    nonzero_data = torch.zeros_like(result.conflict)
    for n in result.norms[:d]:
        nonzero_data |= n > 0
    active = nonzero_data & nonzero_other
    conflict = _active_fraction(result.conflict, active)
    out.update(
        conflict=conflict,
        conflict_rate=log.add(conflict),
        projected_similarity=_active_fraction(result.projected[:d].any(dim=0), active),
        projected_regularizer=_active_fraction(result.projected[d:].any(dim=0), active),
    )
    return out
