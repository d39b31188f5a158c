"""The affine stage: pre-alignment by a translation, rigid, similarity or affine transform.

The models (:mod:`dirio.transforms.affine`) are optimised by the same engine and similarity terms
as the dense field (:func:`dirio.optim.pyramid.run_pyramid`); they only change how the
displacement is parameterised. The voxel matrix, the parameter units and the geometry are
defined in :mod:`dirio.transforms.affine`; in addition:

* World coordinates: with the fixed image's voxel -> RAS affine ``F``, the world transform is
  ``T = F M F^-1`` (fixed RAS point -> moving RAS point, the direction ITK transforms use for
  resampling); ITK works in LPS, ``T_lps = P T P`` with ``P = diag(-1, -1, 1, 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dirio.core.fields import identity_grid
from dirio.losses.terms import Role, SimilarityTerm, Term
from dirio.optim.pyramid import OptimizerConfig, PyramidConfig, run_pyramid
from dirio.transforms.affine import FAMILIES, AffineTransform, check_family

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
    config = config or AffineConfig()
    config.validate()
    check_family(family)
    shape = tuple(fixed.shape[2:])
    fixed_weights = fixed_mask if fixed_mask is not None else fixed[:, :1].clamp_min(0)
    moving_weights = moving_mask if moving_mask is not None else moving[:, :1].clamp_min(0)
    centre, offset = initial_alignment(fixed_weights, moving_weights, config.centre)
    transform = AffineTransform(family, shape, spacing=spacing, centre=centre, translation=offset, device=fixed.device)
    terms = [Term(getattr(similarity, "name", "similarity"), Role.SIMILARITY, SimilarityTerm(similarity), 1.0)]
    result = run_pyramid(
        transform, terms, fixed, moving,
        PyramidConfig(levels=tuple(config.levels), iterations=tuple(config.iterations)),
        OptimizerConfig(optimizer="adam", lr=config.lr, schedule=config.schedule),
        fixed_mask=fixed_mask, moving_mask=moving_mask, spacing=spacing, seed=seed, progress=progress,
        description="affine",
    )
    with torch.no_grad():
        matrix = result.transform.voxel_matrix().cpu().numpy()
    return AffineResult(
        matrix=matrix,
        displacement=result.displacement,
        history=result.history,
        levels=result.levels,
        seconds=result.seconds,
        peak_memory_mb=result.peak_memory_mb,
    )
