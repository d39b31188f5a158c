"""Careless and hostile input around networks, checkpoints and options (issue 18, part B).

Each defect of the second audit becomes one line ``dirio: error: ...`` (exit 2) before any work,
or a correct result with a warning:

3. no field is written unless it is finite and not exploded (:mod:`dirio.core.field_checks`): NaN
   weights are refused at load naming the checkpoint, a network predicting NaN names its weights,
   a diverged optimisation names the learning rate (``--lr``, ``--network-lr``), and
   ``--network-lr`` / ``dirio train --lr`` take the bound of ``--lr``;
5. invalid network settings (checkpoint settings, ``--network-levels``, ``--network-weight-decay``,
   a 2D/3D mismatch between the network and the images) name the option or the mismatch;

and the also-fix items: the lung mask's silence on non-HU images, the command-line words in
messages, network options with ``--method dense``, label ids without or absent from the label maps,
negative lists reaching the range check, ``dirio train``'s ``--network-options`` example and epoch
numbering, ``dirio convert`` on hostile files, ``dirio warp`` of a label map without ``--labels``,
duplicate config keys, and an ``scl_slope`` that overflows float32.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, shift

from cli_helpers import assert_one_error_line, run_cli
from dirio.io.checkpoints import save_checkpoint
from dirio.methods import network as network_methods
from dirio.transforms.networks import LapIRN, UNet
from tiny_networks import upstream_lapirn_layout

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (16, 16, 16)
QUICK = ["-q", "--no-figure"]
TINY_UNET = dict(encoder_channels=(4, 8), decoder_channels=(8, 8), final_channels=(8,), init_std=0.1)


def _save(path: Path, array, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture(autouse=True)
def fresh_models():
    """Checkpoints of the same name differ between tests: load each afresh."""
    network_methods.clear_model_cache()
    yield
    network_methods.clear_model_cache()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile-networks")
    volume = gaussian_filter(np.random.default_rng(0).standard_normal(SHAPE), 2.0)
    volume = ((volume - volume.min()) / np.ptp(volume) * 100).astype(np.float32)
    moved = shift(volume, (0.6, -0.4, 0.3), order=1, mode="nearest").astype(np.float32)
    labels = (volume > np.percentile(volume, 60)).astype(np.uint8) + (volume > np.percentile(volume, 85))
    torch.manual_seed(0)
    lapirn = LapIRN(start_channel=1)
    save_checkpoint(folder / "lapirn.pt", lapirn)
    save_checkpoint(folder / "unet3d.pt", UNet(ndim=3, **TINY_UNET))
    save_checkpoint(folder / "unet2d.pt", UNet(ndim=2, **TINY_UNET))
    return SimpleNamespace(
        dir=folder, lapirn=lapirn,
        fixed=_save(folder / "fixed.nii.gz", volume), moving=_save(folder / "moving.nii.gz", moved),
        fixed2d=_save(folder / "fixed2d.nii.gz", volume[:, :, 8]), moving2d=_save(folder / "moving2d.nii.gz",
                                                                                   moved[:, :, 8]),
        labels=_save(folder / "labels.nii.gz", labels.astype(np.uint8)),
    )


_one_error_line = assert_one_error_line


def _register(data, out, *options, fixed=None, moving=None):
    return run_cli(["register", fixed or data.fixed, moving or data.moving, "-o", out, *QUICK, *options])


def _no_field_written(out: Path) -> None:
    assert not list(out.glob("disp_*")) and not (out / "metrics.json").exists(), sorted(out.glob("*"))


def _scaled_lapirn(data, path: Path, factor: float) -> Path:
    model = LapIRN(start_channel=1)
    model.load_state_dict(data.lapirn.state_dict())
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(factor)
    save_checkpoint(path, model)
    return path




# --- 3. what a usable field is (one definition) -----------------------------------------------


def test_a_field_is_usable_when_finite_and_within_the_image_extent():
    """|u_d| <= S_d voxels along every axis is usable; one voxel beyond, or a NaN, is not."""
    from dirio.core.field_checks import field_problem

    field = torch.zeros(1, 3, 4, 5, 6)
    assert field_problem(field) is None
    field[0, 2, 1, 1, 1] = -6.0  # exactly the extent along axis 2 (6 voxels): still usable
    assert field_problem(field) is None
    field[0, 1, 0, 0, 0] = 5.01  # beyond the 5 voxels of axis 1
    assert field_problem(field) == ("displacements up to 5.01 voxels along axis 1, beyond the image's 5 voxels "
                                    "(an exploded field)")
    field[0, 0, 0, 0, 0] = float("nan")
    assert field_problem(field) == "1 of 360 values are NaN or Inf"
    on_disk = np.zeros((4, 5, 2), np.float32)  # a 2D field in the Learn2Reg layout (H, W, 2)
    assert field_problem(on_disk, channels_last=True) is None
    on_disk[0, 0, 0] = 4.5
    assert "along axis 0, beyond the image's 4 voxels" in field_problem(on_disk, channels_last=True)


def test_a_checkpoint_with_nan_weights_is_refused_at_load(data, tmp_path):
    path = _scaled_lapirn(data, tmp_path / "nan.pt", float("nan"))
    out = tmp_path / "out"
    result = _register(data, out, "--method", "network", "--model", path)
    _one_error_line(result, "nan.pt", "non-finite weights (NaN or Inf) in 48 of 48 tensors", "levels.0.encoder")
    _no_field_written(out)


def test_an_upstream_lapirn_file_with_nan_weights_is_refused_at_load(data, tmp_path):
    state = upstream_lapirn_layout(data.lapirn.state_dict())
    state["output_lvl1.0.weight"][0] = float("inf")
    path = tmp_path / "LapIRN_disp_broken.pth"
    torch.save(state, path)
    out = tmp_path / "out"
    result = _register(data, out, "--method", "network", "--model", path, "--network-architecture", "lapirn-disp")
    _one_error_line(result, "LapIRN_disp_broken.pth", "non-finite weights", "in 1 of 48 tensors", "levels.2.head.0")
    _no_field_written(out)
    # Without the architecture, the message uses the command line's words.
    result = _register(data, out, "--method", "network", "--model", path)
    _one_error_line(result, "LapIRN_disp_broken.pth", "--network-architecture lapirn-disp or lapirn-diff")


def test_a_network_whose_weights_predict_nan_names_the_checkpoint(data, tmp_path):
    """Weights x 1e30 are finite, but the field is NaN: nothing is written, the checkpoint is blamed."""
    path = _scaled_lapirn(data, tmp_path / "huge.pt", 1e30)
    out = tmp_path / "out"
    result = _register(data, out, "--method", "network", "--model", path)
    _one_error_line(result, "the network of", "huge.pt", "values are NaN or Inf", "weights", "no field was written")
    _no_field_written(out)


def test_network_lr_has_the_bound_of_lr_and_a_diverged_tuning_names_it(data, tmp_path):
    out = tmp_path / "out"
    result = _register(data, out, "--method", "network-io", "--model", data.dir / "lapirn.pt", "--network-lr", "1e9",
                       "--network-iterations", "1")
    _one_error_line(result, "--network-lr 1e+09 is absurd", "amsgrad", "at most 100")
    # SGD has no bound (its step scales with the gradient): the diverged weights give a NaN field.
    result = _register(data, out, "--method", "network-io", "--model", data.dir / "lapirn.pt", "--network-lr",
                       "1e30", "--network-optimizer", "sgd", "--network-iterations", "1")
    _one_error_line(result, "network-io field is unusable", "lapirn.pt", "NaN or Inf", "lower --network-lr (sgd, 1e+30)")
    _no_field_written(out)


def test_an_exploded_dense_field_is_not_written_and_names_the_learning_rate(data, tmp_path):
    """SGD at 1e30 moved voxels by ~1e26 voxels (exit 0 before): now refused, naming --lr."""
    out = tmp_path / "out"
    result = _register(data, out, "--optimizer", "sgd", "--lr", "1e30", "--levels", "1", "--iterations", "1")
    _one_error_line(result, "dense stage's field is unusable", "beyond the image's 16 voxels (an exploded field)",
                    "lower --lr (sgd, 1e+30)")
    _no_field_written(out)


def test_train_lr_has_the_bound_of_lr(data, tmp_path):
    out = tmp_path / "train"
    for value, fragment in (("1e9", "--lr: 1e+09 is absurd"), ("-1", "--lr: must be positive and finite")):
        result = run_cli(["train", data.fixed2d, data.moving2d, "-o", out, "--ndim", "2", "--lr", value, "-q"])
        _one_error_line(result, fragment)
    assert not out.exists()


# --- 5. invalid network settings --------------------------------------------------------------


def test_a_checkpoint_with_negative_channels_is_a_one_line_error(data, tmp_path):
    raw = torch.load(data.dir / "unet3d.pt", weights_only=True)
    raw["settings"].update(encoder_channels=[-4, 8, 8], decoder_channels=[8, 8, 8])
    torch.save(raw, tmp_path / "negative.pt")
    result = _register(data, tmp_path / "out", "--method", "network", "--model", tmp_path / "negative.pt")
    _one_error_line(result, "negative.pt", "cannot build unet from its settings",
                    "encoder_channels must be positive integers (channel counts), got [-4, 8, 8]")


def test_network_levels_beyond_the_network_name_the_option(data, tmp_path):
    result = _register(data, tmp_path / "out", "--method", "nio", "--network-levels", "4")
    _one_error_line(result, "--network-levels of nio are LapIRN levels 1 to 3, got 4")
    result = _register(data, tmp_path / "out", "--method", "network-io", "--model", data.dir / "lapirn.pt",
                       "--network-levels", "2,4", "--network-iterations", "1")
    _one_error_line(result, "--network-levels 2,4", "lapirn.pt has levels 1 to 3")


@pytest.mark.parametrize("option, value, message", [
    ("--network-weight-decay", "-1", "--network-weight-decay must be >= 0 and finite, got -1"),
    ("--network-iterations", "-1,2,3", "--network-iterations must be >= 0, got -1,2,3"),
    ("--network-resolution", "0", "--network-resolution must be positive shrink factors, got 0"),
    ("--network-lambda", "1.5", "--network-lambda must be in [0, 1), got 1.5"),
])
def test_network_option_ranges_name_the_option(data, tmp_path, option, value, message):
    """A negative list reaches the range check (argparse took -1,2,3 for a flag before)."""
    result = _register(data, tmp_path / "out", "--method", "network-io", "--model", data.dir / "lapirn.pt",
                       option, value)
    _one_error_line(result, message)


def test_a_network_of_other_dimensions_than_the_images_is_refused_before_work(data, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the stage ran before the mismatch was found")

    monkeypatch.setattr(network_methods, "run_pyramid", forbidden)
    monkeypatch.setattr(network_methods, "_direct", forbidden)
    pair2d = dict(fixed=data.fixed2d, moving=data.moving2d)
    result = _register(data, tmp_path / "a", "--ndim", "2", "--method", "nio", **pair2d)
    _one_error_line(result, "the packaged LapIRN brain model is a 3D network but the images are 2D", "--model",
                    "--ndim")
    result = _register(data, tmp_path / "b", "--ndim", "2", "--method", "network", "--model", data.dir / "unet3d.pt",
                       **pair2d)
    _one_error_line(result, "unet3d.pt is a 3D network but the images are 2D")
    result = _register(data, tmp_path / "c", "--method", "network-io", "--model", data.dir / "unet2d.pt")
    _one_error_line(result, "unet2d.pt is a 2D network but the images are 3D")
    assert not any((tmp_path / name).exists() and list((tmp_path / name).iterdir()) for name in "abc")


# --- also fix -----------------------------------------------------------------------------------


def test_network_options_with_the_dense_method_are_refused(data, tmp_path):
    result = _register(data, tmp_path / "out", "--network-lr", "1e-3", "--levels", "1", "--iterations", "1")
    _one_error_line(result, "--network-lr applies to the network methods only", "the method is dense", "--method")
    result = _register(data, tmp_path / "out", "--model", data.dir / "lapirn.pt", "--network-iterations", "3")
    _one_error_line(result, "--model, --network-iterations apply to the network methods only")


def test_label_ids_without_label_maps_or_absent_from_both_are_refused(data, tmp_path):
    out = tmp_path / "out"
    result = _register(data, out, "--label-ids", "2,3", "--levels", "1", "--iterations", "1")
    _one_error_line(result, "--label-ids name labels to score, but no label maps were given", "--fixed-labels")
    result = _register(data, out, "--fixed-labels", data.labels, "--moving-labels", data.labels,
                       "--label-ids", "1,7,9", "--levels", "1", "--iterations", "1")
    _one_error_line(result, "--label-ids 7,9 are in neither", "labels.nii.gz", "the maps hold labels 1,2")
    assert not out.exists() or not list(out.glob("disp_*"))
    field = _save(tmp_path / "disp.nii.gz", np.zeros(SHAPE + (3,), np.float32))
    result = run_cli(["evaluate", field, data.fixed, "--label-ids", "2"])
    _one_error_line(result, "--label-ids name labels to score, but no label maps were given")


def test_the_network_options_example_of_train_help_builds_its_network(monkeypatch):
    """The example in ``dirio train --help`` (final_channels=16 failed: an int where a list was
    expected) is parsed by the option's own parser and builds the U-Net."""
    from dirio.config.training import TRAIN_OPTIONS_BY_KEY
    from dirio.transforms.networks import NETWORKS

    monkeypatch.setenv("COLUMNS", "2000")  # no line wrapping inside the example
    result = run_cli(["train", "--help"])
    assert result.rc == 0
    text = " ".join(result.out.split())
    example = re.search(r"--network-options K=V,\.\.\. .*?e\.g\. (\S+)", text).group(1)
    assert "final_channels=16" in example
    settings = TRAIN_OPTIONS_BY_KEY["network_options"].convert(example)
    network = NETWORKS.create("unet", ndim=2, **settings)
    assert network.final_channels == (16,) and network.encoder_channels == (16, 32, 32)


