"""``torchrun -m dirio run``: two CPU processes (gloo) shard the pairs and give what one process gives.

Both runs use one thread per process (``--threads 1``, ``OMP_NUM_THREADS=1``), which makes the
registration bitwise reproducible, so the fields are compared bit for bit.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from test_runner import broken_copy, build_dataset, field_bytes, read_rows, run_in_process, temporaries, without_seconds, write_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dirio", "run", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def worker_exit_codes(report: str) -> list[int]:
    """The workers' exit statuses in torchrun's failure report (``exitcode  : N`` lines)."""
    return sorted(int(line.split(":")[1].split()[0]) for line in report.splitlines() if line.strip().startswith("exitcode"))


def without_timings(summary: dict) -> dict:
    cases = {key: {k: v for k, v in case.items() if k != "seconds"} for key, case in summary["cases"].items()}
    aggregates = {k: v for k, v in summary["aggregates"].items() if k != "seconds"}
    return {**summary, "cases": cases, "aggregates": aggregates}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("l2r"))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp("config"))


@pytest.mark.slow
def test_two_processes_give_the_same_fields_and_tables_as_one(dataset, config, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_in_process(dataset, "-o", one, "--config", config, "--threads", "1", "--no-report", "-q") == 0
    result = torchrun(dataset, "-o", two, "--config", config, "--threads", "1", "--no-report")
    assert result.returncode == 0, result.stderr[-3000:]

    fields_one, fields_two = field_bytes(one), field_bytes(two)
    assert list(fields_two) == list(fields_one) and len(fields_one) == 4
    for name in fields_one:
        assert np.array_equal(fields_two[name], fields_one[name]), name
    assert without_seconds(read_rows(two / "cases.csv")) == without_seconds(read_rows(one / "cases.csv"))
    assert read_rows(two / "labels.csv") == read_rows(one / "labels.csv")
    summary_one = json.loads((one / "summary.json").read_text())
    summary_two = json.loads((two / "summary.json").read_text())
    assert json.dumps(without_timings(summary_two)) == json.dumps(without_timings(summary_one))

    run = json.loads((two / "run.json").read_text())
    assert run["world_size"] == 2 and run["done"] == 4 and run["config_hash"] == json.loads((one / "run.json").read_text())["config_hash"]
    # pairs i % 2 == rank: rank 0 registered the 1st and 3rd pair, rank 1 the 2nd and 4th
    ranks = {json.loads(p.read_text())["pair"]: json.loads(p.read_text())["rank"] for p in (two / "status").iterdir()}
    assert ranks == {"0001_0000_0002_0000": 0, "0002_0000_0003_0000": 1, "0003_0000_0004_0000": 0, "0004_0000_0005_0000": 1}
    log = (two / "run.log").read_text()
    assert " rank0 " in log and " rank1 " in log
    assert "rank 1: [2/2] 0004_0000_0005_0000 done in" in result.stderr
    assert temporaries(two) == []


@pytest.mark.slow
def test_failed_pairs_on_one_rank_neither_hang_the_others_nor_go_unreported(dataset, config, tmp_path):
    # case 3 (truncated) is in the 2nd and 3rd pairs (ranks 1 and 0); case 5 (deleted) in the 4th (rank 1)
    root = broken_copy(dataset, tmp_path)
    out = tmp_path / "out"
    result = torchrun(root / dataset.name, "-o", out, "--config", config, "--threads", "1", "--no-report", "-q")
    # torchrun exits 1 when a worker fails; each worker's own status (1: some pair failed) is in its report
    assert result.returncode == 1, result.stderr[-3000:]
    assert worker_exit_codes(result.stderr) == [1, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert [f["pair"] for f in summary["failed"]] == ["0002_0000_0003_0000", "0003_0000_0004_0000", "0004_0000_0005_0000"]
    assert list(summary["cases"]) == ["0001_0000<--0002_0000"]


@pytest.mark.slow
def test_a_refused_resume_stops_every_rank_with_one_error(dataset, config, tmp_path):
    out = tmp_path / "out"
    assert run_in_process(dataset, "-o", out, "--config", config, "--threads", "1", "--no-report", "-q",
                          "--limit", "1") == 0
    result = torchrun(dataset, "-o", out, "--config", config, "--lr", "0.3", "--no-report", "-q")
    assert result.returncode == 1 and worker_exit_codes(result.stderr) == [2, 2]
    assert result.stderr.count("dirio: error: ") == 2 and "another configuration" in result.stderr
