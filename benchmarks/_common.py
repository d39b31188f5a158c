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
from pathlib import Path
from typing import Sequence

import numpy as np

from dirio.evaluation.overlap import mean_dice
import torch

from dirio.io.atomic import write_json, write_text
from dirio.config.settings import PRESETS, make_settings
from dirio.apps.workflow import software_versions

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


def load_voxelmorph_brain(script: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, Path]:
    """The voxelmorph test scan ``(160, 192, 224)`` float32, its aseg label map (uint8), the 30
    VoxelMorph Dice label ids, and the path of ``labels.npz`` (exits when the data is absent)."""
    folder = DATA / "voxelmorph-brain"
    scan_path = require(folder / "test_scan.npz", script)
    labels_path = require(folder / "labels.npz", script)
    with np.load(scan_path) as scan:
        image = scan["vol"].astype(np.float32)
        # FreeSurfer aseg ids are stored as float64; all are integers <= 255 (README).
        seg = np.rint(scan["seg"]).astype(np.uint8)
    with np.load(labels_path) as archive:
        label_ids = archive["labels"].astype(int)
    return image, seg, label_ids, labels_path


def int_list(text: str) -> tuple[int, ...]:
    """``"80,40"`` -> ``(80, 40)``."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def base_parser(name: str, description: str, default_preset: str) -> argparse.ArgumentParser:
    """Options every benchmark script shares (the method overrides also go to the CLI runs)."""
    parser = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
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
    levels = args.levels if args.levels is not None else tuple(preset.pyramid.levels)
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
        overrides["regularizers"] = {name: args.weight for name in preset.terms.regularizers}
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


# A small Python process that runs a command and prints its wall time. Linux keeps ``ru_maxrss``
# across fork and exec, so a command started straight from a benchmark process holding gigabytes
# would report the benchmark's resident size as its own peak memory; started from this small
# launcher it reports only its own. The launcher also times the command, so its own start-up is
# not counted.
_LAUNCHER = (
    "import subprocess, sys, time\n"
    "start = time.perf_counter()\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "print(f'WALL_SECONDS={time.perf_counter() - start!r}', file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def run_timed(command: Sequence[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command to completion; return its wall time in seconds (``perf_counter``) and the result.

    The time covers interpreter start-up, imports, reading inputs, registration, writing outputs
    and the figure: the whole command as a user sees it. The command runs under a small launcher
    process (see ``_LAUNCHER``) so that its own peak-memory record is not inflated by this process.
    """
    completed = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], capture_output=True, text=True)
    lines = completed.stderr.rstrip().splitlines()
    if not lines or not lines[-1].startswith("WALL_SECONDS="):
        raise RuntimeError(f"the timing launcher failed:\n{completed.stderr}")
    wall = float(lines[-1].split("=", 1)[1])
    completed.stderr = "\n".join(lines[:-1])
    return wall, completed


def cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) and its waited-for children."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def process_peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> float | None:
    """Reset this process's peak-RSS record to its current resident size; return that size in MiB.

    On CPU, ``RegistrationResult.peak_memory_mb`` is the process's ``ru_maxrss``, which otherwise
    never decreases: a second registration in the same process (or one after the metrics of the
    first) would report the earlier peak. Writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0)
    resets the high-water mark that ``ru_maxrss`` reads, so the peak reported after the next
    registration is its own (plus the data this process already holds, the returned baseline).
    Returns ``None`` where the reset is not available (the peak is then cumulative).
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    return process_peak_rss_mb()


def peak_memory_note(rows: Sequence[dict]) -> str:
    """The table note that says what ``peak MB`` measures on the device used."""
    if rows and str(rows[0].get("device", "")).startswith("cuda"):
        return "peak MB: torch's peak allocated CUDA memory during the optimisation (reset at its start)."
    baselines = [r.get("rss_at_register_start_mb") for r in rows]
    if any(b is None for b in baselines):
        return ("peak MB: the process's peak resident set size (ru_maxrss); it could not be reset between runs here, "
                "so it is cumulative over everything this script did before.")
    return ("peak MB: the process's peak resident set size (ru_maxrss) during register(), reset just before each call "
            "(/proc/self/clear_refs), so it includes what the script already held then: "
            + ", ".join(f"{b:.0f}" for b in baselines) + " MB at the start of each call.")


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

    ``seconds_per_iteration`` is the engine's level wall time divided by the iterations it ran, so it
    includes the level's set-up (resizing images, computing features) spread over the iterations.
    """
    return [
        {
            "level": lv["level"],
            "factor": lv["factor"],
            "shape": lv["shape"],
            "iterations": lv["iterations"],
            # fewer than ``iterations`` when an early-stopping rule ended the level
            "iterations_run": lv.get("iterations_run", lv["iterations"]),
            "seconds": lv["seconds"],
            "seconds_per_iteration": lv["seconds_per_iteration"],
        }
        for lv in levels
    ]


def format_levels(levels: list[dict]) -> str:
    """``"x4: 0.0520, x2: 0.410"`` -- seconds per iteration per level (3 significant digits), by shrink factor."""
    return ", ".join(f"x{lv['factor']}: {lv['seconds_per_iteration']:#.3g}" for lv in levels)


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
    bullets = "\n".join(f"- {n}" for n in notes if n)
    section = "\n\n".join([heading, *tables, bullets]).rstrip() + "\n"
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


def regularity_and_run(after: dict, result, rss_baseline) -> dict:
    """The row fields every benchmark reports: regularity of the field and the run's cost."""
    return {
        "sdlogj_l2r": after["sdlogj_l2r"],
        "sdlogj": after["sdlogj"],
        "percent_nonpositive_jacobian": after["percent_nonpositive_jacobian"],
        "ndv_percent": after["ndv_percent"],
        "optimisation_seconds": result.seconds,
        "levels": level_timings(result.levels),
        "peak_memory_mb": result.peak_memory_mb,
        "rss_at_register_start_mb": rss_baseline,
        "device": result.device,
        "settings": result.settings.to_dict(),
    }


def overlap_before_after(dice_before: dict, hd95_before: dict, after: dict) -> dict:
    """Dice and HD95 (voxels) before and after registration, as every labelled benchmark reports them."""
    return {
        "dice_before": mean_dice(dice_before),
        "dice_after": after["dice_mean"],
        "dice_per_label_before": {str(k): v for k, v in dice_before.items()},
        "dice_per_label_after": after["dice_per_label"],
        "hd95_before_voxels": float(np.nanmean(list(hd95_before.values()))),
        "hd95_after_voxels": after["hd95_voxels"],
    }
