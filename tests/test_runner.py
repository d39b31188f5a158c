"""``dirio run`` over a Learn2Reg-style dataset: outputs, resumption after SIGKILL, failures, config files,
and the exported fields scored by an independent re-implementation of the Learn2Reg evaluation.

The dataset is built on the fly from the voxelmorph test scan (../shared/data), taken every fourth
voxel (40x48x56, 4 mm voxels): case 1 is the scan, cases 2-5 are smooth random warps of it
(dirio.testing.synthetic), with label maps, brain masks and exactly corresponding keypoints (label
centroids mapped through the known fields).
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from dirio.apps.cli import main as dirio_main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "voxelmorph-brain"
# A fast configuration: two levels (half, full resolution of the 40x48x56 grid), few iterations.
FAST_TOML = 'preset = "brain-mri"\nlevels = [2, 1]\niterations = [20, 10]\n'
SECONDS_COLUMN = "seconds"


def build_dataset(folder: Path, cases: int = 5) -> Path:
    """The small Learn2Reg-style dataset of this module (skips when ../shared/data is absent)."""
    if not (DATA / "test_scan_vol.nii.gz").exists():
        pytest.skip(f"real data not found at {DATA} (../shared/data beside the repository)")
    import nibabel as nib

    from dirio.io.dataset import write_synthetic_dataset

    volume = nib.load(DATA / "test_scan_vol.nii.gz")
    image = np.ascontiguousarray(np.asarray(volume.dataobj, dtype=np.float32)[::4, ::4, ::4])
    labels = np.ascontiguousarray(np.asarray(nib.load(DATA / "test_scan_seg.nii.gz").dataobj).astype(np.int16)[::4, ::4, ::4])
    affine = volume.affine @ np.diag([4.0, 4.0, 4.0, 1.0])
    return write_synthetic_dataset(folder, image, labels, affine, cases=cases, max_displacement=2.0, sigma=4.0)


def write_config(folder: Path, text: str = FAST_TOML, name: str = "fast.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def run_in_process(*args) -> int:
    """``dirio run ...`` in this process; torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        return dirio_main(["run", *map(str, args)])
    finally:
        torch.set_num_threads(threads)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != SECONDS_COLUMN} for row in rows]


