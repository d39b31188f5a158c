"""The napari plugin (dirio.apps.napari): widget, reader, sample data, saving, world coordinates.

The widget, reader and sample tests run on napari's viewer model (``napari.components.ViewerModel``:
the layer list, ``open``, ``open_sample`` and the plugins, without a canvas), under Qt's offscreen
platform with pytest-qt's ``qtbot``, and build the widget through the plugin's manifest. They draw
nothing, so they need no OpenGL: on a CI machine, napari's canvas queried OpenGL with no current
context at random moments (``'NoneType' object has no attribute 'decode'``), failing tests that
adding a layer to a real window made depend on it.

One test docks the widget in a real napari window (napari's ``make_napari_viewer``), with no layers.
That canvas needs an OpenGL context, which Qt's offscreen platform takes from an X display: without
``DISPLAY`` the test starts its own ``Xvfb`` (Debian packages in ``tests/napari_system_deps.sh``),
stopped at the end of the session, and is skipped with the reason when Xvfb is missing.

The plugin adds no registration logic: its field must equal ``dirio register``'s bit for bit, and
its metrics the CLI's ``metrics.json``, for the same settings on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the napari extra is not installed (pip install -e '.[napari]')")
pytest.importorskip("pytestqt", reason="pytest-qt (the napari extra) is not installed")

import nibabel as nib
from cli_helpers import run_cli

from dirio.apps.napari.layers import image_from_layer, image_layer, layer_affine
from dirio.apps.napari.reader import get_reader
from dirio.apps.napari.widget import RegisterWidget
from dirio.testing.synthetic import oblique_affine
from dirio.io.fields import load_field, save_field
from dirio.io.images import Image, load_image, save_image

WAIT_MS = 120_000  # an upper bound for a worker on the shared 2-core machine, never a timing
_STARTED_HERE = False  # whether gl_display started the Xvfb that DISPLAY names


os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(scope="session")
def gl_display():
    """An X display for OpenGL (an Xvfb started here when none is set), Qt on its offscreen platform."""
    global _STARTED_HERE
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("napari's canvas needs OpenGL through an X display: no DISPLAY and no Xvfb "
                    "(install the Debian packages of tests/napari_system_deps.sh)")
    read, write = os.pipe()
    # Qt's application outlives this fixture (pytest-qt keeps it to the end of the session) and exits
    # the process if its X server goes first: Xvfb ends with this process instead (Linux's
    # parent-death signal), never before it.
    process = subprocess.Popen([sys.executable, "-c", _END_WITH_PARENT, xvfb, "-displayfd", str(write), "-screen", "0",
                                "1024x768x24", "-nolisten", "tcp"],
                               pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        process.kill()
        pytest.skip("Xvfb did not start")
    os.environ["DISPLAY"] = f":{number}"
    _STARTED_HERE = True
    yield os.environ["DISPLAY"]


@pytest.fixture(scope="module", autouse=True)
def _display_for_this_module_only():
    """Later test modules see no DISPLAY when this module set it (Qt keeps its connection to the display)."""
    yield
    if _STARTED_HERE:
        os.environ.pop("DISPLAY", None)


@pytest.fixture
def viewer(qtbot):
    """napari's viewer model with the installed plugins discovered: layers, readers and sample data
    as in a window, without a canvas."""
    import npe2
    from napari.components import ViewerModel

    npe2.PluginManager.instance().discover()
    model = ViewerModel()
    yield model
    model.layers.clear()


def _register_widget_class():
    """The dock widget the plugin's manifest contributes as "Register" (what napari's Plugins menu opens)."""
    import npe2

    manager = npe2.PluginManager.instance()  # plugins discovered by the ``viewer`` fixture
    (contribution,) = [widget for widget in manager.iter_widgets()
                       if widget.plugin_name == "dirio" and widget.display_name == "Register"]
    return contribution.get_callable()


# Runs the command of its arguments with SIGTERM as its parent-death signal (PR_SET_PDEATHSIG = 1,
# linux/prctl.h; kept across exec), so that it ends when this test process does.
_END_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL('libc.so.6').prctl(1, signal.SIGTERM); "
                    "os.execv(sys.argv[1], sys.argv[1:])")


# --- a small pair on an anisotropic, oblique grid --------------------------------------------

SHAPE = (20, 18, 16)
# Voxel sizes 1.5 / 1 / 2 mm, rotated 20 degrees about z, origin away from 0: an oblique grid.
AFFINE = oblique_affine(20.0, (1.5, 1.0, 2.0), (-12.0, 7.5, 3.0))


def _blobs(shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs (float32) and their label map (1, 2), shifted by ``shift`` voxels along i."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    first = np.exp(-((i - 7 - shift) ** 2 + (j - 8) ** 2 + (k - 6) ** 2) / 12.0)
    second = np.exp(-((i - 13 - shift) ** 2 + (j - 10) ** 2 + (k - 10) ** 2) / 8.0)
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[first > 0.4] = 1
    labels[second > 0.4] = 2
    return (first + 0.8 * second).astype(np.float32), labels


@pytest.fixture
def pair_files(tmp_path):
    """``fixed``, ``moving`` and their label maps as NIfTI files on the oblique grid."""
    fixed, fixed_labels = _blobs(0.0)
    moving, moving_labels = _blobs(1.5)
    files = {"fixed": tmp_path / "fixed.nii.gz", "moving": tmp_path / "moving.nii.gz",
             "fixed_labels": tmp_path / "fixed_labels.nii.gz", "moving_labels": tmp_path / "moving_labels.nii.gz"}
    for key, array in (("fixed", fixed), ("moving", moving), ("fixed_labels", fixed_labels),
                       ("moving_labels", moving_labels)):
        save_image(files[key], array, AFFINE)
    return files


SETTINGS_FLAGS = ["--levels", "2,1", "--iterations", "6,3", "--device", "cpu"]


def _cli_register(files, out, extra=()):
    result = run_cli(["register", files["fixed"], files["moving"], "-o", out, "--fixed-labels", files["fixed_labels"],
                      "--moving-labels", files["moving_labels"], *SETTINGS_FLAGS, "--quiet", "--itk-field", *extra])
    assert result.rc == 0, result.err
    return json.loads((out / "metrics.json").read_text())


def _open(viewer, path):
    """Add the layers of ``path`` as the plugin's reader gives them."""
    reader = get_reader(str(path))
    assert reader is not None
    return [getattr(viewer, f"add_{kind}")(data, **options) for data, options, kind in reader(str(path))]


