"""What a figure shows of a volume: the displayed planes, the slices cut along them, display windows
and the Jacobian determinant on the shown slices only.

Display conventions (the same in every figure and thumbnail):

* 3D volumes ``(D, H, W)`` (axes ``i, j, k``) are shown as three central slices, one per
  orthogonal plane: the plane normal to ``i`` shows ``j`` horizontally and ``k`` vertically; the
  plane normal to ``j`` shows ``i`` / ``k``; the plane normal to ``k`` shows ``i`` / ``j``. The
  vertical axis increases upwards (``origin="lower"``), which is the usual radiological display
  for RAS-like voxel orders. 2D images ``(H, W)`` are shown as arrays usually are: ``i`` down,
  ``j`` across.
* Displacements are in voxel units, component order ``(i, j, k)``, pull convention
  ``warped(x) = moving(x + u(x))`` (see :mod:`dirio.core.fields`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dirio.core import fields as field
from dirio.errors import DirioError

__all__ = [
    "AXIS_NAMES",
    "View",
    "as_array",
    "check_images",
    "central_views",
    "view_plane",
    "in_plane_displacement",
    "plane_label",
    "display_window",
    "deviation_half_range",
    "normalised_to_window",
    "jacobian_planes",
]

# Robust display windows: intensities are clipped to these percentiles of the shown slices so
# that a few bright voxels (vessels, bone, artefacts) do not wash out the anatomy.
INTENSITY_PERCENTILES = (1.0, 99.0)
# The difference and Jacobian colour ranges use this percentile of the absolute deviation.
DEVIATION_PERCENTILE = 99.0

AXIS_NAMES = "ijk"


# --- views and slices ----------------------------------------------------------------------------


@dataclass(frozen=True)
class View:
    """How one plane is displayed: the axis normal to it (None in 2D), the array axes shown
    horizontally and vertically, and matplotlib's ``origin`` for the vertical direction."""

    normal: int | None
    horizontal: int
    vertical: int
    origin: str


_VIEWS_3D = (
    View(normal=0, horizontal=1, vertical=2, origin="lower"),
    View(normal=1, horizontal=0, vertical=2, origin="lower"),
    View(normal=2, horizontal=0, vertical=1, origin="lower"),
)
_VIEW_2D = View(normal=None, horizontal=1, vertical=0, origin="upper")


