"""Figures a person looks at: registration summaries, overlays and loss curves, as PNG files.

Figures are drawn outside pyplot and written atomically (:mod:`dirio.viz.canvas`). Planes,
orientation, display windows and the Jacobian of the shown slices follow
:mod:`dirio.viz.slices` (three orthogonal central slices in 3D, vertical axis upwards; one plane
in 2D). Pixels are square voxels (aspect equal in voxel units; the spacing is not known here).
Displacements are in voxel units, component order ``(i, j, k)``, pull convention
``warped(x) = moving(x + u(x))`` (see :mod:`dirio.core.fields`).
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import ListedColormap, Normalize

from dirio.errors import DirioError
from dirio.io.atomic import check_writable
from dirio.viz.canvas import check_png_path, new_figure, save_figure
from dirio.viz.slices import (
    AXIS_NAMES,
    View,
    as_array,
    central_views,
    check_images,
    deviation_half_range,
    display_window,
    in_plane_displacement,
    jacobian_planes,
    normalised_to_window,
    plane_label,
    view_plane,
)

PathLike = str | os.PathLike

# Figure geometry. One image panel is PANEL_INCHES wide; at DPI 100 a 3D registration figure is
# about 1400 x 1100 pixels, enough to see single voxels of a 224-voxel axis.
PANEL_INCHES = 2.3
CURVE_PANEL_HEIGHT_INCHES = 2.2
COLORBAR_ROW_INCHES = 0.18
NOTE_LINE_INCHES = 0.25  # height of each line of notes under the title
MAX_CURVE_PANELS_PER_ROW = 6
# Curves with fewer logged points than this are drawn with point markers too.
FEW_POINTS = 30

# A deformation grid line every GRID_STEP_VOXELS voxels: dense enough to show local
# deformation, sparse enough that neighbouring lines stay distinguishable at the panel size.
GRID_STEP_VOXELS = 6

# Smallest half-range of the Jacobian colour scale around 1, so that an almost rigid field is
# not drawn with amplified noise; largest, so that the scale never goes below det = 0.
JACOBIAN_MIN_HALF_RANGE = 0.05
JACOBIAN_MAX_HALF_RANGE = 1.0

# Number of checkerboard tiles along the shorter in-plane axis of an overlay panel.
CHECKER_TILES = 8

IMAGE_CMAP = "gray"
DIFFERENCE_CMAP = "PuOr_r"
JACOBIAN_CMAP = "RdBu_r"  # blue: compression (det < 1), red: expansion (det > 1)
FOLD_COLOR = "lime"  # voxels with det <= 0 (folding), drawn over the Jacobian map
GRID_COLOR = "#ffb000"
LABEL_CMAP = "tab10"  # qualitative, all saturated colours for label contours, label value modulo 10


# --- panel painters -------------------------------------------------------------------------------


def _bare(ax) -> None:
    """Image panel without ticks (voxel indices are given by the row label instead)."""
    ax.set_xticks([])
    ax.set_yticks([])


def _show_image(ax, plane: np.ndarray, view: View, window: tuple[float, float]):
    return ax.imshow(
        plane, cmap=IMAGE_CMAP, vmin=window[0], vmax=window[1], origin=view.origin, interpolation="nearest"
    )


def _label_edges_rgba(labels: np.ndarray) -> np.ndarray:
    """RGBA image of the inner boundary of every non-zero label of a 2D label plane.

    A voxel is on the boundary of its label when one of its 4 neighbours has another label.
    Drawing boundary voxels (rather than matplotlib contours of every label) costs one pass
    whatever the number of labels, which keeps atlases with 100+ structures fast.
    """
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, dtype=bool)
    differs_vertical = labels[1:, :] != labels[:-1, :]
    differs_horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= differs_vertical
    edge[:-1, :] |= differs_vertical
    edge[:, 1:] |= differs_horizontal
    edge[:, :-1] |= differs_horizontal
    edge &= labels != 0
    cmap = colormaps[LABEL_CMAP]
    rgba = np.zeros((*labels.shape, 4))
    rgba[edge] = cmap((labels[edge].astype(np.int64) % cmap.N) / cmap.N)  # exact colour bins
    rgba[..., 3] = edge
    return rgba


def _draw_label_edges(ax, labels_plane: np.ndarray, view: View) -> None:
    ax.imshow(_label_edges_rgba(labels_plane), origin=view.origin, interpolation="nearest")


def _draw_deformation_grid(ax, disp_h: np.ndarray, disp_v: np.ndarray) -> None:
    """Deformed grid ``x + u(x)`` for every GRID_STEP_VOXELS-th row and column of the plane.

    ``disp_h`` / ``disp_v`` are the in-plane displacement components (voxels) along the
    horizontal and vertical display axes, arrays ``(n_vertical, n_horizontal)``. A point on the
    fixed grid at column ``c`` and row ``r`` is drawn at ``(c + u_h, r + u_v)``: the position in
    the moving image it pulls its value from.
    """
    n_v, n_h = disp_h.shape
    columns = np.arange(n_h, dtype=np.float64)
    rows = np.arange(n_v, dtype=np.float64)
    lines = []
    for r in range(0, n_v, GRID_STEP_VOXELS):
        lines.append(np.stack([columns + disp_h[r, :], r + disp_v[r, :]], axis=-1))
    for c in range(0, n_h, GRID_STEP_VOXELS):
        lines.append(np.stack([c + disp_h[:, c], rows + disp_v[:, c]], axis=-1))
    ax.add_collection(LineCollection(lines, colors=GRID_COLOR, linewidths=0.6))


def _draw_jacobian(ax, det: np.ndarray, view: View, norm: Normalize):
    image = ax.imshow(det, cmap=JACOBIAN_CMAP, norm=norm, origin=view.origin, interpolation="nearest")
    folds = np.ma.masked_where(~(det <= 0), np.ones_like(det))
    ax.imshow(folds, cmap=ListedColormap([FOLD_COLOR]), vmin=0, vmax=1, origin=view.origin, interpolation="nearest")
    return image


# --- loss history ---------------------------------------------------------------------------------


def _as_number(value: Any) -> float | None:
    """``float(value)`` for real scalars (Python, numpy, 0-d / 1-element tensors); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    single_numpy = isinstance(value, np.ndarray) and value.size == 1
    single_tensor = isinstance(value, torch.Tensor) and value.numel() == 1
    if single_numpy or single_tensor:
        item = value.item()
        return float(item) if isinstance(item, numbers.Real) and not isinstance(item, bool) else None
    return None