def _widget(qtbot, viewer, fixed, moving, fixed_labels=None, moving_labels=None, levels="2,1", iterations="6,3"):
    widget = _register_widget_class()(viewer)  # through the manifest
    assert isinstance(widget, RegisterWidget)
    qtbot.addWidget(widget.native)  # closed and deleted at the end of the test
    widget.fixed.value, widget.moving.value = fixed, moving
    widget.fixed_labels.value, widget.moving_labels.value = fixed_labels, moving_labels
    widget.levels.value, widget.iterations.value, widget.device.value = levels, iterations, "cpu"
    return widget


def _wait(qtbot, widget):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)


def _same(a, b) -> bool:
    """Equal JSON values, NaN equal to NaN."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# --- world coordinates ------------------------------------------------------------------------


def test_layer_keeps_the_image_affine_and_follows_a_moved_layer(viewer):
    """An image layer maps voxel (i, j, k) to the affine's world point (oblique and anisotropic), gives
    the exact 4x4 affine back, and a layer moved in the viewer is taken where it now is."""
    fixed, _ = _blobs(0.0)
    data, options, _ = image_layer(Image(fixed, AFFINE), "fixed")
    layer = viewer.add_image(data, **options)
    voxel = np.array([3.0, 5.0, 7.0])
    np.testing.assert_allclose(layer.data_to_world(voxel), (AFFINE @ np.append(voxel, 1.0))[:3], atol=1e-9)
    assert np.array_equal(layer_affine(layer), AFFINE)
    assert np.array_equal(image_from_layer(layer).affine, AFFINE)
    layer.translate = (0.0, 0.0, 10.0)  # moved by hand (napari applies translate before its affine)
    moved = layer_affine(layer)
    assert not np.allclose(moved, AFFINE)
    for point in (voxel, np.zeros(3), np.array(SHAPE, dtype=float) - 1):
        np.testing.assert_allclose(layer.data_to_world(point), (moved @ np.append(point, 1.0))[:3], atol=1e-9)


# --- the widget -------------------------------------------------------------------------------


def test_widget_field_and_metrics_equal_dirio_register_then_save(viewer, qtbot, pair_files, tmp_path):
    """On the same files and settings, the widget's field is the CLI's bit for bit and its metrics are
    the CLI's; the result layers appear; Save writes the CLI's set of files (same field), refuses to
    overwrite without the box ticked, and the reader opens the folder it wrote."""
    cli = _cli_register(pair_files, tmp_path / "cli")
    fixed, moving, fixed_labels, moving_labels = (
        _open(viewer, pair_files[key])[0] for key in ("fixed", "moving", "fixed_labels", "moving_labels"))
    widget = _widget(qtbot, viewer, fixed, moving, fixed_labels, moving_labels)
    widget.register()
    _wait(qtbot, widget)
    assert widget.outcome is not None, widget.status.value
    cli_disp = load_field(tmp_path / "cli" / "disp_fixed_moving.nii.gz")
    assert np.array_equal(widget.outcome.result.disp, cli_disp)
    assert _same(json.loads(json.dumps(widget.outcome.before)), cli["before"])
    assert _same(json.loads(json.dumps(widget.outcome.after)), cli["after"])
    assert f"Dice {cli['before']['dice_mean']:.3f} -> {cli['after']['dice_mean']:.3f}" in widget.metrics.value
    names = [layer.name for layer in viewer.layers]
    for name in ("moving warped", "moving labels warped", "moving -> fixed: Jacobian determinant",
                 "moving -> fixed: folds (det <= 0)", "moving -> fixed: deformed grid", "moving -> fixed: displacement"):
        assert name in names
    warped = viewer.layers["moving warped"]
    assert np.array_equal(layer_affine(warped), layer_affine(fixed))  # over the fixed image, in world coordinates
    assert widget.progress.value == widget.progress.max == 9

    widget.folder.value = tmp_path / "plugin"
    widget.save()
    _wait(qtbot, widget)
    assert widget.status.value.startswith("saved"), widget.status.value
    cli_files = sorted(path.name for path in (tmp_path / "cli").iterdir())
    plugin_files = sorted(path.name for path in (tmp_path / "plugin").iterdir())
    assert plugin_files == cli_files
    assert np.array_equal(load_field(tmp_path / "plugin" / "disp_fixed_moving.nii.gz"), cli_disp)
    saved = json.loads((tmp_path / "plugin" / "metrics.json").read_text())
    assert _same(saved["after"], cli["after"]) and saved["settings"] == cli["settings"]
    assert np.array_equal(nib.load(tmp_path / "plugin" / "itk_disp_fixed_moving.nii.gz").get_fdata(),
                          nib.load(tmp_path / "cli" / "itk_disp_fixed_moving.nii.gz").get_fdata())

    widget.save()  # again, into the same folder, without "overwrite"
    _wait(qtbot, widget)
    assert widget.status.value.startswith("dirio: error:") and "exists; tick 'overwrite'" in widget.status.value
    assert "Traceback" not in widget.status.value

    layers = _open(viewer, tmp_path / "plugin")
    names = [layer.name for layer in layers]
    assert "warped_moving" in names and "warped_labels_moving" in names and "fixed" not in names
    jacobian = viewer.layers["disp_fixed_moving: Jacobian determinant"]
    assert jacobian.data.shape == tuple(n - 4 for n in SHAPE)


def test_network_method_with_the_packaged_model_equals_dirio_register(viewer, qtbot, pair_files, tmp_path):
    """method network (the packaged LapIRN brain model, one forward pass) from the widget gives the
    CLI's field bit for bit."""
    result = run_cli(["register", pair_files["fixed"], pair_files["moving"], "-o", tmp_path / "cli", "--method", "network",
                      "--device", "cpu", "--quiet", "--no-figure"])
    assert result.rc == 0, result.err
    fixed, moving = (_open(viewer, pair_files[key])[0] for key in ("fixed", "moving"))
    widget = _widget(qtbot, viewer, fixed, moving, levels="", iterations="")
    widget.method.value = "network"
    widget.register()
    _wait(qtbot, widget)
    assert widget.outcome is not None, widget.status.value
    assert np.array_equal(widget.outcome.result.disp, load_field(tmp_path / "cli" / "disp_fixed_moving.nii.gz"))
    assert widget.outcome.result.stages[0]["stage"] == "network"


