"""Dense transformation models: a displacement field or a stationary velocity field on a parameter grid.

The parameter grid may be coarser than the image grid on which the similarity is computed
(``grid_spacing`` image voxels per parameter voxel); the field is upsampled (trilinear,
``align_corners=True``) every iteration. Parameters are stored in **voxels of the parameter
grid**, so that resampling between pyramid levels is :func:`dirio.core.fields.resize_field` and the
finite differences the regularizers take on the parameter grid are dimensionless derivatives
``du/dx`` whatever the grid. Learning rates given to the engine are in voxels of the level's image
grid; the transform's optimiser group divides them by ``grid_spacing`` (``lr_divisor``).

Both models implement :class:`dirio.transforms.base.Transform`: at each pyramid level
(``start_level``) the parameters move to the level's parameter grid, ``field(ctx)`` is the
displacement on the level's image grid, and the regularizers see the parameters themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from torch.autograd.function import once_differentiable

from dirio.core.fields import integrate_velocity, resize_field
from dirio.core.filters import box_smooth, box_smooth_adjoint
from dirio.core.inverse import invert_velocity
from dirio.core.context import LevelContext, RegularizedField
from dirio.transforms.base import TransformModule
from dirio.transforms.composed import ComposedDisplacement
from dirio.transforms.symmetric import SymmetricTransform


def grid_shape(shape: Sequence[int], spacing: float) -> tuple[int, ...]:
    """Shape of a grid covering ``shape`` voxels with ``spacing`` voxels per grid point (at least 2 per axis)."""
    return tuple(max(int(round(n / spacing)), 2) for n in shape)


class _BoxSmoothing(torch.autograd.Function):
    """:func:`dirio.core.filters.box_smooth` with its exact transpose as the backward pass."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, passes: int, border: str) -> torch.Tensor:
        ctx.passes = passes
        ctx.border = border
        return box_smooth(param, passes, border)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return box_smooth_adjoint(grad, ctx.passes, ctx.border), None, None


def smooth_parameters(param: torch.Tensor, passes: int, border: str = "inside") -> torch.Tensor:
    """``passes`` rounds of a 3-voxel moving average along every axis.

    Two passes give the kernel ``[1, 2, 3, 2, 1] / 9`` per axis, a compact approximation of a
    cubic B-spline: the field is a smooth function of the parameters and the optimiser's per-voxel
    steps are spread over neighbours (ConvexAdam smooths its Adam field the same way with two
    3x3x3 average poolings). At the border the average is over the voxels inside the grid
    (``border="inside"``), or the grid is padded with zeros and every sum divided by 3
    (``"zeros"``: ConvexAdam's ``avg_pool3d(padding=1)``, which pulls the field toward 0 at the border).
    Shifted adds forward and their transpose backward (:func:`dirio.core.filters.box_smooth`): on the
    80 x 96 x 112 x 3 half-resolution brain field, forward + backward take 0.025 s against 0.16 s
    with 1D average pooling.
    """
    if passes <= 0:
        return param
    return _BoxSmoothing.apply(param, passes, border)


