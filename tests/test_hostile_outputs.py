"""Outputs under hostile or careless use (issue 18, part A): nothing lost, nothing silently mixed.

1. ``--overwrite`` deletes only what an earlier dirio run recorded writing (its manifest, with the
   SHA-256 of every file) and only when unchanged; every other file stays and is named on the
   terminal; a file the new run would write but dirio did not write (or that changed) stops the
   command before anything is deleted (``dirio run`` and ``dirio register``; ``sweep`` and ``demo``
   refuse the same way);
2. ``register --overwrite`` leaves one consistent set: the earlier set's extra files go;
3. unusable output paths (``/proc``, ``/sys``, names too long) are one line, exit 2, before any work,
   for every command;
4. ``register`` into a run folder and ``run`` into a register folder are refused without
   ``--overwrite``; a run config's ``model`` is taken from the config's folder (a missing one is a
   usage error); grid mismatches report how far the voxel centres are apart; ``run -q`` prints
   its failures.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, shift

from cli_helpers import assert_one_error_line, run_cli, save_nifti, write_smooth_pair

SHAPE = (12, 14, 16)
AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])
AFFINE[:3, 3] = (-10.0, 4.0, 2.0)
QUICK = ["--levels", "2,1", "--iterations", "3,2", "-q"]
LINUX_PSEUDO = Path("/proc/self").exists() and Path("/sys/kernel").exists()


def _save(path: Path, array, affine=AFFINE) -> Path:
    return save_nifti(path, array, affine)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_smooth_pair(tmp_path_factory.mktemp("outputs"), SHAPE, AFFINE, names=("f", "m", "fs", "ms"))


_assert_user_error = assert_one_error_line


def _digests(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _listed_outputs(out: Path) -> set[str]:
    metrics = json.loads((out / "metrics.json").read_text())
    return {Path(path).name for path in metrics["outputs"].values()}


# --- 2. register --overwrite: one consistent set -------------------------------------------------


def _register(pair, out, *options):
    return run_cli(["register", pair.fixed, pair.moving, "-o", out, *QUICK, "--no-figure", *options])


def _full_set(pair, out):
    result = _register(pair, out, "--fixed-labels", pair.fixed_labels, "--moving-labels", pair.moving_labels,
                       "--itk-field", "--affine", "rigid")
    assert result.rc == 0, result.err
    names = {p.name for p in out.iterdir()}
    assert {"warped_labels_m.nii.gz", "itk_disp_f_m.nii.gz", "affine_f_m.json"} <= names
    return names


def test_register_overwrite_leaves_one_consistent_set_without_the_earlier_sets_extra_files(pair, tmp_path):
    out = tmp_path / "out"
    first = _full_set(pair, out)
    result = _register(pair, out, "--overwrite", "--seed", "2")
    assert result.rc == 0, result.err
    names = {p.name for p in out.iterdir()}
    # exactly the new set: its metrics.json names every file in the folder, and nothing else is there
    assert names == _listed_outputs(out) | {"metrics.json"}
    for extra in ("warped_labels_m.nii.gz", "itk_disp_f_m.nii.gz", "itk_disp_f_m.h5", "affine_f_m.json",
                  "affine_f_m.tfm"):
        assert extra not in names
    assert first - names  # the earlier set had more files
    assert result.err == ""  # nothing of the user's to report


def test_register_overwrite_keeps_files_it_did_not_write_and_changed_files_and_says_so(pair, tmp_path):
    out = tmp_path / "out"
    _full_set(pair, out)
    (out / "notes.txt").write_text("my notes\n")
    (out / "disp_mine.nii.gz").write_bytes(b"mine")
    with open(out / "affine_f_m.json", "a") as handle:  # an earlier output the user edited
        handle.write("\n")
    before = _digests(out)
    result = _register(pair, out, "--overwrite")
    assert result.rc == 0, result.err
    after = _digests(out)
    for name in ("notes.txt", "disp_mine.nii.gz", "affine_f_m.json"):
        assert after[name] == before[name]
    assert "warped_labels_m.nii.gz" not in after  # unchanged earlier outputs go
    lines = result.err.splitlines()
    assert len(lines) == 2, result.err
    assert "no earlier dirio run wrote" in lines[0] and "notes.txt" in lines[0] and "disp_mine.nii.gz" in lines[0]
    assert "changed since dirio wrote them" in lines[1] and "affine_f_m.json" in lines[1]
    recorded = json.loads((out / "metrics.json").read_text())["overwrite"]
    assert recorded["kept_foreign"] == ["disp_mine.nii.gz", "notes.txt"]
    assert recorded["kept_changed"] == ["affine_f_m.json"]


def test_register_overwrite_refuses_to_replace_a_file_dirio_did_not_write(pair, tmp_path):
    out = tmp_path / "out"
    assert _register(pair, out).rc == 0
    (out / "history.csv").write_text("the user's own table\n")  # at a name the new set writes
    before = _digests(out)
    _assert_user_error(_register(pair, out, "--overwrite"), "history.csv", "not written by dirio or changed since",
                       "--overwrite")
    assert _digests(out) == before  # nothing deleted, nothing written


def test_register_overwrite_of_a_folder_without_a_manifest_keeps_the_users_file(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": true}\n')
    _assert_user_error(_register(pair, out, "--overwrite"), "metrics.json", "not written by dirio")
    assert (out / "metrics.json").read_text() == '{"mine": true}\n'
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_a_killed_register_overwrite_is_finished_by_the_next_overwrite(pair, tmp_path, monkeypatch):
    import dirio.apps.workflow as workflow

    out = tmp_path / "out"
    _full_set(pair, out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(workflow, "save_image", interrupted)
    assert _register(pair, out, "--overwrite").rc == 130
    monkeypatch.undo()
    assert (out / "dirio-incomplete.json").is_file() and not (out / "metrics.json").exists()
    result = _register(pair, out, "--overwrite")
    assert result.rc == 0, result.err
    assert {p.name for p in out.iterdir()} == _listed_outputs(out) | {"metrics.json"}
    assert result.err == ""


# --- 4. register into a run folder, run into a register folder ----------------------------------


def _dataset(folder: Path, cases: int = 3, missing: str | None = None) -> Path:
    volume = gaussian_filter(np.random.default_rng(3).standard_normal(SHAPE), 2.0).astype(np.float32)
    for case in range(1, cases + 1):
        if f"{case:04d}" != missing:
            _save(folder / "imagesTr" / f"T_{case:04d}_0000.nii.gz", shift(volume, (0.3 * case, 0, 0), mode="nearest"))
    entries = [{"fixed": f"./imagesTr/T_{c:04d}_0000.nii.gz", "moving": f"./imagesTr/T_{c + 1:04d}_0000.nii.gz"}
               for c in range(1, cases)]
    path = folder / "T_dataset.json"
    path.write_text(json.dumps({"name": "T", "registration_val": entries}))
    return path


RUN_QUICK = ["--levels", "2,1", "--iterations", "3,2", "--threads", "1"]


def _run(dataset, out, *options):
    return run_cli(["run", dataset, "-o", out, *RUN_QUICK, *options])


def test_register_into_a_run_folder_is_refused_without_overwrite(pair, tmp_path):
    out = tmp_path / "run"
    assert _run(_dataset(tmp_path / "data"), out, "-q", "--no-report").rc == 0
    before = _digests(out)
    _assert_user_error(_register(pair, out), "holds a dirio run", "run.json", "--overwrite")
    assert _digests(out) == before
    result = _register(pair, out, "--overwrite")
    assert result.rc == 0, result.err
    # the run's outputs went (unchanged); what is left is the new set and the run's log
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == \
        _listed_outputs(out) | {"metrics.json", "run.log"}


def test_run_into_a_register_folder_is_refused_without_overwrite_and_replaces_its_set_with_it(pair, tmp_path):
    out = tmp_path / "out"
    assert _register(pair, out).rc == 0
    register_set = _listed_outputs(out) | {"metrics.json"}
    (out / "notes.txt").write_text("mine\n")
    dataset = _dataset(tmp_path / "data")
    _assert_user_error(_run(dataset, out, "-q", "--no-report"), "not a dirio run folder", "metrics.json")
    result = _run(dataset, out, "-q", "--no-report", "--overwrite")
    assert result.rc == 0, result.err
    names = {p.name for p in out.iterdir()}
    assert not names & register_set and "notes.txt" in names and "run.json" in names
    assert "notes.txt" in result.err and "no earlier dirio run wrote" in result.err


# --- 1. run --overwrite deletes only what the earlier run wrote ----------------------------------


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_run_overwrite_deletes_only_what_the_earlier_run_wrote_and_says_what_it_kept(tmp_path):
    from dirio.io.manifest import earlier_outputs

    dataset = _dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert _run(dataset, out, "-q", "--itk-field").rc == 0
    written = _files(out)
    assert {"report/index.html", "itk/disp_0001_0000_0002_0000.nii.gz", "thumbnails/0001_0000_0002_0000.png",
            "status/0002_0000_0003_0000.json", "cases.csv"} <= written
    assert set(earlier_outputs(out)) == written - {"run.log"}  # the manifests name every file the run wrote
    mine = {"notes.txt": b"my notes\n", "disp_mine.nii.gz": b"my field",
            "status/mine.json": b'{"pair": "mine", "status": "done"}\n', "report/mine.css": b"body {}\n"}
    for name, content in mine.items():
        (out / name).write_bytes(content)
    result = _run(dataset, out, "--iterations", "4,2", "--overwrite")  # another configuration
    assert result.rc == 0, result.err
    for name, content in mine.items():
        assert (out / name).read_bytes() == content, name
    kept = [line for line in result.err.splitlines() if "kept" in line]
    assert kept == ["kept 4 file(s) that no earlier dirio run wrote: disp_mine.nii.gz, notes.txt, report/mine.css, "
                    "status/mine.json"]
    # the earlier run's files are gone (no ITK fields this time); the new run's are all recorded
    assert not (out / "itk").exists()
    assert set(earlier_outputs(out)) == _files(out) - set(mine) - {"run.log"}
    assert json.loads((out / "run.json").read_text())["config"]["pyramid"]["iterations"] == [4, 2]


def test_run_overwrite_refuses_to_replace_a_table_the_user_changed(tmp_path):
    dataset = _dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert _run(dataset, out, "-q", "--no-report").rc == 0
    with open(out / "cases.csv", "a") as handle:
        handle.write("my,own,row\n")
    before = _digests(out)
    _assert_user_error(_run(dataset, out, "-q", "--no-report", "--overwrite"), "cases.csv",
                       "not written by dirio or changed since", "--overwrite")
    assert _digests(out) == before


def test_run_overwrite_keeps_an_earlier_field_the_user_changed(tmp_path):
    dataset = _dataset(tmp_path / "data")
    out = tmp_path / "run"
    assert _run(dataset, out, "-q", "--no-report").rc == 0
    changed = out / "disp_0002_0000_0003_0000.nii.gz"
    _save(changed, np.ones(SHAPE + (3,), np.float32))
    content = changed.read_bytes()
    result = _run(dataset, out, "-q", "--no-report", "--overwrite", "--limit", "1")
    assert result.rc == 0, result.err
    assert changed.read_bytes() == content
    assert not (out / "status" / "0002_0000_0003_0000.json").exists()  # unchanged: removed
    assert result.err.splitlines() == ["kept 1 file(s) changed since dirio wrote them: disp_0002_0000_0003_0000.nii.gz"]


def test_run_overwrite_replaces_the_files_of_a_run_killed_before_its_tables(tmp_path, monkeypatch):
    import dirio.apps.runner as runner

    dataset = _dataset(tmp_path / "data")
    out = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_finish", killed)
    assert _run(dataset, out, "-q", "--no-report").rc == 130
    monkeypatch.undo()
    assert (out / "status" / "0001_0000_0002_0000.json").is_file() and not (out / "cases.csv").exists()
    result = _run(dataset, out, "-q", "--no-report", "--overwrite", "--iterations", "4,2")
    assert result.rc == 0, result.err
    assert result.err == ""  # every file was the earlier run's: nothing kept


def test_run_quiet_still_prints_each_failed_pair(tmp_path):
    dataset = _dataset(tmp_path / "data", missing="0003")
    result = _run(dataset, tmp_path / "run", "-q", "--no-report")
    assert result.rc == 1
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("failed: 0002_0000_0003_0000: ") and "T_0003_0000.nii.gz" in lines[0]


# --- 3. unusable output paths: one line, exit 2, before any work ---------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a registration, an evaluation or a training starts: the output must be refused first."""
    import dirio.apps.train as train
    import dirio.apps.workflow as workflow

    def forbidden(*args, **kwargs):
        raise AssertionError("the work started before the output was refused")

    for module, name in ((workflow, "register"), (workflow, "evaluate_field"), (train, "load_training_images")):
        monkeypatch.setattr(module, name, forbidden)


