"""Slow imports that the command line starts in a background thread while it reads and registers.

``dirio register`` needs two slow modules late: ``torch._dynamo`` (about 1 s), which ``torch.optim``
imports at the first optimiser step (its step wrapper marks graph breaks for the compiler), and,
when it draws the figure, matplotlib with :mod:`dirio.viz.figures` (about 0.7 s). Imported in a
thread started before the images are read, they overlap the reading and the registration, whose
tensor operations release the GIL. Python's import lock makes the main thread wait for a module
the thread is still importing, so the order of events never changes what is imported.
"""

from __future__ import annotations

import threading

__all__ = ["preload_slow_imports"]


def _import_slow_modules(figure: bool) -> None:
    try:
        import torch._dynamo  # noqa: F401  (torch.optim's first step imports it)

        if figure:
            import dirio.viz.figures  # noqa: F401
    except Exception:  # noqa: BLE001  a failed preload changes nothing: the import is retried where it is needed
        pass


def preload_slow_imports(figure: bool) -> threading.Thread:
    """Start importing the slow modules (see the module docstring) in a daemon thread; returns it."""
    thread = threading.Thread(target=_import_slow_modules, args=(figure,), name="dirio-preload", daemon=True)
    thread.start()
    return thread