def test_cancel_stops_the_run_and_changes_nothing(viewer, qtbot, pair_files):
    """Cancel during a long run: the worker ends without a result, no layer is added, the viewer keeps
    its layers, and a later run works."""
    fixed, moving = (_open(viewer, pair_files[key])[0] for key in ("fixed", "moving"))
    widget = _widget(qtbot, viewer, fixed, moving, iterations="100000,100000")
    before = [layer.name for layer in viewer.layers]
    widget.register()
    qtbot.waitUntil(lambda: widget.progress.value >= 3, timeout=WAIT_MS)
    widget.cancel()
    _wait(qtbot, widget)
    assert widget.status.value == "cancelled; nothing changed"
    assert widget.outcome is None
    assert [layer.name for layer in viewer.layers] == before
    widget.iterations.value = "2,1"
    widget.register()
    _wait(qtbot, widget)
    assert widget.outcome is not None and widget.status.value == "done"


def test_images_on_different_grids_give_a_message_not_a_traceback(viewer, qtbot, pair_files):
    """A moving layer on another grid is refused before any work with one line naming both layers."""
    fixed = _open(viewer, pair_files["fixed"])[0]
    moving, _ = _blobs(1.0)
    other = viewer.add_image(moving[:, :, :12], name="cropped", affine=AFFINE)
    widget = _widget(qtbot, viewer, fixed, other)
    widget.register()
    assert widget.worker is None
    message = widget.status.value
    assert message.startswith("dirio: error: moving image 'cropped' is on a different grid from the fixed image 'fixed'")
    assert "\n" not in message and "Traceback" not in message
    assert [layer.name for layer in viewer.layers] == ["fixed", "cropped"]


