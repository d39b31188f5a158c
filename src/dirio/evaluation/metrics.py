"""Registration metrics: the Learn2Reg evaluator's numbers, with textbook variants beside them.

Every function takes numpy arrays. A displacement field is in the on-disk (Learn2Reg) layout
``(*S, ndim)`` with ``S = (D, H, W)`` (3D) or ``(H, W)`` (2D), in **voxel units of the fixed
grid**, pull convention ``warped(x) = moving(x + u(x))``. Fields are converted to float64
before any computation, as the evaluator does when it reads a NIfTI file with nibabel's
``get_fdata``.

What reproduces the Learn2Reg evaluator (``evaluation.py`` / ``utils.py`` of the challenge's
evaluation code, MICCAI 2021-2023, eval_version 2.0) on the same field:

* :func:`warp_labels` (nearest neighbour through ``scipy.ndimage.map_coordinates``),
* :func:`dice_per_label` / :func:`mean_dice` (its ``compute_dice``),
* :func:`hd95_per_label` with ``spacing=None`` (its ``compute_hd95``: DeepMind's surface-distance
  algorithm with unit spacing, i.e. voxel units),
* :func:`tre` with ``order=3`` (its ``compute_tre``),
* :func:`jacobian_determinant_l2r` / :func:`sdlogj_l2r` (its ``jacobian_determinant`` and the
  ``sdlogj`` metric, quirks included),
* :func:`dsc30` (its ``'30'`` aggregate).

:func:`ndv` / :func:`ndv_fraction` reproduce the non-diffeomorphic volume of Liu et al.,
"On finite difference Jacobian computation in deformable image registration", IJCV 2024.
Textbook variants live under their own names: :func:`sdlogj`,
:func:`fraction_nonpositive_jacobian`, and ``hd95_per_label(..., spacing=...)`` in mm.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Iterator, Mapping, Sequence

import numpy as np
from scipy import ndimage

# The Learn2Reg SDlogJ adds 3 to the Jacobian determinant and clips it to [1e-9, 1e9] before
# the log (``(jacobian_determinant(disp) + 3).clip(0.000000001, 1000000000)`` in evaluation.py).
L2R_SDLOGJ_OFFSET = 3.0
L2R_SDLOGJ_CLIP = (1e-9, 1e9)
# The evaluator's Jacobian is cropped by 2 voxels on every side (``jacobian[:, :, 2:-2, 2:-2, 2:-2]``).
L2R_JACOBIAN_CROP = 2
# Central difference kernel of the evaluator (``np.array([-0.5, 0, 0.5])``, scipy ``correlate``).
_CENTRAL_DIFFERENCE = np.array([-0.5, 0.0, 0.5])
# DSC30 is the 0.3 quantile of per-case values (``np.quantile(all_means_metric, .3)``).
DSC30_QUANTILE = 0.3


# --- input checks ------------------------------------------------------------------------------


def _as_field(disp) -> np.ndarray:
    """Validate a ``(*S, ndim)`` field (ndim 2 or 3) and return it as float64."""
    array = np.asarray(disp, dtype=np.float64)
    if array.ndim not in (3, 4) or array.shape[-1] != array.ndim - 1:
        raise ValueError(
            f"expected a displacement field of shape (D, H, W, 3) or (H, W, 2), got {array.shape}"
        )
    return array


def _check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def _spacing_array(spacing, ndim: int) -> np.ndarray:
    """Spacing as a float64 vector of length ``ndim`` (ones for ``None``)."""
    if spacing is None:
        return np.ones(ndim)
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size != ndim or not np.all(values > 0):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing!r}")
    return values


def _nanmean(values: Sequence[float]) -> float:
    """Mean over the non-NaN values (``np.nanmean``), NaN without a warning when there are none."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0 or np.all(np.isnan(array)):
        return float("nan")
    return float(np.nanmean(array))


# --- warping -----------------------------------------------------------------------------------


