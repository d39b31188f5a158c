"""Affine transforms: translation, rigid, similarity and affine models, and a dense residual after a fixed affine.

They implement :class:`dirio.transforms.base.Transform` and are optimised by the same engine and
terms as the dense field; they only change how the displacement is parameterised. Geometry (binding for every function of this module):

* The transform maps a **fixed voxel** ``x`` (indices of the full-resolution fixed grid) to a
  **moving voxel** ``y = A x + b`` of the same grid (fixed and moving share the grid, see
  DESIGN.md), i.e. the pull displacement is ``u(x) = A x + b - x``. The homogeneous
  ``(ndim + 1, ndim + 1)`` matrix ``[[A, b], [0, 1]]`` is the *voxel matrix*.
* Parameters live in isotropic physical units: with voxel size ``h`` (mm per axis) and unit
  length ``l = mean(h)``, a voxel offset ``x - c`` from the rotation centre ``c`` becomes
  ``p = (h / l) * (x - c)``; the transform is ``q = L p + t`` and ``y = c + (l / h) * q``. So a
  rigid model is a true rotation in millimetres even for anisotropic voxels.
* Parameter units are "voxels of size ``l`` moved": ``t`` directly; the rotation vector, the log
  scale and the entries of ``L - I`` are multiplied by ``R``, the RMS distance of the grid's voxels
  from the centre (in ``l`` units), so that a unit change of any parameter moves a typical voxel
  by about one voxel. Adam's step size (the engine's ``lr``) then means the same for every
  parameter.
* World coordinates: with the fixed image's voxel -> RAS affine ``F``, the world transform is
  ``T = F M F^-1`` (fixed RAS point -> moving RAS point, the direction ITK transforms use for
  resampling); ITK works in LPS, ``T_lps = P T P`` with ``P = diag(-1, -1, 1, 1)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dirio.core.fields import compose, identity_grid
from dirio.core.context import LevelContext, RegularizedField
from dirio.transforms.base import TransformModule

FAMILIES = ("translation", "rigid", "similarity", "affine")


def check_family(family: str) -> str:
    """Return ``family`` when it is a known affine family (else ``ValueError`` naming the choices)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown affine family {family!r}; choose one of none, {', '.join(FAMILIES)}")
    return family


def parameter_count(family: str, ndim: int) -> int:
    """Number of parameters: translation ``ndim``; rigid adds 1 (2D) or 3 (3D) rotation angles;
    similarity adds an isotropic log scale; affine has ``ndim**2 + ndim``."""
    check_family(family)
    rotations = 1 if ndim == 2 else 3
    return {
        "translation": ndim,
        "rigid": ndim + rotations,
        "similarity": ndim + rotations + 1,
        "affine": ndim * ndim + ndim,
    }[family]


def _skew(vector: torch.Tensor, ndim: int) -> torch.Tensor:
    """Skew-symmetric generator of a rotation: angle (2D, 1 value) or rotation vector (3D)."""
    if ndim == 2:
        (a,) = vector
        zero = torch.zeros((), dtype=vector.dtype, device=vector.device)
        return torch.stack([torch.stack([zero, -a]), torch.stack([a, zero])])
    x, y, z = vector
    zero = torch.zeros((), dtype=vector.dtype, device=vector.device)
    return torch.stack([
        torch.stack([zero, -z, y]),
        torch.stack([z, zero, -x]),
        torch.stack([-y, x, zero]),
    ])


