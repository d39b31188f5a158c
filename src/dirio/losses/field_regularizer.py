"""The contract every regularizer of a displacement field follows, and the checks they share.

* ``name``: short identifier (the factory name).
* ``__call__(disp, spacing=None) -> scalar``: ``>= 0``, 0 for a constant (translation) field.
  ``disp`` is ``(B, ndim, *S)`` (``ndim`` = 2 or 3) in voxel units of the fine image grid;
  ``spacing`` is the grid spacing of ``disp`` in fine voxels (one number per axis or a scalar,
  default 1), so derivatives are ``difference / spacing`` and a weight means the same on every level.

The families: :mod:`dirio.losses.regularizers` (smoothness) and :mod:`dirio.losses.folding`.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch


class Regularizer:
    """Base class of displacement regularizers."""

    name = "regularizer"

    def __call__(self, disp: torch.Tensor, spacing: float | Sequence[float] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        options = ", ".join(f"{n}={getattr(self, n)!r}" for n in names if hasattr(self, n))
        return f"{type(self).__name__}({options})"


def spacing_tuple(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Normalise ``spacing`` to one positive float per axis."""
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)):
        values = (float(spacing),) * ndim
    else:
        values = tuple(float(s) for s in spacing)
    if len(values) != ndim or any(not s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per axis), got {spacing!r}")
    return values


def check_field(disp: torch.Tensor) -> int:
    """Validate a ``(B, ndim, *S)`` field; return ``ndim``."""
    ndim = disp.dim() - 2
    if ndim not in (2, 3) or disp.shape[1] != ndim:
        raise ValueError(
            f"expected a displacement field (B, ndim, *S) with ndim = 2 or 3 components, got shape {tuple(disp.shape)}"
        )
    return ndim