# --- the reader -------------------------------------------------------------------------------


def test_reader_opens_a_displacement_file_as_field_layers(viewer, tmp_path):
    """A Learn2Reg field: x -> x + u(x) with u = (0.5 i, 0, 0) has det = 1.5 everywhere (no folds), and
    u = (-2 i, 0, 0) has det = -1 (every voxel folds); vectors carry u; layers sit on the field's grid."""
    i = np.arange(SHAPE[0], dtype=np.float32)[:, None, None] * np.ones(SHAPE, dtype=np.float32)
    for name, scale, det, folds in (("stretch", 0.5, 1.5, 0), ("fold", -2.0, -1.0, 1)):
        disp = np.zeros((*SHAPE, 3), dtype=np.float32)
        disp[..., 0] = scale * i
        path = tmp_path / f"disp_{name}.nii.gz"
        save_field(path, disp, AFFINE)
        viewer.open(str(path), plugin="dirio")
        jacobian = viewer.layers[f"disp_{name}: Jacobian determinant"]
        np.testing.assert_allclose(jacobian.data, det, atol=1e-5)
        assert np.all(viewer.layers[f"disp_{name}: folds (det <= 0)"].data == folds)
        # the cropped determinant's voxel 0 is the field's voxel (2, 2, 2)
        np.testing.assert_allclose(jacobian.data_to_world(np.zeros(3)), (AFFINE @ [2.0, 2.0, 2.0, 1.0])[:3], atol=1e-9)
        vectors = viewer.layers[f"disp_{name}: displacement"].data
        positions = vectors[:, 0].astype(int)
        np.testing.assert_allclose(vectors[:, 1], disp[tuple(positions.T)])
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path)) is None  # a folder without metrics.json


def test_reader_opens_an_image_file_in_world_coordinates(viewer, pair_files):
    """An image file becomes an image layer and a label file a labels layer, both placed by the affine."""
    viewer.open(str(pair_files["fixed"]), plugin="dirio")
    viewer.open(str(pair_files["fixed_labels"]), plugin="dirio")
    image, labels = viewer.layers["fixed"], viewer.layers["fixed_labels"]
    assert isinstance(labels, napari.layers.Labels) and isinstance(image, napari.layers.Image)
    stored = load_image(pair_files["fixed"]).affine  # the file's affine (NIfTI keeps it in float32)
    np.testing.assert_allclose(stored, AFFINE, atol=1e-5)
    assert np.array_equal(layer_affine(image), stored) and np.array_equal(layer_affine(labels), stored)
    np.testing.assert_allclose(image.data_to_world([1.0, 2.0, 3.0]), (stored @ [1.0, 2.0, 3.0, 1.0])[:3], atol=1e-9)


