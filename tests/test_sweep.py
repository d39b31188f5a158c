"""Pareto sweeps: the front on hand-made points, the runs of a sweep, and ``dirio sweep`` end to end
on a tiny 2D pair with label maps."""

import csv
import json
import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from dirio.apps.cli import main
from dirio.io.images import save_image
from dirio.config.settings import make_settings
from dirio.apps.sweep import check_sweep_options, pareto_mask, rows_markdown, run_sweep, settings_for_run, sweep_runs
from dirio.testing.synthetic import warped_pair


pytestmark = pytest.mark.usefixtures("one_thread")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = dict(levels=(2, 1), iterations=(8, 4), progress=False)


def test_pareto_mask_on_hand_made_points():
    costs = np.array([
        [1.0, 5.0],  # front
        [2.0, 3.0],  # front
        [3.0, 3.0],  # dominated by [2, 3]
        [4.0, 1.0],  # front
        [4.0, 1.0],  # tie with the previous: both kept
        [5.0, 4.0],  # dominated
        [np.nan, 0.0],  # NaN: never on the front, dominates nothing
    ])
    assert pareto_mask(costs).tolist() == [True, True, False, True, True, False, False]


def test_sweep_runs_every_weight_per_rule_and_surgery_once():
    runs = sweep_runs(["sum", "surgery", "pcgrad"], [1.0, 0.1, 1.0])
    assert runs[:2] == [("sum", 0.1), ("sum", 1.0)]
    assert runs[2][0] == "surgery" and math.isnan(runs[2][1])
    assert runs[3:] == [("pcgrad", 0.1), ("pcgrad", 1.0)]
    with pytest.raises(ValueError, match="unknown combination rule"):
        sweep_runs(["mgda"], [1.0])
    with pytest.raises(ValueError, match="positive"):
        sweep_runs(["sum"], [0.0])


def test_settings_for_run_sets_every_weight_and_keeps_only_the_rules_options():
    base = make_settings(regularizers={"diffusion": 1.0, "bending": 2.0},
                         combine_options={"scope": "block", "project": "similarity"})
    run = settings_for_run(base, "surgery", 0.5)
    assert run.terms.regularizers == {"diffusion": 0.5, "bending": 0.5}
    assert run.optimization.combine == "surgery" and run.optimization.combine_options == {"scope": "block"}
    assert settings_for_run(base, "sum", 0.5).optimization.combine_options == {"scope": "block"}  # its diagnostics' scope
    with pytest.raises(ValueError, match="lambda_"):
        check_sweep_options(["sum", "surgery"], {"lambda_": 1.0})
    assert base.terms.regularizers == {"diffusion": 1.0, "bending": 2.0}  # the base is not modified


def tiny_pair(shape=(32, 32)):
    rng = np.random.default_rng(0)
    image = gaussian_filter(rng.random(shape), 2.0)
    image = ((image - image.min()) / (image.max() - image.min())).astype(np.float32)
    labels = (image > 0.5).astype(np.uint8) + (image > 0.7).astype(np.uint8)
    return warped_pair(image, labels, sigma=5.0, max_displacement=2.0, seed=1)


def test_run_sweep_scores_every_run_and_the_regulariser_weight_trades_accuracy_for_smoothness():
    pair = tiny_pair()
    settings = make_settings(similarity="mse", normalise="none", **FAST)
    rows = run_sweep(pair.fixed, pair.moving, settings=settings, weights=[0.01, 100.0], rules=["sum", "surgery"],
                     fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels)
    assert [(r["rule"], r["weight"]) for r in rows[:2]] == [("sum", 0.01), ("sum", 100.0)]
    assert rows[2]["rule"] == "surgery"
    for row in rows:
        for key in ("dice_mean", "similarity", "sdlogj_l2r", "percent_nonpositive_jacobian", "ndv_percent",
                    "front_sdlogj_l2r", "seconds", "conflict_rate"):
            assert key in row
    weak, strong = rows[0], rows[1]
    assert strong["sdlogj_l2r"] < weak["sdlogj_l2r"]
    assert strong["similarity"] > weak["similarity"]
    assert "| sum | 0.01 |" in rows_markdown(rows)


def test_dirio_sweep_writes_the_table_json_and_pareto_figure(tmp_path, capsys):
    pair = tiny_pair()
    paths = {}
    for name in ("fixed", "moving", "fixed_labels", "moving_labels"):
        paths[name] = tmp_path / f"{name}.nii.gz"
        save_image(paths[name], getattr(pair, name), np.eye(4))
    out = tmp_path / "sweep"
    argv = ["sweep", str(paths["fixed"]), str(paths["moving"]), "-o", str(out), "--ndim", "2",
            "--weights", "0.1,1", "--rules", "sum,pcgrad,surgery", "--similarity", "mse", "--normalise", "none",
            "--fixed-labels", str(paths["fixed_labels"]), "--moving-labels", str(paths["moving_labels"]),
            "--levels", "2,1", "--iterations", "6,3", "--combine-options", "scope=block,block_size=8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| pcgrad | 0.1 |" in printed
    record = json.loads((out / "sweep.json").read_text())
    assert [(r["rule"], r["weight"]) for r in record["rows"] if r["rule"] != "surgery"] == [
        ("sum", 0.1), ("sum", 1.0), ("pcgrad", 0.1), ("pcgrad", 1.0)]
    assert record["accuracy"] == "dice_mean"
    with open(out / "sweep.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 5
    assert (out / "pareto.png").read_bytes()[:8] == PNG_SIGNATURE
    # a second run refuses to replace the outputs
    assert main(argv + ["-q"]) == 2
    assert "exists" in capsys.readouterr().err


def test_dirio_sweep_rejects_an_unknown_rule_before_registering(tmp_path, capsys):
    pair = tiny_pair((16, 16))
    for name in ("fixed", "moving"):
        save_image(tmp_path / f"{name}.nii.gz", getattr(pair, name), np.eye(4))
    code = main(["sweep", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(tmp_path / "o"),
                 "--ndim", "2", "--weights", "1", "--rules", "sum,mgda"])
    assert code == 2
    assert "mgda" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
