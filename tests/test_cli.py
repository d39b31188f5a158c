"""Specification of the ``dirio`` command line (:mod:`dirio.apps.cli`).

The commands are run in-process through ``dirio.apps.cli.main(argv)`` (fast); one test runs
``python -m dirio register`` in a subprocess to prove the entry point. Inputs are built in
temporary directories: smooth random volumes and a known smooth warp, so that the answer of a
registration is known (``fixed(x) = moving(x + u_true(x))``, the convention of
:mod:`dirio.testing.synthetic`).

User errors must give exit status 2, exactly one stderr line ``dirio: error: ...`` naming the
offending file, no traceback, and no file in the output directory.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dirio import __version__
from dirio.apps.cli import main
from dirio.core.fields import field_from_numpy, jacobian_determinant, warp
from dirio.evaluation.overlap import warp_labels
from dirio.losses.by_level import align_to_levels
from dirio.config.settings import PRESETS, flat_keys
from dirio.testing.synthetic import smooth_random_field

SHAPE = (24, 28, 32)  # the end-to-end pair
TINY = (12, 14, 16)  # pairs for option and error tests

# A non-identity voxel -> world affine: anisotropic spacing (1.5, 1.2, 2.0) mm, a 10 degree
# rotation about the third axis and an offset, so that a field written with an identity affine
# or with the columns swapped would be caught.
_ANGLE = math.radians(10.0)
_ROTATION = np.array(
    [[math.cos(_ANGLE), -math.sin(_ANGLE), 0.0], [math.sin(_ANGLE), math.cos(_ANGLE), 0.0], [0.0, 0.0, 1.0]]
)
AFFINE = np.eye(4)
AFFINE[:3, :3] = _ROTATION @ np.diag([1.5, 1.2, 2.0])
AFFINE[:3, 3] = (-20.0, 10.0, 5.0)
SPACING = np.array([1.5, 1.2, 2.0])

# Few iterations keep each run at about a second on 2 CPU cores.
FAST = ["--levels", "2,1", "--iterations", "10,5"]
QUICK = ["--levels", "2,1", "--iterations", "3,2", "-q", "--no-figure"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- building inputs -----------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def _save_points(path: Path, points: np.ndarray) -> Path:
    np.savetxt(path, points, delimiter=",", fmt="%.6f")
    return path


def _smooth_volume(shape, seed: int, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise scaled to [0, 100], float32."""
    volume = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    volume = (volume - volume.min()) / (volume.max() - volume.min()) * 100.0
    return volume.astype(np.float32)