class DenseDisplacement(TransformModule):
    """A displacement field optimised directly (dense instance optimisation).

    Args:
        param_shape: spatial shape of the parameter grid when the model is used on its own;
            ``None`` (the engine's use) creates the parameters at the first ``start_level``.
        init: optional ``(1, ndim, *S)`` initial displacement on any grid, in voxels of that grid.
        device: device of the parameters.
        smoothing: passes of the parameter smoothing (:func:`smooth_parameters`).
        grid_spacing: parameter-grid spacing in voxels of each level's image grid: one number, or
            one per pyramid level (indexed by ``ctx.level``).

    Conventions (:meth:`set_conventions`; the defaults are dirio's): ``smoothing_border`` of the
    parameter smoothing (``"inside"`` or ``"zeros"``), what the regularizers see (``regularize``:
    ``"parameters"`` or ``"smoothed"``, the field the parameters form) and the geometry of every
    resampling between grids (``align_corners``, :func:`dirio.core.fields.resize_field`).
    """

    kind = "displacement"
    smoothing_border = "inside"
    regularize = "parameters"
    align_corners = True

    def __init__(self, param_shape: Sequence[int] | None = None, init: torch.Tensor | None = None, device=None,
                 smoothing: int = 0, grid_spacing: float | Sequence[float] = 1.0):
        super().__init__()
        self.smoothing = smoothing
        self.grid_spacing = grid_spacing
        self.init = init
        self.device = device
        self.current_spacing = 1.0
        self.register_parameter("param", None)
        if param_shape is not None:
            self.param = nn.Parameter(self._initial(param_shape))

    def _initial(self, param_shape: Sequence[int]) -> torch.Tensor:
        if self.init is None:
            return torch.zeros(1, len(param_shape), *param_shape, device=self.device).contiguous()
        return resize_field(self.init.to(device=self.device, dtype=torch.float32), param_shape,
                            self.align_corners).contiguous()

    def set_conventions(self, smoothing_border: str = "inside", regularize: str = "parameters",
                        align_corners: bool = True) -> DenseDisplacement:
        """Choose the conventions of the class docstring (before the first level); returns ``self``."""
        self.smoothing_border, self.regularize, self.align_corners = smoothing_border, regularize, align_corners
        return self

    def spacing_of_level(self, level: int) -> float:
        """Parameter-grid spacing (image voxels per parameter voxel) of pyramid level ``level``."""
        if isinstance(self.grid_spacing, (int, float)):
            return float(self.grid_spacing)
        return float(self.grid_spacing[level])

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape[2:])

    # --- the Transform contract ----------------------------------------------------------------

    def start_level(self, ctx: LevelContext) -> bool:
        """Create the parameters on the level's parameter grid, or resample them onto it."""
        self.current_spacing = self.spacing_of_level(ctx.level)
        param_shape = grid_shape(ctx.shape, self.current_spacing)
        if self.param is None:
            self.param = nn.Parameter(self._initial(param_shape))
        else:
            self.resample(param_shape)
        return True

    def parameter_groups(self) -> list[dict]:
        return [{"params": [self.param], "lr_divisor": self.current_spacing}]

    def spatial_parameters(self) -> list[torch.Tensor]:
        return [self.param]

    def field(self, ctx: LevelContext) -> torch.Tensor:
        """``(1, ndim, *ctx.shape)`` displacement on the level's image grid, in its voxels."""
        return self.displacement(ctx.shape)

    def regularized(self, ctx: LevelContext, field: torch.Tensor | None = None) -> RegularizedField:
        """The parameters (or with ``regularize="smoothed"`` the smoothed field they form, as ConvexAdam
        regularizes its pooled field), in parameter-grid voxels (unit spacing: derivatives are dimensionless)."""
        values = self.param if self.regularize == "parameters" else smooth_parameters(
            self.param, self.smoothing, self.smoothing_border)
        return RegularizedField(values, (1.0,) * (self.param.dim() - 2))

    # --- field on any grid ---------------------------------------------------------------------

    def grid_displacement(self) -> torch.Tensor:
        """``(1, ndim, *P)`` displacement on the parameter grid, in parameter-grid voxels."""
        return smooth_parameters(self.param, self.smoothing, self.smoothing_border)

    def displacement(self, shape: Sequence[int]) -> torch.Tensor:
        """``(1, ndim, *shape)`` displacement on an image grid of ``shape``, in voxels of that grid."""
        return resize_field(self.grid_displacement(), shape, self.align_corners)

    @torch.no_grad()
    def resample(self, param_shape: Sequence[int]) -> None:
        """Move to a new parameter grid (next pyramid level), keeping the represented field."""
        self.param = nn.Parameter(resize_field(self.param.detach(), param_shape, self.align_corners).contiguous())


