"""Specification of dirio.viz.figures: the PNG figures and the conventions they display.

Figures are checked by reading the PNG back (valid image, plausible size, expected colours) and
by the geometry of what is drawn (slice orientation, grid line positions), on small synthetic
volumes with a known answer.
"""

from __future__ import annotations

import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from dirio.core import fields as field
from dirio.core import filters
from dirio.viz import canvas, slices
from dirio.viz import figures as report
from dirio.errors import DirioError

SHAPE_3D = (14, 16, 18)
SHAPE_2D = (20, 24)


def _pair(shape, amplitude=1.5, seed=0):
    """Synthetic (fixed, moving, warped, disp) numpy arrays: a blob warped by a smooth field."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    moving = np.exp(-4.0 * (grid**2).sum(0)).astype(np.float32)
    rng = np.random.default_rng(seed)
    disp = filters.gaussian_smooth(torch.from_numpy(rng.normal(size=(1, len(shape), *shape)).astype(np.float32)), 2.0)
    disp = disp * (amplitude / disp.abs().max())
    moved = field.warp(torch.from_numpy(moving)[None, None], disp)[0, 0].numpy()
    fixed = moved + rng.normal(0.0, 0.02, shape).astype(np.float32)
    warped = field.warp(torch.from_numpy(moving)[None, None], 0.9 * disp)[0, 0].numpy()
    return fixed, moving, warped, field.field_to_numpy(0.9 * disp)


def _history(levels=(4, 5)):
    entries = []
    for level, count in enumerate(levels):
        for iteration in range(count):
            t = len(entries)
            entries.append(
                {"level": level, "iteration": iteration, "loss": 1.0 / (t + 1), "similarity": -0.1 * t, "lr": 0.01}
            )
    return entries


def _read_png(path):
    """(H, W, C) float image in [0, 1]; fails if the file is not a PNG matplotlib can decode."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path, format="png")


def _assert_plausible_figure(path, min_size=300):
    image = _read_png(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert min_size <= height <= 4000 and min_size <= width <= 4000
    assert image[..., :3].std() > 0.05  # not a blank page
    return image


def _lime_pixels(image):
    """Count of pure-green pixels: report.FOLD_COLOR ('lime' = (0, 1, 0)) marks det <= 0."""
    rgb = image[..., :3]
    return int(np.count_nonzero((rgb[..., 0] < 0.1) & (rgb[..., 1] > 0.9) & (rgb[..., 2] < 0.1)))


def _no_temporary_files(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".tmp")] == []


# --- registration_figure -------------------------------------------------------------------------


def test_registration_figure_3d_writes_a_readable_png(tmp_path):
    fixed, moving, warped, disp = _pair(SHAPE_3D)
    out = report.registration_figure(tmp_path / "reg.png", fixed, moving, warped, disp, history=_history(), title="3D")
    assert out == tmp_path / "reg.png"
    image = _assert_plausible_figure(out)
    # three image rows plus curves: taller than wide is not required, but it is a full page
    assert image.shape[1] >= 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg.png"]


def test_registration_figure_2d_with_labels_jacobian_and_tensor_inputs(tmp_path):
    """2D works, labels and a precomputed Jacobian are accepted, torch tensors are converted."""
    fixed, moving, warped, disp = _pair(SHAPE_2D)
    labels = (fixed > 0.5).astype(np.int16), (warped > 0.5).astype(np.int16)
    jacobian = field.jacobian_determinant(field.field_from_numpy(disp))[0].numpy()
    out = report.registration_figure(
        tmp_path / "reg2d.png",
        torch.from_numpy(fixed),
        moving,
        warped,
        torch.from_numpy(disp),
        jacobian=jacobian,
        labels=labels,
        history=_history(),
    )
    _assert_plausible_figure(out, min_size=200)


@pytest.mark.parametrize("history", [None, [], [{"level": 0, "iteration": 0, "note": "text only"}]])
def test_registration_figure_without_curves(tmp_path, history):
    """No history, an empty one, or one without numeric terms: the figure has no curve row."""
    out = report.registration_figure(tmp_path / "reg.png", *_pair(SHAPE_2D), history=history)
    _assert_plausible_figure(out, min_size=150)


