"""Early stopping of a pyramid level when the similarity reaches a plateau.

The gradient-projection IO paper leaves "the criteria for determining stopping points for IO" as
open work; the engine runs a fixed number of iterations per level unless a stopping rule is
configured (``EngineConfig.early_stop``). A rule sees the similarity loss of every iteration of
a level and says when the level may stop; the level's iteration count stays the upper bound.

``plateau`` (:class:`PlateauStop`): the similarity is averaged over two consecutive windows of
``window`` iterations (the mean damps the step-to-step oscillation of Adam); the level stops when
the decrease from the earlier window to the latest one is at most ``tolerance`` times the
decrease the level has achieved so far (first iteration's similarity minus the latest window's
mean). The test is relative to the level's own progress, so it needs no knowledge of the
similarity's scale or offset (LNCC in [-1, 0], MSE, MIND all work with the same tolerance).
"""

from __future__ import annotations

from typing import Protocol

from dirio.core.registry import Registry



class StoppingRule(Protocol):
    """Decides, iteration by iteration, when a pyramid level may stop."""

    def start_level(self) -> None:
        """Forget the previous level."""

    def update(self, similarity: float) -> bool:
        """Record this iteration's similarity loss (lower is better); True when the level should stop."""


class PlateauStop:
    """Stop a level when the similarity has stopped improving.

    Args:
        window: iterations per averaging window (>= 1).
        tolerance: stop when ``mean(previous window) - mean(latest window) <= tolerance *
            (first value - mean(latest window))``; 0.01 stops when the last ``window``
            iterations brought less than 1 % of the level's improvement so far.
        min_iterations: never stop a level before this many iterations (at least ``2 * window``
            are always needed to compare two windows).
    """

    def __init__(self, window: int = 10, tolerance: float = 0.01, min_iterations: int = 20):
        if int(window) != window or window < 1:
            raise ValueError(f"window must be a positive integer, got {window!r}")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
        if int(min_iterations) != min_iterations or min_iterations < 0:
            raise ValueError(f"min_iterations must be a non-negative integer, got {min_iterations!r}")
        self.window = int(window)
        self.tolerance = float(tolerance)
        self.min_iterations = int(min_iterations)
        self.values: list[float] = []

    def start_level(self) -> None:
        self.values = []

    def update(self, similarity: float) -> bool:
        self.values.append(float(similarity))
        count = len(self.values)
        if count < max(self.min_iterations, 2 * self.window):
            return False
        latest = sum(self.values[-self.window:]) / self.window
        previous = sum(self.values[-2 * self.window:-self.window]) / self.window
        progress = self.values[0] - latest
        return previous - latest <= self.tolerance * max(progress, 0.0)


def _no_stopping() -> None:
    """Fixed iteration counts: no stopping rule."""
    return None


STOPPING_REGISTRY: Registry[StoppingRule | None] = Registry("early stopping rule")
STOPPING_REGISTRY.register("none", _no_stopping)
STOPPING_REGISTRY.register("plateau", PlateauStop)
STOPPING_RULES = STOPPING_REGISTRY.names()


def make_stopping_rule(name: str, **options) -> StoppingRule | None:
    """The stopping rule by name: ``"none"`` (returns None: fixed iteration counts) or ``"plateau"``.

    Raises:
        ValueError: unknown name, unknown option or invalid option value.
    """
    return STOPPING_REGISTRY.create(name, **options)