def rms_radius(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """RMS distance of a grid's voxels from its centre, in units of the mean voxel size.

    Per axis the variance of ``0..n-1`` is ``(n^2 - 1) / 12``; scaled by ``h / mean(h)``.
    """
    unit = float(np.mean(spacing))
    return math.sqrt(sum((h / unit) ** 2 * (n * n - 1) / 12.0 for n, h in zip(shape, spacing))) or 1.0


class AffineTransform(TransformModule):
    """A translation / rigid / similarity / affine transform as a model the engine can optimise.

    Args:
        family: one of :data:`FAMILIES`.
        shape: the full-resolution grid ``S`` (fixed = moving grid).
        spacing: voxel size in mm per axis (default 1): rotations and scalings are in mm.
        centre: rotation centre, voxel coordinates of ``S`` (default: the grid centre).
        translation: initial moving-minus-fixed offset in voxels of ``S`` (default 0).
    As a :class:`~dirio.transforms.base.Transform`: one flat parameter vector ``param`` at the
    level's learning rate, nothing to do between levels, no regularized field.
    """

    kind = "affine"

    def __init__(self, family: str, shape: Sequence[int], spacing: Sequence[float] | None = None,
                 centre: Sequence[float] | None = None, translation: Sequence[float] | None = None, device=None):
        super().__init__()
        self.family = check_family(family)
        self.full_shape = tuple(int(n) for n in shape)
        ndim = len(self.full_shape)
        if ndim not in (2, 3):
            raise ValueError(f"affine models need 2 or 3 spatial axes, got shape {self.full_shape}")
        self.ndim = ndim
        spacing = [1.0] * ndim if spacing is None else [float(h) for h in spacing]
        if len(spacing) != ndim or any(not h > 0 for h in spacing):
            raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing}")
        self.spacing = tuple(spacing)
        unit = float(np.mean(spacing))
        # Voxel -> isotropic (mean-voxel) units, per axis.
        self.scale = torch.tensor([h / unit for h in spacing], dtype=torch.float64, device=device)
        if centre is None:
            centre = [(n - 1) / 2.0 for n in self.full_shape]
        self.centre = torch.as_tensor(centre, dtype=torch.float64, device=device).reshape(ndim)
        self.radius = rms_radius(self.full_shape, spacing)
        value = torch.zeros(parameter_count(family, ndim), dtype=torch.float32, device=device)
        if translation is not None:
            offset = torch.as_tensor(translation, dtype=torch.float64, device=device).reshape(ndim)
            value[:ndim] = (offset * self.scale).to(torch.float32)
        self.param = nn.Parameter(value)

    # --- the transform -------------------------------------------------------------------------

    def linear(self) -> torch.Tensor:
        """``(ndim, ndim)`` linear part ``L`` in isotropic physical units (identity at zero parameters)."""
        ndim = self.ndim
        p = self.param.to(torch.float64)
        eye = torch.eye(ndim, dtype=torch.float64, device=p.device)
        if self.family == "translation":
            return eye
        if self.family == "affine":
            return eye + p[ndim:].reshape(ndim, ndim) / self.radius
        rotations = 1 if ndim == 2 else 3
        rotation = torch.linalg.matrix_exp(_skew(p[ndim : ndim + rotations] / self.radius, ndim))
        if self.family == "similarity":
            rotation = rotation * torch.exp(p[ndim + rotations] / self.radius)
        return rotation

    def translation(self) -> torch.Tensor:
        """``(ndim,)`` translation ``t`` in isotropic physical units (mean voxel sizes)."""
        return self.param[: self.ndim].to(torch.float64)

    def voxel_matrix(self) -> torch.Tensor:
        """``(ndim + 1, ndim + 1)`` float64 homogeneous matrix: fixed voxel -> moving voxel of the full grid."""
        linear = self.linear()
        inverse_scale = 1.0 / self.scale
        matrix_a = inverse_scale[:, None] * linear * self.scale[None, :]
        offset = self.centre + inverse_scale * self.translation() - matrix_a @ self.centre
        top = torch.cat([matrix_a, offset[:, None]], dim=1)
        bottom = torch.zeros(1, self.ndim + 1, dtype=top.dtype, device=top.device)
        bottom[0, -1] = 1.0
        return torch.cat([top, bottom], dim=0)

    # --- the Transform contract ---------------------------------------------------------------

    def field(self, ctx: LevelContext) -> torch.Tensor:
        """``(1, ndim, *ctx.shape)`` pull displacement on the level grid, in its voxels."""
        return self.displacement(ctx.shape)

    def displacement(self, shape: Sequence[int]) -> torch.Tensor:
        """``(1, ndim, *shape)`` float32 pull displacement on a grid of ``shape`` covering the full grid
        (``align_corners`` geometry), in voxels of that grid."""
        return affine_displacement(self.voxel_matrix(), shape, self.full_shape)


def level_matrix(matrix: torch.Tensor, shape: Sequence[int], full_shape: Sequence[int]) -> torch.Tensor:
    """Express a full-grid voxel matrix on a grid of ``shape`` covering the same extent.

    A level voxel ``x'`` is the full-grid voxel ``r * x'`` with ``r = (n - 1) / (n' - 1)``
    (``align_corners``), so the level matrix is ``diag(1/r) M diag(r)`` (homogeneous, float64).
    """
    ratio = torch.tensor([(n - 1) / max(m - 1, 1) for n, m in zip(full_shape, shape)] + [1.0],
                         dtype=matrix.dtype, device=matrix.device)
    return matrix * ratio[None, :] / ratio[:, None]


