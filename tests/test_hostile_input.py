"""Careless and hostile input: each defect of the audit (issue 13) becomes one line
``dirio: error: ...``, exit status 2, raised before any work, with nothing half-written and
nothing overwritten.

1. a ``.nii.gz`` damaged in the middle (gzip CRC fails) is refused, not read as garbage;
2. two runs into one output folder: the second is refused at once (an advisory lock), a stale lock
   of a killed process is recovered;
3. ``-o`` naming a file, an unwritable folder, or a path through a file is refused before the
   optimisation (``register``, ``warp``);
4. images smaller than 5 voxels along an axis are refused on input (``register``, ``evaluate``);
5. regulariser weights must be finite and >= 0;
6. ``warp`` and ``evaluate`` check the field's affine (``--resample`` overrides);
7. an absurd learning rate, a missing ``--label-ids`` file, ``.tmp-*`` leftovers, a killed
   ``--overwrite`` (marked incomplete), dataset paths leading outside the dataset folder.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from dirio.io.atomic import LOCK_NAME, OutputLock
from cli_helpers import assert_one_error_line, run_cli, save_nifti, write_smooth_pair

SHAPE = (12, 14, 16)
AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])
AFFINE[:3, 3] = (-10.0, 4.0, 2.0)
QUICK = ["--levels", "2,1", "--iterations", "3,2", "-q", "--no-figure"]


def _save(path: Path, array, affine=AFFINE) -> Path:
    return save_nifti(path, array, affine)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_smooth_pair(tmp_path_factory.mktemp("hostile"), SHAPE, AFFINE)


_run = run_cli


_assert_user_error = assert_one_error_line


@pytest.fixture
def no_registration(monkeypatch):
    """Fail the test if the optimisation starts: the error must come before any work."""
    import dirio.apps.workflow as workflow

    def forbidden(*args, **kwargs):
        raise AssertionError("the registration started before the input was refused")

    monkeypatch.setattr(workflow, "register", forbidden)


# --- 1. damaged gzip ---------------------------------------------------------------------------


def test_a_nii_gz_damaged_in_the_middle_is_refused_by_its_crc(pair, tmp_path, no_registration):
    content = bytearray(pair.moving.read_bytes())
    content[len(content) // 2] ^= 0x08
    damaged = tmp_path / "damaged.nii.gz"
    damaged.write_bytes(bytes(content))
    out = tmp_path / "out"
    result = _run(["register", pair.fixed, damaged, "-o", out, *QUICK])
    _assert_user_error(result, "damaged.nii.gz", "gzip")
    assert not out.exists()


# --- 2. one writer per output folder -----------------------------------------------------------


def test_a_second_register_into_a_folder_in_use_is_refused_at_once(pair, tmp_path, no_registration):
    out = tmp_path / "out"
    with OutputLock(out):
        result = _run(["register", pair.fixed, pair.moving, "-o", out, *QUICK])
        _assert_user_error(result, str(out), "another dirio process", f"pid {os.getpid()}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert not out.exists()  # the lock's folder goes with the lock when nothing else was written


def test_a_register_started_while_another_writes_the_folder_is_refused(pair, tmp_path):
    out = tmp_path / "out"
    slow = subprocess.Popen([sys.executable, "-m", "dirio", "register", str(pair.fixed), str(pair.moving), "-o",
                             str(out), "--levels", "1", "--iterations", "100000", "-q", "--no-figure"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the first process locks its folder before it reads the images
            if (out / LOCK_NAME).exists() or slow.poll() is not None:
                break
            time.sleep(0.05)
        assert slow.poll() is None, slow.stderr.read()
        _assert_user_error(_run(["register", pair.fixed, pair.moving, "-o", out, *QUICK]), "another dirio process",
                           f"pid {slow.pid}")
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
        slow.stderr.close()
    assert not (out / "metrics.json").exists()


def test_a_dirio_run_into_a_folder_in_use_is_refused(tmp_path):
    dataset = _tiny_dataset(tmp_path / "data")
    out = tmp_path / "run"
    with OutputLock(out):
        result = _run(["run", dataset, "-o", out, "-q", "--no-report", *QUICK[:4]])
        _assert_user_error(result, "another dirio process")
        assert not (out / "run.json").exists()


# --- 3. unusable -o ----------------------------------------------------------------------------


def test_output_naming_an_existing_file_is_refused_before_the_optimisation(pair, tmp_path, no_registration):
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    _assert_user_error(_run(["register", pair.fixed, pair.moving, "-o", afile, *QUICK]), "afile", "not a folder")
    assert afile.read_text() == "keep me\n"


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_optimisation(pair, tmp_path, monkeypatch,
                                                                                      no_registration):
    import dirio.io.atomic as atomic

    out = tmp_path / "readonly"
    out.mkdir()

    def read_only(*args, **kwargs):  # what a read-only file system answers (root ignores chmod)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    _assert_user_error(_run(["register", pair.fixed, pair.moving, "-o", out, *QUICK]), "readonly",
                       "cannot write there", "Read-only file system")
    assert list(out.iterdir()) == []


def test_warp_into_a_path_through_a_file_is_refused(pair, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    _assert_user_error(_run(["warp", pair.moving, pair.field, "-o", afile / "x.nii.gz"]), "afile", "not a folder")


# --- 4. minimum size ---------------------------------------------------------------------------


def test_images_with_fewer_than_5_voxels_along_an_axis_are_refused_on_input(tmp_path, no_registration):
    small = np.random.default_rng(1).random((4, 9, 9)).astype(np.float32)
    fixed, moving = _save(tmp_path / "f.nii.gz", small), _save(tmp_path / "m.nii.gz", small)
    _assert_user_error(_run(["register", fixed, moving, "-o", tmp_path / "out", *QUICK]), "f.nii.gz",
                       "at least 5 voxels")
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_4x4x4_grid(tmp_path):
    fixed = _save(tmp_path / "f.nii.gz", np.ones((4, 4, 4), np.float32))
    field = _save(tmp_path / "disp.nii.gz", np.zeros((4, 4, 4, 3), np.float32))
    _assert_user_error(_run(["evaluate", field, fixed]), "at least 5 voxels")


# --- 5. weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", ["-1", "nan", "inf"])
def test_regularizer_weights_must_be_finite_and_not_negative(pair, tmp_path, weight, no_registration):
    result = _run(["register", pair.fixed, pair.moving, "-o", tmp_path / "out", "--weight", weight, *QUICK])
    _assert_user_error(result, "weight")
    assert not (tmp_path / "out").exists()


def test_weights_and_rates_are_checked_by_a_pure_function_of_the_settings():
    from dirio.api import check_settings, make_settings
    from dirio.errors import DirioError

    check_settings(make_settings("brain-mri"))
    # refused when the settings are made (ValueError) or when they are checked (DirioError)
    with pytest.raises((DirioError, ValueError), match="diffusion"):
        check_settings(make_settings(None, regularizers={"diffusion": -0.5}))
    with pytest.raises((DirioError, ValueError), match="affine learning rate 1e\\+09"):
        check_settings(make_settings(None, affine="affine", affine_options={"lr": 1e9}))


# --- 6. field affines --------------------------------------------------------------------------


def test_warp_and_evaluate_refuse_a_field_on_another_affine_unless_resample(pair, tmp_path):
    moved = AFFINE.copy()
    moved[:3, 3] += (10.0, 0.0, 0.0)  # 10 mm away
    field = _save(tmp_path / "disp_far.nii.gz", np.zeros(SHAPE + (3,), np.float32), moved)
    _assert_user_error(_run(["warp", pair.moving, field, "-o", tmp_path / "w.nii.gz"]), "disp_far.nii.gz",
                       "10 mm", "--resample")
    assert not (tmp_path / "w.nii.gz").exists()
    _assert_user_error(_run(["evaluate", field, pair.fixed]), "disp_far.nii.gz", "--resample")
    assert _run(["warp", pair.moving, field, "-o", tmp_path / "w.nii.gz", "--resample"]).rc == 0
    # resampled onto the field's grid: the output has the field's affine
    assert np.allclose(nib.load(tmp_path / "w.nii.gz").affine, moved, atol=1e-4)
    assert _run(["evaluate", field, pair.fixed, "--resample"]).rc == 0


# --- 7. the smaller ones -----------------------------------------------------------------------


def test_an_absurd_learning_rate_is_refused(pair, tmp_path, no_registration):
    _assert_user_error(_run(["register", pair.fixed, pair.moving, "-o", tmp_path / "out", "--lr", "1e9", *QUICK]),
                       "1e+09")


def test_a_missing_label_ids_file_is_reported_as_missing(pair, tmp_path):
    result = _run(["register", pair.fixed, pair.moving, "-o", tmp_path / "out", "--label-ids",
                   tmp_path / "labels.txt", *QUICK])
    line = _assert_user_error(result, "labels.txt", "does not exist")
    assert "comma-separated" not in line


def test_register_removes_tmp_leftovers_of_a_killed_run(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    leftover = out / ".tmp-0123456789ab-disp_fixed_moving.nii.gz"
    leftover.write_bytes(b"half a file")
    assert _run(["register", pair.fixed, pair.moving, "-o", out, *QUICK]).rc == 0
    assert not leftover.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_a_killed_overwrite_leaves_the_set_marked_incomplete(pair, tmp_path, monkeypatch):
    import dirio.apps.workflow as workflow

    out = tmp_path / "out"
    assert _run(["register", pair.fixed, pair.moving, "-o", out, *QUICK]).rc == 0
    first = json.loads((out / "metrics.json").read_text())
    assert set(first["sha256"]) >= {"disp", "warped", "history"}

    real_save_image = workflow.save_image

    def killed(*args, **kwargs):  # the field is rewritten, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "save_image", killed)
    result = _run(["register", pair.fixed, pair.moving, "-o", out, "--overwrite", "--seed", "7", *QUICK])
    assert result.rc == 130
    assert (out / "dirio-incomplete.json").is_file() and not (out / "metrics.json").exists()
    monkeypatch.setattr(workflow, "save_image", real_save_image)
    _assert_user_error(_run(["register", pair.fixed, pair.moving, "-o", out, *QUICK]), "incomplete",
                       "--overwrite")
    assert _run(["register", pair.fixed, pair.moving, "-o", out, "--overwrite", *QUICK]).rc == 0
    assert not (out / "dirio-incomplete.json").exists()
    record = json.loads((out / "metrics.json").read_text())
    import hashlib

    for key, digest in record["sha256"].items():
        assert hashlib.sha256(Path(record["outputs"][key]).read_bytes()).hexdigest() == digest


def _tiny_dataset(folder: Path, entries=None) -> Path:
    volume = gaussian_filter(np.random.default_rng(3).standard_normal(SHAPE), 2.0).astype(np.float32)
    for case in ("0001", "0002"):
        _save(folder / "imagesTr" / f"T_{case}_0000.nii.gz", volume)
    content = {"name": "T", "registration_val": entries or [
        {"fixed": "./imagesTr/T_0001_0000.nii.gz", "moving": "./imagesTr/T_0002_0000.nii.gz"}]}
    path = folder / "T_dataset.json"
    path.write_text(json.dumps(content))
    return path


def test_dataset_paths_leading_outside_the_dataset_folder_are_refused_before_any_work(tmp_path, monkeypatch):
    import dirio.apps.runner as runner

    outside = _save(tmp_path / "elsewhere" / "X_0009_0000.nii.gz", np.ones(SHAPE, np.float32))
    entries = [{"fixed": "./imagesTr/T_0001_0000.nii.gz", "moving": "../../../../../../../../etc/passwd"},
               {"fixed": "./imagesTr/T_0001_0000.nii.gz", "moving": str(outside)}]
    for entry in entries:
        dataset = _tiny_dataset(tmp_path / f"data{len(str(entry))}", [entry])
        opened = []
        monkeypatch.setattr(runner, "register_pair", lambda *a, **k: opened.append(a))
        out = tmp_path / f"run{len(str(entry))}"
        _assert_user_error(_run(["run", dataset, "-o", out, "-q", "--no-report"]), "outside the dataset folder",
                           "--allow-outside-paths")
        assert opened == [] and not out.exists()
    monkeypatch.undo()
    result = _run(["run", dataset, "-o", tmp_path / "allowed", "-q", "--no-report", "--allow-outside-paths",
                   *QUICK[:4]])
    assert result.rc == 0, result.err


def test_a_sigkill_while_replacing_a_set_leaves_it_marked_and_the_next_run_recovers(pair, tmp_path):
    out = tmp_path / "out"
    assert _run(["register", pair.fixed, pair.moving, "-o", out, *QUICK]).rc == 0
    # A real kill -9 in the middle of the writes: the field is replaced, then the process dies.
    code = textwrap.dedent(f"""
        import os, signal, sys
        import dirio.apps.workflow as workflow
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        workflow.save_image = die
        from dirio.apps.cli import main
        main({[str(a) for a in ["register", pair.fixed, pair.moving, "-o", out, "--overwrite", "--seed", "3", *QUICK]]!r})
    """)
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "dirio-incomplete.json").is_file() and not (out / "metrics.json").exists()
    assert (out / LOCK_NAME).exists()  # the dead process's lock file, released by the kernel
    _assert_user_error(_run(["register", pair.fixed, pair.moving, "-o", out, *QUICK]), "incomplete")
    assert _run(["register", pair.fixed, pair.moving, "-o", out, "--overwrite", *QUICK]).rc == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith((".", "dirio-"))) == []