def warp_labels(moving_labels: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Warp a label map with nearest neighbour, as the Learn2Reg evaluator does.

    ``warped[x] = moving[round(x + u(x))]`` through ``scipy.ndimage.map_coordinates(order=0)``
    on ``identity + disp``, with the evaluator's boundary handling (``mode="constant"``,
    ``cval=0``): every point outside ``[0, n - 1]`` along some axis gets label 0, even one that is
    less than half a voxel past the outermost voxel centre.

    Args:
        moving_labels: ``S`` label map on the same grid as the field (integer, bool or float).
        disp: ``(*S, ndim)`` displacement in voxels.
    Returns:
        ``S`` warped label map with the dtype of ``moving_labels``.
    """
    field = _as_field(disp)
    labels = np.asarray(moving_labels)
    if labels.shape != field.shape[:-1]:
        raise ValueError(f"label map of shape {labels.shape} does not match the field grid {field.shape[:-1]}")
    if not field.any():
        # The identity samples every voxel at its own centre: the map itself (the "before" scores).
        return labels.copy()
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in labels.shape], indexing="ij")
    coords = np.stack(grid, axis=0) + np.moveaxis(field, -1, 0)
    source = labels.astype(np.uint8) if labels.dtype == bool else labels
    warped = ndimage.map_coordinates(source, coords, order=0, mode="constant", cval=0)
    return warped.astype(labels.dtype, copy=False)


# --- Dice --------------------------------------------------------------------------------------


def _labels_present(*label_maps: np.ndarray) -> list[int]:
    """Sorted nonzero labels present in any of the maps."""
    found: set[int] = set()
    for label_map in label_maps:
        found.update(int(v) for v in np.unique(label_map) if v != 0)
    return sorted(found)


def dice_per_label(
    fixed_labels: np.ndarray,
    warped_labels: np.ndarray,
    labels: Sequence[int] | None = None,
    *,
    moving_labels: np.ndarray | None = None,
) -> dict[int, float]:
    """Dice overlap ``2 |F & W| / (|F| + |W|)`` per label, in ``[0, 1]``, higher is better.

    Missing labels (Learn2Reg's ``compute_dice`` convention): a label absent from the fixed map,
    or absent from the moving map, gives **NaN** (it is left out of :func:`mean_dice`), never 0.
    The evaluator checks presence in the *moving* map, so a label that is present in both fixed
    and moving but warped out of the image scores 0. Pass ``moving_labels`` to get exactly that;
    without it presence is checked in ``warped_labels`` instead (the only map at hand).

    Args:
        fixed_labels: ``S`` label map of the fixed image.
        warped_labels: ``S`` warped moving label map (:func:`warp_labels`).
        labels: labels to score; default: the union of the nonzero labels of all maps given.
        moving_labels: the unwarped moving label map, used only for the presence check.
    Returns:
        ``{label: dice}`` in the order of ``labels``.
    """
    fixed = np.asarray(fixed_labels)
    warped = np.asarray(warped_labels)
    _check_same_shape("fixed_labels", fixed, "warped_labels", warped)
    reference = warped if moving_labels is None else np.asarray(moving_labels)
    if labels is None:
        labels = _labels_present(fixed, warped, reference)
    result: dict[int, float] = {}
    for label in labels:
        in_fixed = fixed == label
        in_warped = warped == label
        if not in_fixed.any() or not np.any(reference == label):
            result[int(label)] = float("nan")
            continue
        total = int(in_fixed.sum()) + int(in_warped.sum())
        result[int(label)] = 2.0 * int(np.count_nonzero(in_fixed & in_warped)) / total
    return result


def mean_dice(per_label: Mapping[int, float]) -> float:
    """Mean of per-label values ignoring NaN (``np.nanmean``, as Learn2Reg); NaN if all are NaN."""
    return _nanmean(per_label.values())


def dsc30(per_case_values: Sequence[float], *, skip_nan: bool = False) -> float:
    """The 0.3 quantile of per-case values, Learn2Reg's robustness aggregate ("DSC30").

    The evaluator (eval_version 2.0) computes ``np.quantile(values, .3)`` with numpy's default
    ``method="linear"`` (the older pandas-based evaluator used ``DataFrame.quantile(.3)``, whose
    default interpolation is the same linear one). With that method a NaN case makes the result
    NaN, as in the evaluator; ``skip_nan=True`` drops NaN cases first, as pandas did.

    Args:
        per_case_values: one value per case (e.g. mean Dice per registration pair).
    Returns:
        The quantile; NaN for an empty input.
    """
    values = np.asarray(list(per_case_values), dtype=np.float64)
    if skip_nan:
        values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan")
    return float(np.quantile(values, DSC30_QUANTILE, method="linear"))


# --- surface distances (DeepMind surface-distance algorithm) -----------------------------------
#
# Surface elements ("surfels") live at the corners of the voxel grid: a corner is on the surface
# when its 2x2x2 (2D: 2x2) neighbourhood of voxels holds both inside and outside voxels. The
# neighbourhood is encoded as an 8-bit (2D: 4-bit) code, and the surfel area of each code is the
# area of the marching-cubes surface inside that cell: polygons through the midpoints of the cell
# edges that change state; on a face with two diagonal inside corners the inside corners are kept
# apart; the minority side (or the inside set when both sides have 4 corners) defines the polygons,
# and each polygon is cut into the triangles of largest total area (the choice that reproduces the
# lookup table of DeepMind's surface-distance for every code, at any anisotropic spacing). In 2D the
# contour segments join edge midpoints the same way. Distances are Euclidean distance transforms
# between corner points, in units of ``spacing``.


def _cell_corners(ndim: int) -> list[tuple[int, ...]]:
    """Corner offsets of a unit cell; corner ``n`` of the list is bit ``n`` of a neighbour code."""
    return list(itertools.product((0, 1), repeat=ndim))


def _cell_faces_3d() -> list[list[tuple[int, ...]]]:
    """The 6 faces of the unit cube, each as its 4 corners in cyclic order."""
    faces = []
    for axis in range(3):
        other = [d for d in range(3) if d != axis]
        for value in (0, 1):
            cycle = []
            for p, q in ((0, 0), (1, 0), (1, 1), (0, 1)):
                corner = [0, 0, 0]
                corner[axis], corner[other[0]], corner[other[1]] = value, p, q
                cycle.append(tuple(corner))
            faces.append(cycle)
    return faces


def _midpoint(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[float, ...]:
    return tuple((x + y) / 2.0 for x, y in zip(a, b))


def _face_segments(cycle: list[tuple[int, ...]], inside: frozenset) -> list[tuple[tuple, tuple]]:
    """Segments between midpoints of the state-changing edges of one square face.

    With two diagonal inside corners (4 changing edges) each inside corner is cut off on its own.
    """
    flags = [corner in inside for corner in cycle]
    changing = [i for i in range(4) if flags[i] != flags[(i + 1) % 4]]
    if len(changing) == 2:
        (i, j) = changing
        return [(_midpoint(cycle[i], cycle[(i + 1) % 4]), _midpoint(cycle[j], cycle[(j + 1) % 4]))]
    if len(changing) == 4:
        return [
            (_midpoint(cycle[i - 1], cycle[i]), _midpoint(cycle[i], cycle[(i + 1) % 4]))
            for i in range(4)
            if flags[i]
        ]
    return []


def _minority_side(code: int, ndim: int) -> frozenset:
    """Corner set whose cut-off surface is triangulated: the inside corners unless they are most."""
    corners = _cell_corners(ndim)
    inside = frozenset(c for bit, c in enumerate(corners) if code >> bit & 1)
    if len(inside) > len(corners) // 2:
        inside = frozenset(corners) - inside
    return inside


def _surface_loops_3d(inside: frozenset) -> list[np.ndarray]:
    """Closed polygons (vertex arrays ``(n, 3)`` in cyclic order) separating ``inside`` corners."""
    neighbours: dict[tuple, list[tuple]] = {}
    for cycle in _cell_faces_3d():
        for a, b in _face_segments(cycle, inside):
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
    loops, visited = [], set()
    for start in neighbours:
        if start in visited:
            continue
        loop, previous, current = [start], None, start
        visited.add(start)
        while True:
            following = [p for p in neighbours[current] if p != previous and p not in visited]
            if not following:
                break
            previous, current = current, following[0]
            loop.append(current)
            visited.add(current)
        loops.append(np.array(loop))
    return loops


def _polygon_triangulations(indices: list[int]):
    """Every triangulation of a polygon with the given vertex indices (lists of index triples)."""
    if len(indices) < 3:
        yield []
        return
    first, last = indices[0], indices[-1]
    for k in range(1, len(indices) - 1):
        for left in _polygon_triangulations(indices[: k + 1]):
            for right in _polygon_triangulations(indices[k:]):
                yield left + right + [(first, indices[k], last)]


def _triangle_area_vectors(triangles: np.ndarray) -> np.ndarray:
    """``(T, 3, 3)`` triangle vertices -> ``(T, 3)`` area vectors (half the cross product)."""
    return 0.5 * np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])


@functools.lru_cache(maxsize=1)
def _surfel_triangles_3d() -> tuple[np.ndarray, ...]:
    """For each of the 256 codes, its surface triangles ``(T, 3, 3)`` in unit-cell coordinates."""
    per_code = []
    for code in range(256):
        triangles = []
        for loop in _surface_loops_3d(_minority_side(code, 3)):
            best_area, best = -1.0, None
            for candidate in _polygon_triangulations(list(range(len(loop)))):
                tris = loop[np.array(candidate)]
                area = float(np.linalg.norm(_triangle_area_vectors(tris), axis=1).sum())
                if area > best_area + 1e-12:
                    best_area, best = area, tris
            triangles.extend(best)
        per_code.append(np.array(triangles, dtype=np.float64).reshape(-1, 3, 3))
    return tuple(per_code)


@functools.lru_cache(maxsize=1)
def _contour_segments_2d() -> tuple[np.ndarray, ...]:
    """For each of the 16 codes of a 2x2 neighbourhood, its contour segments ``(L, 2, 2)``."""
    cycle = [(0, 0), (1, 0), (1, 1), (0, 1)]
    return tuple(
        np.array(_face_segments(cycle, _minority_side(code, 2)), dtype=np.float64).reshape(-1, 2, 2)
        for code in range(16)
    )


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple[float, ...]) -> np.ndarray:
    """Surfel area (3D, mm^2) or contour length (2D, mm) per neighbour code for a voxel spacing."""
    scale = np.asarray(spacing, dtype=np.float64)
    if scale.size == 3:
        # An area vector n transforms with the cofactor of diag(spacing): (s1 s2, s0 s2, s0 s1) * n.
        cofactor = np.array([scale[1] * scale[2], scale[0] * scale[2], scale[0] * scale[1]])
        return np.array(
            [
                float(np.linalg.norm(_triangle_area_vectors(t) * cofactor, axis=1).sum()) if len(t) else 0.0
                for t in _surfel_triangles_3d()
            ]
        )
    return np.array(
        [
            float(np.linalg.norm((s[:, 1] - s[:, 0]) * scale, axis=1).sum()) if len(s) else 0.0
            for s in _contour_segments_2d()
        ]
    )


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """Neighbour code at every corner of the voxel grid of a zero-padded boolean mask.

    Args:
        mask: ``P`` boolean array whose border (one voxel on every side) is False.
    Returns:
        ``P - 1`` codes; corner ``c`` sits between voxels ``c`` and ``c + 1`` of ``mask`` along every
        axis, and bit ``n`` is set when the voxel at corner offset ``_cell_corners(ndim)[n]`` is inside.
    """
    out_shape = tuple(n - 1 for n in mask.shape)
    codes = np.zeros(out_shape, dtype=np.uint8)
    for bit, offset in enumerate(_cell_corners(mask.ndim)):
        window = tuple(slice(o, o + n) for o, n in zip(offset, out_shape))
        codes |= mask[window].astype(np.uint8) << bit
    return codes


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a non-empty boolean ``mask``, as slices.

    One projection per axis (``any`` over the others) instead of listing the voxels' indices:
    ~10x faster than ``np.nonzero`` on a 160 x 192 x 224 label.
    """
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def surface_distances(
    mask_a: np.ndarray, mask_b: np.ndarray, spacing: Sequence[float] | None = None
) -> dict[str, np.ndarray]:
    """Distances from every surfel of one mask to the surface of the other, with surfel areas.

    Same quantities as DeepMind's ``compute_surface_distances`` (sorting is left to the caller).
    An empty mask has no surfels, and every distance towards it is ``inf``.

    Args:
        mask_a, mask_b: ``S`` boolean masks (2D or 3D), on the same grid.
        spacing: voxel size per axis (mm); ``None`` means ones (voxel units).
    Returns:
        ``distances_a_to_b``, ``areas_a`` (one per surfel of ``a``), ``distances_b_to_a``,
        ``areas_b``; distances in units of ``spacing``, areas in its square (3D) or in its units
        (2D contour lengths).
    """
    a = np.asarray(mask_a, dtype=bool)
    b = np.asarray(mask_b, dtype=bool)
    _check_same_shape("mask_a", a, "mask_b", b)
    if a.ndim not in (2, 3):
        raise ValueError(f"surface distances need 2D or 3D masks, got shape {a.shape}")
    sampling = _spacing_array(spacing, a.ndim)
    union = a | b
    if not union.any():
        empty = np.zeros(0)
        return {"distances_a_to_b": empty, "areas_a": empty, "distances_b_to_a": empty, "areas_b": empty}
    # Work on the bounding box of both masks plus one empty voxel on every side.
    box = _bounding_box(union)
    codes_a = _neighbour_codes(np.pad(a[box], 1))
    codes_b = _neighbour_codes(np.pad(b[box], 1))
    full = (1 << (1 << a.ndim)) - 1
    border_a = (codes_a != 0) & (codes_a != full)
    border_b = (codes_b != 0) & (codes_b != full)
    table = _surfel_area_table(tuple(float(s) for s in sampling))

    def distance_to(border: np.ndarray) -> np.ndarray:
        if not border.any():
            return np.full(border.shape, np.inf)
        return ndimage.distance_transform_edt(~border, sampling=sampling)

    return {
        "distances_a_to_b": distance_to(border_b)[border_a],
        "areas_a": table[codes_a[border_a]],
        "distances_b_to_a": distance_to(border_a)[border_b],
        "areas_b": table[codes_b[border_b]],
    }


def _area_weighted_percentile(distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    """DeepMind's robust percentile: first sorted distance whose cumulative area share >= percent."""
    if distances.size == 0:
        return float("inf")
    order = np.lexsort((areas, distances))  # by distance, ties by area, as sorted(zip(d, a))
    sorted_distances = distances[order]
    sorted_areas = areas[order]
    cumulative = np.cumsum(sorted_areas) / np.sum(sorted_areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(sorted_distances[min(index, sorted_distances.size - 1)])


def robust_hausdorff(
    mask_a: np.ndarray, mask_b: np.ndarray, percent: float = 95.0, spacing: Sequence[float] | None = None
) -> float:
    """Symmetric percentile Hausdorff distance (DeepMind ``compute_robust_hausdorff``).

    The larger of the two directed, surfel-area-weighted ``percent`` percentiles of the distances
    between the surfaces, >= 0, lower is better, in units of ``spacing`` (voxels for ``None``).
    ``inf`` when either mask is empty.
    """
    found = surface_distances(mask_a, mask_b, spacing)
    return max(
        _area_weighted_percentile(found["distances_a_to_b"], found["areas_a"], percent),
        _area_weighted_percentile(found["distances_b_to_a"], found["areas_b"], percent),
    )


def hd95_per_label(
    fixed_labels: np.ndarray,
    warped_labels: np.ndarray,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    *,
    moving_labels: np.ndarray | None = None,
) -> dict[int, float]:
    """95th percentile Hausdorff distance per label, as Learn2Reg's ``compute_hd95``.

    ``spacing=None`` gives voxel units, exactly the evaluator's number (it passes a spacing of
    ones); a spacing tuple gives mm (the same algorithm with anisotropic surfel areas and distances).
    >= 0, lower is better.

    Missing labels (Learn2Reg's convention): a label absent from the fixed map or from the moving
    map gives **NaN**; a label present in both but absent from the warped map gives ``inf`` (the
    surface-distance package's value for an empty surface), which makes a NaN-ignoring mean
    ``inf`` too, as in the evaluator. Presence is checked in ``moving_labels`` when given, else in
    ``warped_labels``.

    Args:
        fixed_labels, warped_labels: ``S`` label maps (2D or 3D).
        labels: labels to score; default: union of the nonzero labels of all maps given.
        spacing: voxel size (mm) per axis, or ``None`` for voxel units.
        moving_labels: the unwarped moving label map, used only for the presence check.
    Returns:
        ``{label: hd95}``.
    """
    fixed = np.asarray(fixed_labels)
    warped = np.asarray(warped_labels)
    _check_same_shape("fixed_labels", fixed, "warped_labels", warped)
    reference = warped if moving_labels is None else np.asarray(moving_labels)
    if labels is None:
        labels = _labels_present(fixed, warped, reference)
    result: dict[int, float] = {}
    for label in labels:
        in_fixed = fixed == label
        if not in_fixed.any() or not np.any(reference == label):
            result[int(label)] = float("nan")
            continue
        result[int(label)] = robust_hausdorff(in_fixed, warped == label, 95.0, spacing)
    return result


# --- target registration error -----------------------------------------------------------------


def _as_points(points, ndim: int, name: str) -> np.ndarray:
    """Validate ``(N, ndim)`` voxel coordinates (an empty input gives ``(0, ndim)``)."""
    array = np.asarray(points, dtype=np.float64)
    if array.size == 0:
        return np.zeros((0, ndim))
    if array.ndim != 2 or array.shape[1] != ndim:
        raise ValueError(f"{name} must have shape (N, {ndim}), got {array.shape}")
    return array


def tre(
    fixed_points: np.ndarray,
    moving_points: np.ndarray,
    disp: np.ndarray,
    spacing: Sequence[float],
    order: int = 3,
) -> np.ndarray:
    """Target registration error per point pair, in mm: ``||(p_f + u(p_f) - p_m) * spacing||``.

    ``u`` is sampled at the fixed points by ``scipy.ndimage.map_coordinates`` with spline
    ``order`` (3: cubic B-spline with prefiltering, the evaluator's default; 1: trilinear) and its
    default boundary mode (``"constant"``: zero displacement far outside the grid). Learn2Reg
    multiplies by the moving image's spacing; fixed and moving share a grid here.

    Args:
        fixed_points, moving_points: ``(N, ndim)`` voxel coordinates ``(i, j, k)`` of corresponding
            points in the fixed and moving image.
        disp: ``(*S, ndim)`` displacement in voxels.
        spacing: voxel size (mm) per axis.
        order: interpolation order, 0 to 5.
    Returns:
        ``(N,)`` float64 errors in mm, >= 0, lower is better.
    """
    field = _as_field(disp)
    ndim = field.shape[-1]
    fixed = _as_points(fixed_points, ndim, "fixed_points")
    moving = _as_points(moving_points, ndim, "moving_points")
    _check_same_shape("fixed_points", fixed, "moving_points", moving)
    if order not in range(6):
        raise ValueError(f"interpolation order must be an integer from 0 to 5, got {order!r}")
    scale = _spacing_array(spacing, ndim)
    if fixed.shape[0] == 0:
        return np.zeros(0)
    sampled = np.stack(
        [ndimage.map_coordinates(field[..., d], fixed.T, order=order, mode="constant") for d in range(ndim)],
        axis=1,
    )
    return np.linalg.norm((fixed + sampled - moving) * scale, axis=1)


# --- Jacobian-based metrics --------------------------------------------------------------------


def _determinant(matrix: list[list[np.ndarray]]) -> np.ndarray:
    """Determinant of a 2x2 or 3x3 matrix given as nested lists of equally shaped arrays."""
    if len(matrix) == 2:
        return matrix[0][0] * matrix[1][1] - matrix[0][1] * matrix[1][0]
    (a, b, c), (d, e, f), (g, h, i) = matrix
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def jacobian_determinant_l2r(disp: np.ndarray) -> np.ndarray:
    """Jacobian determinant of ``x -> x + u(x)`` exactly as the Learn2Reg evaluator computes it.

    Derivatives are central differences (``scipy.ndimage.correlate`` with ``[-0.5, 0, 0.5]``, zero
    padding outside the grid), the identity is added, and the result is cropped by 2 voxels on every
    side, which removes every voxel whose difference touched the padding.

    Args:
        disp: ``(*S, ndim)`` displacement in voxels (every side of ``S`` longer than 4).
    Returns:
        ``S - 4`` determinants (1 = volume preserved, <= 0 = folding), float64.
    """
    field = _as_field(disp)
    ndim = field.shape[-1]
    if min(field.shape[:-1]) <= 2 * L2R_JACOBIAN_CROP:
        raise ValueError(f"the Jacobian crop needs a grid larger than 4 voxels per axis, got {field.shape[:-1]}")
    crop = (slice(L2R_JACOBIAN_CROP, -L2R_JACOBIAN_CROP),) * ndim
    jacobian = [
        [
            ndimage.correlate1d(field[..., c], _CENTRAL_DIFFERENCE, axis=a, mode="constant", cval=0.0)[crop]
            + (1.0 if a == c else 0.0)
            for a in range(ndim)
        ]
        for c in range(ndim)
    ]
    return _determinant(jacobian)


def sdlogj_l2r(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Learn2Reg's SDlogJ: ``std(log(clip(det + 3, 1e-9, 1e9)))`` over the cropped Jacobian.

    This is the evaluator's variant, not the textbook one (:func:`sdlogj`): the ``+ 3`` shift keeps
    folded voxels (det down to -3) inside the log and compresses the spread, so it is smaller than
    ``std(log(det))``. Population standard deviation (``ddof=0``). >= 0, lower is smoother.

    Args:
        disp: ``(*S, ndim)`` displacement in voxels.
        mask: optional ``S`` mask on the fixed grid; as the evaluator's masked evaluation, only
            voxels where ``mask == 1`` (after the same 2-voxel crop) count.
    Returns:
        The standard deviation; NaN when the mask keeps no voxel.
    """
    field = _as_field(disp)
    return _sdlogj_l2r_of(jacobian_determinant_l2r(field), mask, field.shape[:-1])


def _sdlogj_l2r_of(det: np.ndarray, mask, grid: tuple) -> float:
    """:func:`sdlogj_l2r` from the cropped determinant of a field on ``grid``."""
    log_det = np.log(np.clip(det + L2R_SDLOGJ_OFFSET, *L2R_SDLOGJ_CLIP))
    if mask is not None:
        mask_array = np.asarray(mask)
        if mask_array.shape != tuple(grid):
            raise ValueError(f"mask of shape {mask_array.shape} does not match the field grid {tuple(grid)}")
        crop = (slice(L2R_JACOBIAN_CROP, -L2R_JACOBIAN_CROP),) * det.ndim
        log_det = log_det[mask_array[crop] == 1]
        if log_det.size == 0:
            return float("nan")
    return float(log_det.std())


def sdlogj(disp: np.ndarray) -> float:
    """Textbook SDlogJ: ``std(log(det))`` over the voxels with ``det > 0``.

    Same cropped central-difference Jacobian as :func:`jacobian_determinant_l2r`. Voxels with a
    non-positive determinant have no logarithm and are **left out** (report them with
    :func:`fraction_nonpositive_jacobian`). Population standard deviation. >= 0, lower is smoother.

    Returns:
        The standard deviation; NaN when no voxel has a positive determinant.
    """
    return _sdlogj_of(jacobian_determinant_l2r(disp))


def _sdlogj_of(det: np.ndarray) -> float:
    """:func:`sdlogj` from the cropped determinant."""
    positive = det[det > 0]
    if positive.size == 0:
        return float("nan")
    return float(np.log(positive).std())


def fraction_nonpositive_jacobian(disp: np.ndarray) -> float:
    """Fraction in ``[0, 1]`` of voxels whose Jacobian determinant is ``<= 0`` (folding).

    Counted on the **cropped** grid of :func:`jacobian_determinant_l2r` (2 voxels removed on every
    side; central differences), so numerator and denominator both exclude that border.
    """
    return _fraction_nonpositive_of(jacobian_determinant_l2r(disp))


def _fraction_nonpositive_of(det: np.ndarray) -> float:
    """:func:`fraction_nonpositive_jacobian` from the cropped determinant."""
    return float(np.count_nonzero(det <= 0) / det.size)


def _central_tetrahedra_offsets() -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Edge offsets of the two central tetrahedra seen from a voxel (3D).

    With apex ``x`` and vertices ``x + (1,1,0), x + (0,1,1), x + (1,0,1)`` the tetrahedron is the
    central one of the 5-tetrahedra split of the cell at ``x`` (even corners); with apex ``x`` and
    vertices ``x - (1,1,0), x - (1,0,1), x - (0,1,1)`` it is the central one of the other split
    of the cell at ``x - 1`` (odd corners). Both have determinant 2 (volume 1/3) for the identity.
    """
    return (
        ((1, 1, 0), (0, 1, 1), (1, 0, 1)),
        ((-1, -1, 0), (-1, 0, -1), (0, -1, -1)),
    )


def _padded_deformation(disp: np.ndarray) -> np.ndarray:
    """``phi = id + u`` on the grid extended by one voxel of edge replication of ``u`` (Liu et al.).

    Returns ``(*(S + 2), ndim)`` float64 positions in voxels of the unpadded grid plus one.
    """
    field = _as_field(disp)
    ndim = field.shape[-1]
    padded = np.pad(field, [(1, 1)] * ndim + [(0, 0)], mode="edge")
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in padded.shape[:-1]], indexing="ij")
    return padded + np.stack(grid, axis=-1)


def _tetrahedral_determinants_inside(phi: np.ndarray) -> Iterator[np.ndarray]:
    """The determinants of :func:`tetrahedral_jacobian_determinants`, one array at a time, at the
    voxels of ``phi`` (a padded deformation or a slab of one) that have a neighbour on every side.

    Args:
        phi: ``(*(P), ndim)`` positions.
    Yields:
        ``(*(P - 2))`` arrays: the ``2^ndim`` one-sided determinants, then (3D) the two central ones.
    """
    ndim = phi.shape[-1]
    shape = tuple(n - 2 for n in phi.shape[:-1])

    def difference(offset: Sequence[int]) -> list[np.ndarray]:
        """``phi(x + offset) - phi(x)`` per component, over the inner voxels."""
        window = tuple(slice(1 + o, 1 + o + n) for o, n in zip(offset, shape))
        centre = tuple(slice(1, 1 + n) for n in shape)
        return [phi[window + (c,)] - phi[centre + (c,)] for c in range(ndim)]

    def unit(axis: int, step: int) -> tuple[int, ...]:
        return tuple(step if d == axis else 0 for d in range(ndim))

    for signs in itertools.product((1, -1), repeat=ndim):
        columns = []
        for axis, sign in enumerate(signs):
            column = difference(unit(axis, sign))
            columns.append(column if sign > 0 else [-v for v in column])
        yield _determinant([[columns[k][c] for k in range(ndim)] for c in range(ndim)])
    if ndim == 3:
        for offsets in _central_tetrahedra_offsets():
            columns = [difference(o) for o in offsets]
            yield _determinant([[columns[k][c] for k in range(3)] for c in range(3)])


def tetrahedral_jacobian_determinants(disp: np.ndarray) -> np.ndarray:
    """Finite-difference Jacobian determinants of Liu et al. (IJCV 2024), per voxel.

    In 3D, 10 per voxel: the 8 one-sided ones ``det[D^{s0}_0 phi, D^{s1}_1 phi, D^{s2}_2 phi]`` for
    every sign pattern ``s`` (forward ``D^+ phi = phi(x + e) - phi(x)``, backward
    ``D^- phi = phi(x) - phi(x - e)``), i.e. 6 x the signed volume of the corner tetrahedron at ``x``
    of each of the 8 cells around it, then the two central tetrahedra
    (:func:`_central_tetrahedra_offsets`). Over the grid, every cell gets the 5 + 5 tetrahedra of
    its two 5-tetrahedra splits. In 2D, 4 per pixel: the triangles ``det[D^{s0}_0, D^{s1}_1]``.
    ``phi = id + u`` with ``u`` extended by one voxel of edge replication, as Liu et al. do.

    Args:
        disp: ``(*S, ndim)`` displacement in voxels.
    Returns:
        ``(10, *S)`` (3D) or ``(4, *S)`` (2D) determinants; identity gives 1 for the corner
        tetrahedra / triangles and 2 for the central tetrahedra.
    """
    return np.stack(list(_tetrahedral_determinants_inside(_padded_deformation(disp))), axis=0)


# Voxels per slab of the non-diffeomorphic volume: the ~30 float64 temporaries of one determinant
# then stay in the CPU caches: on the 160 x 192 x 224 grid 1.3-2.7 s instead of 7.4 s for the whole
# grid at once (development CPU; bit-identical result).
_NDV_SLAB_VOXELS = 2**16


def _non_diffeomorphic_volume_map(disp: np.ndarray) -> np.ndarray:
    """Per-voxel non-diffeomorphic volume (voxels^ndim): negative parts of the simplex volumes.

    Each of the two 5-tetrahedra splits of a cell fills the cell once, so the volume is averaged
    over the two splits: weight ``1/2`` times the simplex volume ``|det| / 6`` (3D) or
    ``|det| / 2`` (2D, two triangle splits of a pixel cell). Computed in slabs along the first
    axis (same operations on the same numbers as the whole grid at once, so the same result).
    """
    phi = _padded_deformation(disp)
    ndim = phi.shape[-1]
    shape = tuple(n - 2 for n in phi.shape[:-1])
    rows = max(1, _NDV_SLAB_VOXELS // max(1, math.prod(shape[1:])))
    negative = np.zeros(shape, dtype=np.float64)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        slab = negative[start:stop]
        for det in _tetrahedral_determinants_inside(phi[start:stop + 2]):
            slab += np.maximum(-det, 0.0)
    return 0.5 / math.factorial(ndim) * negative


def _ndv_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if mask is None:
        return np.ones(shape, dtype=bool)
    mask_array = np.asarray(mask)
    if mask_array.shape != shape:
        raise ValueError(f"mask of shape {mask_array.shape} does not match the field grid {shape}")
    return mask_array > 0


def ndv(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Non-diffeomorphic volume (Liu et al., IJCV 2024), in voxels (2D: non-diffeomorphic area, pixels).

    The sum over voxels of the negative parts of the signed volumes of the 10 finite-difference
    tetrahedra (:func:`tetrahedral_jacobian_determinants`), halved because the two 5-tetrahedra
    splits each tile the cell once. 0 for any field whose piecewise-linear interpolation on both
    splits is orientation preserving; > 0 measures how much volume is folded. >= 0, lower is better.

    Args:
        disp: ``(*S, ndim)`` displacement in voxels.
        mask: optional ``S`` mask; only voxels with ``mask > 0`` count, as in Liu et al.'s code.
    """
    volume = _non_diffeomorphic_volume_map(disp)
    return float(volume[_ndv_mask(mask, volume.shape)].sum())


def ndv_fraction(disp: np.ndarray, mask: np.ndarray | None = None) -> float:
    """:func:`ndv` divided by the total volume (number of voxels in the mask).

    >= 0: 0 for a digitally diffeomorphic field, usually far below 1, but severe folding can push
    it past 1 (folded tetrahedra may be larger than the cell). Multiply by 100 for Liu et al.'s
    ``NDV %``. NaN for an empty mask.
    """
    volume = _non_diffeomorphic_volume_map(disp)
    keep = _ndv_mask(mask, volume.shape)
    count = int(np.count_nonzero(keep))
    return float(volume[keep].sum() / count) if count else float("nan")


# --- summary -----------------------------------------------------------------------------------


def _json_floats(per_label: Mapping[int, float]) -> dict[str, float]:
    return {str(label): float(value) for label, value in per_label.items()}


def evaluate_field(
    disp: np.ndarray,
    *,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    labels: Sequence[int] | None = None,
    fixed_points: np.ndarray | None = None,
    moving_points: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    tre_order: int = 3,
    regularity: bool = True,
    hd95: bool = True,
) -> dict:
    """Every metric the inputs allow, as a JSON-ready dict.

    Always: ``sdlogj_l2r``, ``sdlogj``, ``percent_nonpositive_jacobian`` (cropped grid, 0..100),
    ``ndv_voxels``, ``ndv_percent`` (0..100). With ``fixed_labels`` and ``moving_labels``:
    ``dice_per_label``, ``dice_mean``, ``hd95_voxels_per_label``, ``hd95_voxels`` (NaN-ignoring
    mean over labels, Learn2Reg's number), ``hd95_mm_per_label``, ``hd95_mm``. With both point
    sets: ``tre_mm`` (per point), ``tre_mm_mean``, ``tre_mm_median``, ``tre_mm_std`` (ddof=0),
    ``tre_order``.

    Values are Python floats; NaN and inf stay ``float('nan')`` / ``float('inf')`` (``json.dumps``
    writes them as ``NaN`` / ``Infinity`` with its default ``allow_nan=True``); per-label dicts have
    string keys so that a JSON round trip keeps them.

    Args:
        disp: ``(*S, ndim)`` displacement in voxels.
        fixed_labels, moving_labels: ``S`` label maps; the moving one is warped with
            :func:`warp_labels`, and presence of a label is checked as Learn2Reg does.
        labels: labels to score (default: every nonzero label of either map).
        fixed_points, moving_points: ``(N, ndim)`` voxel coordinates of corresponding points.
        spacing: voxel size (mm) of the fixed grid, for TRE and ``hd95_mm``; ``None`` = ones.
        tre_order: interpolation order for TRE (3 = Learn2Reg's cubic, 1 = trilinear).
        regularity: include the Jacobian-based metrics (SDlogJ, folding, NDV); callers scoring
            the identity ("before registration") skip them, their values being known.
        hd95: include HD95 (the most expensive overlap metric).
    """
    field = _as_field(disp)
    ndim = field.shape[-1]
    scale = _spacing_array(spacing, ndim)
    result: dict = {}
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("label metrics need both fixed_labels and moving_labels")
    if fixed_labels is not None:
        fixed = np.asarray(fixed_labels)
        moving = np.asarray(moving_labels)
        warped = warp_labels(moving, field)
        if labels is None:
            labels = _labels_present(fixed, moving)
        dice = dice_per_label(fixed, warped, labels, moving_labels=moving)
        result["dice_per_label"] = _json_floats(dice)
        result["dice_mean"] = mean_dice(dice)
        if hd95:
            hd_voxels = hd95_per_label(fixed, warped, labels, None, moving_labels=moving)
            result["hd95_voxels_per_label"] = _json_floats(hd_voxels)
            result["hd95_voxels"] = _nanmean(hd_voxels.values())
            if np.all(scale == 1.0):
                hd_mm = hd_voxels
            else:
                hd_mm = hd95_per_label(fixed, warped, labels, tuple(scale), moving_labels=moving)
            result["hd95_mm_per_label"] = _json_floats(hd_mm)
            result["hd95_mm"] = _nanmean(hd_mm.values())
    if (fixed_points is None) != (moving_points is None):
        raise ValueError("TRE needs both fixed_points and moving_points")
    if fixed_points is not None:
        errors = tre(fixed_points, moving_points, field, tuple(scale), order=tre_order)
        result["tre_mm"] = [float(e) for e in errors]
        empty = errors.size == 0  # no points: NaN summaries rather than numpy's warnings
        result["tre_mm_mean"] = float("nan") if empty else float(np.mean(errors))
        result["tre_mm_median"] = float("nan") if empty else float(np.median(errors))
        result["tre_mm_std"] = float("nan") if empty else float(np.std(errors))
        result["tre_order"] = int(tre_order)
    if not regularity:
        return result
    det = jacobian_determinant_l2r(field)  # once for the three Jacobian summaries
    result["sdlogj_l2r"] = _sdlogj_l2r_of(det, None, field.shape[:-1])
    result["sdlogj"] = _sdlogj_of(det)
    result["percent_nonpositive_jacobian"] = 100.0 * _fraction_nonpositive_of(det)
    volume = _non_diffeomorphic_volume_map(field)
    result["ndv_voxels"] = float(volume.sum())
    result["ndv_percent"] = 100.0 * float(volume.sum() / volume.size)
    return result
