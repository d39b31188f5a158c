"""``dirio transform-points``: map a point file through a displacement field, in either direction.

Files in, file out, over :mod:`dirio.io.points` (formats and coordinate spaces) and
:mod:`dirio.core.points` (the mapping). The field is a Learn2Reg ``disp_<fixed>_<moving>.nii.gz``:
it maps a fixed-grid point ``x`` to the moving-grid point ``x + u(x)``; dirio's fixed and moving
images share one grid (the field's, with the field's affine), so voxel coordinates of both images
are voxel coordinates of that grid and world coordinates go through the field's affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dirio.core.points import displace_points, invert_points
from dirio.errors import DirioError
from dirio.io.atomic import check_writable
from dirio.io.fields import load_field_and_affine
from dirio.io.points import PointSet, WORLD_SPACES, check_space, from_voxels, load_points, point_format, save_points, to_voxels

# A point of ``--inverse`` whose residual |x + u(x) - y| exceeds this (voxels) is reported as not inverted.
RESIDUAL_WARNING_VOXELS = 0.01


def output_space(requested: str | None, input_space: str, output: str | Path) -> str:
    """The space written: ``requested``, else the input's, except that markups from voxel input are LPS."""
    if requested is not None:
        return check_space(requested, "`output_space`")
    if point_format(output) != "csv" and input_space not in WORLD_SPACES:
        return "lps"  # what Slicer writes in new files
    return input_space


def check_inside(voxels: np.ndarray, shape: tuple[int, ...], path: str | Path) -> None:
    """Every point within the grid's voxel extent ``[-0.5, n - 0.5]`` per axis (the field is only known there).

    Raises:
        DirioError: naming the file and the first point outside.
    """
    upper = np.asarray(shape, dtype=np.float64) - 0.5
    outside = ((voxels < -0.5) | (voxels > upper)).any(axis=1)
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        coords = ", ".join(f"{v:.4g}" for v in voxels[bad])
        raise DirioError(f"{path}: point {bad} lies at voxel ({coords}), outside the field's grid of shape {shape}")


def transform_points_file(points: str | Path, field: str | Path, output: str | Path, *, inverse: bool = False,
                          space: str | None = None, out_space: str | None = None, order: int = 3,
                          overwrite: bool = False, ndim: int = 3) -> dict:
    """Map the points of a file through a displacement field and write them, atomically.

    Args:
        points: ``.csv`` (numbers in ``space``: ``voxel`` by default, or ``ras`` / ``lps`` mm),
            ``.fcsv`` or ``.mrk.json`` (Slicer markups; the file states RAS or LPS).
        field: Learn2Reg displacement file (voxels of the fixed grid, the fixed affine).
        output: ``.csv``, ``.fcsv`` or ``.mrk.json``; written in ``out_space`` (default: the
            input's space; LPS for markups written from voxel coordinates).
        inverse: map moving-space points into the fixed space (solve ``x + u(x) = y`` per point,
            :func:`dirio.core.points.invert_points`); else fixed -> moving, ``x + u(x)``.
        order: interpolation order of ``u`` at the points: 3 (cubic B-spline, as ``dirio evaluate``'s
            TRE with its default ``--tre-order 3``) or 1 (trilinear).
    Returns:
        A record: ``points``, ``direction``, ``space_in``, ``space_out``, ``order``, and with
        ``inverse`` ``residual_voxels_max``, ``not_inverted`` (points above
        :data:`RESIDUAL_WARNING_VOXELS`) and ``iterations``.
    Raises:
        DirioError: unreadable files, points outside the field's grid, an output that exists.
    """
    check_writable([output], overwrite)
    if order not in (1, 3):
        raise DirioError(f"`order` must be 1 or 3, got {order}")
    point_set = load_points(points, space=space, ndim=ndim)
    written_space = output_space(out_space, point_set.space, output)
    if written_space != "voxel" and point_format(output) == "csv" and ndim != 3:
        raise DirioError("world coordinates (ras, lps) are supported for 3D points only")
    disp, affine = load_field_and_affine(field, ndim=ndim)
    if point_set.points.shape[1] != disp.shape[-1]:
        raise DirioError(f"{points}: has {point_set.points.shape[1]}D points but {field} is a {disp.shape[-1]}D field")
    voxels = to_voxels(point_set, affine)
    check_inside(voxels, tuple(disp.shape[:-1]), points)
    record: dict = {"points": int(len(voxels)), "direction": "moving -> fixed" if inverse else "fixed -> moving",
                    "space_in": point_set.space, "space_out": written_space, "order": int(order)}
    if inverse:
        found = invert_points(voxels, disp, order=order)
        mapped = found.points
        record.update(residual_voxels_max=float(found.residual.max()) if len(found.residual) else 0.0,
                      not_inverted=int(np.count_nonzero(found.residual > RESIDUAL_WARNING_VOXELS)),
                      iterations=int(found.iterations))
    else:
        mapped = displace_points(voxels, disp, order=order)
    save_points(output, PointSet(from_voxels(mapped, affine, written_space), written_space, point_set.labels),
                overwrite=overwrite)
    return record