LONG_NAME = "a" * 300


def _unusable_outputs():
    outputs = [pytest.param(lambda tmp: tmp / LONG_NAME, "255", id="300-character-folder")]
    if LINUX_PSEUDO:
        outputs += [pytest.param(lambda tmp: Path("/proc/x"), "/proc/x", id="proc"),
                    pytest.param(lambda tmp: Path("/sys/x"), "/sys/x", id="sys")]
    return outputs


def _commands(pair, tmp_path, folder: Path) -> dict[str, list]:
    """Every command that writes, each with ``folder`` (or a file in it) as its output."""
    dataset = _dataset(tmp_path / "data")
    return {
        "register": ["register", pair.fixed, pair.moving, "-o", folder, *QUICK],
        "evaluate": ["evaluate", pair.field, pair.fixed, "-o", folder / "m.json"],
        "warp": ["warp", pair.moving, pair.field, "-o", folder / "y.nii.gz"],
        "convert": ["convert", pair.field, "-o", folder / "y.nii.gz"],
        "run": ["run", dataset, "-o", folder, "-q", *RUN_QUICK],
        "train": ["train", pair.fixed, pair.moving, "-o", folder, "--epochs", "1", "-q"],
        "sweep": ["sweep", pair.fixed, pair.moving, "-o", folder, "--weights", "1", *QUICK],
        "demo": ["demo", "-o", folder, "-q"],
    }