def _make_pair(directory: Path, shape, sigma: float, max_displacement: float) -> SimpleNamespace:
    """A pair with a known warp, label maps, masks, keypoints and the true field on disk.

    ``moving`` is a smooth volume and ``fixed = moving(x + u_true(x))``, so ``u_true`` is the
    answer. Labels are two thresholds of ``moving`` (uint8 values 0, 1, 2); the fixed labels are
    the moving labels warped by ``u_true`` with the evaluator's nearest-neighbour warp, so the
    true field scores Dice 1. Fixed keypoints are interior voxels ``p``; the moving ones are
    ``p + u_true(p)``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    moving = _smooth_volume(shape, seed=0, sigma=sigma)
    u_true = smooth_random_field(shape, sigma=2 * sigma, max_displacement=max_displacement, seed=1)
    fixed = warp(torch.from_numpy(moving)[None, None], u_true)[0, 0].numpy()
    u_true_np = np.ascontiguousarray(u_true[0].numpy().transpose(1, 2, 3, 0))

    moving_labels = ((moving > np.percentile(moving, 50)).astype(np.uint8)
                     + (moving > np.percentile(moving, 80)).astype(np.uint8))
    fixed_labels = warp_labels(moving_labels, u_true_np)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[1:-1, 1:-1, 1:-1] = 1

    margin = 3
    axes = [np.arange(margin, n - margin, 4) for n in shape]
    fixed_points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3).astype(np.float64)
    index = tuple(fixed_points.astype(int).T)
    moving_points = fixed_points + u_true_np[index]

    return SimpleNamespace(
        dir=directory,
        shape=tuple(shape),
        moving_array=moving,
        moving_labels_array=moving_labels,
        u_true=u_true_np,
        fixed=_save(directory / "fixed.nii.gz", fixed),
        moving=_save(directory / "moving.nii.gz", moving),
        fixed_labels=_save(directory / "fixed_labels.nii.gz", fixed_labels),
        moving_labels=_save(directory / "moving_labels.nii.gz", moving_labels),
        fixed_mask=_save(directory / "fixed_mask.nii.gz", mask),
        moving_mask=_save(directory / "moving_mask.nii.gz", mask),
        fixed_keypoints=_save_points(directory / "fixed_keypoints.csv", fixed_points),
        moving_keypoints=_save_points(directory / "moving_keypoints.csv", moving_points),
        true_disp=_save(directory / "disp_true.nii.gz", u_true_np),
    )


def _all_inputs(pair) -> list[str]:
    """Every optional input of a pair as CLI arguments."""
    return [
        "--fixed-labels", str(pair.fixed_labels), "--moving-labels", str(pair.moving_labels),
        "--fixed-mask", str(pair.fixed_mask), "--moving-mask", str(pair.moving_mask),
        "--fixed-keypoints", str(pair.fixed_keypoints), "--moving-keypoints", str(pair.moving_keypoints),
    ]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The 24x28x32 end-to-end pair (known warp of up to 2.5 voxels)."""
    return _make_pair(tmp_path_factory.mktemp("pair"), SHAPE, sigma=3.0, max_displacement=2.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 12x14x16 pair for option and error tests."""
    return _make_pair(tmp_path_factory.mktemp("tiny"), TINY, sigma=2.0, max_displacement=1.5)


def _run(argv) -> SimpleNamespace:
    """``main(argv)`` with stdout and stderr captured (usable in module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def _register(pair, out_dir: Path, *options) -> SimpleNamespace:
    return _run(["register", pair.fixed, pair.moving, "-o", out_dir, *options])


def _read_metrics(out_dir: Path) -> dict:
    return json.loads((out_dir / "metrics.json").read_text())


def _read_history(out_dir: Path) -> tuple[list[str], list[dict]]:
    with open(out_dir / "history.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def _field(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


# --- 1. register end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def registered(pair, tmp_path_factory):
    """One ``dirio register`` run of the known-warp pair with labels, keypoints and both masks."""
    out_dir = tmp_path_factory.mktemp("registered") / "out"
    result = _register(pair, out_dir, *_all_inputs(pair), *FAST)
    result.dir = out_dir
    return result


def test_register_exits_0_and_writes_every_output(registered):
    assert registered.rc == 0, registered.err
    names = sorted(p.name for p in registered.dir.iterdir())
    assert names == sorted([
        "disp_fixed_moving.nii.gz", "warped_moving.nii.gz", "warped_labels_moving.nii.gz",
        "metrics.json", "history.csv", "report_fixed_moving.png",
    ])  # and no temporary file is left beside them


def test_register_writes_the_field_in_the_learn2reg_layout_with_the_fixed_affine(registered, pair):
    disp = nib.load(str(registered.dir / "disp_fixed_moving.nii.gz"))
    assert disp.shape == SHAPE + (3,)
    assert disp.get_data_dtype() == np.float32
    np.testing.assert_allclose(disp.affine, nib.load(str(pair.fixed)).affine, atol=1e-5)
    assert np.isfinite(np.asarray(disp.dataobj)).all()


def test_register_writes_the_moving_image_pulled_through_the_written_field(registered, pair):
    """warped(x) = moving(x + u(x)) with u the written field, on the fixed grid."""
    warped = nib.load(str(registered.dir / "warped_moving.nii.gz"))
    u = _field(registered.dir / "disp_fixed_moving.nii.gz")
    expected = warp(torch.from_numpy(pair.moving_array)[None, None], field_from_numpy(u))[0, 0].numpy()
    assert warped.shape == SHAPE
    np.testing.assert_allclose(warped.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(np.asarray(warped.dataobj), expected, atol=1e-3)


def test_register_writes_warped_labels_with_an_integer_type_and_the_moving_label_values(registered):
    labels = nib.load(str(registered.dir / "warped_labels_moving.nii.gz"))
    assert labels.shape == SHAPE
    assert np.issubdtype(labels.get_data_dtype(), np.integer)
    assert set(np.unique(np.asarray(labels.dataobj)).tolist()) <= {0, 1, 2}


def test_the_written_warped_labels_are_the_scored_ones(registered, pair):
    """warped_labels_<moving> is the evaluator's warp of the moving labels by the written field, so
    Dice recomputed from the two written label maps is metrics.json's."""
    from dirio.evaluation.overlap import dice_per_label, mean_dice

    disp = np.asarray(nib.load(str(registered.dir / "disp_fixed_moving.nii.gz")).dataobj)
    written = np.asarray(nib.load(str(registered.dir / "warped_labels_moving.nii.gz")).dataobj)
    moving = np.asarray(nib.load(str(pair.moving_labels)).dataobj)
    fixed = np.asarray(nib.load(str(pair.fixed_labels)).dataobj)
    np.testing.assert_array_equal(written, warp_labels(moving, disp))
    dice = dice_per_label(fixed, written, [1, 2], moving_labels=moving)
    assert mean_dice(dice) == pytest.approx(_read_metrics(registered.dir)["after"]["dice_mean"], abs=1e-12)


def test_register_improves_dice_and_tre_on_the_known_warp(registered, pair):
    metrics = _read_metrics(registered.dir)
    before, after = metrics["before"], metrics["after"]
    for key in ("dice_mean", "dice_per_label", "tre_mm_mean"):
        assert key in after and key in before
    # Regularity is scored after registration only: for the identity it is known (no folding);
    # HD95 too, as before registration it costs seconds no one asked for.
    assert "sdlogj_l2r" in after and "ndv_percent" in after and "sdlogj_l2r" not in before
    assert "hd95_mm" in after and "hd95_mm" not in before
    steps = metrics["step_seconds"]
    assert list(steps) == ["load", "register", "evaluate", "write", "checksums"]
    assert all(seconds >= 0 for seconds in steps.values())
    assert sum(steps.values()) <= metrics["total_seconds"]
    assert set(after["dice_per_label"]) == {"1", "2"}
    assert before["dice_mean"] < 0.95  # the warp is visible ...
    assert after["dice_mean"] > before["dice_mean"] + 0.02  # ... and registration undoes part of it
    assert after["tre_mm_mean"] < before["tre_mm_mean"]
    assert len(after["tre_mm"]) == len(np.loadtxt(pair.fixed_keypoints, delimiter=","))


def test_register_tre_before_registration_is_the_true_displacement_in_mm(registered, pair):
    """With u = 0, TRE of point p is |u_true(p) * spacing| (hand-computed from the known warp)."""
    before = _read_metrics(registered.dir)["before"]
    fixed_points = np.loadtxt(pair.fixed_keypoints, delimiter=",")
    moving_points = np.loadtxt(pair.moving_keypoints, delimiter=",")
    expected = np.linalg.norm((moving_points - fixed_points) * SPACING, axis=1)
    np.testing.assert_allclose(before["tre_mm"], expected, atol=1e-4)


def test_register_history_has_one_row_per_iteration_and_a_column_per_term(registered):
    metrics = _read_metrics(registered.dir)
    columns, rows = _read_history(registered.dir)
    assert len(rows) == 10 + 5
    terms = [metrics["settings"]["terms"]["similarity"], *metrics["settings"]["terms"]["regularizers"]]
    for name in ["level", "iteration", "lr", *terms]:
        assert name in columns
    assert [int(r["level"]) for r in rows] == [0] * 10 + [1] * 5
    assert all(math.isfinite(float(r[term])) for r in rows for term in terms)


def test_register_draws_the_png_figure(registered):
    assert (registered.dir / "report_fixed_moving.png").read_bytes().startswith(PNG_SIGNATURE)


def test_register_prints_the_one_line_summary(registered):
    after = _read_metrics(registered.dir)["after"]
    lines = registered.out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("Dice ") and f"-> {after['dice_mean']:.3f}" in lines[0]
    assert "TRE " in lines[0] and "mm" in lines[0] and "SDlogJ" in lines[0]
    assert "Traceback" not in registered.err


# --- 2. every option reaches the settings ----------------------------------------------------


@pytest.mark.parametrize("similarity", ["lncc", "ncc", "mse", "mind", "nmi"])
def test_each_similarity_runs_and_is_logged(tiny, tmp_path, similarity):
    result = _register(tiny, tmp_path / "out", "--similarity", similarity, *QUICK)
    assert result.rc == 0, result.err
    assert _read_metrics(tmp_path / "out")["settings"]["terms"]["similarity"] == similarity
    columns, rows = _read_history(tmp_path / "out")
    assert similarity in columns and len(rows) == 5
    assert all(math.isfinite(float(r[similarity])) for r in rows)


def test_every_register_option_reaches_the_recorded_settings(tiny, tmp_path):
    out = tmp_path / "out"
    result = _register(
        tiny, out, *_all_inputs(tiny),
        "--similarity", "lncc", "--similarity-options", "window=3,kernel=gaussian",
        "--regularizer", "diffusion,bending=0.5", "--weight", "2",
        "--levels", "2,1", "--iterations", "3,2", "--grid-spacing", "2,1",
        "--lr", "0.7", "--optimizer", "amsgrad",
        "--schedule", "piecewise", "--schedule-options", "constant_until=0.5,cosine_until=0.75",
        "--seed", "7", "--device", "cpu", "--normalise", "clip", "--clip-range", "10,90", "--auto-mask", "lungs",
        "--tre-order", "1", "--label-ids", "2", "--no-figure", "--quiet",
    )
    assert result.rc == 0, result.err
    metrics = _read_metrics(out)
    settings = metrics["settings"]
    terms, optimization = settings["terms"], settings["optimization"]
    assert terms["similarity"] == "lncc"
    assert terms["similarity_options"] == {"window": 3, "kernel": "gaussian"}
    # --weight applies to the regulariser named without a weight only.
    assert terms["regularizers"] == {"diffusion": 2.0, "bending": 0.5}
    assert settings["preprocessing"] == {"normalise": "clip", "clip_range": [10.0, 90.0], "auto_mask": "lungs",
                                       "mask_use": "restrict"}
    assert settings["pyramid"] == {"levels": [2, 1], "iterations": [3, 2]}
    assert settings["transform"]["grid_spacing"] == [2.0, 1.0]
    assert optimization["lr"] == 0.7 and optimization["optimizer"] == "amsgrad"
    assert optimization["schedule"] == "piecewise"
    assert optimization["schedule_options"] == {"constant_until": 0.5, "cosine_until": 0.75}
    assert settings["seed"] == 7 and settings["transform"]["diffeomorphic"] is False
    assert settings["progress"] is False
    assert metrics["device"] == "cpu"
    assert metrics["after"]["tre_order"] == 1
    assert list(metrics["after"]["dice_per_label"]) == ["2"]  # --label-ids
    columns, rows = _read_history(out)
    assert {"lncc", "diffusion", "bending"} <= set(columns) and len(rows) == 5
    assert float(rows[0]["lr"]) == pytest.approx(0.7)  # piecewise starts with its constant phase
    assert not list(out.glob("*.png"))  # --no-figure
    assert result.out == "" and result.err == ""  # --quiet: no summary, no progress bar


def test_weight_without_regularizer_weights_the_default_regularizers(tiny, tmp_path):
    result = _register(tiny, tmp_path / "out", "--preset", "brain-mri", "--weight", "0.25", *QUICK)
    assert result.rc == 0, result.err
    expected = {name: 0.25 for name in PRESETS["brain-mri"]["regularizers"]}
    assert _read_metrics(tmp_path / "out")["settings"]["terms"]["regularizers"] == expected


@pytest.mark.parametrize("preset", ["brain-mri", "lung-ct"])
def test_preset_gives_its_defaults_and_explicit_iterations_override_it(tiny, tmp_path, preset):
    result = _register(tiny, tmp_path / "out", "--preset", preset, *QUICK)
    assert result.rc == 0, result.err
    settings = _read_metrics(tmp_path / "out")["settings"]
    section = flat_keys()  # flat preset key -> its section in metrics.json
    for key in ("similarity", "normalise", "regularizers", "schedule"):
        assert settings[section[key]][key] == PRESETS[preset][key]
    # a preset's per-level options follow the two levels of QUICK by shrink factor
    aligned = align_to_levels(PRESETS[preset]["similarity_options"], PRESETS[preset]["levels"], (2, 1))
    assert settings["terms"]["similarity_options"] == json.loads(json.dumps(aligned))
    if "clip_range" in PRESETS[preset]:
        assert settings["preprocessing"]["clip_range"] == list(PRESETS[preset]["clip_range"])
    assert settings["pyramid"] == {"levels": [2, 1], "iterations": [3, 2]}


def test_diffeomorphic_field_has_positive_jacobian_determinant(pair, tmp_path):
    # No regularisation and a large step: a plain displacement field folds under these settings,
    # a velocity field integrated by scaling and squaring must not.
    out = tmp_path / "out"
    result = _register(pair, out, "--diffeomorphic", "--similarity", "mse", "--weight", "0", "--lr", "1",
                       *FAST, "-q", "--no-figure")
    assert result.rc == 0, result.err
    assert _read_metrics(out)["settings"]["transform"]["diffeomorphic"] is True
    det = jacobian_determinant(field_from_numpy(_field(out / "disp_fixed_moving.nii.gz")))
    assert float(det.min()) > 0.0


def test_same_seed_gives_byte_identical_field_files(tiny, tmp_path):
    files = []
    for name in ("a", "b"):
        result = _register(tiny, tmp_path / name, "--seed", "3", *QUICK)
        assert result.rc == 0, result.err
        files.append((tmp_path / name / "disp_fixed_moving.nii.gz").read_bytes())
    assert files[0] == files[1]


def test_without_quiet_the_summary_is_printed_and_without_labels_it_reports_tre(tiny, tmp_path):
    result = _register(
        tiny, tmp_path / "out", "--fixed-keypoints", tiny.fixed_keypoints,
        "--moving-keypoints", tiny.moving_keypoints, "--levels", "2,1", "--iterations", "3,2", "--no-figure",
    )
    assert result.rc == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("TRE ") and "Dice" not in lines[0]


def test_register_2d_images_with_ndim_2(tmp_path):
    image = _smooth_volume((20, 24), seed=4, sigma=2.0)
    fixed = _save(tmp_path / "f2.nii.gz", image)
    moving = _save(tmp_path / "m2.nii.gz", np.roll(image, 1, axis=0))
    result = _run(["register", fixed, moving, "-o", tmp_path / "out", "--ndim", "2", *QUICK])
    assert result.rc == 0, result.err
    disp = nib.load(str(tmp_path / "out" / "disp_f2_m2.nii.gz"))
    assert disp.shape == (20, 24, 2) and disp.get_data_dtype() == np.float32


# --- 3. warp and evaluate ----------------------------------------------------------------------


def _shift_field(directory: Path, shape) -> Path:
    """A constant displacement of +1 voxel along the first axis."""
    u = np.zeros(tuple(shape) + (3,), dtype=np.float32)
    u[..., 0] = 1.0
    return _save(directory / "disp_shift.nii.gz", u)


def test_warp_pulls_an_image_through_the_field(tiny, tmp_path):
    """u = (1, 0, 0): out[i] = image[i + 1], and the last slice repeats the border."""
    out = tmp_path / "warped.nii.gz"
    result = _run(["warp", tiny.moving, _shift_field(tmp_path, TINY), "-o", out])
    assert result.rc == 0, result.err
    warped = nib.load(str(out))
    expected = np.concatenate([tiny.moving_array[1:], tiny.moving_array[-1:]], axis=0)
    np.testing.assert_allclose(np.asarray(warped.dataobj), expected, atol=1e-4)
    np.testing.assert_allclose(warped.affine, AFFINE, atol=1e-5)


def test_warp_labels_keeps_the_integer_type_and_the_value_set(tiny, tmp_path):
    # Values 0, 7 and 300 (above the uint8 range) in an int16 file.
    labels = np.choose(tiny.moving_labels_array, np.array([0, 7, 300], dtype=np.int16))
    source = _save(tmp_path / "labels.nii.gz", labels)
    # A fractional smooth field: trilinear interpolation would create values between labels.
    result = _run(["warp", source, tiny.true_disp, "-o", tmp_path / "warped.nii.gz", "--labels"])
    assert result.rc == 0, result.err
    warped = nib.load(str(tmp_path / "warped.nii.gz"))
    assert warped.get_data_dtype() == np.int16
    values = set(np.unique(np.asarray(warped.dataobj)).tolist())
    assert values <= {0, 7, 300} and {7, 300} <= values
    # An integer shift moves the labels exactly.
    result = _run(["warp", source, _shift_field(tmp_path, TINY), "-o", tmp_path / "shifted.nii.gz", "--labels"])
    assert result.rc == 0, result.err
    shifted = np.asarray(nib.load(str(tmp_path / "shifted.nii.gz")).dataobj)
    np.testing.assert_array_equal(shifted, np.concatenate([labels[1:], labels[-1:]], axis=0))


def _evaluate_args(pair) -> list:
    return [
        "evaluate", pair.true_disp, pair.fixed,
        "--fixed-labels", pair.fixed_labels, "--moving-labels", pair.moving_labels,
        "--fixed-keypoints", pair.fixed_keypoints, "--moving-keypoints", pair.moving_keypoints,
    ]


def test_evaluate_prints_json_and_the_true_field_scores_perfectly(tiny):
    result = _run(_evaluate_args(tiny))
    assert result.rc == 0, result.err
    metrics = json.loads(result.out)
    assert metrics["dice_mean"] == 1.0  # fixed labels are the moving labels warped by this field
    assert metrics["tre_mm_mean"] < 1e-3  # moving keypoints are p + u_true(p)
    assert metrics["percent_nonpositive_jacobian"] == 0.0


def test_evaluate_writes_the_json_with_output_and_prints_nothing(tiny, tmp_path):
    printed = json.loads(_run(_evaluate_args(tiny)).out)
    result = _run([*_evaluate_args(tiny), "-o", tmp_path / "metrics.json"])
    assert result.rc == 0, result.err
    assert result.out == ""
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written.keys() == printed.keys()
    assert written["dice_per_label"] == printed["dice_per_label"]
    assert written["tre_mm"] == pytest.approx(printed["tre_mm"])


# --- 4. user errors ----------------------------------------------------------------------------


def _bad_volume(directory: Path, name: str, array) -> Path:
    return _save(directory / name, np.asarray(array, dtype=np.float32))


def _case_4d(tiny, d):
    bad = _bad_volume(d, "moving_4d.nii.gz", np.stack([tiny.moving_array] * 2, axis=-1))
    return ["register", tiny.fixed, bad], bad.name


def _case_2d(tiny, d):
    bad = _bad_volume(d, "moving_2d.nii.gz", tiny.moving_array[:, :, 0])
    return ["register", tiny.fixed, bad], bad.name


def _case_other_shape(tiny, d):
    bad = _bad_volume(d, "moving_shape.nii.gz", _smooth_volume((12, 14, 18), seed=5, sigma=2.0))
    return ["register", tiny.fixed, bad], bad.name


def _shifted_affine():
    affine = AFFINE.copy()
    affine[:3, 3] += 3.0  # 3 mm away: same shape, different grid
    return affine


def _case_other_affine(tiny, d):
    bad = _save(d / "moving_affine.nii.gz", tiny.moving_array, _shifted_affine())
    return ["register", tiny.fixed, bad], bad.name


def _case_nan(tiny, d):
    array = tiny.moving_array.copy()
    array[3, 4, 5] = np.nan
    bad = _bad_volume(d, "moving_nan.nii.gz", array)
    return ["register", tiny.fixed, bad], bad.name


def _case_inf(tiny, d):
    array = tiny.moving_array.copy()
    array[3, 4, 5] = np.inf
    bad = _bad_volume(d, "moving_inf.nii.gz", array)
    return ["register", bad, tiny.moving], bad.name


def _case_not_nifti(tiny, d):
    bad = d / "notes.nii.gz"
    bad.write_text("this is a text file, not a NIfTI image\n")
    return ["register", tiny.fixed, bad], bad.name


def _case_truncated(tiny, d):
    data = tiny.moving.read_bytes()
    bad = d / "truncated.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    return ["register", tiny.fixed, bad], bad.name


def _case_missing(tiny, d):
    return ["register", tiny.fixed, d / "absent.nii.gz"], "absent.nii.gz"


def _case_keypoint_outside(tiny, d):
    points = np.loadtxt(tiny.fixed_keypoints, delimiter=",")
    points[1] = (5.0, 40.0, 5.0)  # the second axis has 14 voxels
    bad = _save_points(d / "outside.csv", points)
    return ["register", tiny.fixed, tiny.moving, "--fixed-keypoints", bad,
            "--moving-keypoints", tiny.moving_keypoints], bad.name


def _case_one_keypoint_file(tiny, d):
    return ["register", tiny.fixed, tiny.moving, "--fixed-keypoints", tiny.fixed_keypoints], "fixed_keypoints.csv"


def _case_keypoint_rows_differ(tiny, d):
    bad = _save_points(d / "fewer.csv", np.loadtxt(tiny.moving_keypoints, delimiter=",")[:-1])
    return ["register", tiny.fixed, tiny.moving, "--fixed-keypoints", tiny.fixed_keypoints,
            "--moving-keypoints", bad], bad.name


def _case_one_label_file(tiny, d):
    return ["register", tiny.fixed, tiny.moving, "--fixed-labels", tiny.fixed_labels], "fixed_labels.nii.gz"


def _case_fractional_labels(tiny, d):
    labels = tiny.moving_labels_array.astype(np.float32)
    labels[2, 2, 2] = 0.5
    bad = _bad_volume(d, "labels_float.nii.gz", labels)
    return ["register", tiny.fixed, tiny.moving, "--fixed-labels", tiny.fixed_labels,
            "--moving-labels", bad], bad.name


def _case_unknown_similarity_option(tiny, d):
    return ["register", tiny.fixed, tiny.moving, "--similarity-options", "bogus=1"], "bogus"


def _case_unknown_schedule_option(tiny, d):
    return ["register", tiny.fixed, tiny.moving, "--schedule", "cosine", "--schedule-options", "bogus=1"], "bogus"


def _case_bad_clip_range(tiny, d):
    return ["register", tiny.fixed, tiny.moving, "--normalise", "clip", "--clip-range", "90,10"], "--clip-range"


def _case_warp_field_on_another_grid(tiny, d):
    field = _save(d / "disp_other.nii.gz", np.zeros((10, 10, 10, 3), dtype=np.float32))
    return ["warp", tiny.moving, field, "-o", d / "out" / "warped.nii.gz"], field.name


ERROR_CASES = {
    "4d image": _case_4d,
    "2d image for 3d": _case_2d,
    "moving on another shape": _case_other_shape,
    "moving on another affine": _case_other_affine,
    "nan voxel": _case_nan,
    "inf voxel": _case_inf,
    "text file named .nii.gz": _case_not_nifti,
    "truncated .nii.gz": _case_truncated,
    "missing file": _case_missing,
    "keypoint outside the image": _case_keypoint_outside,
    "one keypoint file": _case_one_keypoint_file,
    "keypoint files differ in rows": _case_keypoint_rows_differ,
    "one label file": _case_one_label_file,
    "non-integer label map": _case_fractional_labels,
    "unknown similarity option": _case_unknown_similarity_option,
    "unknown schedule option": _case_unknown_schedule_option,
    "clip range low above high": _case_bad_clip_range,
    "warp field on another grid": _case_warp_field_on_another_grid,
}


def _assert_user_error(result, offending: str) -> None:
    assert result.rc == 2, (result.rc, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("dirio: error: ")
    assert offending in lines[0]
    assert "Traceback" not in result.err


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_user_error_exits_2_with_one_line_naming_the_file_and_writes_nothing(tiny, tmp_path, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    argv, offending = ERROR_CASES[case](tiny, inputs)
    out = tmp_path / "out"
    if argv[0] == "register":
        # Without -q a progress bar would go to stderr if the run had started.
        argv = [*argv, "-o", out, "--levels", "2,1", "--iterations", "3,2", "--no-figure"]
    result = _run(argv)
    _assert_user_error(result, offending)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("case", [_case_other_shape, _case_other_affine], ids=["shape", "affine"])
def test_resample_registers_a_moving_image_on_another_grid(tiny, tmp_path, case):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    argv, _ = case(tiny, inputs)
    result = _run([*argv, "-o", tmp_path / "out", "--resample", *QUICK])
    assert result.rc == 0, result.err
    disp = nib.load(str(next((tmp_path / "out").glob("disp_*.nii.gz"))))
    assert disp.shape == TINY + (3,)  # on the fixed grid
    np.testing.assert_allclose(disp.affine, AFFINE, atol=1e-5)


def test_existing_output_is_kept_byte_for_byte_without_overwrite_and_replaced_with_it(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = b"an earlier run's metrics\n"
    (out / "metrics.json").write_bytes(old)
    result = _register(tiny, out, *QUICK)
    _assert_user_error(result, "metrics.json")
    assert "--overwrite" in result.err
    assert (out / "metrics.json").read_bytes() == old
    assert [p.name for p in out.iterdir()] == ["metrics.json"]  # nothing else written

    # --overwrite replaces only what an earlier dirio run wrote: this metrics.json is the user's
    result = _register(tiny, out, *QUICK, "--overwrite")
    _assert_user_error(result, "metrics.json")
    assert (out / "metrics.json").read_bytes() == old

    (out / "metrics.json").unlink()
    assert _register(tiny, out, *QUICK).rc == 0
    first = _read_metrics(out)
    result = _register(tiny, out, *QUICK, "--overwrite", "--seed", "1")
    assert result.rc == 0, result.err
    assert _read_metrics(out)["settings"] != first["settings"]
    assert (out / "disp_fixed_moving.nii.gz").exists()


def test_warp_and_evaluate_refuse_to_replace_an_existing_output(tiny, tmp_path):
    target = tmp_path / "exists.nii.gz"
    target.write_bytes(b"keep me")
    result = _run(["warp", tiny.moving, tiny.true_disp, "-o", target])
    _assert_user_error(result, "exists.nii.gz")
    assert target.read_bytes() == b"keep me"
    report = tmp_path / "exists.json"
    report.write_bytes(b"keep me too")
    result = _run([*_evaluate_args(tiny), "-o", report])
    _assert_user_error(result, "exists.json")
    assert report.read_bytes() == b"keep me too"


# --- 5. entry points ---------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dirio {__version__}"


def test_register_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["register", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--fixed-labels", "--moving-labels", "--fixed-mask", "--moving-mask", "--fixed-keypoints",
        "--moving-keypoints", "--label-ids", "--resample", "--ndim", "--preset", "--similarity",
        "--similarity-options", "--regularizer", "--weight", "--normalise", "--clip-range", "--levels",
        "--iterations", "--grid-spacing", "--lr", "--optimizer", "--schedule", "--schedule-options",
        "--diffeomorphic", "--seed", "--device", "--overwrite", "--no-figure", "--tre-order", "--quiet",
    ):
        assert option in text


def test_python_dash_m_dirio_register_runs_in_a_subprocess(tiny, tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, "-m", "dirio", "register", str(tiny.fixed), str(tiny.moving), "-o", str(out), *QUICK],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == "" and completed.stderr == ""  # -q
    assert nib.load(str(out / "disp_fixed_moving.nii.gz")).shape == TINY + (3,)


def test_malformed_arguments_give_one_dirio_error_line(capsys):
    """argparse's own errors follow the same one-line ``dirio: error:`` rule (exit 2)."""
    from dirio.apps.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["register", "a.nii.gz", "b.nii.gz", "-o", "out", "--levels", "a,b"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dirio: error: register: argument --levels")


def test_api_rejects_bad_schedule_options_with_a_one_line_error():
    from dirio.api import register
    from dirio.errors import DirioError

    image = np.zeros((8, 8, 8), dtype=np.float32)
    with pytest.raises(DirioError, match="schedule options"):
        register(image, image, schedule="cosine", schedule_options={"bogus": 1}, progress=False)
    with pytest.raises(DirioError, match="clip range"):
        register(image, image, normalise="clip", clip_range=(5.0, 1.0), progress=False)
