"""Affine pre-alignment: translation, rigid, similarity and affine transformation models.

The models are optimised by the same engine and similarity objects as the dense field
(:func:`dirio.optim.engine.optimise` with ``model_factory``); they only change how the
displacement is parameterised. Geometry (binding for every function of this module):

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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dirio.core.fields import identity_grid

FAMILIES = ("translation", "rigid", "similarity", "affine")
CENTRES = ("mass", "grid")
_LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])

# An affine learning rate above this many voxels per Adam step is refused (as the dense stage's,
# dirio.config.settings.MAX_LR): no pre-alignment moves hundreds of voxels per step.
MAX_LR = 100.0


@dataclass
class AffineConfig:
    """Settings of the affine stage (it runs before any deformable stage).

    Attributes:
        levels: pyramid shrink factors, coarse to fine. Quarter then half resolution: the
            12 parameters are over-determined by the half-resolution image already and a
            full-resolution level would cost ~8x more per iteration.
        iterations: Adam iterations per level.
        lr: Adam step in voxels (of the mean voxel size) per iteration; see the module docstring.
            Chosen on synthetic affine pairs (rotations <= 8 degrees per axis, scalings +-5 %,
            shifts of 10 voxels, 48^3 voxels, levels 2 and 1): 0.5 reached a mean endpoint error
            of 0.05 voxel with the MSE similarity.
        schedule: learning-rate schedule of each level (``"cosine"`` decays to 0 for precision).
        centre: initial alignment and rotation centre: ``"mass"`` (centres of mass of the masks
            when given, else of the normalised intensities: rotation about the fixed centre of
            mass, initial translation between the two centres) or ``"grid"`` (grid centre,
            identity start).
    """

    levels: Sequence[int] = (4, 2)
    iterations: Sequence[int] = (100, 60)
    lr: float = 0.5
    schedule: str = "cosine"
    centre: str = "mass"

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason when the settings are inconsistent."""
        if len(self.levels) == 0 or len(self.levels) != len(self.iterations):
            raise ValueError(
                f"affine levels {tuple(self.levels)} and iterations {tuple(self.iterations)} must be non-empty "
                "and of equal length"
            )
        if self.centre not in CENTRES:
            raise ValueError(f"unknown affine centre {self.centre!r}; choose one of {', '.join(CENTRES)}")
        if not self.lr > 0:
            raise ValueError(f"affine learning rate must be positive, got {self.lr}")
        if not self.lr <= MAX_LR:
            raise ValueError(f"affine learning rate {self.lr:g} is absurd: it is an Adam step of about that many "
                             f"voxels per iteration, and at most {MAX_LR:g} is accepted (the presets use 0.5)")


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


