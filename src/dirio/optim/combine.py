"""Gradient combination rules: how the separately kept objectives become one update direction.

A rule receives every objective's scalar loss and its weight, and leaves the combined gradient
in ``param.grad`` of every optimised parameter; the optimiser (Adam, AMSGrad, SGD) then consumes
it. Rules therefore never depend on the optimiser. A rule returns a dict of diagnostics (floats)
that the engine logs with the iteration.

Rules (chosen by name, :data:`COMBINE_RULES`):

* ``sum`` (:class:`WeightedSum`): the gradient of ``sum_k w_k L_k``, one backward pass.
* ``pcgrad`` (:class:`PCGrad`): projecting conflicting gradients (Yu et al., NeurIPS 2020, as used
  for registration instance optimisation by Zhang, Zhao and Tao, Learn2Reg 2024). Each weighted
  gradient ``G_k = w_k grad L_k`` is kept separately; where two of them have a negative inner
  product, one is replaced by its projection onto the normal plane of the other,
  ``G_i <- G_i - <G_i, G_j> / ||G_j||^2 G_j``, and the (projected) gradients are summed.
* ``surgery`` (:class:`GradientSurgery`): GSMorph's rule (Dou et al., MICCAI 2023): the update
  is the similarity gradient alone, projected onto the normal plane of the regularisation
  gradient where the two conflict. No weight to tune.

Conventions every rule relies on: ``losses`` is ordered, **the similarity first**, then the
regularisers (the engine builds it that way); weights are the objectives' weights (a weight of 0
drops the objective and its backward pass). Separate gradients cost one backward pass per
objective (``torch.autograd.grad``; the graph is retained for all passes but the last, and the
similarity, whose backward dominates the cost, goes last so that its graph is never retained).

Scope of the inner products (:class:`Scope`), for ``pcgrad`` and ``surgery``:

* ``global``: one inner product over all parameters, flattened (the PCGrad paper).
* ``level``: one inner product per pyramid level. The engine optimises one level at a time, each
  with its own parameter tensor(s), and a rule only sees the current level's parameters, so for
  dirio's engine this is the same set of numbers as ``global``; the name exists so that the
  choice reads as what it means for a multi-level run.
* ``tensor``: one inner product per parameter tensor (GSMorph's layer-wise rule for networks).
  A dense field is a single tensor, so for dense IO ``tensor`` equals ``global``.
* ``block``: for tensors with spatial axes ``(B, C, *S)`` (a dense field ``(1, ndim, *S)``), one
  inner product per spatial block of ``block_size`` voxels per axis of the parameter grid, all
  components of the block together (edge blocks are smaller); tensors without spatial axes are
  one unit each. Everything is computed with reshapes and reductions, no loop over blocks.
  Reasoning: a global inner product of two dense-field gradients is a sum of local terms whose
  signs differ from place to place (the similarity pulls the field towards detail at edges, the
  regulariser pulls it back; in flat regions the similarity gradient is ~0). A single global
  decision projects everywhere or nowhere; per block, the projection happens only where the two
  objectives conflict locally and leaves the rest of the field untouched. A block (not a voxel)
  is the unit because the regulariser's gradient is a local second difference: per voxel its
  sign flips at the scale of one voxel and the decision would be noise; the default of 8 voxels
  is a little more than the 5-voxel support of the parameter smoothing and of the LNCC window at
  the finest level. Measured (benchmarks/combine_rules.py): blocks of 4, 8 and 16 voxels give
  the same accuracy and regularity within noise, and ~90 % of the active blocks conflict at the
  finest level -- near the weighted-sum equilibrium the two gradients are opposite locally as
  well as globally, so the local decision rarely differs from the global one.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch
import torch.nn.functional as F

SCOPES = ("global", "level", "tensor", "block")
PROJECT_CHOICES = ("random", "similarity", "regularizer", "all")
# Default block edge in parameter-grid voxels (see the module docstring for why 8).
DEFAULT_BLOCK_SIZE = 8


class CombineRule(Protocol):
    """Turns separate objectives into gradients on the parameters."""

    name: str

    def backward(
        self, losses: Mapping[str, torch.Tensor], weights: Mapping[str, float], params: Sequence[torch.Tensor]
    ) -> dict[str, float]:
        """Set ``p.grad`` for every ``p`` in ``params``; return diagnostics for the log.

        ``losses`` is ordered: the similarity first, then the regularisers.
        """


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


def _is_spatial(tensor: torch.Tensor) -> bool:
    """A ``(B, C, *S)`` tensor with 2 or 3 spatial axes (a dense 2D or 3D field)."""
    return 4 <= tensor.dim() <= 5


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

    def unit_count(self, tensors: Sequence[torch.Tensor]) -> int:
        """Number of units the gradients of ``tensors`` are cut into."""
        if self.kind in ("global", "level"):
            return 1
        if self.kind == "tensor":
            return len(tensors)
        return sum(
            math.prod(math.ceil(n / self.block_size) for n in t.shape[2:]) if _is_spatial(t) else 1 for t in tensors
        )

    def dots(self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
        """Inner products ``<a, b>`` per unit: ``(U,)``; they sum to the global inner product."""
        if self.kind in ("global", "level"):
            return sum((x * y).sum() for x, y in zip(a, b)).reshape(1)
        if self.kind == "tensor":
            return torch.stack([(x * y).sum() for x, y in zip(a, b)])
        parts = []
        for x, y in zip(a, b):
            if _is_spatial(x):
                parts.append(block_sums((x * y).sum(dim=(0, 1)), self.block_size).reshape(-1))
            else:
                parts.append((x * y).sum().reshape(1))
        return torch.cat(parts)

    def axpy(self, coefficients: torch.Tensor, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``y + c_u * x`` with each unit's coefficient ``c_u`` applied to its part of ``x``.

        Args:
            coefficients: ``(U,)`` one coefficient per unit.
            x, y: gradients, one tensor per parameter.
        """
        if self.kind in ("global", "level"):
            return [yy + coefficients[0] * xx for xx, yy in zip(x, y)]
        if self.kind == "tensor":
            return [yy + coefficients[i] * xx for i, (xx, yy) in enumerate(zip(x, y))]
        out, start = [], 0
        for xx, yy in zip(x, y):
            if _is_spatial(xx):
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
    Returns:
        A :class:`Projection`.
    """
    count = len(grads)
    order = list(range(count)) if order is None else list(order)
    norms = [scope.dots(g, g) for g in grads]
    tiny = torch.finfo(norms[0].dtype).tiny
    pair_dots: dict[tuple[int, int], torch.Tensor] = {}
    for i in range(count):
        for j in range(i + 1, count):
            pair_dots[i, j] = pair_dots[j, i] = scope.dots(grads[i], grads[j])
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
            dot = pair_dots[i, j] if not touched else scope.dots(projected[i], grads[j])
            allowed = dot < 0
            if priorities is not None:
                allowed = allowed & (priorities[j] > priorities[i])
            if not bool(allowed.any()):
                continue
            coefficient = torch.where(allowed, -dot / norms[j].clamp_min(tiny), torch.zeros_like(dot))
            projected[i] = scope.axpy(coefficient, grads[j], projected[i])
            projected_mask[i] |= allowed
            touched = True
    return Projection(projected, projected_mask, conflict, norms, pair_dots)


# --- gradients and diagnostics ---------------------------------------------------------------------


def objective_gradients(
    losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
) -> list[list[torch.Tensor]]:
    """The gradient of each (already weighted) loss w.r.t. ``params``: one backward pass each.

    The graph is retained for every pass but the last, so the loss whose graph is the largest
    should come last. Parameters a loss does not depend on get zeros.
    """
    grads = []
    for index, loss in enumerate(losses):
        if not loss.requires_grad:
            grads.append([torch.zeros_like(p) for p in params])
            continue
        parts = torch.autograd.grad(loss, params, retain_graph=index < len(losses) - 1, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, parts)])
    return grads


def _separate_gradients(losses, weights, names, params):
    """Weighted gradients of the similarity (``names[0]``) and of each regulariser.

    The regularisers' passes run first with the graph retained; the similarity's runs last.
    """
    ordered = names[1:] + names[:1]
    grads = objective_gradients([weights[n] * losses[n] for n in ordered], params)
    return grads[-1], grads[:-1]


def _set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.detach().to(dtype=p.dtype).contiguous()


def _summed(grads: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not grads:
        return [torch.zeros_like(p) for p in params]
    return [sum(parts) for parts in zip(*grads)]


class _ConflictLog:
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


def projection_diagnostics(result: Projection, names: Sequence[str], log: _ConflictLog) -> dict[str, float]:
    """The per-iteration diagnostics of a projection (objective 0 is the similarity).

    ``cosine``: global cosine between the similarity gradient and the sum of the others (from
    the per-unit products, which sum to the global ones); ``grad_norm_<name>``; ``conflict``:
    fraction of active units with a conflicting pair; ``conflict_rate``: its mean over the steps
    so far; ``projected_similarity`` / ``projected_regularizer``: fraction of active units where
    the similarity / some other gradient was projected. A unit is active when the similarity
    gradient and at least one other gradient are nonzero in it.
    """
    count = len(result.norms)
    norms = [float(n.sum()) for n in result.norms]
    dot = sum(float(result.dots[0, j].sum()) for j in range(1, count))
    others = sum(norms[1:]) + 2.0 * sum(
        float(result.dots[i, j].sum()) for i in range(1, count) for j in range(i + 1, count)
    )
    out = {"cosine": cosine_from_products(dot, norms[0], others)}
    out.update({f"grad_norm_{name}": math.sqrt(max(n, 0.0)) for name, n in zip(names, norms)})
    nonzero_other = torch.zeros_like(result.conflict)
    for n in result.norms[1:]:
        nonzero_other |= n > 0
    active = (result.norms[0] > 0) & nonzero_other
    conflict = _active_fraction(result.conflict, active)
    out.update(
        conflict=conflict,
        conflict_rate=log.add(conflict),
        projected_similarity=_active_fraction(result.projected[0], active),
        projected_regularizer=_active_fraction(result.projected[1:].any(dim=0), active),
    )
    return out


def _nonzero(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> list[str]:
    return [name for name in losses if weights[name] != 0.0]


# --- the rules ----------------------------------------------------------------------------------------


class WeightedSum:
    """The baseline: the gradient of ``sum_k w_k * L_k`` (one backward pass).

    Args:
        diagnose: also log the diagnostics of :func:`projection_diagnostics` (nothing is
            projected; ``conflict`` is measured in ``scope``). This needs one backward pass per
            objective (the gradients are then summed, which gives the same update); off by
            default so that the baseline stays one pass.
        scope, block_size: where conflicts are counted when diagnosing (see :class:`Scope`).
        generator: accepted and unused (rules share one signature).
    """

    name = "sum"

    def __init__(self, diagnose: bool = False, scope: str = "global", block_size: int = DEFAULT_BLOCK_SIZE,
                 generator: torch.Generator | None = None):
        self.diagnose = bool(diagnose)
        self._log = _ConflictLog()
        self._scope = Scope(scope, block_size)

    def backward(self, losses, weights, params) -> dict[str, float]:
        names = _nonzero(losses, weights)
        for p in params:
            p.grad = None
        if not names:
            _set_grads(params, [torch.zeros_like(p) for p in params])
            return {}
        if not self.diagnose or len(names) < 2:
            total = sum(weights[name] * losses[name] for name in names)
            total.backward()
            return {}
        similarity, regularisers = _separate_gradients(losses, weights, names, params)
        grads = [similarity, *regularisers]
        _set_grads(params, _summed(grads, params))
        # a projection that may project nothing: every priority equal
        units = self._scope.unit_count(params)
        result = project_conflicting(grads, self._scope, torch.zeros(len(grads), units, device=params[0].device))
        return projection_diagnostics(result, names, self._log)


class PCGrad:
    """Projecting conflicting gradients (one backward pass per objective).

    Args:
        project: which gradient of a conflicting pair is projected onto the other's normal plane:
            ``"random"`` (default; drawn every step, independently per scope unit, from
            ``generator``, each objective of a pair with probability 1/2 -- the
            gradient-projection IO paper), ``"similarity"`` (always the similarity),
            ``"regularizer"`` (always the regulariser) or ``"all"`` (Yu et al.'s original
            PCGrad: every gradient is projected onto the normal plane of every other one it
            conflicts with, visited in a random order drawn every step).
            With more than two objectives, ``"random"`` draws a random priority order of the
            objectives per unit and each objective is projected onto the higher-priority ones it
            conflicts with; ``"similarity"``/``"regularizer"`` put the similarity last/first and
            draw the order of the regularisers.
        scope: ``"global"``, ``"level"``, ``"tensor"`` or ``"block"`` (see :class:`Scope`).
        block_size: block edge for ``scope="block"``, parameter-grid voxels.
        generator: the run's seeded ``torch.Generator`` (CPU); every random draw goes through it.
            ``None`` uses a generator seeded with 0.

    The update is the **sum** of the (projected) weighted gradients, so without a conflict it is
    exactly the weighted sum's (an often-used PyTorch port averages them instead, which divides
    the step by the number of objectives). Weights apply before the projection.
    Diagnostics: see :func:`projection_diagnostics`.
    """

    name = "pcgrad"

    def __init__(
        self,
        project: str = "random",
        scope: str = "global",
        block_size: int = DEFAULT_BLOCK_SIZE,
        generator: torch.Generator | None = None,
    ):
        if project not in PROJECT_CHOICES:
            raise ValueError(f"unknown projection choice {project!r}; choose one of {', '.join(PROJECT_CHOICES)}")
        self.project = project
        self.scope = Scope(scope, block_size)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._log = _ConflictLog()

    def draw(self, count: int, units: int) -> tuple[torch.Tensor | None, list[int]]:
        """This step's random choices: ``(priorities (count, units) or None, visiting order)``.

        Objective 0 is the similarity. Both are drawn every step, whether or not a conflict
        occurs, so the random stream does not depend on the conflicts.
        """
        keys = torch.rand(count, units, generator=self.generator)
        order = torch.randperm(count, generator=self.generator).tolist()
        if self.project == "all":
            return None, order
        if self.project == "similarity":
            keys[0] = -1.0  # below every uniform draw: the similarity is always the one projected
        elif self.project == "regularizer":
            keys[0] = 2.0  # above every uniform draw: the similarity is never projected
        return keys, order

    def combine(self, grads: Sequence[Sequence[torch.Tensor]]) -> tuple[list[torch.Tensor], Projection]:
        """The combined update of weighted gradients (objective 0 = the similarity), no autograd."""
        priorities, order = self.draw(len(grads), self.scope.unit_count(grads[0]))
        if priorities is not None:
            priorities = priorities.to(grads[0][0].device)
        result = project_conflicting(grads, self.scope, priorities, order)
        return _summed(result.grads, grads[0]), result

    def backward(self, losses, weights, params) -> dict[str, float]:
        names = _nonzero(losses, weights)
        for p in params:
            p.grad = None
        if len(names) < 2:
            return WeightedSum().backward(losses, weights, params)
        similarity, regularisers = _separate_gradients(losses, weights, names, params)
        combined, result = self.combine([similarity, *regularisers])
        _set_grads(params, combined)
        return projection_diagnostics(result, names, self._log)


class GradientSurgery:
    """GSMorph's gradient surgery: the similarity gradient, projected where it conflicts.

    ``G = w_s grad S``, ``R = grad (sum_r w_r R_r)`` (one backward pass for all regularisers
    together, one for the similarity). Per unit of the scope: ``G`` when ``<G, R> >= 0``, else
    ``G - <G, R> / ||R||^2 R``. The regulariser only provides a direction, so a common scale of
    the regulariser weights has no effect (with one regulariser its weight is irrelevant).

    With plain gradient descent a step along ``-G`` never increases the regulariser to first
    order; adaptive optimisers (Adam, AMSGrad) rescale the step per coordinate, so this holds
    only approximately for them. Every point where the similarity gradient is zero or opposite
    to the regulariser's is a fixed point, i.e. any point of the Pareto set: which one a run
    reaches depends on the path. Measured on dense IO from a zero field (benchmarks/
    combine_rules.py): with Adam the regulariser, which only removes components, barely acts and
    the fields fold (% det <= 0 of 7-26 %); with plain SGD the rule is stable at step sizes at
    which the weighted sum diverges (the stiff regulariser never enters the step).

    Args:
        scope: ``"tensor"`` (default; GSMorph's layer-wise rule, equal to ``"global"`` for a
            dense field), ``"global"``, ``"level"`` or ``"block"``.
        block_size: block edge for ``scope="block"``, parameter-grid voxels.
        generator: accepted and unused (the rule draws nothing).
    Diagnostics: see :func:`projection_diagnostics`; the regularisers' gradient is logged as
    ``grad_norm_regularizers`` and ``projected_regularizer`` is always 0.
    """

    name = "surgery"

    def __init__(self, scope: str = "tensor", block_size: int = DEFAULT_BLOCK_SIZE,
                 generator: torch.Generator | None = None):
        self.scope = Scope(scope, block_size)
        self._log = _ConflictLog()

    def combine(self, similarity: Sequence[torch.Tensor], regulariser: Sequence[torch.Tensor]):
        """The update from the weighted similarity gradient and the regularisers' gradient, no autograd."""
        units = self.scope.unit_count(similarity)
        priorities = torch.ones(2, units, device=similarity[0].device)
        priorities[0] = 0.0  # the similarity has the lower priority: it is the one projected
        result = project_conflicting([similarity, regulariser], self.scope, priorities)
        return result.grads[0], result

    def backward(self, losses, weights, params) -> dict[str, float]:
        names = _nonzero(losses, weights)
        for p in params:
            p.grad = None
        similarity_name = next(iter(losses))
        regularisers = [n for n in names if n != similarity_name]
        if similarity_name not in names:
            _set_grads(params, [torch.zeros_like(p) for p in params])
            return {}
        if not regularisers:
            return WeightedSum().backward({similarity_name: losses[similarity_name]}, weights, params)
        regulariser_loss = sum(weights[n] * losses[n] for n in regularisers)
        regulariser, similarity = objective_gradients(
            [regulariser_loss, weights[similarity_name] * losses[similarity_name]], params
        )
        update, result = self.combine(similarity, regulariser)
        _set_grads(params, update)
        return projection_diagnostics(result, [similarity_name, "regularizers"], self._log)


COMBINE_RULES = {"sum": WeightedSum, "pcgrad": PCGrad, "surgery": GradientSurgery}


def make_combine_rule(name: str, **options) -> CombineRule:
    """Combination rule by name (``"sum"``, ``"pcgrad"``, ``"surgery"``) with its options.

    Raises:
        ValueError: unknown name, unknown option (lists the valid ones) or invalid option value.
    """
    if name not in COMBINE_RULES:
        raise ValueError(f"unknown combination rule {name!r}; choose one of {', '.join(COMBINE_RULES)}")
    cls = COMBINE_RULES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(v for v in valid if v != "generator")
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for combination rule {name!r}; valid options: {listed}")
    return cls(**options)
