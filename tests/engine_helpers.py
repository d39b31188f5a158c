"""Test helpers: run the dense instance-optimisation stage on tensors with flat settings.

``optimise(fixed, moving, objectives, EngineConfig(...))`` builds the dense transform, the terms and
the pyramid and optimiser sections, and runs :func:`dirio.methods.dense.register_dense`. Objectives
name their role with a string and may be plain callables: a similarity object (``features`` and
``__call__(fixed, warped, mask)``) or a regularizer ``f(u)`` of the regularized field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dirio.losses.terms import RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.dense import DenseStage, register_dense
from dirio.optim.pyramid import OptimizerConfig, PyramidConfig
from dirio.transforms.dense import DenseConfig


@dataclass
class EngineConfig:
    """Flat settings of one dense run (the fields of the pyramid, transform and optimiser sections)."""

    levels: Sequence[int] = (4, 2)
    iterations: Sequence[int] = (80, 40)
    grid_spacing: float | Sequence[float] = 1.0
    lr: float = 0.5
    optimizer: str = "adam"
    schedule: str = "cosine"
    schedule_options: dict = field(default_factory=dict)
    diffeomorphic: bool = False
    integration_steps: int = 7
    smoothing: int = 2
    combine: str = "sum"
    combine_options: dict = field(default_factory=dict)
    early_stop: str = "none"
    early_stop_options: dict = field(default_factory=dict)
    seed: int = 0
    progress: bool = False

    def stage(self) -> DenseStage:
        def pick(cls):
            return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if hasattr(self, f.name)})

        return DenseStage(transform=pick(DenseConfig), pyramid=pick(PyramidConfig), optimizer=pick(OptimizerConfig))

    def validate(self) -> None:
        self.stage().validate()


@dataclass
class Objective:
    name: str
    kind: str
    function: Callable
    weight: float

    def term(self) -> Term:
        if self.kind == "similarity":
            return Term(self.name, Role.SIMILARITY, SimilarityTerm(self.function), self.weight)
        return Term(self.name, Role(self.kind), RegularizerTerm(_FieldOnly(self.function)), self.weight)


class _FieldOnly:
    """A regularizer written as ``f(u)``, called with the engine's ``(u, spacing)``."""

    def __init__(self, function):
        self.function = function

    def __call__(self, u, spacing):
        return self.function(u)


def optimise(fixed, moving, objectives, config: EngineConfig, *, fixed_mask=None, moving_mask=None, init=None):
    return register_dense(fixed, moving, [o.term() for o in objectives], config.stage(), init=init,
                          fixed_mask=fixed_mask, moving_mask=moving_mask, seed=config.seed, progress=config.progress)
