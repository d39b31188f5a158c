"""Matplotlib figures drawn outside pyplot, and their atomic PNG output.

A figure is a :class:`matplotlib.figure.Figure` drawn by the Agg canvas, never a
:mod:`matplotlib.pyplot` one: no global backend is switched, no figure is registered in pyplot's
figure manager (so there is nothing left open to close), and drawing works on machines without a
display. Every PNG is written atomically through :func:`dirio.io.atomic.atomic_output`, so a
failed rendering never leaves a partial file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dirio.errors import DirioError
from dirio.io.atomic import atomic_output

__all__ = ["DPI", "check_png_path", "new_figure", "save_figure"]

PathLike = str | os.PathLike

# Pixels per inch of the saved figures.
DPI = 100


def check_png_path(path: PathLike) -> Path:
    """``Path(path)``; DirioError unless the name ends in ``.png`` (any case)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DirioError(f"{path}: figures are written as PNG; use a file name ending in .png")
    return path


def new_figure(width: float, height: float) -> Figure:
    """A ``width`` x ``height`` inch figure (constrained layout) drawn by the Agg canvas, outside
    pyplot (nothing global to close)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path, overwrite: bool) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically, then release its artists; returns ``path``."""
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        fig.clear()
    return path