def test_registration_figure_marks_folding_voxels(tmp_path):
    """Voxels with det <= 0 are painted in the fold colour, and only when the field folds."""
    fixed, moving, warped, _ = _pair(SHAPE_2D)
    i = np.arange(SHAPE_2D[0], dtype=np.float32)[:, None]
    smooth = np.zeros((*SHAPE_2D, 2), dtype=np.float32)
    smooth[..., 0] = 0.5 * np.sin(i / 5.0)  # d u_i / d i >= -0.1: det >= 0.9
    folding = smooth.copy()
    folding[..., 0] = -2.0 * i  # d u_i / d i = -2: det = -1 everywhere
    report.registration_figure(tmp_path / "smooth.png", fixed, moving, warped, smooth)
    report.registration_figure(tmp_path / "fold.png", fixed, moving, warped, folding)
    assert _lime_pixels(_read_png(tmp_path / "smooth.png")) == 0
    # the whole Jacobian panel is folded: at least a panel's worth of pixels
    assert _lime_pixels(_read_png(tmp_path / "fold.png")) > 5000


def test_registration_figure_refuses_to_overwrite_without_the_flag(tmp_path):
    fixed, moving, warped, disp = _pair(SHAPE_2D)
    target = tmp_path / "reg.png"
    target.write_bytes(b"keep me")
    with pytest.raises(DirioError, match="exists"):
        report.registration_figure(target, fixed, moving, warped, disp)
    assert target.read_bytes() == b"keep me"
    report.registration_figure(target, fixed, moving, warped, disp, overwrite=True)
    _assert_plausible_figure(target, min_size=200)
    assert _no_temporary_files(tmp_path)


def test_registration_figure_leaves_no_temporary_file_when_saving_fails(tmp_path, monkeypatch):
    """A failure while writing (here: after half a file is written) leaves neither the target
    nor a temporary file, and an existing target is kept whole."""

    def failing_savefig(self, fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    fixed, moving, warped, disp = _pair(SHAPE_2D)
    with pytest.raises(RuntimeError, match="disk full"):
        report.registration_figure(tmp_path / "new.png", fixed, moving, warped, disp)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "old.png").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        report.overlay_figure(tmp_path / "old.png", fixed, warped, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"old"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f, m, w, d: (f, m, w[:-1], d), "one shape"),
        (lambda f, m, w, d: (f, m, w, d[..., :1]), "displacement"),
        (lambda f, m, w, d: (f, m, w, np.moveaxis(d, -1, 0)), "displacement"),
        (lambda f, m, w, d: (f[None, None], m[None, None], w[None, None], d), "2D .* or 3D"),
    ],
)
def test_registration_figure_rejects_wrong_shapes_before_writing(tmp_path, change, message):
    args = change(*_pair(SHAPE_2D))
    with pytest.raises(DirioError, match=message):
        report.registration_figure(tmp_path / "bad.png", *args)
    assert list(tmp_path.iterdir()) == []


def test_figures_must_be_png(tmp_path):
    fixed, moving, warped, disp = _pair(SHAPE_2D)
    with pytest.raises(DirioError, match="PNG"):
        report.registration_figure(tmp_path / "reg.jpg", fixed, moving, warped, disp)
    with pytest.raises(DirioError, match="PNG"):
        report.loss_curve_figure(tmp_path / "loss.pdf", _history())


def test_registration_figure_leaves_pyplot_and_backend_alone(tmp_path):
    """No global matplotlib state changes: backend unchanged, no pyplot figure left open."""
    backend = matplotlib.get_backend()
    open_before = sys.modules["matplotlib.pyplot"].get_fignums() if "matplotlib.pyplot" in sys.modules else []
    report.registration_figure(tmp_path / "reg.png", *_pair(SHAPE_2D))
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:
        assert sys.modules["matplotlib.pyplot"].get_fignums() == open_before


# --- loss curves and overlays --------------------------------------------------------------------


def test_loss_curve_figure_writes_png_and_refuses_overwrite(tmp_path):
    out = report.loss_curve_figure(tmp_path / "loss.png", _history())
    _assert_plausible_figure(out, min_size=150)
    with pytest.raises(DirioError, match="exists"):
        report.loss_curve_figure(out, _history())
    report.loss_curve_figure(out, _history((3,)), overwrite=True)
    assert _no_temporary_files(tmp_path)


def test_loss_curve_figure_rejects_a_history_without_curves(tmp_path):
    with pytest.raises(DirioError, match="empty"):
        report.loss_curve_figure(tmp_path / "loss.png", [])
    with pytest.raises(DirioError, match="numeric"):
        report.loss_curve_figure(tmp_path / "loss.png", [{"level": 0, "iteration": 0, "note": "x"}])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [SHAPE_3D, SHAPE_2D])