def test_train_counts_epochs_from_0_on_the_terminal_as_in_its_files(data, tmp_path):
    out = tmp_path / "train"
    result = run_cli(["train", data.fixed2d, data.moving2d, "-o", out, "--ndim", "2", "--epochs", "2",
                      "--steps-per-epoch", "1", "--threads", "1", "--network-options",
                      "encoder_channels=4/4,decoder_channels=4/4,final_channels=4,init_std=0.01"])
    assert result.rc == 0, result.err
    shown = [int(m) for m in re.findall(r"epoch (\d+) of 0-1: loss", result.err)]  # the lines after the bars
    with open(out / "epochs.csv") as handle:
        written = [int(row["epoch"]) for row in csv.DictReader(handle)]
    best = json.loads((out / "train.json").read_text())["best_epoch"]
    assert shown == written == [0, 1] and best in written
    assert f"best epoch {best} " in result.out


def test_convert_of_hostile_files_is_one_line_naming_the_input(tmp_path):
    pytest.importorskip("SimpleITK")
    text = tmp_path / "notes.h5"
    text.write_text("not a transform")
    _one_error_line(run_cli(["convert", text, "-o", tmp_path / "a.nii.gz"]), "notes.h5", "not an HDF5 file")
    fake = tmp_path / "fake.h5"
    fake.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(200))  # an HDF5 signature, nothing behind it
    line = _one_error_line(run_cli(["convert", fake, "-o", tmp_path / "b.nii.gz"]), "fake.h5", "cannot read")
    assert ".cxx" not in line and "0x" not in line and "Tried to create" not in line, line
    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    source = _save(tmp_path / "sheared.nii.gz", np.zeros((6, 6, 6, 3), np.float32), sheared)
    _one_error_line(run_cli(["convert", source, "-o", tmp_path / "itk.nii.gz"]), "sheared.nii.gz: ", "shear")
    five = _save(tmp_path / "five.nii.gz", np.zeros((6, 6, 6, 1, 3), np.float32))
    _one_error_line(run_cli(["convert", five, "-o", tmp_path / "c.nii.gz"]), "five.nii.gz",
                    "(6, 6, 6, 1, 3)", "without a vector intent", "(D, H, W, 3)")
    assert not list(tmp_path.glob("[abc].nii.gz")) and not (tmp_path / "itk.nii.gz").exists()


