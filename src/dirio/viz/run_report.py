"""A dirio run folder as the report reads it: what each ``cases.csv`` column means, the parsed files,
the failed pairs and the timings.

Run folder layout read here (the runner's contract; a missing optional file or column leaves
out what needs it, and an unreadable file is recorded in :attr:`RunFolder.problems` instead of
failing)::

    OUT/run.json        dataset, split, config, config_file, config_hash, run_options, versions,
                        world_size, started, finished, seconds, pairs, done, failed, device, threads
    OUT/cases.csv       pair, fixed, moving, status, seconds, dice, hd95, sdlogj, fold_percent,
                        ndv_percent, tre_mm, dice_before, tre_mm_before, error (empty cell: n/a)
    OUT/labels.csv      pair, label, dice, hd95 (long format; optional)
    OUT/summary.json    Learn2Reg evaluator structure: {"aggregates": {metric: {"mean", "std",
                        "30"}}, "cases": ..., "failed": [{"pair", "error"}], ...}
    OUT/thumbnails/<pair>.png
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dirio.errors import DirioError

__all__ = [
    "Metric",
    "METRICS",
    "METRIC_BY_KEY",
    "TEXT_COLUMNS",
    "RunFolder",
    "read_run",
    "finite_number",
    "column_values",
    "failures",
    "timings",
]


@dataclass(frozen=True)
class Metric:
    """A numeric column of ``cases.csv`` as the page shows it.

    ``better`` is ``"higher"`` or ``"lower"`` (said in the header tooltip and the box plot
    title); ``digits`` is the number of decimals shown (sorting uses the full CSV value).
    """

    key: str
    title: str
    unit: str
    better: str
    digits: int
    description: str

    @property
    def heading(self) -> str:
        return f"{self.title} ({self.unit})" if self.unit else self.title


METRICS = (
    Metric("dice", "Dice", "", "higher", 3, "mean Dice overlap over the labels after registration"),
    Metric("dice_before", "Dice before", "", "higher", 3, "mean Dice overlap before registration (identity)"),
    Metric("hd95", "HD95", "vox", "lower", 2, "95th percentile Hausdorff distance (Learn2Reg), mean over labels"),
    Metric("tre_mm", "TRE", "mm", "lower", 2, "mean target registration error of the keypoints"),
    Metric("tre_mm_before", "TRE before", "mm", "lower", 2, "mean keypoint distance before registration (identity)"),
    Metric("sdlogj", "SDlogJ", "", "lower", 3, "standard deviation of the log Jacobian determinant (Learn2Reg)"),
    Metric("fold_percent", "folds", "%", "lower", 3, "percentage of voxels with Jacobian determinant <= 0"),
    Metric("ndv_percent", "NDV", "%", "lower", 3, "non-diffeomorphic volume, percent of the volume"),
    Metric("seconds", "time", "s", "lower", 1, "wall-clock time of the pair (registration and evaluation)"),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}
# Columns of cases.csv that are not shown as table columns of their own.
TEXT_COLUMNS = ("pair", "fixed", "moving", "status", "error")


@dataclass
class RunFolder:
    """The run folder's contents; ``problems`` lists files that could not be read."""

    out: Path
    info: dict[str, Any] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    cases: list[dict[str, str]] = field(default_factory=list)
    labels: list[dict[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read_json(run: RunFolder, name: str) -> dict[str, Any]:
    """The JSON object in ``run.out / name``; ``{}`` when missing or unreadable (then noted in ``run.problems``)."""
    path = run.out / name
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        run.problems.append(f"{name} could not be read: {error}")
        return {}
    if not isinstance(data, dict):
        run.problems.append(f"{name} does not hold a JSON object")
        return {}
    return data


def _read_csv(run: RunFolder, name: str) -> tuple[list[str], list[dict[str, str]]]:
    """``(columns, rows)`` of ``run.out / name`` with stripped cells; empty when missing or unreadable."""
    path = run.out / name
    if not path.is_file():
        return [], []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
            return list(reader.fieldnames or []), rows
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        run.problems.append(f"{name} could not be read: {error}")
        return [], []


def read_run(out: Path) -> RunFolder:
    """Read ``run.json``, ``summary.json``, ``cases.csv`` and ``labels.csv`` of the run folder ``out``.

    Raises:
        DirioError: ``out`` holds neither ``cases.csv`` nor ``run.json``.
    """
    run = RunFolder(out=out)
    run.info = _read_json(run, "run.json")
    run.summary = _read_json(run, "summary.json")
    run.columns, run.cases = _read_csv(run, "cases.csv")
    _, run.labels = _read_csv(run, "labels.csv")
    if not run.columns and not run.info and not run.problems:
        raise DirioError(f"{out}: not a dirio run folder (neither cases.csv nor run.json found)")
    return run


def finite_number(text: Any) -> float | None:
    """A finite float from a CSV cell or JSON value; None when empty, not numeric, NaN or infinite."""
    if isinstance(text, bool) or text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def column_values(rows: Sequence[Mapping[str, str]], key: str) -> np.ndarray:
    """The finite values of a column, as a float64 array."""
    values = [finite_number(row.get(key)) for row in rows]
    return np.array([v for v in values if v is not None], dtype=np.float64)


def failures(run: RunFolder) -> list[tuple[str, str]]:
    """``(pair, error)`` of every failed pair: summary.json's list, then failed rows of cases.csv."""
    failed: dict[str, str] = {}
    for item in run.summary.get("failed") or []:
        if isinstance(item, Mapping):
            failed[str(item.get("pair", "?"))] = str(item.get("error", ""))
    for row in run.cases:
        if row.get("status") == "failed":
            failed.setdefault(row.get("pair", "?"), row.get("error", ""))
    return list(failed.items())


def timings(run: RunFolder) -> dict[str, Any]:
    """Start, end, device, counts, wall time, throughput and per-pair times of the run, as page text."""
    info = run.info
    shown: dict[str, Any] = {}
    for key in ("started", "finished", "device", "world_size", "threads", "pairs", "done", "failed"):
        if key in info:
            shown[key] = info[key]
    seconds = finite_number(info.get("seconds"))
    if seconds is not None:
        minutes, secs = divmod(seconds, 60.0)
        shown["wall time"] = f"{seconds:.1f} s ({int(minutes // 60)}:{int(minutes % 60):02d}:{secs:04.1f})"
        done = finite_number(info.get("done"))
        if done and seconds > 0:
            shown["throughput"] = f"{60.0 * done / seconds:.3g} pairs per minute (this invocation's wall time)"
    per_pair = column_values([r for r in run.cases if r.get("status") == "done"], "seconds")
    if per_pair.size:
        shown["time per done pair"] = (
            f"mean {per_pair.mean():.1f} s, median {np.median(per_pair):.1f} s, max {per_pair.max():.1f} s"
        )
    return shown
