"""Learning-rate schedules as pure functions of the step: a multiplier of the base rate.

Every schedule maps ``(step, total)`` with ``0 <= step < total`` to a factor in ``[0, 1]``;
the engine sets ``lr = base_lr * factor`` before each step. Each pyramid level runs its own
schedule over its own iteration count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from dirio.core.registry import Registry

Schedule = Callable[[int, int], float]



def constant(step: int, total: int) -> float:
    """Factor 1 at every step."""
    return 1.0


def cosine_factor(progress: float, final: float) -> float:
    """Half-cosine from 1 (progress 0) down to ``final`` (progress 1); ``progress`` is clipped to [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Cosine:
    """Cosine decay from 1 at step 0 to ``final`` at the last step."""

    final: float = 0.0

    def __call__(self, step: int, total: int) -> float:
        return cosine_factor(step / max(total - 1, 1), self.final)


@dataclass(frozen=True)
class Piecewise:
    """Constant -> cosine -> linear decay (Vujovic et al., continuous optimisation paper, Fig. 1).

    The paper's run has 270 steps: constant for ``s <= 70``, cosine decay for ``70 < s <= 180``
    and linear decay for ``180 < s <= 270``, i.e. phase boundaries at the fractions
    ``70/270 = 0.26`` and ``180/270 = 0.67`` of the iteration count, which are the defaults here.
    The text does not give the levels the two decays reach; dirio's defaults are: the cosine
    phase goes from 1 to ``middle = 0.1`` and the linear phase from ``middle`` to ``final = 0.01``
    (so the last step still moves).

    Attributes:
        constant_until: end of the constant phase, as a fraction of the iteration count.
        cosine_until: end of the cosine phase, as a fraction of the iteration count.
        middle: factor at the end of the cosine phase.
        final: factor at the last step.
    """

    constant_until: float = 70 / 270
    cosine_until: float = 180 / 270
    middle: float = 0.1
    final: float = 0.01

    def __post_init__(self):
        if not 0.0 <= self.constant_until <= self.cosine_until <= 1.0:
            raise ValueError(
                f"phase boundaries must satisfy 0 <= constant_until <= cosine_until <= 1, "
                f"got {self.constant_until}, {self.cosine_until}"
            )

    def __call__(self, step: int, total: int) -> float:
        t = step / max(total - 1, 1)
        if t <= self.constant_until:
            return 1.0
        if t <= self.cosine_until:
            span = max(self.cosine_until - self.constant_until, 1e-12)
            return cosine_factor((t - self.constant_until) / span, self.middle)
        span = max(1.0 - self.cosine_until, 1e-12)
        return self.middle + (self.final - self.middle) * (t - self.cosine_until) / span


def _constant_schedule() -> Schedule:
    """The constant schedule (no options)."""
    return constant


SCHEDULE_REGISTRY: Registry[Schedule] = Registry("schedule")
SCHEDULE_REGISTRY.register("constant", _constant_schedule)
SCHEDULE_REGISTRY.register("cosine", Cosine)
SCHEDULE_REGISTRY.register("piecewise", Piecewise)
SCHEDULES = SCHEDULE_REGISTRY.names()


def make_schedule(name: str, **options) -> Schedule:
    """Schedule by name: ``"constant"``, ``"cosine"`` (option ``final``) or ``"piecewise"``
    (options ``constant_until``, ``cosine_until``, ``middle``, ``final``)."""
    return SCHEDULE_REGISTRY.create(name, **options)