_HISTORY_INDEX_KEYS = ("level", "iteration")


def history_series(history: Sequence[Mapping[str, Any]]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Curves of a per-iteration history, indexed by a global iteration counter.

    Args:
        history: one mapping per iteration, in the order they ran, e.g.
            ``{"level": 0, "iteration": 3, "loss": 0.8, "similarity": 0.7, "lr": 0.01}``.
    Returns:
        ``(series, boundaries)``: ``series[name]`` is an array with one value per history entry
        (NaN where that entry has no numeric value for ``name``), for every key except
        ``level`` and ``iteration`` that is numeric somewhere, in order of first appearance;
        ``boundaries`` are the global indices ``t`` where ``history[t]``'s ``level`` or ``stage``
        differs from ``history[t - 1]``'s (the first iteration of a new pyramid level, or of the
        next stage of a multi-stage run such as ``nio`` then ``refine``).
    """
    names: list[str] = []
    for entry in history:
        for key, value in entry.items():
            if key not in _HISTORY_INDEX_KEYS and key not in names and _as_number(value) is not None:
                names.append(key)
    series = {}
    for name in names:
        values = [_as_number(entry.get(name)) for entry in history]
        series[name] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    levels = [(entry.get("stage"), entry.get("level")) for entry in history]
    boundaries = [t for t in range(1, len(levels)) if levels[t] != levels[t - 1]]
    return series, boundaries


def _draw_curves(fig, spec, history: Sequence[Mapping[str, Any]]) -> None:
    """One panel per history term inside the gridspec cell ``spec``."""
    series, boundaries = history_series(history)
    count = len(series)
    columns = min(count, MAX_CURVE_PANELS_PER_ROW)
    rows = math.ceil(count / columns)
    grid = spec.subgridspec(rows, columns)
    steps = np.arange(len(history))
    for number, (name, values) in enumerate(series.items()):
        ax = fig.add_subplot(grid[number // columns, number % columns])
        finite = np.isfinite(values)
        # plotting only the finite points joins terms that are logged every n-th iteration
        marker = "." if finite.sum() < FEW_POINTS else None  # single points would be invisible
        ax.plot(steps[finite], values[finite], color="tab:blue", linewidth=1.2, marker=marker)
        if finite.any() and np.all(values[finite] > 0):
            ax.set_yscale("log")
        for t in boundaries:
            ax.axvline(t - 0.5, color="0.5", linestyle="--", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
        if number // columns == rows - 1 or number + columns >= count:
            label = "iteration (all levels)"
            if boundaries:
                label += "; dashed: next level" + (" or stage" if any("stage" in entry for entry in history) else "")
            ax.set_xlabel(label, fontsize=8)


# --- public figures --------------------------------------------------------------------------------


def registration_figure(
    path: PathLike,
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    disp: np.ndarray,
    *,
    history: Sequence[Mapping[str, Any]] | None = None,
    title: str | None = None,
    overwrite: bool = False,
    jacobian: np.ndarray | None = None,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write a one-page PNG summary of a registration result.

    Rows: one per displayed plane (three central orthogonal slices in 3D, one in 2D). Columns:
    fixed, moving, warped, signed difference ``fixed - warped`` (diverging colours, symmetric
    range), the deformation grid ``x + u(x)`` drawn every GRID_STEP_VOXELS voxels over the
    warped image, and the Jacobian determinant of ``x -> x + u(x)`` (diverging colours centred
    at 1: blue compresses, red expands; voxels with ``det <= 0`` in FOLD_COLOR). A bottom row
    holds one loss curve per term of ``history`` when given.

    Args:
        path: output file, must end in ``.png``.
        fixed, moving, warped: images of one shape ``S``, ``(D, H, W)`` or ``(H, W)``.
        disp: displacement ``(*S, ndim)`` in voxels (Learn2Reg layout, pull convention).
        history: per-iteration mappings, see :func:`history_series`.
        title: figure title.
        overwrite: replace an existing ``path``.
        jacobian: precomputed determinant, shape ``S``. When given, the figure also reports the
            number of folding voxels of the whole volume; otherwise the determinant is computed
            on the shown slices only (fast) and the counts are per slice.
        labels: ``(fixed_labels, warped_labels)`` integer maps of shape ``S``; the boundaries
            of their non-zero labels are drawn on the fixed and the warped panels.
        notes: lines printed under the title (e.g. the inverse consistency of ``dirio register --inverse``).
    Returns:
        ``Path(path)``.
    Raises:
        DirioError: wrong shapes, a non-PNG name, or ``path`` exists and ``overwrite`` is false.
    """
    path = check_png_path(path)
    fixed, moving, warped = (as_array(a, np.float32) for a in (fixed, moving, warped))
    shape = check_images(path, fixed=fixed, moving=moving, warped=warped)
    ndim = len(shape)
    disp = as_array(disp, np.float32)
    if disp.shape != (*shape, ndim):
        raise DirioError(f"{path}: displacement must have shape {(*shape, ndim)} (*S, ndim), got {disp.shape}")
    if jacobian is not None:
        jacobian = as_array(jacobian, np.float32)
        if jacobian.shape != shape:
            raise DirioError(f"{path}: Jacobian determinant must have shape {shape}, got {jacobian.shape}")
    if labels is not None:
        if len(labels) != 2:
            raise DirioError(f"{path}: labels must be a pair (fixed_labels, warped_labels)")
        labels = tuple(as_array(lab) for lab in labels)
        if any(lab.shape != shape for lab in labels):
            raise DirioError(f"{path}: label maps must have shape {shape}, got {[lab.shape for lab in labels]}")
    if history is not None and not history_series(history)[0]:
        history = None  # nothing numeric to plot: no curve row
    check_writable(path, overwrite)  # fail before rendering, not after

    views = central_views(shape)
    planes = {
        name: [view_plane(image, view, index) for view, index in views]
        for name, image in (("fixed", fixed), ("moving", moving), ("warped", warped))
    }
    differences = [f - w for f, w in zip(planes["fixed"], planes["warped"])]
    if jacobian is not None:
        det_planes = [view_plane(jacobian, view, index) for view, index in views]
        volume_folds = int(np.count_nonzero(jacobian <= 0))
    else:
        det_planes = jacobian_planes(disp, views)
        volume_folds = None

    fixed_window = display_window(*planes["fixed"])
    moving_window = display_window(*planes["moving"], *planes["warped"])
    difference_limit = deviation_half_range(differences, minimum=1e-6)
    jacobian_spread = deviation_half_range([d - 1.0 for d in det_planes], JACOBIAN_MIN_HALF_RANGE)
    jacobian_half = min(jacobian_spread, JACOBIAN_MAX_HALF_RANGE)
    jacobian_norm = Normalize(vmin=1.0 - jacobian_half, vmax=1.0 + jacobian_half)

    # one row per plane, heights proportional to the plane's aspect, a thin row of colour bars
    # (own axes, so that they do not shrink the image panels above), then the curves
    heights = [PANEL_INCHES * p.shape[0] / p.shape[1] for p in planes["fixed"]]
    heights.append(COLORBAR_ROW_INCHES)
    if history is not None:
        curve_rows = math.ceil(len(history_series(history)[0]) / MAX_CURVE_PANELS_PER_ROW) or 1
        heights.append(CURVE_PANEL_HEIGHT_INCHES * curve_rows)
    columns = 6
    notes = [str(line) for line in notes]
    fig = new_figure(PANEL_INCHES * columns + 1.0,
                     sum(heights) + 1.2 + (0.4 if title else 0.0) + NOTE_LINE_INCHES * len(notes))
    grid = fig.add_gridspec(len(heights), columns, height_ratios=heights)

    column_axes: list[list] = [[] for _ in range(columns)]
    difference_image = jacobian_image = None
    for row, (view, index) in enumerate(views):
        axes = [fig.add_subplot(grid[row, c]) for c in range(columns)]
        for c, ax in enumerate(axes):
            column_axes[c].append(ax)
            _bare(ax)
        _show_image(axes[0], planes["fixed"][row], view, fixed_window)
        _show_image(axes[1], planes["moving"][row], view, moving_window)
        _show_image(axes[2], planes["warped"][row], view, moving_window)
        difference_image = axes[3].imshow(
            differences[row],
            cmap=DIFFERENCE_CMAP,
            vmin=-difference_limit,
            vmax=difference_limit,
            origin=view.origin,
            interpolation="nearest",
        )
        background = normalised_to_window(planes["warped"][row], moving_window)
        axes[4].imshow(background, cmap=IMAGE_CMAP, vmin=0.0, vmax=1.6, origin=view.origin, interpolation="nearest")
        _draw_deformation_grid(axes[4], *in_plane_displacement(disp, view, index))
        n_v, n_h = planes["fixed"][row].shape
        axes[4].set_xlim(-0.5, n_h - 0.5)
        axes[4].set_ylim(*((-0.5, n_v - 0.5) if view.origin == "lower" else (n_v - 0.5, -0.5)))
        jacobian_image = _draw_jacobian(axes[5], det_planes[row], view, jacobian_norm)
        slice_folds = int(np.count_nonzero(det_planes[row] <= 0))
        axes[5].set_xlabel(f"det ≤ 0 in this slice: {slice_folds}", fontsize=8)
        if labels is not None:
            _draw_label_edges(axes[0], view_plane(labels[0], view, index), view)
            _draw_label_edges(axes[2], view_plane(labels[1], view, index), view)

        axes[0].set_ylabel(
            f"{plane_label(view, index)}\n{AXIS_NAMES[view.vertical]} {'↑' if view.origin == 'lower' else '↓'}",
            fontsize=9,
        )
        axes[0].set_xlabel(f"{AXIS_NAMES[view.horizontal]} →", fontsize=9)

    headings = ["fixed", "moving", "warped", "fixed − warped", f"grid x + u(x), every {GRID_STEP_VOXELS} vox"]
    for c, heading in enumerate(headings):
        column_axes[c][0].set_title(heading, fontsize=10)
    jac_heading = f"det J ({FOLD_COLOR}: det ≤ 0)"
    if volume_folds is not None:
        jac_heading += f"\ndet ≤ 0 in volume: {volume_folds} ({100.0 * volume_folds / jacobian.size:.3g}%)"
    column_axes[5][0].set_title(jac_heading, fontsize=10)

    bar_row = len(views)
    for c, image, label in ((3, difference_image, "fixed − warped"), (5, jacobian_image, "Jacobian determinant")):
        bar = fig.colorbar(image, cax=fig.add_subplot(grid[bar_row, c]), orientation="horizontal", extend="both")
        bar.set_label(label, fontsize=8)
        bar.ax.tick_params(labelsize=7)

    if history is not None:
        _draw_curves(fig, grid[bar_row + 1, :], history)
    if title or notes:
        fig.suptitle("\n".join(([title] if title else []) + notes), fontsize=12)
    return save_figure(fig, path, overwrite)


