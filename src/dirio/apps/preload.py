"""Slow imports that the command line starts in a background thread while it reads and registers.

``dirio register`` needs one slow module late: when it draws the figure, matplotlib with
:mod:`dirio.viz.figures` (about 0.7 s). Imported in a thread started before the images are read,
it overlaps the reading and the registration, whose tensor operations release the GIL. Python's
import lock makes the main thread wait for a module the thread is still importing, so the order of
events never changes what is imported. (``torch._dynamo``, which ``torch.optim`` imports at an
optimiser's first step, is not needed: dirio's Adam, :mod:`dirio.optim.adam`, does without it.)
"""

from __future__ import annotations

import threading

__all__ = ["preload_slow_imports"]


def _import_slow_modules(figure: bool) -> None:
    if not figure:
        return
    try:
        import dirio.viz.figures  # noqa: F401
    except Exception:  # noqa: BLE001  a failed preload changes nothing: the import is retried where it is needed
        pass


def preload_slow_imports(figure: bool) -> threading.Thread:
    """Start importing the slow modules (see the module docstring) in a daemon thread; returns it."""
    thread = threading.Thread(target=_import_slow_modules, args=(figure,), name="dirio-preload", daemon=True)
    thread.start()
    return thread