def test_overlay_figure_writes_png_in_2d_and_3d(tmp_path, shape):
    fixed, _, warped, _ = _pair(shape)
    out = report.overlay_figure(tmp_path / "overlay.png", fixed, warped)
    _assert_plausible_figure(out, min_size=150)
    with pytest.raises(DirioError, match="exists"):
        report.overlay_figure(out, fixed, warped)


def test_overlay_colours_fixed_red_and_warped_green(tmp_path):
    """Bright only in fixed -> red pixels; bright only in warped -> green pixels."""
    fixed = np.zeros(SHAPE_2D, dtype=np.float32)
    warped = np.zeros(SHAPE_2D, dtype=np.float32)
    fixed[:, :10] = 1.0
    warped[:, 14:] = 1.0
    rgb = _read_png(report.overlay_figure(tmp_path / "o.png", fixed, warped))[..., :3]
    red = (rgb[..., 0] > 0.9) & (rgb[..., 1] < 0.1) & (rgb[..., 2] < 0.1)
    green = (rgb[..., 1] > 0.9) & (rgb[..., 0] < 0.1) & (rgb[..., 2] < 0.1)
    assert red.sum() > 1000 and green.sum() > 1000


def test_checkerboard_alternates_tiles():
    a, b = np.zeros((16, 16)), np.ones((16, 16))
    board = report._checkerboard(a, b)
    tile = 16 // report.CHECKER_TILES
    assert board[0, 0] == 0 and board[0, tile] == 1 and board[tile, 0] == 1 and board[tile, tile] == 0
    assert board.mean() == 0.5


# --- history parsing -----------------------------------------------------------------------------


def test_history_series_collects_numeric_terms_and_level_boundaries():
    history = [
        {"level": 0, "iteration": 0, "loss": 3.0, "lr": np.float32(0.1), "note": "start", "converged": False},
        {"level": 0, "iteration": 1, "loss": torch.tensor(2.0), "lr": 0.1},
        {"level": 1, "iteration": 0, "loss": 1.5, "lr": 0.05, "dice": 0.7},
        {"level": 1, "iteration": 1, "loss": 1.0, "lr": 0.05},
        {"level": 2, "iteration": 0, "loss": 0.5, "lr": 0.025},
    ]
    series, boundaries = report.history_series(history)
    assert list(series) == ["loss", "lr", "dice"]  # no level/iteration, strings or booleans
    np.testing.assert_allclose(series["loss"], [3.0, 2.0, 1.5, 1.0, 0.5])
    np.testing.assert_allclose(series["lr"], [0.1, 0.1, 0.05, 0.05, 0.025], rtol=1e-6)
    assert np.isnan(series["dice"][[0, 1, 3, 4]]).all() and series["dice"][2] == 0.7
    assert boundaries == [2, 4]
    # a multi-stage run (a network stage, then its refinement) changes stage at the same level too
    staged = [{"stage": "nio", "level": 0, "iteration": 0, "loss": 1.0},
              {"stage": "nio", "level": 0, "iteration": 1, "loss": 0.9},
              {"stage": "refine", "level": 0, "iteration": 0, "loss": 0.5}]
    assert report.history_series(staged)[1] == [2]


def test_curves_use_log_axis_only_for_positive_terms():
    history = [
        {"level": 0, "iteration": t, "loss": 2.0**-t, "similarity": -0.5 + 0.1 * t, "zero": 0.0} for t in range(5)
    ]
    fig = canvas.new_figure(8, 3)
    report._draw_curves(fig, fig.add_gridspec(1, 1)[0, 0], history)
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales == {"loss": "log", "similarity": "linear", "zero": "linear"}


def test_curves_mark_level_changes_with_vertical_lines():
    fig = canvas.new_figure(4, 3)
    report._draw_curves(fig, fig.add_gridspec(1, 1)[0, 0], _history((3, 4, 2)))
    ax = fig.axes[0]
    vertical = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert vertical == [2.5, 6.5]  # between the last iteration of a level and the next one


# --- display conventions -------------------------------------------------------------------------


def test_plane_orientation_of_each_3d_view():
    """Rows of a displayed plane run along view.vertical, columns along view.horizontal."""
    volume = np.arange(np.prod(SHAPE_3D)).reshape(SHAPE_3D)
    for view, index in slices.central_views(SHAPE_3D):
        assert index == SHAPE_3D[view.normal] // 2
        plane = slices.view_plane(volume, view, index)
        assert plane.shape == (SHAPE_3D[view.vertical], SHAPE_3D[view.horizontal])
        voxel = [0, 0, 0]
        voxel[view.normal], voxel[view.vertical], voxel[view.horizontal] = index, 3, 5
        assert plane[3, 5] == volume[tuple(voxel)]
    assert {view.normal for view, _ in slices.central_views(SHAPE_3D)} == {0, 1, 2}


