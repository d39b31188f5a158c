"""Keypoints on disk: CSV, one point per row, voxel coordinates ``(i, j, k)`` of their own image
(Learn2Reg NLST style)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import numpy as np

from dirio.errors import DirioError
from dirio.io.atomic import atomic_output
from dirio.io.images import PathLike, _check_exists, _one_line, _to_numpy


def _parse_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def load_keypoints(
    path: PathLike,
    shape: Sequence[int] | None = None,
    ndim: int = 3,
    columns: Sequence[int | str] | None = None,
) -> np.ndarray:
    """Read keypoints from a CSV file: one point per row, voxel coordinates ``(i, j, k)``.

    The Learn2Reg NLST layout is comma separated without a header, exactly ``ndim`` columns.
    A first row of non-numeric names is taken as a header and skipped; blank lines are ignored.
    Files with more columns (an id column, physical coordinates...) are read by naming the
    coordinate columns with ``columns`` (0-based indices, or header names); without ``columns``
    every row must have exactly ``ndim`` values.

    Args:
        path: the CSV file.
        shape: the image's spatial shape; when given, every point must lie inside the image's
            voxel extent ``-0.5 <= p[d] <= shape[d] - 0.5`` (voxel centres are integers).
        ndim: coordinates per point (2 or 3).
        columns: the ``ndim`` columns that hold ``(i, j, k)``, as 0-based indices or header names.
    Returns:
        ``(N, ndim)`` float64 voxel coordinates, in file order.
    Raises:
        DirioError: naming the file, when it is missing or unreadable, is empty, has the wrong
            number of columns or a non-numeric value, contains NaN/Inf, or (with ``shape``) a
            point lies outside the image.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if columns is not None and len(columns) != ndim:
        raise ValueError(f"columns must name {ndim} columns, got {list(columns)}")
    path = Path(path)
    _check_exists(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = [(number, row) for number, row in enumerate(csv.reader(handle), start=1) if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DirioError(f"{path}: cannot read as a keypoint CSV file ({_one_line(exc)})") from None

    header: list[str] | None = None
    if rows and all(_parse_float(cell) is None for cell in rows[0][1]):
        header = [cell.strip() for cell in rows[0][1]]
        rows = rows[1:]
    if not rows:
        raise DirioError(f"{path}: contains no keypoints")

    if columns is None:
        indices = list(range(ndim))
    else:
        indices = []
        for column in columns:
            if isinstance(column, str):
                if header is None or column not in header:
                    raise DirioError(f"{path}: has no column named {column!r} (header: {header})")
                indices.append(header.index(column))
            else:
                indices.append(int(column))

    points = np.empty((len(rows), ndim), dtype=np.float64)
    for index, (line, row) in enumerate(rows):
        if columns is None and len(row) != ndim:
            raise DirioError(
                f"{path}: line {line} has {len(row)} columns; expected {ndim} voxel coordinates per point"
            )
        if max(indices) >= len(row):
            raise DirioError(f"{path}: line {line} has {len(row)} columns; column {max(indices)} is missing")
        for axis, column in enumerate(indices):
            value = _parse_float(row[column])
            if value is None:
                raise DirioError(f"{path}: line {line} column {column}: {row[column]!r} is not a number")
            points[index, axis] = value

    finite = np.isfinite(points).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise DirioError(f"{path}: keypoint {bad} (line {rows[bad][0]}) has NaN/Inf coordinates")
    if shape is not None:
        _check_inside(points, shape, path, [line for line, _ in rows])
    return points


def _check_inside(points: np.ndarray, shape: Sequence[int], path: Path, lines: Sequence[int]) -> None:
    """Error for the first point outside the voxel extent ``[-0.5, n - 0.5]`` of each axis."""
    shape = tuple(int(n) for n in shape)
    if len(shape) != points.shape[1]:
        raise ValueError(f"shape {shape} has {len(shape)} axes but the keypoints have {points.shape[1]}")
    upper = np.asarray(shape, dtype=np.float64) - 0.5
    outside = ((points < -0.5) | (points > upper)).any(axis=1)
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        coords = ", ".join(f"{v:g}" for v in points[bad])
        raise DirioError(
            f"{path}: keypoint {bad} (line {lines[bad]}) at ({coords}) lies outside the image of shape {shape}"
        )


def format_coordinate(value: float) -> str:
    """Integers without a decimal point (NLST style), other values with full float precision."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def save_keypoints(path: PathLike, points: np.ndarray, overwrite: bool = False) -> None:
    """Write ``(N, ndim)`` voxel coordinates as a header-less comma-separated file, atomically.

    Values are written losslessly (integers as integers), so :func:`load_keypoints` reads back
    the same array.
    """
    points = _to_numpy(points)
    if points.ndim != 2 or points.shape[1] not in (2, 3):
        raise ValueError(f"points must have shape (N, 2) or (N, 3), got {points.shape}")
    lines = [",".join(format_coordinate(v) for v in point) for point in points]
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
