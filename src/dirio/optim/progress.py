"""Progress reports of the optimisation loops, for callers that show progress or cancel a run.

A caller sets an observer for a block of code (``with observing(callback): ...``); the pyramid
driver (:func:`dirio.optim.pyramid.run_pyramid`) calls it after every iteration with a
:class:`Progress`. The observer lives in a :mod:`contextvars` variable, so it belongs to the thread
(and task) that set it: two registrations in two threads each see only their own. Nothing is
stored on the engine's objects.

**Cancelling.** An exception raised by the observer propagates out of the optimisation between two
steps (the usual choice is :class:`Cancelled`): no result is returned, and what the run changed on
the way is undone by the code that owns it (a network's weights are restored by
:func:`dirio.transforms.base.restored`). The observer never changes the numbers: a run with one
gives the same field as a run without.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass


class Cancelled(Exception):
    """Raised by a progress observer to stop a registration between two optimisation steps."""


@dataclass(frozen=True)
class Progress:
    """One report, made after an optimisation step.

    Attributes:
        description: what runs (the pyramid driver's description, e.g. ``"registering"``,
            ``"affine"``); a registration with several optimising stages reports each in turn.
        level: index of the pyramid level (0 = coarsest); ``levels`` the number of levels.
        iteration: steps done at this level (1 ... ``iterations``); ``iterations`` the level's count.
        done: steps done by this run of the driver, counting every step of the finished levels as
            asked (an early-stopped level counts in full); ``total`` the steps asked in all levels.
    """

    description: str
    level: int
    levels: int
    iteration: int
    iterations: int
    done: int
    total: int


ProgressCallback = Callable[[Progress], None]

_OBSERVER: contextvars.ContextVar[ProgressCallback | None] = contextvars.ContextVar("dirio_progress", default=None)


@contextlib.contextmanager
def observing(callback: ProgressCallback | None) -> Iterator[None]:
    """Call ``callback`` with every :class:`Progress` report made inside the block (in this thread);
    ``None`` leaves the current observer in place. The previous observer is back after the block."""
    if callback is None:
        yield
        return
    token = _OBSERVER.set(callback)
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def report(progress: Progress) -> None:
    """Hand ``progress`` to the current observer, if any (its exceptions propagate: they stop the run)."""
    callback = _OBSERVER.get()
    if callback is not None:
        callback(progress)
