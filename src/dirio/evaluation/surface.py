"""Surface distances between masks and the 95th percentile Hausdorff distance (HD95) per label.

:func:`hd95_per_label` with ``spacing=None`` reproduces the Learn2Reg evaluator's ``compute_hd95``
(DeepMind's surface-distance algorithm with unit spacing, i.e. voxel units); a spacing gives the
textbook variant in mm. Masks and label maps are numpy arrays on one 2D or 3D grid.
"""

from __future__ import annotations

import functools
import itertools
from typing import Sequence

import numpy as np
from scipy import ndimage

from dirio.evaluation._checks import check_same_shape, scores_per_label, spacing_array


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
    check_same_shape("mask_a", a, "mask_b", b)
    if a.ndim not in (2, 3):
        raise ValueError(f"surface distances need 2D or 3D masks, got shape {a.shape}")
    sampling = spacing_array(spacing, a.ndim)
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
    return scores_per_label(
        fixed_labels, warped_labels, labels, moving_labels, lambda a, b: robust_hausdorff(a, b, 95.0, spacing)
    )