def affine_displacement(matrix: torch.Tensor, shape: Sequence[int], full_shape: Sequence[int] | None = None,
                        points: torch.Tensor | None = None) -> torch.Tensor:
    """Displacement ``A x + b - x`` of a voxel matrix, on a grid or at given points.

    Args:
        matrix: ``(ndim + 1, ndim + 1)`` homogeneous voxel matrix of the full grid (any float dtype).
        shape: the grid the displacement is wanted on (a pyramid level of ``full_shape``).
        full_shape: the grid ``matrix`` is defined on (default ``shape``).
        points: optional ``(1, ndim, *shape)`` voxel coordinates of that grid at which to evaluate
            ``A y + b - y`` (default: the grid's own voxels).
    Returns:
        ``(1, ndim, *shape)`` float32 displacement in voxels of ``shape``.
    """
    full_shape = tuple(shape) if full_shape is None else tuple(full_shape)
    ndim = len(shape)
    m = level_matrix(matrix, shape, full_shape).to(torch.float32)
    if points is None:
        points = identity_grid(shape, device=matrix.device).unsqueeze(0)
    linear = m[:ndim, :ndim] - torch.eye(ndim, device=m.device, dtype=m.dtype)
    # Broadcast multiply-adds, one per input axis: a (ndim x ndim) @ (ndim x voxels) product or an
    # einsum takes ~30 ms instead of ~0.02 ms when the BLAS library runs multi-threaded on a busy CPU.
    points = points.to(m.dtype)
    view = (1, ndim) + (1,) * ndim
    moved = m[:ndim, ndim].view(view).expand_as(points)
    for j in range(ndim):
        moved = moved + linear[:, j].view(view) * points[:, j : j + 1]
    return moved


def compose_affine_field(matrix: torch.Tensor, disp: torch.Tensor) -> torch.Tensor:
    """Field of warping by the affine first and then by ``disp``: ``u(x) + a(x + u(x))``.

    With pull warps, ``warp(warp(m, a), u)(x) = m(y + a(y))`` at ``y = x + u(x)``; the affine part
    is evaluated analytically (no interpolation of the affine field).

    Args:
        matrix: full-grid homogeneous voxel matrix of the affine ``a``.
        disp: ``(1, ndim, *S)`` displacement on the full grid ``S``.
    Returns:
        ``(1, ndim, *S)`` composite displacement.
    """
    shape = tuple(disp.shape[2:])
    points = identity_grid(shape, device=disp.device, dtype=disp.dtype).unsqueeze(0) + disp
    return disp + affine_displacement(matrix.to(disp.device), shape, shape, points=points)


class AffineThenDense(TransformModule):
    """A dense transform (the residual) applied after a fixed affine: ``u_total = u + a(x + u)``.

    The engine optimises and regularizes only the dense residual ``u``; similarity and masks see
    the composite, and the moving image is sampled once (no pre-warped copy is interpolated twice).

    Args:
        dense: a :class:`dirio.transforms.dense.DenseDisplacement` (or velocity) transform.
        matrix: full-grid homogeneous voxel matrix of the fixed affine.
        full_shape: the full grid ``S``.
    """

    def __init__(self, dense: TransformModule, matrix: torch.Tensor, full_shape: Sequence[int]):
        super().__init__()
        self.dense = dense
        self.register_buffer("matrix", matrix.detach().to(torch.float64))
        self.full_shape = tuple(full_shape)
        self.kind = getattr(dense, "kind", "displacement")

    def start_level(self, ctx: LevelContext) -> bool:
        return self.dense.start_level(ctx)

    def after_step(self, ctx: LevelContext) -> None:
        self.dense.after_step(ctx)

    def parameter_groups(self) -> list[dict]:
        return self.dense.parameter_groups()

    def spatial_parameters(self) -> list[torch.Tensor]:
        return self.dense.spatial_parameters()

    def field(self, ctx: LevelContext) -> torch.Tensor:
        return self.displacement(ctx.shape)

    def displacement(self, shape: Sequence[int]) -> torch.Tensor:
        residual = self.dense.displacement(shape)
        points = identity_grid(shape, device=residual.device, dtype=residual.dtype).unsqueeze(0) + residual
        return residual + affine_displacement(self.matrix, shape, self.full_shape, points=points)

    def regularized(self, ctx: LevelContext, field: torch.Tensor | None = None) -> RegularizedField | None:
        return self.dense.regularized(ctx, field)

    def inverse_field(self, ctx: LevelContext) -> torch.Tensor | None:
        """Exact when the residual's inverse is: the map ``x -> A(x + u(x))`` inverts to
        ``y -> z + w(z)`` with ``z = A^-1 y`` and ``w`` the residual's inverse, i.e. the displacement
        ``compose(w, a_inv)``; ``None`` when the residual has no exact inverse."""
        residual_inverse = self.dense.inverse_field(ctx)
        if residual_inverse is None:
            return None
        inverse_matrix = torch.linalg.inv(self.matrix)
        return compose(residual_inverse, affine_displacement(inverse_matrix, ctx.shape, self.full_shape))
