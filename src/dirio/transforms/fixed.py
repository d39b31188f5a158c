"""A fixed displacement as a transform: a field that is no longer optimised (e.g. the dense stage's
field after its final smoothing, :mod:`dirio.methods.final_smoothing`)."""

from __future__ import annotations

from typing import Sequence

import torch

from dirio.core.context import LevelContext
from dirio.core.fields import resize_field
from dirio.transforms.base import TransformModule

__all__ = ["FixedDisplacement"]


class FixedDisplacement(TransformModule):
    """``u`` itself on its grid, resampled to another grid (voxels of that grid); no parameters and
    no exact inverse (:func:`dirio.transforms.base.invert_transform` inverts it numerically).

    Args:
        displacement: ``(B, ndim, *S)`` field in voxels of the grid ``S``.
    """

    def __init__(self, displacement: torch.Tensor):
        super().__init__()
        self.register_buffer("fixed_displacement", displacement.detach())

    def displacement(self, shape: Sequence[int]) -> torch.Tensor:
        """The field on grid ``shape`` (itself on its own grid)."""
        if tuple(shape) == tuple(self.fixed_displacement.shape[2:]):
            return self.fixed_displacement
        return resize_field(self.fixed_displacement, shape)

    def field(self, ctx: LevelContext) -> torch.Tensor:
        return self.displacement(ctx.shape)
