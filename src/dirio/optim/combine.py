"""Gradient combination rules: how the separately kept objectives become one update direction.

A rule receives every objective's scalar loss, its weight and its role
(:class:`dirio.losses.terms.Role`), and leaves the combined gradient in ``param.grad`` of every
optimised parameter; the optimiser (Adam, AMSGrad, SGD) then consumes it. Rules therefore never
depend on the optimiser. A rule returns a dict of diagnostics (floats) that the engine logs with
the iteration.

Data terms (roles similarity and supervision) are the gradients a rule keeps or projects;
regularizers are the smoothness side. Under ``torch.distributed`` each objective's gradient is
averaged across ranks (the ``reduce`` argument, :func:`dirio.core.distributed.average_gradients`)
*before* any inner product or projection, so that every rank projects the same global gradients
and takes the same step; ``DistributedDataParallel``'s hooks would not fire for the per-objective
``torch.autograd.grad`` passes.

Rules (chosen by name, :data:`COMBINE_RULES`):

* ``sum`` (:class:`WeightedSum`): the gradient of ``sum_k w_k L_k``, one backward pass.
* ``pcgrad`` (:class:`PCGrad`): projecting conflicting gradients (Yu et al., NeurIPS 2020, as used
  for registration instance optimisation by Zhang, Zhao and Tao, Learn2Reg 2024). Each weighted
  gradient ``G_k = w_k grad L_k`` is kept separately; where two of them have a negative inner
  product, one is replaced by its projection onto the normal plane of the other,
  ``G_i <- G_i - <G_i, G_j> / ||G_j||^2 G_j``, and the (projected) gradients are summed.
* ``surgery`` (:class:`GradientSurgery`): GSMorph's rule (Dou et al., MICCAI 2023): the update
  is the similarity gradient alone, projected onto the normal plane of the regularization
  gradient where the two conflict. No weight to tune.

Conventions every rule relies on: roles come from ``roles`` (never from the order of
``losses``); weights are the objectives' weights (a weight of 0 drops the objective and its
backward pass). Separate gradients cost one backward pass per objective
(``torch.autograd.grad``; the graph is retained for all passes but the last, and the data terms,
whose backward dominates the cost, go last so that the last one's graph is never retained).

Scopes of the inner products and the projection itself: :mod:`dirio.optim.projection`.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol, Sequence

import torch

from dirio.core.registry import Registry
from dirio.losses.terms import Role
from dirio.optim.projection import (
    DEFAULT_BLOCK_SIZE,
    Projection,
    Scope,
    ConflictLog,
    project_conflicting,
    projection_diagnostics,
)

PROJECT_CHOICES = ("random", "similarity", "regularizer", "all")


class CombineRule(Protocol):
    """Turns separate objectives into gradients on the parameters."""

    name: str

    def backward(
        self,
        losses: Mapping[str, torch.Tensor],
        weights: Mapping[str, float],
        roles: Mapping[str, Role],
        params: Sequence[torch.Tensor],
        *,
        spatial: Sequence[bool] | None = None,
        reduce: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    ) -> dict[str, float]:
        """Set ``p.grad`` for every ``p`` in ``params``; return diagnostics for the log.

        Args:
            losses: every objective's scalar loss, by name.
            weights, roles: each objective's weight and :class:`Role`, by name.
            params: the optimised parameters.
            spatial: per parameter, whether it is a spatial field (for the ``block`` scope).
            reduce: averages one objective's gradients across processes (identity alone).
        """


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


def _identity(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return grads


def _split_roles(names: Sequence[str], roles: Mapping[str, Role]) -> tuple[list[str], list[str]]:
    """``(data terms, regularizers)`` among ``names``: similarity and supervision are data terms."""
    data = [n for n in names if Role(roles[n]) is not Role.REGULARIZER]
    regularizers = [n for n in names if Role(roles[n]) is Role.REGULARIZER]
    return data, regularizers


def _separate_gradients(losses, weights, data, regularizers, params, reduce):
    """Weighted, process-averaged gradients of each data term and of each regularizer.

    The regularizers' passes run first with the graph retained; the data terms' run last.
    Returns ``(data gradients, regularizer gradients)``, each a list of per-parameter lists.
    """
    ordered = list(regularizers) + list(data)
    grads = [reduce(g) for g in objective_gradients([weights[n] * losses[n] for n in ordered], params)]
    return grads[len(regularizers):], grads[:len(regularizers)]


def _set_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.detach().to(dtype=p.dtype).contiguous()


def _summed(grads: Sequence[Sequence[torch.Tensor]], params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    if not grads:
        return [torch.zeros_like(p) for p in params]
    return [sum(parts) for parts in zip(*grads)]


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
        self._log = ConflictLog()
        self._scope = Scope(scope, block_size)

    def backward(self, losses, weights, roles, params, *, spatial=None, reduce=None) -> dict[str, float]:
        reduce = reduce or _identity
        names = _nonzero(losses, weights)
        for p in params:
            p.grad = None
        if not names:
            _set_grads(params, [torch.zeros_like(p) for p in params])
            return {}
        data, regularizers = _split_roles(names, roles)
        if not self.diagnose or not data or not regularizers:
            total = sum(weights[name] * losses[name] for name in names)
            total.backward()
            if reduce is not _identity:
                grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
                _set_grads(params, reduce(grads))
            return {}
        data_grads, regularizer_grads = _separate_gradients(losses, weights, data, regularizers, params, reduce)
        grads = [*data_grads, *regularizer_grads]
        _set_grads(params, _summed(grads, params))
        # a projection that may project nothing: every priority equal
        units = self._scope.unit_count(params, spatial)
        result = project_conflicting(grads, self._scope, torch.zeros(len(grads), units, device=params[0].device),
                                     spatial=spatial)
        return projection_diagnostics(result, data + regularizers, self._log, len(data))


class PCGrad:
    """Projecting conflicting gradients (one backward pass per objective).

    Args:
        project: which gradient of a conflicting pair is projected onto the other's normal plane:
            ``"random"`` (default; drawn every step, independently per scope unit, from
            ``generator``, each objective of a pair with probability 1/2 -- the
            gradient-projection IO paper), ``"similarity"`` (always the similarity),
            ``"regularizer"`` (always the regularizer) or ``"all"`` (Yu et al.'s original
            PCGrad: every gradient is projected onto the normal plane of every other one it
            conflicts with, visited in a random order drawn every step).
            With more than two objectives, ``"random"`` draws a random priority order of the
            objectives per unit and each objective is projected onto the higher-priority ones it
            conflicts with; ``"similarity"``/``"regularizer"`` put the similarity last/first and
            draw the order of the regularizers.
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
        self._log = ConflictLog()

    def draw(self, count: int, units: int, data_count: int = 1) -> tuple[torch.Tensor | None, list[int]]:
        """This step's random choices: ``(priorities (count, units) or None, visiting order)``.

        Objectives ``0 .. data_count-1`` are the data terms. Both are drawn every step, whether
        or not a conflict occurs, so the random stream does not depend on the conflicts.
        """
        keys = torch.rand(count, units, generator=self.generator)
        order = torch.randperm(count, generator=self.generator).tolist()
        if self.project == "all":
            return None, order
        if self.project == "similarity":
            keys[:data_count] = -1.0  # below every uniform draw: the data terms are always the ones projected
        elif self.project == "regularizer":
            keys[:data_count] = 2.0  # above every uniform draw: the data terms are never projected
        return keys, order

    def combine(self, grads: Sequence[Sequence[torch.Tensor]], data_count: int = 1,
                spatial: Sequence[bool] | None = None) -> tuple[list[torch.Tensor], Projection]:
        """The combined update of weighted gradients (the first ``data_count`` are data terms), no autograd."""
        priorities, order = self.draw(len(grads), self.scope.unit_count(grads[0], spatial), data_count)
        if priorities is not None:
            priorities = priorities.to(grads[0][0].device)
        result = project_conflicting(grads, self.scope, priorities, order, spatial)
        return _summed(result.grads, grads[0]), result

    def backward(self, losses, weights, roles, params, *, spatial=None, reduce=None) -> dict[str, float]:
        reduce = reduce or _identity
        names = _nonzero(losses, weights)
        for p in params:
            p.grad = None
        if len(names) < 2:
            return WeightedSum().backward(losses, weights, roles, params, spatial=spatial, reduce=reduce)
        data, regularizers = _split_roles(names, roles)
        data_grads, regularizer_grads = _separate_gradients(losses, weights, data, regularizers, params, reduce)
        combined, result = self.combine([*data_grads, *regularizer_grads], len(data), spatial)
        _set_grads(params, combined)
        return projection_diagnostics(result, data + regularizers, self._log, len(data))


