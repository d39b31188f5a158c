"""Shared pieces of the benchmark scripts: paths, options, settings overrides, tables, JSON output.

Every benchmark script is run as ``python benchmarks/<name>.py`` from anywhere; this module sits
beside them and is imported as ``_common``. Data is read from the shared data folder beside the
repository (``<repo>/../shared/data``) and results go to ``benchmarks/out/<name>`` by default.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dirio.files import write_json, write_text
from dirio.settings import make_settings
from dirio.workflow import software_versions

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
OUT_ROOT = REPO / "benchmarks" / "out"

# Iterations per pyramid level in --quick mode: enough to run every code path end to end,
# far too few for meaningful accuracy or timing numbers.
QUICK_ITERATIONS = 3


def require(path: Path, script: str) -> Path:
    """Return ``path`` when it exists; otherwise exit with a one-line message naming it."""
    if not path.exists():
        sys.exit(
            f"{script}: data not found: {path} (expected the shared data folder beside the repository, "
            f"{DATA}); nothing was run"
        )
    return path


def int_list(text: str) -> tuple[int, ...]:
    """``"80,40"`` -> ``(80, 40)``."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def base_parser(name: str, description: str, default_preset: str) -> argparse.ArgumentParser:
    """Options every benchmark script shares (the method overrides also go to the CLI runs)."""
    parser = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    parser.add_argument("--preset", default=default_preset, choices=["brain-mri", "lung-ct"],
                        help=f"dirio preset (default {default_preset})")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_ITERATIONS} iterations per level (numbers are NOT results)")
    parser.add_argument("--out", type=Path, default=OUT_ROOT / name, help=f"output folder (default benchmarks/out/{name})")
    method = parser.add_argument_group("method overrides (default: the preset's values)")
    method.add_argument("--levels", type=int_list, metavar="F,...", help="pyramid shrink factors, coarse to fine")
    method.add_argument("--iterations", type=int_list, metavar="N,...", help="iterations per level")
    method.add_argument("--lr", type=float, help="learning rate")
    method.add_argument("--weight", type=float, help="weight of every regulariser of the preset")
    return parser


def overrides_from_args(args: argparse.Namespace) -> dict:
    """Keyword overrides for :func:`dirio.api.register` (``preset`` excluded).

    ``--quick`` sets ``QUICK_ITERATIONS`` per level unless ``--iterations`` is given. Progress bars
    are off so that the printed output stays a table.
    """
    preset = make_settings(args.preset)
    levels = args.levels if args.levels is not None else tuple(preset.engine.levels)
    iterations = args.iterations
    if iterations is None and args.quick:
        iterations = (QUICK_ITERATIONS,) * len(levels)
    overrides: dict = {"progress": False}
    if args.levels is not None:
        overrides["levels"] = args.levels
    if iterations is not None:
        overrides["iterations"] = iterations
    if args.lr is not None:
        overrides["lr"] = args.lr
    if args.weight is not None:
        overrides["regularizers"] = {name: args.weight for name in preset.regularizers}
    return overrides


def cli_flags_from_args(args: argparse.Namespace) -> list[str]:
    """The same method choices as :func:`overrides_from_args`, as ``dirio register`` flags."""
    overrides = overrides_from_args(args)
    flags = ["--preset", args.preset, "--device", args.device]
    if "levels" in overrides:
        flags += ["--levels", ",".join(str(v) for v in overrides["levels"])]
    if "iterations" in overrides:
        flags += ["--iterations", ",".join(str(v) for v in overrides["iterations"])]
    if "lr" in overrides:
        flags += ["--lr", repr(float(overrides["lr"]))]
    if args.weight is not None:
        flags += ["--weight", repr(float(args.weight))]
    return flags


def dirio_command() -> list[str]:
    """The ``dirio`` console script of this Python environment (``python -m dirio`` if it is missing)."""
    script = Path(sys.executable).parent / "dirio"
    if script.exists():
        return [str(script)]
    found = shutil.which("dirio")
    return [found] if found else [sys.executable, "-m", "dirio"]


def run_timed(command: Sequence[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command to completion; return its wall time in seconds (``perf_counter``) and the result.

    Output is captured, so the time includes interpreter start-up, imports, reading inputs,
    registration, writing outputs and the figure: the whole command as a user sees it.
    """
    start = time.perf_counter()
    completed = subprocess.run(list(command), capture_output=True, text=True)
    return time.perf_counter() - start, completed


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine_info(device: str) -> dict:
    """Where the numbers were taken: host, CPU count, torch threads, GPU name."""
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def level_timings(levels: list[dict]) -> list[dict]:
    """Per pyramid level: factor, image shape, iterations and seconds per iteration.

    ``seconds_per_iteration`` is the engine's level wall time divided by its iterations, so it
    includes the level's set-up (resizing images, computing features) spread over the iterations.
    """
    return [
        {
            "level": lv["level"],
            "factor": lv["factor"],
            "shape": lv["shape"],
            "iterations": lv["iterations"],
            "seconds": lv["seconds"],
            "seconds_per_iteration": lv["seconds_per_iteration"],
        }
        for lv in levels
    ]


def format_levels(levels: list[dict]) -> str:
    """``"x4: 0.052, x2: 0.41"`` -- seconds per iteration per level, by shrink factor."""
    return ", ".join(f"x{lv['factor']}: {lv['seconds_per_iteration']:.3g}" for lv in levels)


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell: fixed decimals, ``nan`` / ``-`` for missing values."""
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if not np.isfinite(value):
        return "nan"
    return f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def finish(name: str, title: str, args: argparse.Namespace, results: dict, tables: Sequence[str],
           notes: Sequence[str] = ()) -> None:
    """Print the markdown section and write ``results.json`` and ``table.md`` into ``args.out``."""
    heading = f"## {title}" + ("  (--quick smoke test: NOT results)" if args.quick else "")
    section = "\n\n".join([heading, *tables, *[f"- {n}" for n in notes if n]]).rstrip() + "\n"
    print(section)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "quick": bool(args.quick),
        "command": [sys.executable, *sys.argv],
        "machine": machine_info(results.get("device", args.device)),
        "versions": software_versions(),
        **results,
        "notes": list(notes),
    }
    write_json(out / "results.json", record, overwrite=True)
    write_text(out / "table.md", section, overwrite=True)
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}")