def test_warp_of_a_label_map_without_labels_warns(data, tmp_path):
    field = np.zeros(SHAPE + (3,), np.float32)
    field[..., 0] = 0.5
    disp = _save(tmp_path / "disp.nii.gz", field)
    result = run_cli(["warp", data.labels, disp, "-o", tmp_path / "warped.nii.gz"])
    assert result.rc == 0, result.err
    assert result.err.startswith("dirio: warning: ") and len(result.err.splitlines()) == 1, result.err
    assert "labels.nii.gz looks like a label map (3 integer values)" in result.err and "--labels" in result.err
    result = run_cli(["warp", data.labels, disp, "-o", tmp_path / "nearest.nii.gz", "--labels"])
    assert result.rc == 0 and result.err == ""
    result = run_cli(["warp", data.fixed, disp, "-o", tmp_path / "image.nii.gz"])  # intensities: no warning
    assert result.rc == 0 and result.err == ""


@pytest.mark.parametrize("name, text", [
    ("both.toml", 'similarity_options = {window = 5}\n"similarity-options" = {window = 9}\n'),
    ("both.yaml", "similarity_options: {window: 5}\nsimilarity-options: {window: 9}\n"),
])
def test_a_config_with_both_spellings_of_a_key_is_refused(tmp_path, name, text):
    from dirio.config.files import run_configuration
    from dirio.errors import DirioError

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(DirioError) as info:
        run_configuration(path)
    message = str(info.value)
    assert name in message and "'similarity_options' and 'similarity-options' are the same option" in message


