"""``benchmarks/gpu_check.py --smoke`` runs every section on the CPU and writes sane numbers, so that the
GPU script cannot rot between the rare sessions that have a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
SECTIONS = ("brain_mri_dense", "lapirn_direct", "nio", "io_pcgrad_50", "train", "torchrun")


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def a_dice(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def smoke_record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--threads", "1", "--out", str(out)],
                               capture_output=True, text=True, env=env, timeout=600)
    assert out.is_file(), completed.stderr[-3000:]
    record = json.loads(out.read_text())
    failed = {name: r.get("error") for name, r in record["sections"].items() if not r["ok"]}
    assert completed.returncode == 0 and not failed, (failed, completed.stderr[-3000:])
    return record


def test_every_section_ran_and_none_errored(smoke_record):
    assert smoke_record["smoke"] is True and smoke_record["machine"]["device"] == "cpu"
    assert tuple(smoke_record["sections"]) == SECTIONS
    assert all(r["ok"] and positive(r["section_seconds"]) for r in smoke_record["sections"].values())
    assert positive(smoke_record["total_seconds"])


def test_the_dense_command_registers_the_smoke_pair(smoke_record):
    dense = smoke_record["sections"]["brain_mri_dense"]
    assert positive(dense["command_seconds"]) and positive(dense["registration_seconds"])
    assert dense["registration_seconds"] < dense["command_seconds"]  # the command includes start-up and outputs
    assert a_dice(dense["dice"]) and a_dice(dense["dice_before"])
    assert dense["dice"] > dense["dice_before"] + 0.2  # a 2-voxel shift of a blob is easy to undo
    assert positive(dense["peak_memory_mb"])


def test_the_network_sections_ran_their_budgets(smoke_record):
    sections = smoke_record["sections"]
    for name, steps in (("lapirn_direct", 0), ("nio", 4), ("io_pcgrad_50", 2)):
        result = sections[name]
        assert result["steps"] == steps, name
        assert positive(result["seconds"]) and positive(result["peak_memory_mb"]), name
        assert a_dice(result["dice"]), name
        assert 0.0 <= result["det_nonpositive_percent"] <= 100.0, name


def test_training_with_and_without_autocast_and_under_torchrun(smoke_record):
    train = smoke_record["sections"]["train"]
    for amp in ("fp32", "bf16"):
        assert positive(train[amp]["pairs_per_second"]) and a_dice(train[amp]["val_dice"]), amp
        assert train[amp]["world_size"] == 1
    assert positive(train["speed_up"]) and abs(train["dice_difference"]) <= 1.0
    assert math.isclose(train["dice_difference"], train["bf16"]["val_dice"] - train["fp32"]["val_dice"])
    torchrun = smoke_record["sections"]["torchrun"]
    assert torchrun["backend"] == "gloo" and torchrun["world_size"] == 1
    assert positive(torchrun["train"]["pairs_per_second"]) and a_dice(torchrun["train"]["val_dice"])
