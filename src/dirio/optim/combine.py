"""Gradient combination rules: how the separately kept objectives become one update direction.

A rule receives every objective's scalar loss and its weight, and leaves the combined gradient
in ``param.grad`` of every optimised parameter; the optimiser (Adam, AMSGrad, SGD) then consumes
it. Rules therefore never depend on the optimiser. A rule returns a dict of diagnostics (floats)
that the engine logs with the iteration.
"""

from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import torch


class CombineRule(Protocol):
    """Turns separate objectives into gradients on the parameters."""

    name: str

    def backward(
        self, losses: Mapping[str, torch.Tensor], weights: Mapping[str, float], params: Sequence[torch.Tensor]
    ) -> dict[str, float]:
        """Set ``p.grad`` for every ``p`` in ``params``; return diagnostics for the log."""


class WeightedSum:
    """The baseline: the gradient of ``sum_k w_k * L_k`` (one backward pass)."""

    name = "sum"

    def backward(self, losses, weights, params) -> dict[str, float]:
        total = sum(weights[key] * loss for key, loss in losses.items() if weights[key] != 0.0)
        for p in params:
            p.grad = None
        total.backward()
        return {}


COMBINE_RULES = {"sum": WeightedSum}


def make_combine_rule(name: str, **options) -> CombineRule:
    """Combination rule by name (``"sum"``)."""
    if name not in COMBINE_RULES:
        raise ValueError(f"unknown combination rule {name!r}; choose one of {', '.join(COMBINE_RULES)}")
    return COMBINE_RULES[name](**options)