def test_an_scl_slope_overflowing_float32_is_refused_at_read(data, tmp_path):
    image = nib.Nifti1Image((np.arange(np.prod(SHAPE)) % 1000).reshape(SHAPE).astype(np.int16), np.eye(4))
    image.header.set_slope_inter(1e37, 0.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, str(path))
    result = _register(data, tmp_path / "out", "--levels", "1", "--iterations", "1", moving=path)
    _one_error_line(result, "scaled.nii.gz", "scl_slope", "overflow float32")


def test_the_lung_mask_on_an_image_not_in_hu_says_so_on_the_terminal_and_in_metrics(data, tmp_path):
    out = tmp_path / "out"
    result = run_cli(["register", data.fixed, data.moving, "-o", out, "--no-figure", "--auto-mask", "lungs",
                      "--levels", "1", "--iterations", "1"])
    assert result.rc == 0, result.err
    warnings = [line for line in result.err.splitlines() if line.startswith("dirio: warning: ")]
    assert len(warnings) == 1, result.err
    assert "found no lungs in the fixed and moving image" in warnings[0]
    assert "Hounsfield units" in warnings[0] and "range from 0 to 100" in warnings[0]
    assert "--auto-mask none" in warnings[0] and "--fixed-mask" in warnings[0]
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    record = next(stage for stage in stages if stage["stage"] == "lung-mask")
    assert record["used"] is False and "Hounsfield units" in record["warning"]