@pytest.mark.parametrize("output, named", _unusable_outputs())
def test_every_command_refuses_an_unusable_output_with_one_line_before_any_work(pair, tmp_path, output, named,
                                                                                  no_work):
    folder = output(tmp_path)
    for command, argv in _commands(pair, tmp_path, folder).items():
        result = run_cli(argv)
        assert result.rc == 2 and "Traceback" not in result.err, (command, result.err)
        _assert_user_error(result, named)
    assert LONG_NAME not in os.listdir(tmp_path)


def test_a_file_name_too_long_for_the_file_system_is_refused_before_any_work(pair, tmp_path, no_work):
    target = tmp_path / ("w" * 260 + ".nii.gz")
    _assert_user_error(run_cli(["warp", pair.moving, pair.field, "-o", target]), "255", "shorter")
    _assert_user_error(run_cli(["evaluate", pair.field, pair.fixed, "-o", tmp_path / ("m" * 260 + ".json")]), "255")


def test_a_long_file_name_that_fits_is_written_through_a_temporary_name_that_fits(pair, tmp_path):
    target = tmp_path / ("w" * 240 + ".nii.gz")  # 247 bytes: fits, but not with the 18-byte temporary prefix
    result = run_cli(["warp", pair.moving, pair.field, "-o", target])
    assert result.rc == 0, result.err
    assert np.allclose(np.asarray(nib.load(target).dataobj), np.asarray(nib.load(pair.moving).dataobj))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_the_output_probe_leaves_no_folder_behind(tmp_path):
    from dirio.io.atomic import check_output_folder

    check_output_folder(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []


# --- 4. run configs: file values from the config's folder ----------------------------------------


def test_a_run_config_takes_model_and_label_files_from_its_own_folder(tmp_path, monkeypatch):
    from dirio.config.files import run_configuration

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "net.pth").write_bytes(b"weights")
    (configs / "labels.txt").write_text("2 3\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "labels.txt").write_text("7\n")  # the folder dirio runs in must not be looked at
    monkeypatch.chdir(elsewhere)
    config = configs / "run.toml"
    config.write_text('method = "network"\nmodel = "net.pth"\nlabel_ids = "labels.txt"\n')
    configuration = run_configuration(config)
    assert configuration.settings.network.model == str(configs / "net.pth")
    assert configuration.label_ids == [2, 3]


def test_a_missing_model_in_a_run_config_is_a_usage_error_before_any_work(tmp_path, monkeypatch):
    import dirio.apps.runner as runner

    dataset = _dataset(tmp_path / "data")
    config = tmp_path / "configs" / "run.toml"
    config.parent.mkdir()
    config.write_text('method = "network"\nmodel = "missing.pth"\n')
    monkeypatch.setattr(runner, "register_pair", lambda *a, **k: pytest.fail("a pair was started"))
    out = tmp_path / "run"
    _assert_user_error(run_cli(["run", dataset, "-o", out, "--config", config, "-q"]), str(config),
                       str(config.parent / "missing.pth"), "not found")
    assert not out.exists()
    _assert_user_error(run_cli(["run", dataset, "-o", out, "--model", tmp_path / "nope.pth", "-q"]), "nope.pth",
                       "--model")


# --- 4. grid mismatches report the distance between voxel centres --------------------------------


def _rotated_affine(angle: float) -> np.ndarray:
    """A 1 mm grid rotated by ``angle`` (rad) about the k axis through voxel 0."""
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return affine


def test_grid_mismatch_messages_report_how_far_apart_the_voxel_centres_are(pair, tmp_path, no_work):
    angle = 0.3
    # (R - I) moves voxel v by 2 sin(angle / 2) |(v_i, v_j)|, largest at the corner (11, 13, *):
    expected = 2 * np.sin(angle / 2) * np.hypot(SHAPE[0] - 1, SHAPE[1] - 1)  # 5.09 mm
    entries = np.abs(_rotated_affine(angle) - np.eye(4)).max()  # 0.296: what the message used to say
    assert abs(expected - entries) > 4
    volume = np.asarray(nib.load(pair.fixed).dataobj)
    fixed = _save(tmp_path / "fixed.nii.gz", volume, np.eye(4))
    moving = _save(tmp_path / "moving.nii.gz", volume, _rotated_affine(angle))
    line = _assert_user_error(run_cli(["register", fixed, moving, "-o", tmp_path / "out", *QUICK]), "moving.nii.gz")
    assert f"differs by up to {expected:.4g} mm" in line, line
    field = _save(tmp_path / "disp.nii.gz", np.zeros(SHAPE + (3,), np.float32), _rotated_affine(angle))
    line = _assert_user_error(run_cli(["warp", fixed, field, "-o", tmp_path / "w.nii.gz"]), "disp.nii.gz")
    assert f"differs by up to {expected:.4g} mm" in line, line
    line = _assert_user_error(run_cli(["evaluate", field, fixed]), "disp.nii.gz")
    assert f"differs by up to {expected:.4g} mm" in line, line


def test_voxel_centre_distance_of_a_translation_is_its_length_and_2d_grids_use_their_corners():
    from dirio.io.images import voxel_centre_distance_mm

    shifted = np.eye(4)
    shifted[:3, 3] = (3.0, 4.0, 0.0)
    assert voxel_centre_distance_mm((5, 6, 7), np.eye(4), shifted) == pytest.approx(5.0)
    scaled = np.diag([2.0, 1.0, 1.0, 1.0])  # voxel (i, j) moves by i mm: largest at i = 9
    assert voxel_centre_distance_mm((10, 4), np.eye(4), scaled) == pytest.approx(9.0)


def test_a_report_rebuilt_by_dirio_report_stays_the_runs_output_for_overwrite(tmp_path):
    dataset = _dataset(tmp_path / "data", cases=2)
    out = tmp_path / "run"
    assert _run(dataset, out, "-q").rc == 0
    index = (out / "report" / "index.html").read_bytes()
    (out / "thumbnails" / "0001_0000_0002_0000.png").unlink()  # the rebuilt page differs: no thumbnail
    assert run_cli(["report", out]).rc == 0
    assert (out / "report" / "index.html").read_bytes() != index
    result = _run(dataset, out, "-q", "--overwrite")
    assert result.rc == 0, result.err
    assert result.err == ""


# --- 1. the same rule for sweep and demo -----------------------------------------------------------


def test_sweep_overwrite_replaces_its_own_outputs_only(pair, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", pair.fixed, pair.moving, "-o", out, "--weights", "1", "--rules", "sum", *QUICK]
    assert run_cli(argv).rc == 0
    result = run_cli([*argv, "--overwrite"])
    assert result.rc == 0, result.err
    with open(out / "sweep.md", "a") as handle:
        handle.write("my conclusions\n")
    before = _digests(out)
    _assert_user_error(run_cli([*argv, "--overwrite"]), "sweep.md", "not written by dirio or changed since")
    assert _digests(out) == before


def test_demo_overwrite_refuses_to_replace_an_input_the_user_changed(tmp_path, monkeypatch):
    import dirio.apps.demo as demo
    from dirio.errors import DirioError

    volume = gaussian_filter(np.random.default_rng(5).standard_normal((16, 16, 16)), 2.0).astype(np.float32)
    volume = (volume - volume.min()) / np.ptp(volume)
    tissue = (volume > 0.5).astype(np.uint8) + (volume > 0.7)
    monkeypatch.setattr(demo, "load_template", lambda resolution: (volume, tissue, np.diag([8.0, 8, 8, 1])))
    real_settings = demo.make_settings
    monkeypatch.setattr(demo, "make_settings", lambda *a, **k: real_settings(*a, **{**k, "iterations": (2, 1)}))
    demo.run_demo(tmp_path, resolution=8.0, quiet=True)
    demo.run_demo(tmp_path, resolution=8.0, quiet=True, overwrite=True)  # its own files: replaced
    _save(tmp_path / "inputs" / "moving.nii.gz", np.zeros(SHAPE, np.float32))
    before = _digests(tmp_path)
    with pytest.raises(DirioError, match="moving.nii.gz"):
        demo.run_demo(tmp_path, resolution=8.0, quiet=True, overwrite=True)
    assert _digests(tmp_path) == before


# --- the manifests themselves ----------------------------------------------------------------------


def test_a_signed_record_survives_its_json_round_trip_and_is_refused_once_edited(tmp_path):
    from dirio.io.atomic import write_json
    from dirio.io.manifest import read_signed_record, sign_record

    record = {"dice": np.float32(0.5), "hd95": float("nan"), "per_label": {1: 0.25, 2: float("inf")},
              "path": Path("out") / "disp.nii.gz", "shape": (3, 4)}
    path = tmp_path / "metrics.json"
    write_json(path, sign_record(record))
    assert read_signed_record(path)["per_label"] == {"1": 0.25, "2": float("inf")}
    path.write_text(path.read_text().replace("0.25", "0.26"))  # edited by hand
    assert read_signed_record(path) is None
    write_json(path, record, overwrite=True)  # unsigned
    assert read_signed_record(path) is None
    path.write_text("{not json")
    assert read_signed_record(path) is None


def test_a_manifest_naming_files_outside_its_folder_deletes_nothing_there(tmp_path):
    from dirio.io.atomic import write_json
    from dirio.io.manifest import earlier_outputs, replace_earlier_outputs, sign_record

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.txt").write_text("keep me too\n")
    out = tmp_path / "out"
    (out / "status").mkdir(parents=True)
    (out / "linked").symlink_to(elsewhere)
    digest = hashlib.sha256(b"keep me\n").hexdigest()
    record = {"pair": "x", "files": {"../precious.txt": digest, str(victim): digest,
                                     "linked/a.txt": hashlib.sha256(b"keep me too\n").hexdigest()}}
    write_json(out / "status" / "x.json", sign_record(record))
    assert set(earlier_outputs(out)) == {"status/x.json"}
    replace_earlier_outputs(out, [])
    assert victim.read_text() == "keep me\n" and (elsewhere / "a.txt").read_text() == "keep me too\n"