class StationaryVelocity(DenseDisplacement):
    """A stationary velocity field exponentiated by scaling and squaring (diffeomorphic).

    The velocity lives on the parameter grid and is integrated there (``steps`` squarings), then
    the displacement is upsampled. Regularizers act on the velocity. An initial displacement is
    used as the initial velocity: exact for translations and a first-order approximation
    (``exp(v) ~ id + v``) otherwise.
    """

    kind = "velocity"

    def __init__(self, param_shape: Sequence[int] | None = None, init: torch.Tensor | None = None, device=None,
                 steps: int = 7, smoothing: int = 0, grid_spacing: float | Sequence[float] = 1.0):
        super().__init__(param_shape, init=init, device=device, smoothing=smoothing, grid_spacing=grid_spacing)
        self.steps = steps

    def grid_velocity(self) -> torch.Tensor:
        """``(1, ndim, *P)`` the (smoothed) velocity on the parameter grid, in parameter-grid voxels per unit time."""
        return smooth_parameters(self.param, self.smoothing)

    def grid_displacement(self) -> torch.Tensor:
        return integrate_velocity(self.grid_velocity(), self.steps)

    def inverse_displacement(self, shape: Sequence[int]) -> torch.Tensor:
        """``(1, ndim, *shape)`` the exact inverse ``exp(-v)`` on an image grid of ``shape``, in its voxels."""
        return resize_field(invert_velocity(self.grid_velocity(), self.steps), shape)

    def inverse_field(self, ctx: LevelContext) -> torch.Tensor:
        """The exact inverse: the flow of the negated velocity (same smoothing, squarings and
        upsampling as :meth:`field`), ``(1, ndim, *ctx.shape)`` in voxels of the level grid."""
        velocity = smooth_parameters(self.param, self.smoothing)
        return resize_field(invert_velocity(velocity, self.steps), ctx.shape)


def make_dense_model(
    diffeomorphic: bool, param_shape=None, init=None, device=None, steps: int = 7, smoothing: int = 0,
    grid_spacing: float | Sequence[float] = 1.0,
) -> DenseDisplacement:
    """The dense transformation model: a velocity field when ``diffeomorphic`` else a displacement field."""
    if diffeomorphic:
        return StationaryVelocity(param_shape, init=init, device=device, steps=steps, smoothing=smoothing,
                                  grid_spacing=grid_spacing)
    return DenseDisplacement(param_shape, init=init, device=device, smoothing=smoothing, grid_spacing=grid_spacing)