def test_documented_view_conventions():
    """Normal to i: j across, k up; normal to j: i across, k up; normal to k: i across, j up."""
    shown = [(v.normal, v.horizontal, v.vertical, v.origin) for v, _ in slices.central_views(SHAPE_3D)]
    assert shown == [(0, 1, 2, "lower"), (1, 0, 2, "lower"), (2, 0, 1, "lower")]
    [(view_2d, _)] = slices.central_views(SHAPE_2D)
    assert (view_2d.horizontal, view_2d.vertical, view_2d.origin) == (1, 0, "upper")


@pytest.mark.parametrize("shape", [SHAPE_3D, SHAPE_2D])
def test_in_plane_displacement_picks_the_components_of_the_displayed_axes(shape):
    """With u_c = 10 * (c + 1) everywhere, the horizontal/vertical components of every view are
    those of its horizontal/vertical array axes."""
    disp = np.broadcast_to(10.0 * np.arange(1, len(shape) + 1), (*shape, len(shape)))
    for view, index in slices.central_views(shape):
        u_h, u_v = slices.in_plane_displacement(disp, view, index)
        assert u_h.shape == u_v.shape == (shape[view.vertical], shape[view.horizontal])
        assert np.all(u_h == 10.0 * (view.horizontal + 1)) and np.all(u_v == 10.0 * (view.vertical + 1))


def test_plane_of_2d_image_is_the_array_itself():
    image = np.arange(np.prod(SHAPE_2D)).reshape(SHAPE_2D)
    [(view, index)] = slices.central_views(SHAPE_2D)
    np.testing.assert_array_equal(slices.view_plane(image, view, index), image)
    assert view.origin == "upper"


def test_deformation_grid_is_drawn_at_x_plus_u():
    """A constant in-plane displacement (2 along the horizontal axis, -1 along the vertical one)
    moves every grid line by exactly that amount; lines sit every GRID_STEP_VOXELS voxels."""
    n_v, n_h = 13, 20
    fig = canvas.new_figure(3, 3)
    ax = fig.add_subplot()
    report._draw_deformation_grid(ax, np.full((n_v, n_h), 2.0), np.full((n_v, n_h), -1.0))
    [collection] = [c for c in ax.collections if isinstance(c, LineCollection)]
    segments = collection.get_segments()
    step = report.GRID_STEP_VOXELS
    rows, cols = list(range(0, n_v, step)), list(range(0, n_h, step))
    assert len(segments) == len(rows) + len(cols)
    first_row = segments[0]  # the line of fixed-grid row 0
    np.testing.assert_allclose(first_row[:, 0], np.arange(n_h) + 2.0)
    np.testing.assert_allclose(first_row[:, 1], -1.0)
    first_column = segments[len(rows)]  # the line of fixed-grid column 0
    np.testing.assert_allclose(first_column[:, 0], 2.0)
    np.testing.assert_allclose(first_column[:, 1], np.arange(n_v) - 1.0)


def test_jacobian_on_shown_slices_equals_whole_volume_computation():
    """The fast slab computation gives the same values as slicing the full determinant."""
    _, _, _, disp = _pair(SHAPE_3D, amplitude=3.0)
    full = field.jacobian_determinant(field.field_from_numpy(disp))[0].numpy()
    views = slices.central_views(SHAPE_3D)
    threads = torch.get_num_threads()
    for (view, index), plane in zip(views, slices.jacobian_planes(disp, views)):
        np.testing.assert_allclose(plane, slices.view_plane(full, view, index), rtol=1e-5, atol=1e-6)
    assert torch.get_num_threads() == threads  # the thread setting is restored


def test_label_edges_outline_each_nonzero_label():
    labels = np.zeros((8, 8), dtype=np.int32)
    labels[2:6, 2:6] = 3
    rgba = report._label_edges_rgba(labels)
    drawn = rgba[..., 3] > 0
    expected = np.zeros((8, 8), dtype=bool)
    expected[2:6, 2:6] = True
    expected[3:5, 3:5] = False  # inner boundary of the square: a 1-voxel ring
    np.testing.assert_array_equal(drawn, expected)