def loss_curve_figure(path: PathLike, history: Sequence[Mapping[str, Any]], overwrite: bool = False) -> Path:
    """Write a PNG with one curve panel per numeric history term (see :func:`history_series`).

    Each term gets its own panel because their scales differ; the y axis is logarithmic when
    every logged value of the term is positive; pyramid level changes are dashed vertical lines.

    Raises:
        DirioError: an empty history, a history without numeric terms, a non-PNG name, or
            ``path`` exists and ``overwrite`` is false.
    """
    path = check_png_path(path)
    if not history:
        raise DirioError(f"{path}: the loss history is empty; nothing to plot")
    series, _ = history_series(history)
    if not series:
        raise DirioError(f"{path}: the loss history has no numeric terms besides level/iteration")
    check_writable(path, overwrite)
    columns = min(len(series), MAX_CURVE_PANELS_PER_ROW)
    rows = math.ceil(len(series) / columns)
    fig = new_figure(max(2.8 * columns, 4.0), CURVE_PANEL_HEIGHT_INCHES * rows + 0.4)
    _draw_curves(fig, fig.add_gridspec(1, 1)[0, 0], history)
    return save_figure(fig, path, overwrite)


def _checkerboard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Tiles alternating between ``a`` and ``b`` (2D planes of one shape), CHECKER_TILES along
    the shorter axis."""
    tile = max(1, min(a.shape) // CHECKER_TILES)
    rows, cols = np.indices(a.shape)
    return np.where((rows // tile + cols // tile) % 2 == 0, a, b)


def overlay_figure(path: PathLike, fixed: np.ndarray, warped: np.ndarray, overwrite: bool = False) -> Path:
    """Write a PNG comparing ``fixed`` and ``warped`` on every displayed plane.

    Column 1: checkerboard alternating fixed and warped tiles (edges that continue across
    tiles mean good alignment). Column 2: colour overlay, fixed in red and warped in green, each
    scaled to its own intensity window: aligned structures are yellow.

    Args:
        fixed, warped: images of one shape ``(D, H, W)`` or ``(H, W)``.
    Raises:
        DirioError: shapes differ, a non-PNG name, or ``path`` exists and ``overwrite`` is false.
    """
    path = check_png_path(path)
    fixed, warped = as_array(fixed, np.float32), as_array(warped, np.float32)
    shape = check_images(path, fixed=fixed, warped=warped)
    check_writable(path, overwrite)
    views = central_views(shape)
    fixed_planes = [view_plane(fixed, view, index) for view, index in views]
    warped_planes = [view_plane(warped, view, index) for view, index in views]
    fixed_window, warped_window = display_window(*fixed_planes), display_window(*warped_planes)

    ratios = [p.shape[0] / p.shape[1] for p in fixed_planes]
    fig = new_figure(2 * PANEL_INCHES + 0.6, sum(PANEL_INCHES * r for r in ratios) + 0.8)
    grid = fig.add_gridspec(len(views), 2, height_ratios=ratios)
    for row, (view, index) in enumerate(views):
        f = normalised_to_window(fixed_planes[row], fixed_window)
        w = normalised_to_window(warped_planes[row], warped_window)
        checker_ax, colour_ax = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
        checker_ax.imshow(
            _checkerboard(f, w), cmap=IMAGE_CMAP, vmin=0, vmax=1, origin=view.origin, interpolation="nearest"
        )
        colour_ax.imshow(np.stack([f, w, np.zeros_like(f)], axis=-1), origin=view.origin, interpolation="nearest")
        for ax in (checker_ax, colour_ax):
            _bare(ax)
        checker_ax.set_ylabel(
            f"{plane_label(view, index)}\n{AXIS_NAMES[view.vertical]} {'↑' if view.origin == 'lower' else '↓'}",
            fontsize=9,
        )
        checker_ax.set_xlabel(f"{AXIS_NAMES[view.horizontal]} →", fontsize=9)
        if row == 0:
            checker_ax.set_title("checkerboard fixed / warped", fontsize=9)
            colour_ax.set_title("red: fixed, green: warped", fontsize=9)
    return save_figure(fig, path, overwrite)