def field_bytes(out: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(out.glob("disp_*.nii.gz"))}


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob(".tmp-*")]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("l2r"))


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="module")
def reference(dataset, config, tmp_path_factory) -> Path:
    """One uninterrupted single-process run of the validation split (4 pairs), no report."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert run_in_process(dataset, "--split", "val", "-o", out, "--config", config, "--threads", "1",
                          "--no-report", "-q") == 0
    return out


# --- outputs -----------------------------------------------------------------------------------


def test_a_run_writes_official_fields_tables_and_records(reference, dataset):
    import nibabel as nib

    names = sorted(p.name for p in reference.glob("disp_*.nii.gz"))
    assert names == ["disp_0001_0000_0002_0000.nii.gz", "disp_0002_0000_0003_0000.nii.gz", "disp_0003_0000_0004_0000.nii.gz", "disp_0004_0000_0005_0000.nii.gz"]
    fixed = nib.load(dataset.parent / "imagesTr" / "SYNTH_0001_0000.nii.gz")
    field = nib.load(reference / "disp_0001_0000_0002_0000.nii.gz")
    assert field.shape == fixed.shape + (3,) and field.get_data_dtype() == np.float32
    assert np.allclose(field.affine, fixed.affine)

    rows = read_rows(reference / "cases.csv")
    assert list(rows[0]) == ["pair", "fixed", "moving", "status", "seconds", "dice", "hd95", "sdlogj", "fold_percent",
                             "ndv_percent", "tre_mm", "dice_before", "tre_mm_before", "error"]
    assert [r["pair"] for r in rows] == ["0001_0000_0002_0000", "0002_0000_0003_0000", "0003_0000_0004_0000", "0004_0000_0005_0000"]
    for row in rows:
        assert row["status"] == "done" and row["error"] == ""
        assert float(row["dice"]) > float(row["dice_before"])
        assert float(row["tre_mm"]) >= 0 and float(row["sdlogj"]) > 0

    labels = read_rows(reference / "labels.csv")
    assert list(labels[0]) == ["pair", "label", "dice", "hd95"]
    assert {r["pair"] for r in labels} == {r["pair"] for r in rows}

    run = json.loads((reference / "run.json").read_text())
    assert run["split"] == "val" and run["pairs"] == 4 and run["done"] == 4 and run["failed"] == 0
    assert run["world_size"] == 1 and run["finished"] and run["config"]["pyramid"]["levels"] == [2, 1]
    for key in ("dataset", "config_file", "config_hash", "versions", "started", "seconds", "device"):
        assert key in run

    summary = json.loads((reference / "summary.json").read_text())
    assert summary["eval_version"] == "2.0" and summary["failed"] == [] and summary["name"] == "SYNTH"
    assert list(summary["cases"]) == ["0001_0000<--0002_0000", "0002_0000<--0003_0000", "0003_0000<--0004_0000",
                                      "0004_0000<--0005_0000"]
    case = summary["cases"]["0001_0000<--0002_0000"]
    assert set(case) >= {"LogJacDetStd", "DSC", "HD95", "TRE_kp", "num_foldings"}
    assert set(summary["aggregates"]["DSC"]) == {"mean", "std", "30"}
    log = (reference / "run.log").read_text()
    assert "[4/4] 0004_0000_0005_0000 done in" in log and "ETA" in log
    assert sorted(p.name for p in (reference / "status").iterdir()) == [f"{r['pair']}.json" for r in rows]


def test_a_rerun_skips_every_finished_pair(reference, dataset, config, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = {p.name: p.read_bytes() for p in (out / "status").iterdir()}
    assert run_in_process(dataset, "-o", out, "--config", config, "--threads", "1", "--no-report", "-q") == 0
    assert {p.name: p.read_bytes() for p in (out / "status").iterdir()} == before
    assert (out / "run.log").read_text().count("already done, skipped") == 4


def test_a_pair_whose_field_file_was_damaged_is_done_again(reference, dataset, config, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    damaged = out / "disp_0002_0000_0003_0000.nii.gz"
    damaged.write_bytes(damaged.read_bytes()[:200])
    assert run_in_process(dataset, "-o", out, "--config", config, "--threads", "1", "--no-report", "-q") == 0
    assert np.array_equal(field_bytes(out)["disp_0002_0000_0003_0000.nii.gz"], field_bytes(reference)["disp_0002_0000_0003_0000.nii.gz"])
    assert (out / "run.log").read_text().count("already done, skipped") == 3


# --- SIGKILL midway ----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_killed_midway_resumes_to_identical_results(reference, dataset, config, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dirio", "run", str(dataset), "-o", str(out), "--config", str(config),
               "--threads", "1", "--no-report", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list(out.glob("status/*.json")):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no pair finished within 120 s"
            time.sleep(0.02)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finished_before_kill = {p.name: p.read_bytes() for p in (out / "status").glob("*.json")}
    assert 1 <= len(finished_before_kill) < 4
    assert not (out / "cases.csv").exists()

    assert run_in_process(dataset, "-o", out, "--config", config, "--threads", "1", "--no-report", "-q") == 0
    # finished pairs were not redone: their records are byte for byte the same
    for name, content in finished_before_kill.items():
        assert (out / "status" / name).read_bytes() == content
    assert (out / "run.log").read_text().count("already done, skipped") == len(finished_before_kill)
    # identical fields and tables, one row and one record per pair, no partial files
    reference_fields, fields = field_bytes(reference), field_bytes(out)
    assert list(fields) == list(reference_fields)
    for name in fields:
        assert np.array_equal(fields[name], reference_fields[name]), name
    assert without_seconds(read_rows(out / "cases.csv")) == without_seconds(read_rows(reference / "cases.csv"))
    assert read_rows(out / "labels.csv") == read_rows(reference / "labels.csv")
    assert len(list((out / "status").iterdir())) == 4
    assert temporaries(out) == []


# --- failures ----------------------------------------------------------------------------------


def broken_copy(dataset: Path, tmp_path: Path) -> Path:
    """A copy of the dataset folder with case 3's image truncated and case 5's image deleted."""
    root = tmp_path / "dataset"
    shutil.copytree(dataset.parent, root)
    corrupt = root / "imagesTr" / "SYNTH_0003_0000.nii.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:300])
    (root / "imagesTr" / "SYNTH_0005_0000.nii.gz").unlink()
    return root


def test_corrupt_and_missing_inputs_fail_their_pairs_only_and_exit_1(dataset, config, tmp_path, capsys):
    root = broken_copy(dataset, tmp_path)
    out = tmp_path / "out"
    assert run_in_process(root / dataset.name, "-o", out, "--config", config, "--threads", "1", "--no-report", "-q") == 1

    rows = {r["pair"]: r for r in read_rows(out / "cases.csv")}
    assert rows["0001_0000_0002_0000"]["status"] == "done"
    for pair in ("0002_0000_0003_0000", "0003_0000_0004_0000", "0004_0000_0005_0000"):
        assert rows[pair]["status"] == "failed" and rows[pair]["dice"] == ""
        assert "\n" not in rows[pair]["error"]
    assert "SYNTH_0003_0000.nii.gz" in rows["0002_0000_0003_0000"]["error"]
    assert "SYNTH_0005_0000.nii.gz" in rows["0004_0000_0005_0000"]["error"]
    summary = json.loads((out / "summary.json").read_text())
    assert [f["pair"] for f in summary["failed"]] == ["0002_0000_0003_0000", "0003_0000_0004_0000", "0004_0000_0005_0000"]
    assert list(summary["cases"]) == ["0001_0000<--0002_0000"] and summary["done"] == 1
    assert sorted(p.name for p in out.glob("disp_*")) == ["disp_0001_0000_0002_0000.nii.gz"]
    assert json.loads((out / "run.json").read_text())["failed"] == 3

    # repaired inputs: the next run retries the failed pairs and keeps the finished one
    shutil.copy(dataset.parent / "imagesTr" / "SYNTH_0003_0000.nii.gz", root / "imagesTr")
    shutil.copy(dataset.parent / "imagesTr" / "SYNTH_0005_0000.nii.gz", root / "imagesTr")
    assert run_in_process(root / dataset.name, "-o", out, "--config", config, "--threads", "1", "--no-report", "-q") == 0
    assert all(r["status"] == "done" for r in read_rows(out / "cases.csv"))
    assert (out / "run.log").read_text().count("already done, skipped") == 1


def test_resuming_into_a_run_of_another_configuration_is_refused(dataset, config, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_in_process(dataset, "-o", out, "--config", config, "--threads", "1", "--no-report", "-q",
                          "--limit", "1") == 0
    records = {p.name: p.read_bytes() for p in (out / "status").iterdir()}
    capsys.readouterr()
    assert run_in_process(dataset, "-o", out, "--config", config, "--lr", "0.3", "--no-report", "-q") == 2
    error = capsys.readouterr().err
    assert error.startswith("dirio: error: ") and "another configuration" in error and error.count("\n") == 1
    assert {p.name: p.read_bytes() for p in (out / "status").iterdir()} == records
    # another split is another run too
    assert run_in_process(dataset, "--split", "test", "-o", out, "--config", config, "--no-report", "-q") == 2
    # --overwrite starts again in the same folder
    assert run_in_process(dataset, "-o", out, "--config", config, "--lr", "0.3", "--threads", "1", "--no-report",
                          "-q", "--limit", "1", "--overwrite") == 0
    assert json.loads((out / "run.json").read_text())["config"]["optimization"]["lr"] == 0.3


def test_a_folder_that_is_not_a_run_folder_is_refused(dataset, config, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_in_process(dataset, "-o", out, "--config", config, "--no-report", "-q") == 2
    assert "not a dirio run folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# --- configuration files -----------------------------------------------------------------------


def test_toml_yaml_and_command_line_options_give_the_same_settings(tmp_path):
    from dirio.apps.cli import build_parser, settings_from_args
    from dirio.config.files import run_configuration

    toml = write_config(tmp_path, 'preset = "brain-mri"\nlevels = "4,2"\niterations = [30, 15]\n'
                                  'similarity-options = {window = 7}\nregularizer = {diffusion = 0.5}\n'
                                  'combine = "pcgrad"\ndiffeomorphic = true\nconvex_symmetric = false\n'
                                  'label_ids = [2, 3]\ntre_order = 1\n', "c.toml")
    yaml = write_config(tmp_path, 'preset: brain-mri\nlevels: [4, 2]\niterations: "30,15"\n'
                                  'similarity_options: {window: 7}\nregularizer: "diffusion=0.5"\n'
                                  'combine: pcgrad\ndiffeomorphic: true\nconvex-symmetric: "false"\n'
                                  'label_ids: "2,3"\ntre_order: 1\n', "c.yaml")
    args = build_parser().parse_args(["register", "f", "m", "-o", "o", "--preset", "brain-mri", "--levels", "4,2",
                                      "--iterations", "30,15", "--similarity-options", "window=7",
                                      "--regularizer", "diffusion=0.5", "--combine", "pcgrad", "--diffeomorphic",
                                      "--convex-symmetric", "false", "-q"])
    flags = settings_from_args(args).to_dict()
    from_toml, from_yaml = run_configuration(toml), run_configuration(yaml)
    assert from_toml.settings.to_dict() == flags == from_yaml.settings.to_dict()
    assert from_toml.label_ids == from_yaml.label_ids == [2, 3] and from_toml.tre_order == 1
    # command-line options override the file's
    assert run_configuration(toml, {"lr": 0.25}).settings.optimization.lr == 0.25


@pytest.mark.parametrize("text, message", [
    ("preset = \"brain-mri\"\nwindow_size = 3\n", "unknown key 'window_size'"),
    ("levels = [2.5]\n", "key 'levels' expects integers"),
    ("similarity = \"cosine\"\n", "key 'similarity': 'cosine' is not one of"),
    ("lr = \"fast\"\n", "key 'lr'"),
    ("preset = \"bones\"\n", "key 'preset'"),
    ("levels = [\n", "not valid TOML"),
])
def test_config_file_errors_are_one_line_and_name_the_file_and_the_key(dataset, tmp_path, capsys, text, message):
    config = write_config(tmp_path, text, "bad.toml")
    assert run_in_process(dataset, "-o", tmp_path / "out", "--config", config, "-q") == 2
    error = capsys.readouterr().err
    assert error.startswith("dirio: error: ") and error.count("\n") == 1
    assert str(config) in error and message in error
    assert not (tmp_path / "out").exists()


def test_an_unknown_config_suffix_is_refused(dataset, tmp_path, capsys):
    config = write_config(tmp_path, "{}", "c.json")
    assert run_in_process(dataset, "-o", tmp_path / "out", "--config", config) == 2
    assert "TOML (.toml) or YAML" in capsys.readouterr().err


# --- the exported fields scored by an independent Learn2Reg evaluation -------------------------
#
# Written from the evaluator's logic (evaluation.py / utils.py, eval_version 2.0), not from dirio's
# code: fields read with nibabel get_fdata (float64); labels warped with map_coordinates order 0;
# Dice per label with NaN for a label missing in the fixed or the moving map, nanmean over labels;
# SDlogJ as std(log(clip(det + 3, 1e-9, 1e9))) of central-difference Jacobians cropped by 2 voxels;
# TRE with cubic map_coordinates of the field at the fixed keypoints, times the moving spacing;
# aggregates mean, std, and quantile 0.3 (DSC, HD95) or 0.7 (SDlogJ, TRE).
# HD95 is a simpler variant: the same surfel positions (voxel corners with a mixed 2x2x2 neighbourhood)
# and Euclidean distances, but every surfel weighted alike where the evaluator's surface-distance
# package weights them by their area. On these small labels (a few hundred voxels at 4 mm) the 5 % tail
# is a handful of surfels, so per label the two differ by up to 2 voxels and the case means by less
# than 0.5 voxel; dirio's area-weighted HD95 is checked against DeepMind's package itself in
# test_metrics.py (test_hd95_matches_deepmind_surface_distance_when_installed).


def l2r_dice(fixed, moving, warped, labels):
    values = []
    for label in labels:
        if not (fixed == label).any() or not (moving == label).any():
            values.append(np.nan)
            continue
        a, b = fixed == label, warped == label
        values.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return np.nanmean(values), values


def l2r_sdlogj(disp):
    gradients = np.stack([np.stack(np.gradient(disp[..., c]), axis=-1) for c in range(3)], axis=-2)  # [..., c, axis]
    jacobian = gradients + np.eye(3)
    det = np.linalg.det(jacobian[2:-2, 2:-2, 2:-2])
    return np.log(np.clip(det + 3, 1e-9, 1e9)).std()


def l2r_tre(fixed_points, moving_points, disp, spacing):
    sampled = np.stack([ndimage.map_coordinates(disp[..., c], fixed_points.T) for c in range(3)], axis=1)
    return np.linalg.norm((fixed_points + sampled - moving_points) * spacing, axis=1)


def corner_surface(mask):
    """Voxel corners whose 2x2x2 neighbourhood holds both inside and outside voxels (the surfel positions)."""
    padded = np.pad(mask, 1).astype(np.int8)
    count = sum(padded[i:i + mask.shape[0] + 1, j:j + mask.shape[1] + 1, k:k + mask.shape[2] + 1]
                for i in (0, 1) for j in (0, 1) for k in (0, 1))
    return (count > 0) & (count < 8)


def surface_hd95(a, b):
    """HD95 between corner surfaces with every surfel weighted alike (the evaluator weights by area)."""
    if not a.any() or not b.any():
        return np.inf
    surface_a, surface_b = corner_surface(a), corner_surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a)[surface_b]
    return max(np.percentile(to_b, 95, method="inverted_cdf"), np.percentile(to_a, 95, method="inverted_cdf"))


def test_exported_fields_score_the_same_in_an_independent_learn2reg_evaluation(reference, dataset):
    import nibabel as nib

    content = json.loads(dataset.read_text())
    labels = sorted(int(k) for k in content["labels"] if int(k) != 0)
    root = dataset.parent
    summary = json.loads((reference / "summary.json").read_text())
    rows = {r["pair"]: r for r in read_rows(reference / "cases.csv")}
    per_metric = {"DSC": [], "HD95": [], "LogJacDetStd": [], "TRE_kp": []}
    for pair in content["registration_val"]:
        fixed, moving = pair["fixed"], pair["moving"]
        # the evaluator's naming rule: the short name only for modalities 0000 <- 0001, else the long one
        short = fixed[-11:-7] == "0000" and moving[-11:-7] == "0001"
        name = (f"disp_{fixed[-16:-12]}_{moving[-16:-12]}.nii.gz" if short else
                f"disp_{fixed[-16:-12]}_{fixed[-11:-7]}_{moving[-16:-12]}_{moving[-11:-7]}.nii.gz")
        key = f"{fixed[-16:-12]}_{fixed[-11:-7]}<--{moving[-16:-12]}_{moving[-11:-7]}"
        disp = nib.load(reference / name).get_fdata()
        fixed_seg = nib.load(root / fixed.replace("images", "labels")).get_fdata()
        moving_seg = nib.load(root / moving.replace("images", "labels")).get_fdata()
        assert disp.shape == fixed_seg.shape + (3,)
        identity = np.meshgrid(*[np.arange(n) for n in fixed_seg.shape], indexing="ij")
        warped = ndimage.map_coordinates(moving_seg, identity + disp.transpose(3, 0, 1, 2), order=0)
        dice, dice_detailed = l2r_dice(fixed_seg, moving_seg, warped, labels)
        sdlogj = l2r_sdlogj(disp)
        keypoints = lambda image: np.loadtxt(root / image.replace("images", "keypoints").replace(".nii.gz", ".csv"),  # noqa: E731
                                             delimiter=",")
        spacing = nib.load(root / moving).header.get_zooms()[:3]
        tre = l2r_tre(keypoints(fixed), keypoints(moving), disp, spacing)

        case = summary["cases"][key]
        assert case["DSC"]["mean"] == pytest.approx(dice, abs=1e-12)
        np.testing.assert_allclose(case["DSC"]["detailed"], dice_detailed, atol=1e-12)
        assert case["LogJacDetStd"]["mean"] == pytest.approx(sdlogj, rel=1e-9)
        assert case["TRE_kp"]["mean"] == pytest.approx(tre.mean(), rel=1e-9)
        np.testing.assert_allclose(case["TRE_kp"]["detailed"], tre, rtol=1e-9)
        row = rows[name[len("disp_"):-len(".nii.gz")]]
        assert float(row["dice"]) == pytest.approx(dice, abs=1e-12)
        assert float(row["sdlogj"]) == pytest.approx(sdlogj, rel=1e-9)
        assert float(row["tre_mm"]) == pytest.approx(tre.mean(), rel=1e-9)
        simple_hd95 = []
        for label, value in zip(labels, case["HD95"]["detailed"]):
            if not (fixed_seg == label).any() or not (moving_seg == label).any():
                assert np.isnan(value)
                simple_hd95.append(np.nan)
                continue
            simple = surface_hd95(fixed_seg == label, warped == label)
            assert (np.isinf(value) and np.isinf(simple)) or abs(value - simple) <= 2.0, (key, label, value, simple)
            simple_hd95.append(simple)
        simple_mean = np.nanmean(simple_hd95)
        assert case["HD95"]["mean"] == simple_mean or abs(case["HD95"]["mean"] - simple_mean) < 0.5
        per_metric["DSC"].append(dice)
        per_metric["HD95"].append(case["HD95"]["mean"])
        per_metric["LogJacDetStd"].append(sdlogj)
        per_metric["TRE_kp"].append(tre.mean())

    for metric, quantile in (("DSC", 0.3), ("HD95", 0.3), ("LogJacDetStd", 0.7), ("TRE_kp", 0.7)):
        values = np.array(per_metric[metric])
        aggregate = summary["aggregates"][metric]
        with np.errstate(invalid="ignore"):
            expected = {"mean": values.mean(), "std": values.std(), "30": np.quantile(values, quantile)}
        for name, value in expected.items():
            if np.isnan(value):
                assert np.isnan(aggregate[name]), (metric, name)
            else:
                assert aggregate[name] == pytest.approx(value, rel=1e-9), (metric, name)


def test_a_run_with_the_report_draws_a_thumbnail_per_pair_and_the_page(dataset, config, tmp_path):
    out = tmp_path / "out"
    assert run_in_process(dataset, "-o", out, "--config", config, "--threads", "1", "-q", "--limit", "1") == 0
    assert sorted(p.name for p in (out / "thumbnails").iterdir()) == ["0001_0000_0002_0000.png"]
    assert (out / "thumbnails" / "0001_0000_0002_0000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "0001_0000_0002_0000" in (out / "report" / "index.html").read_text(encoding="utf-8")