# --- the sample pair ---------------------------------------------------------------------------


def test_sample_pair_registers_as_dirio_register(viewer, qtbot, tmp_path):
    """File > Open Sample gives the demo pair; registered from the widget (brain-mri, a few iterations)
    it gives dirio register's field bit for bit and its Dice."""
    pytest.importorskip("nilearn", reason="the sample pair is the MNI152 template of nilearn (the demo extra)")
    viewer.open_sample("dirio", "demo-pair")
    names = [layer.name for layer in viewer.layers]
    assert names == ["fixed", "moving", "fixed tissue", "moving tissue"]
    files = {}
    for key, name in (("fixed", "fixed"), ("moving", "moving"), ("fixed_labels", "fixed tissue"),
                      ("moving_labels", "moving tissue")):
        layer = viewer.layers[name]
        files[key] = tmp_path / f"{key}.nii.gz"
        save_image(files[key], layer.data, layer_affine(layer))
    flags = ["--preset", "brain-mri", "--levels", "4,2", "--iterations", "3,2", "--device", "cpu"]
    result = run_cli(["register", files["fixed"], files["moving"], "-o", tmp_path / "cli", "--fixed-labels",
                      files["fixed_labels"], "--moving-labels", files["moving_labels"], *flags, "--quiet",
                      "--no-figure"])
    assert result.rc == 0, result.err
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    widget = _widget(qtbot, viewer, viewer.layers["fixed"], viewer.layers["moving"], viewer.layers["fixed tissue"],
                     viewer.layers["moving tissue"], levels="4,2", iterations="3,2")
    widget.preset.value = "brain-mri"
    widget.register()
    _wait(qtbot, widget)
    assert widget.outcome is not None, widget.status.value
    assert np.array_equal(widget.outcome.result.disp, load_field(tmp_path / "cli" / "disp_fixed_moving.nii.gz"))
    assert widget.outcome.after["dice_mean"] == cli["after"]["dice_mean"]
    assert widget.outcome.after["dice_mean"] > widget.outcome.before["dice_mean"]


# --- a real napari window ------------------------------------------------------------------------


def test_widget_docks_in_a_napari_window_and_lists_its_layers(gl_display, make_napari_viewer):
    """Plugins > dirio > Register in a real napari window (Qt widgets and the canvas) docks the widget
    the manifest names, with the window's layers as its choices. No layer is drawn: see the module's
    docstring."""
    window_viewer = make_napari_viewer()
    dock, widget = window_viewer.window.add_plugin_dock_widget("dirio", "Register")
    assert isinstance(widget, RegisterWidget) and dock.isVisibleTo(window_viewer.window._qt_window)
    assert list(widget.fixed.choices) == [] and widget.status.value == "choose the layers and press Register"
    assert widget.run_button.enabled and not widget.cancel_button.enabled


# --- the settings ------------------------------------------------------------------------------


def test_widget_settings_are_the_command_line_settings():
    """The widget's texts give the settings the command line gives for the same flags (a network
    method with the packaged model included), and a refused value names its option."""
    from dirio.apps.cli import build_parser, settings_from_args
    from dirio.apps.napari.session import widget_settings
    from dirio.errors import DirioError

    for values, flags in (
        ({"preset": "brain-mri", "levels": "4,2", "iterations": "5,3", "weight": "0.5"},
         ["--preset", "brain-mri", "--levels", "4,2", "--iterations", "5,3", "--weight", "0.5"]),
        ({"method": "network", "levels": "", "weight": None}, ["--method", "network"]),
        ({"preset": "lung-ct", "method": "dense", "levels": "4,2,1", "iterations": "7,3,2"},
         ["--preset", "lung-ct", "--method", "dense", "--levels", "4,2,1", "--iterations", "7,3,2"]),
    ):
        args = build_parser().parse_args(["register", "f.nii.gz", "m.nii.gz", "-o", "out", "--quiet", *flags])
        assert widget_settings(values).to_dict() == settings_from_args(args).to_dict()
    with pytest.raises(DirioError, match="levels"):
        widget_settings({"levels": "2.5,1"})