def centre_of_mass(weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean voxel coordinate of a ``(1, 1, *S)`` non-negative weight image -> ``(ndim,)``.

    Falls back to the grid centre when all weights are zero.
    """
    shape = weights.shape[2:]
    w = weights[0, 0].clamp_min(0).to(torch.float64)
    total = w.sum()
    if not total > 0:
        return torch.tensor([(n - 1) / 2.0 for n in shape], dtype=torch.float64, device=weights.device)
    grid = identity_grid(shape, device=weights.device, dtype=torch.float64)
    return (grid * w).flatten(1).sum(1) / total


class AffineTransform(nn.Module):
    """A translation / rigid / similarity / affine transform as a model the engine can optimise.

    Args:
        family: one of :data:`FAMILIES`.
        shape: the full-resolution grid ``S`` (fixed = moving grid).
        spacing: voxel size in mm per axis (default 1): rotations and scalings are in mm.
        centre: rotation centre, voxel coordinates of ``S`` (default: the grid centre).
        translation: initial moving-minus-fixed offset in voxels of ``S`` (default 0).
    The engine interface: ``param`` (one flat vector), ``displacement(shape)``, ``regularised()``
    (``None``: no regulariser applies to an affine model) and ``resample`` (nothing to do).
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

    # --- engine interface ----------------------------------------------------------------------

    def displacement(self, shape: Sequence[int]) -> torch.Tensor:
        """``(1, ndim, *shape)`` float32 pull displacement on a grid of ``shape`` covering the full grid
        (``align_corners`` geometry), in voxels of that grid."""
        return affine_displacement(self.voxel_matrix(), shape, self.full_shape)

    def regularised(self):
        """No smoothness regulariser applies to a global transform."""
        return None

    def resample(self, param_shape) -> None:
        """Pyramid levels do not change an affine model's parameters."""


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


class AffineThenDense(nn.Module):
    """A dense model (the residual) applied after a fixed affine: ``u_total = u + a(x + u)``.

    The engine optimises and regularises only the dense residual ``u``; similarity and masks see
    the composite, and the moving image is sampled once (no pre-warped copy is interpolated twice).

    Args:
        dense: a :class:`dirio.transforms.dense.DenseDisplacement` (or velocity) model.
        matrix: full-grid homogeneous voxel matrix of the fixed affine.
        full_shape: the full grid ``S``.
    """

    def __init__(self, dense: nn.Module, matrix: torch.Tensor, full_shape: Sequence[int]):
        super().__init__()
        self.dense = dense
        self.register_buffer("matrix", matrix.detach().to(torch.float64))
        self.full_shape = tuple(full_shape)
        self.kind = getattr(dense, "kind", "displacement")

    @property
    def param(self) -> nn.Parameter:
        return self.dense.param

    def displacement(self, shape: Sequence[int]) -> torch.Tensor:
        residual = self.dense.displacement(shape)
        points = identity_grid(shape, device=residual.device, dtype=residual.dtype).unsqueeze(0) + residual
        return residual + affine_displacement(self.matrix, shape, self.full_shape, points=points)

    def regularised(self) -> torch.Tensor:
        return self.dense.regularised()

    def resample(self, param_shape) -> None:
        self.dense.resample(param_shape)


def initial_alignment(fixed_weights: torch.Tensor, moving_weights: torch.Tensor, centre: str
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rotation centre and initial translation (voxels) from centres of mass, or ``(None, None)``.

    Args:
        fixed_weights, moving_weights: ``(1, 1, *S)`` non-negative weights (masks or intensities).
        centre: ``"mass"`` or ``"grid"``.
    Returns:
        ``(fixed centre of mass, moving minus fixed centre of mass)`` as ``(ndim,)`` float64 tensors,
        or ``(None, None)`` for ``"grid"``.
    """
    if centre == "grid":
        return None, None
    fixed_com = centre_of_mass(fixed_weights)
    moving_com = centre_of_mass(moving_weights)
    return fixed_com, moving_com - fixed_com


# --- world coordinates and files -----------------------------------------------------------------


def embed_3d(matrix: np.ndarray) -> np.ndarray:
    """A 2D homogeneous 3x3 matrix as a 4x4 one (identity along the third axis); 4x4 unchanged."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape == (4, 4):
        return matrix
    if matrix.shape != (3, 3):
        raise ValueError(f"expected a 3x3 or 4x4 homogeneous matrix, got shape {matrix.shape}")
    out = np.eye(4)
    out[:2, :2] = matrix[:2, :2]
    out[:2, 3] = matrix[:2, 2]
    return out


def world_matrix(voxel_matrix: np.ndarray, fixed_affine: np.ndarray) -> np.ndarray:
    """World (RAS mm) 4x4 transform ``F M F^-1``: fixed RAS point -> moving RAS point.

    Args:
        voxel_matrix: homogeneous voxel matrix (3x3 in 2D, 4x4 in 3D).
        fixed_affine: the fixed image's 4x4 voxel -> RAS affine (also the moving image's, same grid).
    """
    fixed_affine = np.asarray(fixed_affine, dtype=np.float64)
    return fixed_affine @ embed_3d(voxel_matrix) @ np.linalg.inv(fixed_affine)


def ras_to_lps_matrix(matrix_ras: np.ndarray) -> np.ndarray:
    """A 4x4 world transform in RAS -> the same transform in ITK's LPS coordinates (``P T P``)."""
    return _LPS_FLIP @ np.asarray(matrix_ras, dtype=np.float64) @ _LPS_FLIP


def affine_record(voxel_matrix: np.ndarray, fixed_affine: np.ndarray, family: str) -> dict:
    """JSON-ready description: the voxel matrix and the world matrices (RAS and LPS), with conventions."""
    world = world_matrix(voxel_matrix, fixed_affine)
    return {
        "family": family,
        "convention": (
            "pull transform: fixed point -> moving point (warped(x) = moving(M x)); voxel_matrix acts on "
            "voxel indices (i, j, k, 1) of the fixed grid; world_ras / world_lps on homogeneous mm coordinates"
        ),
        "voxel_matrix": np.asarray(voxel_matrix, dtype=np.float64).tolist(),
        "world_ras": world.tolist(),
        "world_lps": ras_to_lps_matrix(world).tolist(),
    }


def write_itk_transform(path: str | Path, voxel_matrix: np.ndarray, fixed_affine: np.ndarray) -> bool:
    """Write the affine as an ITK transform file (``.tfm``, LPS) with SimpleITK; ``False`` if it is absent.

    The transform maps fixed physical points to moving physical points, so
    ``SimpleITK.Resample(moving, fixed, transform)`` reproduces the affine-aligned moving image.
    2D voxel matrices are written as 2D ITK transforms.
    """
    try:
        import SimpleITK as sitk
    except ImportError:
        return False
    lps = ras_to_lps_matrix(world_matrix(voxel_matrix, fixed_affine))
    ndim = np.asarray(voxel_matrix).shape[0] - 1
    transform = sitk.AffineTransform(ndim)
    transform.SetMatrix(lps[:ndim, :ndim].ravel().tolist())
    transform.SetTranslation(lps[:ndim, 3].tolist())
    sitk.WriteTransform(transform, str(path))
    return True


# --- the affine stage ----------------------------------------------------------------------------


@dataclass
class AffineResult:
    """What the affine stage produces.

    Attributes:
        matrix: ``(ndim + 1, ndim + 1)`` float64 voxel matrix (fixed voxel -> moving voxel).
        displacement: ``(1, ndim, *S)`` float32 pull displacement of the matrix on the full grid.
        history, levels, seconds, peak_memory_mb: the engine's log of the run.
    """

    matrix: np.ndarray
    displacement: torch.Tensor
    history: list
    levels: list
    seconds: float
    peak_memory_mb: float


def register_affine(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    similarity,
    family: str,
    config: AffineConfig | None = None,
    *,
    spacing: Sequence[float] | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    seed: int = 0,
    progress: bool = False,
) -> AffineResult:
    """Affine pre-alignment by the instance-optimisation engine (Adam, coarse to fine).

    Args:
        fixed, moving: ``(1, C, *S)`` normalised images on the same grid.
        similarity: a similarity object of :mod:`dirio.losses.similarity` (lower is better).
        family: ``"translation"``, ``"rigid"``, ``"similarity"`` or ``"affine"``.
        config: the stage's settings (default :class:`AffineConfig`).
        spacing: voxel size in mm per axis (rigid means rigid in mm).
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` masks: they restrict the similarity and,
            with ``centre="mass"``, give the centres of mass.
    Returns:
        An :class:`AffineResult`.
    """
    from dirio.optim.engine import EngineConfig, Objective, optimise

    config = config or AffineConfig()
    config.validate()
    check_family(family)
    shape = tuple(fixed.shape[2:])
    fixed_weights = fixed_mask if fixed_mask is not None else fixed[:, :1].clamp_min(0)
    moving_weights = moving_mask if moving_mask is not None else moving[:, :1].clamp_min(0)
    centre, offset = initial_alignment(fixed_weights, moving_weights, config.centre)
    holder: dict = {}

    def factory(_param_shape):
        holder["model"] = AffineTransform(family, shape, spacing=spacing, centre=centre, translation=offset,
                                          device=fixed.device)
        return holder["model"]

    engine = EngineConfig(
        levels=tuple(config.levels), iterations=tuple(config.iterations), grid_spacing=1.0, lr=config.lr,
        optimizer="adam", schedule=config.schedule, smoothing=0, seed=seed, progress=progress,
    )
    objectives = [Objective(getattr(similarity, "name", "similarity"), "similarity", similarity, 1.0)]
    result = optimise(fixed, moving, objectives, engine, fixed_mask=fixed_mask, moving_mask=moving_mask,
                      model_factory=factory)
    with torch.no_grad():
        matrix = holder["model"].voxel_matrix().cpu().numpy()
    return AffineResult(
        matrix=matrix,
        displacement=result.displacement,
        history=result.history,
        levels=result.levels,
        seconds=result.seconds,
        peak_memory_mb=result.peak_memory_mb,
    )