class GradientSurgery:
    """GSMorph's gradient surgery: the similarity gradient, projected where it conflicts.

    ``G = w_s grad S``, ``R = grad (sum_r w_r R_r)`` (one backward pass for all regularizers
    together, one for the similarity). Per unit of the scope: ``G`` when ``<G, R> >= 0``, else
    ``G - <G, R> / ||R||^2 R``. The regularizer only provides a direction, so a common scale of
    the regularizer weights has no effect (with one regularizer its weight is irrelevant).

    With plain gradient descent a step along ``-G`` never increases the regularizer to first
    order; adaptive optimisers (Adam, AMSGrad) rescale the step per coordinate, so this holds
    only approximately for them. Every point where the similarity gradient is zero or opposite
    to the regularizer's is a fixed point, i.e. any point of the Pareto set: which one a run
    reaches depends on the path. Measured on dense IO from a zero field (benchmarks/
    combine_rules.py): with Adam the regularizer, which only removes components, barely acts and
    the fields fold (% det <= 0 of 7-26 %); with plain SGD the rule is stable at step sizes at
    which the weighted sum diverges (the stiff regularizer never enters the step).

    Args:
        scope: ``"tensor"`` (default; GSMorph's layer-wise rule, equal to ``"global"`` for a
            dense field), ``"global"``, ``"level"`` or ``"block"``.
        block_size: block edge for ``scope="block"``, parameter-grid voxels.
        generator: accepted and unused (the rule draws nothing).
    Diagnostics: see :func:`projection_diagnostics`; the regularizers' gradient is logged as
    ``grad_norm_regularizers`` and ``projected_regularizer`` is always 0.
    """

    name = "surgery"

    def __init__(self, scope: str = "tensor", block_size: int = DEFAULT_BLOCK_SIZE,
                 generator: torch.Generator | None = None):
        self.scope = Scope(scope, block_size)
        self._log = ConflictLog()

    def combine(self, similarity: Sequence[torch.Tensor], regularizer: Sequence[torch.Tensor],
                spatial: Sequence[bool] | None = None):
        """The update from the weighted data gradient and the regularizers' gradient, no autograd."""
        units = self.scope.unit_count(similarity, spatial)
        priorities = torch.ones(2, units, device=similarity[0].device)
        priorities[0] = 0.0  # the data gradient has the lower priority: it is the one projected
        result = project_conflicting([similarity, regularizer], self.scope, priorities, spatial=spatial)
        return result.grads[0], result

    def backward(self, losses, weights, roles, params, *, spatial=None, reduce=None) -> dict[str, float]:
        reduce = reduce or _identity
        names = _nonzero(losses, weights)
        for p in params:
            p.grad = None
        data, regularizers = _split_roles(names, roles)
        if not data:
            _set_grads(params, [torch.zeros_like(p) for p in params])
            return {}
        if not regularizers:
            return WeightedSum().backward({n: losses[n] for n in data}, weights, roles, params, spatial=spatial,
                                         reduce=reduce)
        regularizer_loss = sum(weights[n] * losses[n] for n in regularizers)
        data_loss = weights[data[0]] * losses[data[0]] if len(data) == 1 else sum(weights[n] * losses[n] for n in data)
        regularizer, similarity = (reduce(g) for g in objective_gradients([regularizer_loss, data_loss], params))
        update, result = self.combine(similarity, regularizer, spatial)
        _set_grads(params, update)
        data_name = data[0] if len(data) == 1 else "data"
        return projection_diagnostics(result, [data_name, "regularizers"], self._log)


COMBINE_RULES: Registry[CombineRule] = Registry("combination rule", hidden_options=("generator",))
COMBINE_RULES.register("sum", WeightedSum)
COMBINE_RULES.register("pcgrad", PCGrad)
COMBINE_RULES.register("surgery", GradientSurgery)


def make_combine_rule(name: str, **options) -> CombineRule:
    """Combination rule by name (``"sum"``, ``"pcgrad"``, ``"surgery"``) with its options.

    Raises:
        ValueError: unknown name, unknown option (lists the valid ones) or invalid option value.
    """
    return COMBINE_RULES.create(name, **options)