def central_views(shape: Sequence[int]) -> list[tuple[View, int | None]]:
    """The displayed planes of a grid and the index of each central slice (None in 2D)."""
    if len(shape) == 2:
        return [(_VIEW_2D, None)]
    return [(view, shape[view.normal] // 2) for view in _VIEWS_3D]


def view_plane(volume: np.ndarray, view: View, index: int | None) -> np.ndarray:
    """The slice of ``volume`` (spatial shape first, then optional trailing axes) shown in a view.

    Returns:
        Array ``(n_vertical, n_horizontal, *trailing)``: rows run along ``view.vertical``,
        columns along ``view.horizontal``, ready for ``imshow(..., origin=view.origin)``.
    """
    if view.normal is None:
        spatial = (0, 1)
        plane = volume
    else:
        spatial = tuple(a for a in range(3) if a != view.normal)
        # basic indexing: a view, where np.take gathers a copy (0.05 s per plane of a Fortran-ordered
        # 160 x 192 x 224 volume as nibabel loads it)
        plane = volume[(slice(None),) * view.normal + (index,)]
    if spatial.index(view.vertical) == 1:  # stored as (horizontal, vertical, ...): swap
        plane = np.swapaxes(plane, 0, 1)
    return plane


def in_plane_displacement(disp: np.ndarray, view: View, index: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The displacement components along a view's horizontal and vertical axes on its plane.

    Args:
        disp: ``(*S, ndim)`` displacement in voxels, component order = axis order.
    Returns:
        ``(u_horizontal, u_vertical)``, each ``(n_vertical, n_horizontal)`` like :func:`view_plane`.
        The component along the plane normal is not drawn.
    """
    return view_plane(disp[..., view.horizontal], view, index), view_plane(disp[..., view.vertical], view, index)


def plane_label(view: View, index: int | None) -> str:
    """Row label such as ``"i = 80"`` (3D) or ``"2D"``."""
    if view.normal is None:
        return "2D"
    return f"{AXIS_NAMES[view.normal]} = {index}"


# --- input checks --------------------------------------------------------------------------------


def as_array(value: Any, dtype=None) -> np.ndarray:
    """numpy view of an array-like; torch tensors are detached and moved to the CPU."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def check_images(path: Path, **images: np.ndarray) -> tuple[int, ...]:
    """Check that all images share one 2D or 3D shape with at least 2 voxels per axis; return it.

    Raises:
        DirioError: naming ``path`` (the figure being drawn) and the shapes.
    """
    shapes = {name: image.shape for name, image in images.items()}
    shape = next(iter(shapes.values()))
    if len(shape) not in (2, 3):
        raise DirioError(f"{path}: images must be 2D (H, W) or 3D (D, H, W) arrays, got shape {shape}")
    if len(set(shapes.values())) != 1:
        listed = ", ".join(f"{name} {s}" for name, s in shapes.items())
        raise DirioError(f"{path}: images must have one shape, got {listed}")
    if min(shape) < 2:
        raise DirioError(f"{path}: every image axis needs at least 2 voxels, got shape {shape}")
    return tuple(shape)


# --- value ranges --------------------------------------------------------------------------------


def display_window(*planes: np.ndarray) -> tuple[float, float]:
    """Display range ``(low, high)`` from INTENSITY_PERCENTILES of the finite values shown."""
    values = np.concatenate([p[np.isfinite(p)].ravel() for p in planes])
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, INTENSITY_PERCENTILES)
    if high <= low:
        low, high = float(values.min()), float(values.max())
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


def deviation_half_range(deviations: Sequence[np.ndarray], minimum: float) -> float:
    """DEVIATION_PERCENTILE of ``|deviation|`` over the shown planes, at least ``minimum``."""
    values = np.concatenate([np.abs(d[np.isfinite(d)]).ravel() for d in deviations])
    if values.size == 0:
        return max(minimum, 1.0)
    return max(float(np.percentile(values, DEVIATION_PERCENTILE)), minimum)


def normalised_to_window(plane: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Intensities mapped linearly from ``window`` to ``[0, 1]`` and clipped."""
    low, high = window
    return np.clip((np.nan_to_num(plane, nan=low) - low) / (high - low), 0.0, 1.0)


# --- Jacobian determinant --------------------------------------------------------------------------


def jacobian_planes(disp: np.ndarray, views: list[tuple[View, int | None]]) -> list[np.ndarray]:
    """Jacobian determinant of ``x -> x + u(x)`` on the shown planes only.

    The determinant is computed with :func:`dirio.core.fields.jacobian_determinant` on a slab of at
    most three slices around each shown slice; central differences only reach one voxel, so
    the middle slice equals the slice of the whole-volume computation while costing a few
    percent of it (the whole 160 x 192 x 224 volume takes about 2 s on 2 CPU cores).

    The slabs are small (about 10^5 voxels), where torch's intra-op threads cost more than they
    save (measured: 0.3 s per slab with 2 threads on a busy 2-core machine, 0.01 s with one),
    so torch runs single-threaded here; the previous thread count is restored afterwards.

    Args:
        disp: ``(*S, ndim)`` displacement in voxels.
        views: the shown planes, as :func:`central_views` gives them.
    Returns:
        one ``(n_vertical, n_horizontal)`` determinant plane per view (:func:`view_plane` layout).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [_jacobian_plane(disp, view, index) for view, index in views]
    finally:
        torch.set_num_threads(previous_threads)


def _jacobian_plane(disp: np.ndarray, view: View, index: int | None) -> np.ndarray:
    """Jacobian determinant on one shown plane, from a slab of at most 3 slices (see above)."""
    if view.normal is None:
        slab, centre = disp, None
    else:
        low, high = max(index - 1, 0), min(index + 2, disp.shape[view.normal])
        # A basic slice (a view): np.take copied the whole field's slab through a general gather,
        # 0.4-0.5 s per plane on a 160 x 192 x 224 field.
        slab = disp[(slice(None),) * view.normal + (slice(low, high),)]
        centre = index - low
    det = field.jacobian_determinant(field.field_from_numpy(slab))[0].numpy()
    return view_plane(det, view, centre)
