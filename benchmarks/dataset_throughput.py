"""Benchmark: ``dirio run`` throughput (pairs per minute) with one and two processes.

Builds a Learn2Reg-style dataset from the voxelmorph brain at half resolution (80x96x112, every
second voxel, 2 mm): case 1 is the brain, cases 2..N are smooth random warps of it (sigma 7 voxels,
largest component 4 voxels; ``dirio.io.dataset.write_synthetic_dataset``), with label maps, brain masks and
exactly corresponding keypoints; the validation split is the N - 1 consecutive pairs. Then times the whole
``dirio run`` command (start-up, registration, writing and reading back the field, every metric,
thumbnails, tables and the HTML report) in three set-ups on the same dataset:

* one process with one thread (``--threads 1``),
* ``torchrun --nproc-per-node 2`` with one thread per process (``--threads 1``),
* with ``--all-threads``, one process using every CPU thread (``--threads <cpus>``): on a CPU shared
  with other work, torch's spinning intra-op threads make this set-up many times slower (measured
  168 s for the first pair with 2 threads against ~21 s per pair with one, while another job kept one of
  the 2 cores busy).

The method is the brain-mri preset with its pyramid moved one level down to match the half-resolution
input (levels 2,1 of the 80x96x112 grid = the preset's 4,2 of the full-size brain), iterations 80,40.
The machine's load average is recorded before and after each run (the CPU may be shared).

    python benchmarks/dataset_throughput.py [--cases 7] [--device cpu] [--all-threads] [--quick] [--out benchmarks/out/dataset_throughput]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np

import _common as C
from dirio.io.dataset import write_synthetic_dataset

NAME = "dataset_throughput"
SIGMA_VOXELS = 7.0
MAX_DISPLACEMENT_VOXELS = 4.0
CONFIG = 'preset = "brain-mri"\nlevels = [2, 1]\niterations = [{}, {}]\n'


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=7, help="images in the dataset (pairs = cases - 1; default 7)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (one GPU per process under torchrun)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {C.QUICK_ITERATIONS} iterations per level (numbers are NOT results)")
    parser.add_argument("--out", type=Path, default=C.OUT_ROOT / NAME, help=f"output folder (default benchmarks/out/{NAME})")
    parser.add_argument("--processes", type=int, default=2, help="processes of the torchrun set-up (default 2)")
    parser.add_argument("--all-threads", action="store_true",
                        help="also time one process using every CPU thread (very slow when other work shares the CPU)")
    return parser.parse_args(argv)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build(folder: Path, cases: int) -> Path:
    image, seg, _, _ = C.load_voxelmorph_brain(NAME)
    image, seg = np.ascontiguousarray(image[::2, ::2, ::2]), np.ascontiguousarray(seg[::2, ::2, ::2])
    affine = np.diag([2.0, 2.0, 2.0, 1.0])  # the voxelmorph grid is 1 mm without world coordinates
    return write_synthetic_dataset(folder, image, seg, affine, cases=cases, sigma=SIGMA_VOXELS,
                                   max_displacement=MAX_DISPLACEMENT_VOXELS)


def timed_run(name: str, launcher: list[str], dataset: Path, config: Path, out: Path, threads: int,
              device: str) -> dict:
    """Run one set-up into a fresh folder; return its wall time, pairs per minute and load averages."""
    shutil.rmtree(out, ignore_errors=True)
    command = [*launcher, "run", str(dataset), "-o", str(out), "--config", str(config), "--threads", str(threads),
               "--device", device, "-q"]
    load_before = os.getloadavg()
    wall, completed = C.run_timed(command)
    load_after = os.getloadavg()
    if completed.returncode != 0:
        raise RuntimeError(f"{name} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    with open(out / "cases.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    run = json.loads((out / "run.json").read_text())
    return {
        "setup": name, "processes": run["world_size"], "threads_per_process": threads, "pairs": len(rows),
        "wall_seconds": wall, "pairs_per_minute": 60.0 * len(rows) / wall,
        "mean_pair_seconds": float(np.mean([float(r["seconds"]) for r in rows])),
        "dice_mean": float(np.mean([float(r["dice"]) for r in rows])),
        "load_before": [round(v, 2) for v in load_before], "load_after": [round(v, 2) for v in load_after],
        "command": command,
    }


def main(argv=None) -> int:
    args = parse(argv)
    iterations = (C.QUICK_ITERATIONS, C.QUICK_ITERATIONS) if args.quick else (80, 40)
    work = args.out / "work"
    dataset = build(work / "dataset", args.cases)
    config = work / "config.toml"
    config.write_text(CONFIG.format(*iterations), encoding="utf-8")
    cpus = os.cpu_count() or 1
    dirio = [sys.executable, "-m", "dirio"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.processes),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dirio"]
    rows = [
        timed_run("1 process x 1 thread", dirio, dataset, config, work / "one_single", 1, args.device),
        timed_run(f"{args.processes} processes x 1 thread (torchrun, gloo)", torchrun, dataset, config,
                  work / "torchrun", 1, args.device),
    ]
    if args.all_threads:
        rows.append(timed_run(f"1 process x {cpus} threads", dirio, dataset, config, work / "one_all", cpus, args.device))
    table = C.markdown_table(
        ["set-up", "pairs", "wall s", "pairs/min", "mean s per pair (in its process)", "Dice", "load avg before -> after"],
        [[r["setup"], r["pairs"], C.fmt(r["wall_seconds"], 1), C.fmt(r["pairs_per_minute"], 2),
          C.fmt(r["mean_pair_seconds"], 1), C.fmt(r["dice_mean"], 3),
          f"{r['load_before'][0]:.2f} -> {r['load_after'][0]:.2f}"] for r in rows],
    )
    notes = [
        f"dataset: voxelmorph brain at half resolution (80x96x112, 2 mm), {args.cases} cases, "
        f"{args.cases - 1} validation pairs; warps sigma {SIGMA_VOXELS:g}, max {MAX_DISPLACEMENT_VOXELS:g} voxels",
        f"method: brain-mri preset, levels 2,1, iterations {iterations[0]},{iterations[1]}; device {args.device}",
        "wall s: the whole command (interpreter start-up, registration, field written and read back, every "
        "metric incl. HD95 and NDV, thumbnails, tables, HTML report); pairs/min = pairs / wall s x 60",
        f"machine: {cpus} CPUs; load average (1 min) before -> after each run: other work shares this CPU",
    ]
    C.finish(NAME, "dirio run throughput (pairs per minute)", args, {"device": args.device, "rows": rows}, [table], notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
