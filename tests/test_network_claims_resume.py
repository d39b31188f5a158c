"""``benchmarks/network_claims.py --checkpoint-every``: an IO run stopped after a checkpoint and
started again ends where the unbroken run ends (the same weights, optimiser state, pcgrad draws)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def claims(monkeypatch):
    """The benchmark module, its pairs replaced by one small blob pair (no shared data needed)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import network_claims

    grid = np.stack(np.meshgrid(*[np.arange(24, dtype=np.float32)] * 3, indexing="ij"))

    def blob(centre):
        return np.exp(-(((grid - np.reshape(centre, (3, 1, 1, 1))) / 5.0) ** 2).sum(0)).astype(np.float32)

    fixed, moving = blob((12, 12, 12)), blob((10, 13, 12))
    pair = (fixed, moving, (fixed > 0.3).astype(np.int16), (moving > 0.3).astype(np.int16), [1], "identity")
    monkeypatch.setattr(network_claims, "load_pairs", lambda names, scale: {"blob": pair})
    yield network_claims
    sys.modules.pop("network_claims", None)


def final_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return [r for r in rows if not r["probe"]]


def metrics(row: dict) -> tuple:
    return row["dice"], row["ndv_percent"], row["sdlogj"], row["det_nonpositive_percent"], row["steps"]


@pytest.mark.usefixtures("one_thread")
def test_a_stopped_and_resumed_io_run_ends_where_the_unbroken_run_ends(claims, tmp_path, monkeypatch):
    common = ["--scale", "half", "--plan", "blob:io-pcgrad", "--io-lr", "1e-3", "--io-probes", "99", "--threads", "1"]
    claims.main([*common, "--io-steps", "2", "--out", str(tmp_path / "two")])
    claims.main([*common, "--io-steps", "4", "--out", str(tmp_path / "unbroken")])

    original = claims.Resume.save

    def save_then_stop(self, *args):
        original(self, *args)
        raise KeyboardInterrupt  # stopped right after the step-2 checkpoint

    monkeypatch.setattr(claims.Resume, "save", save_then_stop)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        claims.main([*common, "--io-steps", "4", "--checkpoint-every", "2", "--out", str(resumed)])
    assert (resumed / "checkpoints").is_dir() and not (resumed / "results.jsonl").exists()
    monkeypatch.setattr(claims.Resume, "save", original)
    claims.main([*common, "--io-steps", "4", "--checkpoint-every", "2", "--out", str(resumed)])

    (two,), (unbroken,), (again,) = (final_rows(tmp_path / name) for name in ("two", "unbroken", "resumed"))
    assert metrics(two) != metrics(unbroken)  # the last two steps change the field
    assert again["resumed_at"] == 2
    assert metrics(again) == metrics(unbroken)
    assert not list((resumed / "checkpoints").iterdir())  # a finished run removes its checkpoint


def test_a_row_counts_the_network_steps_per_level_and_the_refinement_apart(claims):
    history = ([{"stage": "nio", "level": 0, "iteration": i} for i in range(1, 4)]
               + [{"stage": "nio", "level": 1, "iteration": i} for i in range(1, 3)]
               + [{"stage": "refine", "level": 0, "iteration": i} for i in range(1, 6)])
    assert claims.steps_run(history) == ([3, 2], 5)
    assert claims.steps_run([{"level": 0}, {"level": 2}, {"level": 2}]) == ([1, 0, 2], 0)
    assert claims.steps_run([]) == ([0], 0)
