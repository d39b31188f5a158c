"""The transform contract: what the engine optimises.

A transform maps a :class:`~dirio.core.context.LevelContext` (the images, masks and grid of one pyramid level, or one
training batch) to a displacement ``(B, ndim, *S)`` in voxels of that level's grid, Learn2Reg
convention (``warped(x) = moving(x + u(x))``). Dense displacement and velocity fields, the affine
family, an affine followed by a dense residual, and registration networks all implement
:class:`Transform`; the engine (:mod:`dirio.optim.pyramid`, :mod:`dirio.optim.step`) receives one
and returns it, so the caller keeps the optimised object.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch

from dirio.core.context import LevelContext, RegularizedField
from dirio.core.inverse import (DEFAULT_ITERATIONS, DEFAULT_TOLERANCE_VOXELS, InverseField, invert_displacement,
                                inverse_residual)


@runtime_checkable
class Transform(Protocol):
    """What is optimised. Every transform of dirio is a ``torch.nn.Module`` implementing this.

    * ``parameters()``: the tensors the optimiser updates (``nn.Module.parameters``).
    * ``parameter_groups()``: optimiser groups ``{"params": [...], "lr_divisor": d}``; the engine
      sets each group's rate to ``lr / d`` where ``lr`` is in voxels of the level grid per step
      (a dense field on a coarser parameter grid divides by its spacing; an affine or a network by 1).
    * ``spatial_parameters()``: the parameters that are spatial fields ``(B, C, *S)``, for the
      ``block`` scope of the combination rules (a network's Conv3d weights are not).
    * ``start_level(ctx) -> bool``: the per-level hook, called before a level's first iteration
      (resample a field onto the level's parameter grid, freeze or unfreeze parts); returns True
      when the parameter tensors were replaced, so that the optimiser must be rebuilt.
    * ``after_step(ctx)``: called after every optimiser step of instance optimisation (e.g. to fold
      an increment into an accumulated field, :mod:`dirio.transforms.composed`).
    * ``field(ctx)``: ``(B, ndim, *ctx.shape)`` displacement in voxels of the level grid.
    * ``regularized(ctx, field)``: a :class:`RegularizedField`, or ``None`` when no smoothness
      regularizer applies (an affine transform); ``field`` is this iteration's ``field(ctx)``
      (a network regularizes its prediction, a dense field its parameters).
    * ``save_state()`` / ``restore_state(state)``: a detached copy of every parameter and buffer,
      and its exact restoration (parameter shapes included), e.g. to restore pretrained weights
      after per-pair fine-tuning.
    * ``inverse_field(ctx)`` (optional; :class:`TransformModule` returns ``None``): the inverse of
      ``field(ctx)`` when the transform knows it exactly, as a ``(B, ndim, *ctx.shape)``
      displacement ``v`` in voxels of the level grid, on the field's device, such that
      ``x = y + v(y)`` for ``y = x + u(x)`` (it maps moving-grid points back to the fixed grid).
      A stationary velocity field returns the flow of the negated velocity; a transform built of
      two halves (symmetric registration) composes them the other way round. ``None`` means "not
      known exactly": callers then invert ``field(ctx)`` numerically (:func:`invert_transform`).
      Called without gradients, after optimisation.
    """

    def parameters(self) -> Iterable[torch.Tensor]: ...

    def parameter_groups(self) -> list[dict]: ...

    def spatial_parameters(self) -> list[torch.Tensor]: ...

    def start_level(self, ctx: LevelContext) -> bool: ...

    def after_step(self, ctx: LevelContext) -> None: ...

    def field(self, ctx: LevelContext) -> torch.Tensor: ...

    def regularized(self, ctx: LevelContext, field: torch.Tensor) -> RegularizedField | None: ...

    def save_state(self) -> dict[str, torch.Tensor]: ...

    def restore_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def inverse_field(self, ctx: LevelContext) -> torch.Tensor | None: ...


class TransformModule(torch.nn.Module):
    """Defaults shared by dirio's transforms: one optimiser group at the level rate, no spatial
    parameters, nothing to do between levels or steps, no regularized field, state as detached copies."""

    def parameter_groups(self) -> list[dict]:
        """One group of the trainable parameters at the level rate (``lr_divisor`` 1)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_divisor": 1.0}]

    def spatial_parameters(self) -> list[torch.Tensor]:
        """No parameter is a spatial field."""
        return []

    def start_level(self, ctx: LevelContext) -> bool:
        """Nothing to do at a new level; the parameters are kept (``False``)."""
        return False

    def after_step(self, ctx: LevelContext) -> None:
        """Nothing to do after an optimiser step."""
        return None

    def regularized(self, ctx: LevelContext, field: torch.Tensor) -> RegularizedField | None:
        """No smoothness regularizer applies (``None``)."""
        return None

    def inverse_field(self, ctx: LevelContext) -> torch.Tensor | None:
        """No exact inverse known: :func:`invert_transform` inverts the field numerically."""
        return None

    def save_state(self) -> dict[str, torch.Tensor]:
        """A detached copy of every parameter and buffer, by ``state_dict`` name."""
        return {name: value.detach().clone() for name, value in self.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def restore_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back a :meth:`save_state` copy exactly (values and shapes); ``ValueError`` when its names
        do not match the transform's."""
        current = self.state_dict(keep_vars=True)
        missing = sorted(set(current) - set(state))
        unexpected = sorted(set(state) - set(current))
        if missing or unexpected:
            raise ValueError(f"state does not match the transform: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in state.items():
            target = current[name]
            # ``.data`` assignment restores the value and the shape (a resampled field changes shape)
            target.data = value.detach().clone().to(device=target.device, dtype=target.dtype)


def parameter_flags(params: Sequence[torch.Tensor], spatial: Iterable[torch.Tensor]) -> list[bool]:
    """For each of ``params``, whether it is one of the ``spatial`` tensors (by identity)."""
    ids = {id(p) for p in spatial}
    return [id(p) in ids for p in params]


@contextmanager
def restored(transform: Transform):
    """Restore ``transform``'s parameters and buffers, bit for bit, when the block exits, however
    it exits (a result, an error, an interrupt): per-pair fine-tuning never leaks into the next pair."""
    state = transform.save_state()
    try:
        yield transform
    finally:
        transform.restore_state(state)


@torch.no_grad()
def invert_transform(transform: Transform, ctx: LevelContext, field: torch.Tensor | None = None, *,
                     iterations: int = DEFAULT_ITERATIONS,
                     tolerance: float = DEFAULT_TOLERANCE_VOXELS) -> InverseField:
    """The inverse of ``transform``'s field on ``ctx``'s grid: its exact ``inverse_field`` when it
    has one, else the iterative inverse of the field (:func:`dirio.core.inverse.invert_displacement`).

    Args:
        transform: an optimised transform.
        ctx: the grid (usually the full-resolution context of the pair).
        field: ``transform.field(ctx)`` when already computed (``(B, ndim, *ctx.shape)``, voxels).
        iterations, tolerance: of the iteration.
    Returns:
        An :class:`~dirio.core.inverse.InverseField` whose residual is measured against ``field``
        in both cases.
    """
    if field is None:
        field = transform.field(ctx)
    hook = getattr(transform, "inverse_field", None)
    exact = hook(ctx) if hook is not None else None
    if exact is not None:
        exact = exact.detach()
        return InverseField(exact, inverse_residual(field, exact), 0, "exact")
    return invert_displacement(field.detach(), iterations=iterations, tolerance=tolerance)
