"""Symmetric diffeomorphic registration: both images deformed half-way, toward a middle space.

Two half maps are optimised, each a transform of its own: the pull maps from a middle space ``M``
(sampled on the fixed grid) into each image,

    phi_f : M -> fixed,        phi_m : M -> moving,

so that ``fixed ∘ phi_f`` and ``moving ∘ phi_m`` are the two half-warped images, both on ``M``. The
similarity is computed between those two images (:meth:`SymmetricTransform.middle`, read by
:meth:`dirio.losses.terms.Evaluation.warped_pair`), the way SyN (Avants et al., Med. Image Anal.
2008) measures it; swapping the images swaps the roles of the halves and nothing else, which is what
makes the method symmetric. The halves are either

* stationary velocity fields (:class:`dirio.transforms.dense.StationaryVelocity`): ``phi = exp(v)``
  by scaling and squaring, and ``phi^{-1} = exp(-v)`` exactly; or
* composed fields (:class:`dirio.transforms.composed.ComposedDisplacement` with diffeomorphic folds
  and ``track_inverse``): ``phi = exp(u_1) ∘ ... ∘ exp(u_n)``, the greedy composition of optimiser
  steps of SyN, whose inverse ``exp(-u_n) ∘ ... ∘ exp(-u_1)`` is composed fold by fold alongside.

(:meth:`dirio.transforms.dense.DenseConfig.build` makes them with ``symmetric``, without or with
``compose_every``.) The full maps are composed from the halves:

    forward  = phi_m ∘ phi_f^{-1} : fixed -> moving
    inverse  = phi_f ∘ phi_m^{-1} : moving -> fixed

In dirio's pull convention (``warped(x) = moving(x + u(x))``) the forward displacement is
``u(x) = a(x) + d_m(x + a(x))`` with ``a`` the displacement of ``phi_f^{-1}`` and ``d_m`` that of
``phi_m``: :func:`dirio.core.fields.compose` ``(d_m, a)``. ``field(ctx)`` returns it, so metrics,
outputs and evaluation treat this transform like any other; ``inverse_field(ctx)`` returns the
inverse the same way, with the roles swapped. With velocity halves both are diffeomorphic up to the
interpolation of the scaling and squaring and of the one composition, and ``inverse ∘ forward = id``
holds to the same accuracy (tested).

The regularizers see the two halves' regularized fields stacked along the batch axis
``(2, ndim, *P)``: their mean energy. At the symmetric optimum each half carries half of the
deformation, so a weight ``w`` here regularizes the forward map about like ``w / 4`` would
regularize one field.
"""

from __future__ import annotations

from typing import Sequence

import torch

from dirio.core.context import LevelContext, RegularizedField
from dirio.core.fields import compose
from dirio.transforms.base import TransformModule


class SymmetricTransform(TransformModule):
    """Two half maps meeting in a middle space (see the module docstring).

    Args:
        fixed_half, moving_half: the transforms of ``phi_f`` and ``phi_m``: ``start_level``,
            ``after_step``, ``parameter_groups``, ``spatial_parameters``, ``regularized``,
            ``displacement(shape)`` (the half map's pull displacement ``(1, ndim, *shape)`` in voxels
            of that grid) and ``inverse_displacement(shape)`` (its inverse, the same way), e.g.
            :class:`dirio.transforms.dense.StationaryVelocity` or a
            :class:`dirio.transforms.composed.ComposedDisplacement` that tracks its inverse.
    """

    kind = "symmetric"

    def __init__(self, fixed_half: TransformModule, moving_half: TransformModule):
        super().__init__()
        self.fixed_half = fixed_half
        self.moving_half = moving_half

    @property
    def halves(self) -> tuple[TransformModule, TransformModule]:
        return self.fixed_half, self.moving_half

    # --- the Transform contract ----------------------------------------------------------------

    def start_level(self, ctx: LevelContext) -> bool:
        """Start the level in both halves (create, resample or fold their parameters)."""
        for half in self.halves:
            half.start_level(ctx)
        return True

    def after_step(self, ctx: LevelContext) -> None:
        for half in self.halves:
            half.after_step(ctx)

    def parameter_groups(self) -> list[dict]:
        return [group for half in self.halves for group in half.parameter_groups()]

    def spatial_parameters(self) -> list[torch.Tensor]:
        return [p for half in self.halves for p in half.spatial_parameters()]

    def field(self, ctx: LevelContext) -> torch.Tensor:
        """``(1, ndim, *ctx.shape)`` forward displacement ``phi_m ∘ phi_f^{-1}``, voxels of the level grid."""
        return self.forward_displacement(ctx.shape)

    def inverse_field(self, ctx: LevelContext) -> torch.Tensor:
        """``(1, ndim, *ctx.shape)`` inverse displacement ``phi_f ∘ phi_m^{-1}``: the pull field of the
        moving grid into the fixed image (``warped_fixed(y) = fixed(y + w(y))``), voxels of the level grid."""
        return self.inverse_displacement(ctx.shape)

    def middle(self, ctx: LevelContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The two half maps on the level grid: ``(d_f, d_m)``, each ``(1, ndim, *ctx.shape)`` voxels;
        the similarity compares ``fixed(x + d_f(x))`` with ``moving(x + d_m(x))``."""
        return self.fixed_half.displacement(ctx.shape), self.moving_half.displacement(ctx.shape)

    def regularized(self, ctx: LevelContext, field: torch.Tensor | None = None) -> RegularizedField:
        """Both halves' regularized fields stacked, ``(2, ndim, *P)`` (their own unit spacing)."""
        fixed, moving = (half.regularized(ctx, None) for half in self.halves)
        return RegularizedField(torch.cat([fixed.field, moving.field], dim=0), fixed.spacing)

    # --- fields on any grid --------------------------------------------------------------------

    def forward_displacement(self, shape: Sequence[int]) -> torch.Tensor:
        """``(1, ndim, *shape)``: ``phi_m ∘ phi_f^{-1}`` (fixed -> moving), voxels of that grid."""
        return compose(self.moving_half.displacement(shape), self.fixed_half.inverse_displacement(shape))

    def inverse_displacement(self, shape: Sequence[int]) -> torch.Tensor:
        """``(1, ndim, *shape)``: ``phi_f ∘ phi_m^{-1}`` (moving -> fixed), voxels of that grid."""
        return compose(self.fixed_half.displacement(shape), self.moving_half.inverse_displacement(shape))
