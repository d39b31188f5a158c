"""One optimisation step, shared by instance optimisation (:mod:`dirio.optim.pyramid`) and training:
terms -> combination rule -> optimiser -> one log row.

The step evaluates the transform once (:class:`~dirio.losses.terms.Evaluation`), every term on it,
lets the combination rule write the gradients (averaged across processes when distributed), and
steps the optimiser. Loss values stay on the device as tensors; :class:`LossLog` turns them into
numbers only every ``log_every`` steps, so a CUDA run is not synchronised at every iteration.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from dirio.core.context import LevelContext
from dirio.errors import DirioError
from dirio.losses.terms import Evaluation, Role, Term, evaluate_terms, ordered
from dirio.optim.adam import Adam
from dirio.transforms.base import Transform, parameter_flags


class Step:
    """Terms, a combination rule and the gradient reduction; call it once per iteration.

    Args:
        terms: the objectives (any number per role; names unique).
        rule: a combination rule (:mod:`dirio.optim.combine`).
        reduce: averages one objective's gradients across processes, e.g.
            :func:`dirio.core.distributed.average_gradients` for data-parallel training. ``None``
            (the default, and what instance optimisation uses): no reduction, since under
            ``dirio run`` with torchrun each process registers *its own* pairs.
    """

    def __init__(self, terms: Sequence[Term], rule, reduce: Callable | None = None):
        self.terms = ordered(terms)
        self.rule = rule
        self.reduce = reduce
        self.weights = {t.name: t.weight for t in self.terms}
        self.roles = {t.name: t.role for t in self.terms}
        data = [t.name for t in self.terms if t.role is not Role.REGULARIZER]
        self.monitored = data[0] if data else None

    def prepare(self, ctx: LevelContext) -> None:
        """Per-level (or per-batch) set-up of every term (e.g. image features into ``ctx.cache``)."""
        for term in self.terms:
            term.prepare(ctx)

    def __call__(self, transform: Transform, ctx: LevelContext, optimizer: Adam | torch.optim.Optimizer,
                 params: Sequence[torch.Tensor], spatial: Sequence[bool] | None = None,
                 check: Callable[[dict[str, torch.Tensor]], None] | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Evaluate, combine the gradients, step; return ``(detached losses, rule diagnostics)``.

        Args:
            transform, ctx: what is optimised and the level (or batch) it is evaluated on.
            optimizer: built over ``params`` (the transform's parameter groups).
            spatial: per-parameter spatial flags for the rule's ``block`` scope (default: from
                ``transform.spatial_parameters()``).
            check: called with the detached losses before the optimiser steps (e.g. to refuse a
                non-finite loss without corrupting the parameters); it may raise.
        """
        if spatial is None:
            spatial = parameter_flags(params, transform.spatial_parameters())
        evaluation = Evaluation(ctx, None, transform)  # the field is computed when a term first reads it
        losses = evaluate_terms(self.terms, evaluation)
        diagnostics = self.rule.backward(losses, self.weights, self.roles, params, spatial=spatial,
                                         reduce=self.reduce)
        detached = {name: loss.detach() for name, loss in losses.items()}
        if check is not None:
            check(detached)
        optimizer.step()
        return detached, diagnostics

    @torch.no_grad()
    def evaluate(self, transform: Transform, ctx: LevelContext) -> dict[str, torch.Tensor]:
        """Every term's loss on the transform as it is, without gradients and without a step (the
        log row of a step that could not move the parameters)."""
        return evaluate_terms(self.terms, Evaluation(ctx, None, transform))

    def total(self, values: dict[str, float]) -> float:
        """The weighted sum of a row's term values (the log's ``loss`` column)."""
        return sum(self.weights[name] * value for name, value in values.items())


class LossLog:
    """The per-iteration log, with loss tensors turned into floats in batches.

    Rows are added with tensors (:meth:`add`); :meth:`flush` converts every pending row with one
    device synchronisation, appends them to :attr:`rows`, checks that every value is finite and
    returns the new rows.

    Args:
        step: the step (for the weighted total).
        where: ``where(row) -> str`` names the place of a row in messages (e.g. level and iteration).
    """

    def __init__(self, step: Step, where: Callable[[dict], str]):
        self.step = step
        self.where = where
        self.rows: list[dict] = []
        self._pending: list[tuple[dict, dict[str, torch.Tensor], dict[str, float]]] = []

    def add(self, meta: dict, losses: dict[str, torch.Tensor], diagnostics: dict[str, float]) -> None:
        self._pending.append((meta, losses, diagnostics))

    def check_finite(self, meta: dict, losses: dict[str, torch.Tensor]) -> None:
        """Raise :class:`DirioError` naming the first non-finite term of one row (one synchronisation)."""
        values = {name: float(value) for name, value in losses.items()}
        self._raise_if_not_finite(meta, values)

    def _raise_if_not_finite(self, meta: dict, values: dict[str, float]) -> None:
        bad = [name for name, value in values.items() if not math.isfinite(value)]
        if bad:
            raise DirioError(
                f"the {bad[0]} loss became {values[bad[0]]} at {self.where(meta)}; "
                "lower the learning rate or check the inputs for constant or empty images"
            )

    def flush(self) -> list[dict]:
        """Convert the pending rows to floats; return them (also appended to :attr:`rows`)."""
        if not self._pending:
            return []
        names = list(self._pending[0][1])
        stacked = torch.stack([torch.stack([losses[n].to(torch.float64) for n in names]) for _, losses, _ in self._pending])
        numbers = stacked.tolist()
        new = []
        for (meta, _, diagnostics), row_values in zip(self._pending, numbers):
            values = dict(zip(names, (float(v) for v in row_values)))
            self._raise_if_not_finite(meta, values)
            new.append({**meta, "loss": self.step.total(values), **values, **diagnostics})
        self._pending.clear()
        self.rows.extend(new)
        return new