@dataclass
class DenseConfig:
    """Settings of the dense transform.

    Attributes:
        diffeomorphic: optimise a stationary velocity field integrated by scaling and squaring
            with ``integration_steps`` squarings, instead of a displacement field.
        grid_spacing: parameter-grid spacing in voxels of each level's image grid (one number
            for every level or one per level); 1 optimises a field at the level's resolution.
        smoothing: passes of a 3-voxel box filter applied to the parameters to form the field
            (see :func:`smooth_parameters`); 0 uses the parameters as they are.
        compose_every: 0 optimises one field additively; ``N > 0`` optimises increments that are
            composed into an accumulated field every ``N`` steps and at every level change
            (:class:`dirio.transforms.composed.ComposedDisplacement`).
            One number, or one per level (0 at a level: fold only when it ends; not all 0). With
            ``diffeomorphic`` the increments are folded as stationary velocities: ``b <- b ∘ exp(u)``
            by ``integration_steps`` squarings, so that every fold is one-to-one.
        symmetric: optimise two half maps that deform both images toward a middle space
            (:class:`dirio.transforms.symmetric.SymmetricTransform`): two velocity fields (exact
            inverse), or with ``compose_every`` two composed fields with diffeomorphic folds that track
            their inverses; ``integration_steps``, ``smoothing`` and ``grid_spacing`` apply to each half.
        smoothing_border: ``"inside"`` (average over the parameters inside the grid) or ``"zeros"``
            (ConvexAdam's zero-padded average pooling), see :func:`smooth_parameters`.
        regularize: ``"parameters"`` (the regularizers see the parameters) or ``"smoothed"`` (the
            smoothed field they form, as ConvexAdam).
        grid_alignment: ``"corners"`` (dirio's ``align_corners=True`` resampling of the field between
            grids) or ``"centres"`` (``align_corners=False``: ConvexAdam's half-resolution grid,
            whose voxel ``y`` covers the full-grid voxels ``2y, 2y + 1``). These last three
            conventions apply to the plain displacement field (not composed, symmetric or
            diffeomorphic) and are there to reproduce ConvexAdam's Adam stage.
    """

    diffeomorphic: bool = False
    grid_spacing: float | Sequence[float] = 1.0
    integration_steps: int = 7
    smoothing: int = 2
    compose_every: int | Sequence[int] = 0
    symmetric: bool = False
    smoothing_border: str = "inside"
    regularize: str = "parameters"
    grid_alignment: str = "corners"

    def spacings(self, levels: int) -> list[float]:
        """One parameter-grid spacing per pyramid level."""
        if isinstance(self.grid_spacing, (int, float)):
            return [float(self.grid_spacing)] * levels
        return [float(s) for s in self.grid_spacing]

    def compose_counts(self, levels: int) -> list[int]:
        """Steps between folds per pyramid level (all 0: an additive field)."""
        if isinstance(self.compose_every, (int, float)):
            return [self.compose_every] * levels
        return list(self.compose_every)

    @property
    def composes(self) -> bool:
        """Whether the field is built by composition (:mod:`dirio.transforms.composed`)."""
        return any(self.compose_counts(1))  # one value stands for every level; a list comes back as given

    def validate(self, levels: int) -> None:
        """Raise ``ValueError`` when the settings do not fit a pyramid of ``levels`` levels."""
        spacings = self.spacings(levels)
        if len(spacings) != levels or any(not s > 0 for s in spacings):
            raise ValueError(f"grid spacing must be positive, one value or one per level; got {self.grid_spacing}")
        if int(self.smoothing) != self.smoothing or self.smoothing < 0:
            raise ValueError(f"smoothing must be a non-negative integer, got {self.smoothing!r}")
        if int(self.integration_steps) != self.integration_steps or self.integration_steps < 0:
            raise ValueError(f"integration_steps must be a non-negative integer, got {self.integration_steps!r}")
        if self.symmetric and self.composes and self.integration_steps < 1:
            raise ValueError("the symmetric composed transform folds exp(u) and tracks exp(-u): integration_steps "
                             "must be at least 1")
        for name, value, choices in (("smoothing_border", self.smoothing_border, ("inside", "zeros")),
                                     ("regularize", self.regularize, ("parameters", "smoothed")),
                                     ("grid_alignment", self.grid_alignment, ("corners", "centres"))):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if ((self.smoothing_border, self.regularize, self.grid_alignment) != ("inside", "parameters", "corners")
                and (self.symmetric or self.composes or self.diffeomorphic)):
            raise ValueError("smoothing_border, regularize and grid_alignment other than the defaults apply to the "
                             "plain displacement field only (not symmetric, composed or diffeomorphic)")
        counts = self.compose_counts(levels)
        if len(counts) != levels or any(int(n) != n or n < 0 for n in counts):
            raise ValueError(f"compose_every must be non-negative integers, one value or one per level; "
                             f"got {self.compose_every!r}")

    def build(self, init: torch.Tensor | None = None, device=None):
        """The transform (:class:`DenseDisplacement`, :class:`StationaryVelocity`,
        :class:`~dirio.transforms.composed.ComposedDisplacement` or
        :class:`~dirio.transforms.symmetric.SymmetricTransform`), its parameters created at the first pyramid level."""
        if self.symmetric:
            def half(sign: float):
                start = None if init is None else sign * 0.5 * init
                if self.composes:
                    increment = DenseDisplacement(None, device=device, smoothing=self.smoothing,
                                                  grid_spacing=self.grid_spacing)
                    return ComposedDisplacement(increment, self.compose_every, init=start,
                                                fold_steps=self.integration_steps, track_inverse=True)
                return StationaryVelocity(None, init=start, device=device, steps=self.integration_steps,
                                          smoothing=self.smoothing, grid_spacing=self.grid_spacing)

            # an initial forward displacement u0 is split: phi_f ~ -u0 / 2, phi_m ~ u0 / 2 (exact for translations)
            return SymmetricTransform(half(-1.0), half(1.0))
        if self.composes:
            increment = DenseDisplacement(None, device=device, smoothing=self.smoothing, grid_spacing=self.grid_spacing)
            return ComposedDisplacement(increment, self.compose_every, init=init,
                                        fold_steps=self.integration_steps if self.diffeomorphic else 0)
        model = make_dense_model(self.diffeomorphic, None, init=init, device=device, steps=self.integration_steps,
                                 smoothing=self.smoothing, grid_spacing=self.grid_spacing)
        return model.set_conventions(self.smoothing_border, self.regularize, self.grid_alignment == "corners")
