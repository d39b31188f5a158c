"""The context of one pyramid level (or one training batch): what transforms and terms see.

It lives in ``core`` because transforms (:mod:`dirio.transforms`), terms (:mod:`dirio.losses.terms`)
and the engine (:mod:`dirio.optim`) all read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dirio.core.fields import identity_grid


@dataclass
class LevelContext:
    """What a transform and the terms see at one pyramid level (or one training batch).

    Attributes:
        level: index of the pyramid level, 0 = coarsest (0 for a training batch).
        shape: the level's image grid ``S``.
        full_shape: the full-resolution grid the level covers (``align_corners`` geometry).
        fixed, moving: ``(B, C, *S)`` float images of the level.
        fixed_mask, moving_mask: optional ``(B, 1, *S)`` masks in [0, 1] restricting the similarity.
        spacing: voxel size of the level grid in mm, one number per axis.
        factor: the level's shrink factor (1 for the full grid).
        full_fixed, full_moving: optional ``(B, C, *full_shape)`` images of the full grid, for
            terms that compute their features at full resolution (see
            :class:`dirio.losses.terms.SimilarityTerm`).
        extra: anything a supervision term needs (label maps, keypoints), by name.
        cache: per-level values computed once by the terms' ``prepare`` (e.g. image features), by
            term name; the context owns them so that terms and transforms hold no per-pair state.
    """

    level: int
    shape: tuple[int, ...]
    full_shape: tuple[int, ...]
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_mask: torch.Tensor | None = None
    moving_mask: torch.Tensor | None = None
    spacing: tuple[float, ...] | None = None
    factor: float = 1.0
    full_fixed: torch.Tensor | None = None
    full_moving: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> torch.device:
        return self.fixed.device

    @property
    def identity(self) -> torch.Tensor:
        """``(1, ndim, *S)`` voxel coordinates of the level grid (computed once)."""
        if "_identity" not in self.cache:
            self.cache["_identity"] = identity_grid(self.shape, device=self.device).unsqueeze(0)
        return self.cache["_identity"]


@dataclass
class RegularizedField:
    """What the regularizers act on: a ``(B, ndim, *P)`` field and its grid spacing.

    ``spacing`` is in the field's own unit of length per grid step (one number per axis), so the
    regularizers' finite differences are dimensionless derivatives (see :mod:`dirio.losses.regularizers`).
    """

    field: torch.Tensor
    spacing: tuple[float, ...]
