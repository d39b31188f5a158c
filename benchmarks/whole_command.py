"""Benchmark: the whole ``dirio register`` command on the real 160x192x224 brain pair, step by step.

The pair: the voxelmorph brain (fixed) and the OASIS brain ``c2fvit-oasis-brain/on-voxelmorph-grid/
image_A`` (moving), both with their 13-structure label maps (the command then scores Dice and HD95,
as a user with labels would ask). Each variant (a set of ``dirio register`` flags) runs as its own
process, ``--repeats`` times, interleaved so that a change of machine load hits every variant alike.
Reported per variant: wall time of the whole command (interpreter start included), CPU time of the
process (user + sys, all threads: the comparable figure on a shared machine), the machine's load
average, the command's own ``step_seconds`` (load, register, evaluate, write, figure, checksums,
from ``metrics.json``) and per-level seconds, Dice of the 13 structures, % det(J) <= 0.

    python benchmarks/whole_command.py [--repeats 2] [--variant NAME="FLAGS" ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import _common as C

NAME = "whole_command"
GRID = C.DATA / "c2fvit-oasis-brain" / "on-voxelmorph-grid"
FIXED = C.DATA / "voxelmorph-brain" / "test_scan_vol.nii.gz"
DEFAULT_VARIANTS = {"brain-mri": "--preset brain-mri"}


def parse_variant(text: str) -> tuple[str, str]:
    """``'name=--preset brain-mri --levels 4,2,1'`` -> ``('name', '--preset brain-mri ...')``."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FLAGS, got {text!r}")
    return name.strip(), flags.strip()


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every waited-for child process so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(flags: str, out: Path) -> dict:
    """One whole ``dirio register`` command into ``out``; its times, steps and scores."""
    command = [*C.dirio_command(), "register", str(FIXED), str(GRID / "image_A.nii.gz"),
               "--fixed-labels", str(GRID / "voxelmorph_seg13.nii.gz"),
               "--moving-labels", str(GRID / "image_A_seg13.nii.gz"), "-o", str(out), "-q", *shlex.split(flags)]
    load = os.getloadavg()[0]
    cpu = children_cpu_seconds()
    wall, completed = C.run_timed(command)
    cpu = children_cpu_seconds() - cpu
    if completed.returncode != 0:
        sys.exit(f"{NAME}: dirio register failed ({flags}):\n{completed.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_average": load,
        "step_seconds": metrics["step_seconds"],
        "level_seconds": [round(level["seconds"], 2) for level in metrics["levels"]],
        "dice_before": metrics["before"]["dice_mean"],
        "dice_after": metrics["after"]["dice_mean"],
        "percent_nonpositive_jacobian": metrics["after"]["percent_nonpositive_jacobian"],
    }


def summarise(runs: list[dict]) -> dict:
    """Medians over the repeats of every time; the scores of the first run (runs are seeded)."""
    steps = runs[0]["step_seconds"].keys()
    return {
        "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
        "load_average": statistics.median(r["load_average"] for r in runs),
        "step_seconds": {s: statistics.median(r["step_seconds"][s] for r in runs) for s in steps},
        "level_seconds": runs[0]["level_seconds"],
        "dice_before": runs[0]["dice_before"],
        "dice_after": runs[0]["dice_after"],
        "percent_nonpositive_jacobian": runs[0]["percent_nonpositive_jacobian"],
        "runs": runs,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", type=parse_variant, default=[],
                        help='NAME="dirio register flags" (repeatable; default: brain-mri)')
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant, interleaved (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 iterations per level, 1 repeat")
    parser.add_argument("--out", type=Path, default=C.OUT_ROOT / NAME)
    args = parser.parse_args(argv)
    for path in (FIXED, GRID / "image_A.nii.gz", GRID / "voxelmorph_seg13.nii.gz", GRID / "image_A_seg13.nii.gz"):
        C.require(path, NAME)
    variants = dict(args.variant) or dict(DEFAULT_VARIANTS)
    if args.quick:
        args.repeats = 1
        variants = {name: f"{flags} --iterations {','.join(['3'] * 3)} --levels 4,2,1" for name, flags in variants.items()}
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory(prefix="dirio-whole-") as scratch:
        for repeat in range(args.repeats):
            for name, flags in variants.items():
                runs[name].append(run_once(flags, Path(scratch) / f"{name}-{repeat}"))
                print(f"{name} run {repeat + 1}: {runs[name][-1]['wall_seconds']:.1f} s wall, "
                      f"{runs[name][-1]['cpu_seconds']:.1f} s CPU", file=sys.stderr)
    results = {name: summarise(r) for name, r in runs.items()}
    step_names = list(next(iter(results.values()))["step_seconds"])
    header = ["variant", "flags", "wall s", "CPU s", "load", *[f"{s} s" for s in step_names], "levels s",
              "Dice 13 before", "after", "% det<=0"]
    rows = [[name, f"`{variants[name]}`", C.fmt(r["wall_seconds"], 1), C.fmt(r["cpu_seconds"], 1),
             C.fmt(r["load_average"], 1), *[C.fmt(r["step_seconds"][s], 2) for s in step_names],
             ", ".join(str(v) for v in r["level_seconds"]), C.fmt(r["dice_before"]), C.fmt(r["dice_after"]),
             C.fmt(r["percent_nonpositive_jacobian"], 4)] for name, r in results.items()]
    notes = [f"Pair: {FIXED.name} (fixed) and {GRID.name}/image_A (moving), 160x192x224, 13-structure Dice; "
             f"medians of {args.repeats} interleaved runs per variant.",
             "wall: the whole process (interpreter start, imports, reading, registration, scoring, writing, figure); "
             "CPU: user + sys of the process, all threads; load: the 1-minute load average when the run started "
             "(2 cores: above 2 the wall times are inflated by other processes)."]
    args.device = "cpu"
    C.finish(NAME, "The whole dirio register command on the real brain pair", args,
             {"variants": variants, "results": results}, [C.markdown_table(header, rows)], notes)


if __name__ == "__main__":
    main()
