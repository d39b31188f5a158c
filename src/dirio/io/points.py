"""Point files in voxel or world coordinates: CSV, and 3D Slicer markups (``.mrk.json``, ``.fcsv``).

Coordinate spaces (:data:`SPACES`):

* ``voxel``: voxel indices ``(i, j, k)`` of an image grid (the Learn2Reg keypoint convention;
  voxel centres are integers);
* ``ras``: world millimetres, x to the Right, y to the Anterior, z to the Superior (nibabel's and
  NIfTI's world space: ``ras = affine @ (i, j, k, 1)``);
* ``lps``: world millimetres, x to the Left, y to the Posterior, z Superior (ITK's and DICOM's;
  ``lps = (-x, -y, z)`` of ``ras``).

Formats, chosen by the file name:

* ``.csv``: one point per row, ``ndim`` numbers, optional header row (:mod:`dirio.io.keypoints`);
  the file does not say its space, the caller does.
* ``.fcsv``: Slicer's markups fiducial CSV: ``#`` header lines, among them ``# CoordinateSystem =
  LPS`` (or ``RAS``; older files write ``0`` for RAS and ``1`` for LPS; a file without that line
  is from before Slicer 4.11, which wrote RAS) and ``# columns = id,x,y,z,...,label,...``.
* ``.mrk.json``: Slicer's markups JSON: ``markups[*].controlPoints[*].position`` with each
  markup's ``coordinateSystem`` (``LPS`` or ``RAS``; the schema's default, LPS, when absent) and
  ``coordinateUnits`` (only ``mm``). Every control point of every markup, in file order.

Slicer writes LPS in new files; dirio writes markups in the space asked for (default LPS) and says
so in the file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dirio.errors import DirioError
from dirio.io.atomic import atomic_output
from dirio.io.images import PathLike, _check_exists, _one_line
from dirio.io.keypoints import format_coordinate, load_keypoints, save_keypoints

SPACES = ("voxel", "ras", "lps")
WORLD_SPACES = ("ras", "lps")
FORMATS = ("csv", "fcsv", "mrk.json")
MARKUPS_SCHEMA = ("https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/"
                  "Schema/markups-schema-v1.0.3.json#")
FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
# Slicer's numeric codes of the ``# CoordinateSystem`` line of .fcsv files before 4.11.
_FCSV_CODES = {"0": "ras", "1": "lps", "ras": "ras", "lps": "lps"}


@dataclass
class PointSet:
    """Points read from or written to a file.

    Attributes:
        points: ``(N, ndim)`` float64 coordinates in ``space``.
        space: ``"voxel"``, ``"ras"`` or ``"lps"`` (see the module docstring).
        labels: one name per point (markups labels), or ``None``.
    """

    points: np.ndarray
    space: str
    labels: list[str] | None = None


def point_format(path: PathLike) -> str:
    """``"csv"``, ``"fcsv"`` or ``"mrk.json"`` from the file name.

    Raises:
        DirioError: for any other suffix.
    """
    name = Path(path).name.lower()
    if name.endswith(".mrk.json"):
        return "mrk.json"
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith(".csv"):
        return "csv"
    raise DirioError(f"{path}: point files are .csv (voxel or world coordinates), .fcsv or .mrk.json (3D Slicer markups)")


def check_space(space: str, what: str = "space") -> str:
    """``space`` lower-cased, checked against :data:`SPACES`."""
    lowered = str(space).lower()
    if lowered not in SPACES:
        raise DirioError(f"{what} must be one of {', '.join(SPACES)}, got {space!r}")
    return lowered


# --- coordinate conversions ----------------------------------------------------------------------


def ras_lps(points: np.ndarray) -> np.ndarray:
    """RAS <-> LPS (the same sign flip of x and y both ways), ``(N, 3)``."""
    flipped = np.array(points, dtype=np.float64, copy=True)
    flipped[:, :2] *= -1.0
    return flipped


def to_voxels(points: PointSet, affine: np.ndarray) -> np.ndarray:
    """``(N, ndim)`` voxel coordinates of a point set on the grid of ``affine`` (voxel -> RAS mm)."""
    if points.space == "voxel":
        return np.asarray(points.points, dtype=np.float64)
    ndim = points.points.shape[1]
    if ndim != 3:
        raise DirioError("world coordinates (ras, lps) are supported for 3D points only")
    ras = points.points if points.space == "ras" else ras_lps(points.points)
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return ras @ inverse[:3, :3].T + inverse[:3, 3]


def from_voxels(voxels: np.ndarray, affine: np.ndarray, space: str) -> np.ndarray:
    """``(N, ndim)`` voxel coordinates -> ``space`` coordinates on the grid of ``affine``."""
    space = check_space(space)
    voxels = np.asarray(voxels, dtype=np.float64)
    if space == "voxel":
        return voxels
    if voxels.shape[1] != 3:
        raise DirioError("world coordinates (ras, lps) are supported for 3D points only")
    matrix = np.asarray(affine, dtype=np.float64)
    ras = voxels @ matrix[:3, :3].T + matrix[:3, 3]
    return ras if space == "ras" else ras_lps(ras)


# --- reading ---------------------------------------------------------------------------------------


def load_points(path: PathLike, *, space: str | None = None, ndim: int = 3) -> PointSet:
    """Read a point file (format by name, see the module docstring).

    Args:
        path: ``.csv``, ``.fcsv`` or ``.mrk.json``.
        space: the space of a CSV file's numbers (default ``voxel``). For markups the file states
            its space; a ``space`` given that contradicts it is an error (``voxel`` always is).
        ndim: coordinates per point of a CSV file (markups are 3D).
    Returns:
        A :class:`PointSet` in the file's own space.
    Raises:
        DirioError: naming the file, for a missing or malformed file, NaN/Inf coordinates, an
            unknown coordinate system or unit, or no points.
    """
    path = Path(path)
    kind = point_format(path)
    if kind == "csv":
        chosen = "voxel" if space is None else check_space(space)
        return PointSet(load_keypoints(path, ndim=ndim), chosen)
    _check_exists(path)
    result = _load_fcsv(path) if kind == "fcsv" else _load_markups_json(path)
    if space is not None and check_space(space) != result.space:
        raise DirioError(f"{path}: the file states its points in {result.space.upper()} world coordinates, not "
                         f"{space}; leave out `space` for Slicer markups")
    if not np.isfinite(result.points).all():
        bad = int(np.flatnonzero(~np.isfinite(result.points).all(axis=1))[0])
        raise DirioError(f"{path}: point {bad} has NaN/Inf coordinates")
    return result


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DirioError(f"{path}: cannot read the point file ({_one_line(error)})") from None


def _load_fcsv(path: Path) -> PointSet:
    text = _read_text(path)
    space = "ras"  # files without the line predate Slicer 4.11, which wrote RAS
    columns = FCSV_COLUMNS.split(",")
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("#"):
            key, _, value = stripped[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                if value.lower() not in _FCSV_CODES:
                    raise DirioError(f"{path}: line {number}: unknown coordinate system {value!r} (expected LPS or RAS)")
                space = _FCSV_CODES[value.lower()]
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
            continue
        rows.append((number, next(csv.reader(io.StringIO(line)))))
    for needed in ("x", "y", "z"):
        if needed not in columns:
            raise DirioError(f"{path}: the columns line names no {needed!r} column: {columns}")
    index = [columns.index(c) for c in ("x", "y", "z")]
    label_index = columns.index("label") if "label" in columns else None
    if not rows:
        raise DirioError(f"{path}: contains no points")
    points = np.empty((len(rows), 3))
    labels = []
    for row_index, (number, row) in enumerate(rows):
        if max(index) >= len(row):
            raise DirioError(f"{path}: line {number} has {len(row)} fields; expected the columns {columns}")
        for axis, column in enumerate(index):
            try:
                points[row_index, axis] = float(row[column])
            except ValueError:
                raise DirioError(f"{path}: line {number}: {row[column]!r} is not a number") from None
        labels.append(row[label_index] if label_index is not None and label_index < len(row) else "")
    return PointSet(points, space, labels)


def _load_markups_json(path: Path) -> PointSet:
    try:
        content = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise DirioError(f"{path}: not valid JSON ({_one_line(error)})") from None
    markups = content.get("markups") if isinstance(content, dict) else None
    if not isinstance(markups, list) or not markups:
        raise DirioError(f"{path}: not a Slicer markups file (no \"markups\" list)")
    points, labels, spaces = [], [], set()
    for m, markup in enumerate(markups):
        if not isinstance(markup, dict):
            raise DirioError(f"{path}: markup {m} is not an object")
        system = str(markup.get("coordinateSystem", "LPS")).lower()
        if system not in WORLD_SPACES:
            raise DirioError(f"{path}: markup {m} has coordinateSystem {markup.get('coordinateSystem')!r}; "
                             f"expected LPS or RAS")
        units = markup.get("coordinateUnits", "mm")
        if units != "mm":
            raise DirioError(f"{path}: markup {m} has coordinateUnits {units!r}; dirio reads mm only")
        for p, point in enumerate(markup.get("controlPoints") or []):
            position = point.get("position") if isinstance(point, dict) else None
            status = point.get("positionStatus", "defined") if isinstance(point, dict) else None
            if status == "missing" or not isinstance(position, list) or len(position) != 3:
                raise DirioError(f"{path}: markup {m} control point {p} has no position (3 numbers)")
            try:
                points.append([float(v) for v in position])
            except (TypeError, ValueError):
                raise DirioError(f"{path}: markup {m} control point {p}: position {position!r} is not numeric") from None
            labels.append(str(point.get("label", "")))
            spaces.add(system)
    if not points:
        raise DirioError(f"{path}: contains no control points")
    if len(spaces) > 1:
        raise DirioError(f"{path}: markups in both LPS and RAS; dirio reads one coordinate system per file")
    return PointSet(np.asarray(points, dtype=np.float64), spaces.pop(), labels)


# --- writing ---------------------------------------------------------------------------------------


def save_points(path: PathLike, points: PointSet, *, overwrite: bool = False) -> None:
    """Write a point set atomically in the format of ``path``'s name.

    CSV: ``ndim`` numbers per row, no header (read back by :func:`load_points` with the same
    ``space``). Markups: the set's space (``ras`` or ``lps``) is written into the file; labels
    are kept (``P-1``, ``P-2``... when the set has none).

    Raises:
        DirioError: markups asked for in voxel coordinates, or an output that exists (without ``overwrite``).
    """
    path = Path(path)
    kind = point_format(path)
    array = np.asarray(points.points, dtype=np.float64)
    if kind == "csv":
        save_keypoints(path, array, overwrite=overwrite)
        return
    if points.space not in WORLD_SPACES:
        raise DirioError(f"{path}: Slicer markups hold world coordinates; choose ras or lps as the output space")
    labels = points.labels or [f"P-{i + 1}" for i in range(len(array))]
    text = _fcsv_text(array, points.space, labels) if kind == "fcsv" else _markups_json_text(array, points.space, labels)
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _fcsv_text(array: np.ndarray, space: str, labels: Sequence[str]) -> str:
    buffer = io.StringIO()
    buffer.write("# Markups fiducial file version = 4.11\n")
    buffer.write(f"# CoordinateSystem = {space.upper()}\n")
    buffer.write(f"# columns = {FCSV_COLUMNS}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    for index, (point, label) in enumerate(zip(array, labels)):
        writer.writerow([f"vtkMRMLMarkupsFiducialNode_{index}", *(format_coordinate(v) for v in point),
                         0, 0, 0, 1, 1, 1, 0, label, "", ""])
    return buffer.getvalue()


def _markups_json_text(array: np.ndarray, space: str, labels: Sequence[str]) -> str:
    control_points = [{"id": str(index + 1), "label": label, "position": [float(v) for v in point],
                       "positionStatus": "defined"} for index, (point, label) in enumerate(zip(array, labels))]
    content = {"@schema": MARKUPS_SCHEMA, "markups": [
        {"type": "Fiducial", "coordinateSystem": space.upper(), "coordinateUnits": "mm",
         "controlPoints": control_points}]}
    return json.dumps(content, indent=2) + "\n"
