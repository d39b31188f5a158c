"""Box plots of a run's metrics, one panel per metric over the pairs and one row per label metric
over the labels, each value drawn as a jittered point over its box, written as PNG files.

The rows are those of ``cases.csv`` and ``labels.csv`` (:mod:`dirio.viz.run_report`); the
figures are drawn outside pyplot and saved atomically (:mod:`dirio.viz.canvas`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from dirio.viz.canvas import new_figure, save_figure
from dirio.viz.run_report import METRIC_BY_KEY, column_values, finite_number

__all__ = ["BOX_PANELS", "LABEL_METRICS", "metric_boxplots", "label_boxplots"]

# Box plot geometry: width per metric panel and per label, panel height, panels per row.
BOX_PANEL_INCHES = 2.4
BOX_HEIGHT_INCHES = 2.6
BOX_PANELS_PER_ROW = 4
LABEL_BOX_INCHES = 0.3
MIN_LABEL_FIGURE_INCHES = 6.0
MAX_LABEL_FIGURE_INCHES = 40.0
# Per-case points are drawn over the boxes with this horizontal jitter (box widths are 0.6).
POINT_JITTER = 0.12

# Box plot panels: (metric keys drawn side by side in one panel, tick label of each).
BOX_PANELS = (
    (("dice_before", "dice"), ("before", "after")),
    (("hd95",), ("",)),
    (("tre_mm_before", "tre_mm"), ("before", "after")),
    (("sdlogj",), ("",)),
    (("fold_percent",), ("",)),
    (("ndv_percent",), ("",)),
    (("seconds",), ("",)),
)
LABEL_METRICS = ("dice", "hd95")


def _boxes(ax, groups: Sequence[np.ndarray], tick_labels: Sequence[str], seed: int = 0) -> None:
    """Box plots (quartiles, whiskers at 1.5 IQR) with every value as a jittered point."""
    positions = np.arange(1, len(groups) + 1)
    ax.boxplot(
        groups, positions=positions, widths=0.6, showfliers=False, medianprops={"color": "tab:orange"}
    )
    rng = np.random.default_rng(seed)  # fixed jitter: the same run gives the same PNG
    for position, values in zip(positions, groups):
        x = position + rng.uniform(-POINT_JITTER, POINT_JITTER, size=values.size)
        ax.plot(x, values, linestyle="none", marker="o", markersize=3, color="tab:blue", alpha=0.6)
    ax.set_xticks(positions, list(tick_labels))
    ax.tick_params(labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def metric_boxplots(path: Path, cases: Sequence[Mapping[str, str]]) -> bool:
    """Write one box plot panel per metric with values (BOX_PANELS); False when there are none."""
    panels = []
    for keys, ticks in BOX_PANELS:
        groups = [(column_values(cases, key), tick) for key, tick in zip(keys, ticks)]
        groups = [(values, tick) for values, tick in groups if values.size]
        if groups:
            panels.append((METRIC_BY_KEY[keys[-1]], groups))
    if not panels:
        return False
    columns = min(len(panels), BOX_PANELS_PER_ROW)
    rows = math.ceil(len(panels) / columns)
    fig = new_figure(BOX_PANEL_INCHES * columns, BOX_HEIGHT_INCHES * rows)
    for number, (metric, groups) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, number + 1)
        _boxes(ax, [values for values, _ in groups], [tick for _, tick in groups], seed=number)
        arrow = "↑" if metric.better == "higher" else "↓"
        ax.set_title(f"{metric.heading}  {arrow} better, n = {groups[-1][0].size}", fontsize=9)
    save_figure(fig, path, overwrite=True)
    return True


def _label_order(label: str) -> tuple:
    """Sort key: numeric labels by value, then other names alphabetically."""
    number = finite_number(label)
    return (0, number, label) if number is not None else (1, 0.0, label)


def label_boxplots(path: Path, rows: Sequence[Mapping[str, str]]) -> bool:
    """Write one row of box plots per label metric (labels.csv); False when there are no values."""
    labels = sorted({row.get("label", "") for row in rows if row.get("label", "")}, key=_label_order)
    panels = []
    for key in LABEL_METRICS:
        groups = [column_values([r for r in rows if r.get("label") == label], key) for label in labels]
        if any(g.size for g in groups):
            panels.append((METRIC_BY_KEY[key], groups))
    if not panels:
        return False
    width = min(max(MIN_LABEL_FIGURE_INCHES, LABEL_BOX_INCHES * len(labels) + 1.0), MAX_LABEL_FIGURE_INCHES)
    fig = new_figure(width, BOX_HEIGHT_INCHES * len(panels))
    for number, (metric, groups) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, number + 1)
        _boxes(ax, groups, labels, seed=number)
        if len(labels) > 20:
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        arrow = "↑" if metric.better == "higher" else "↓"
        ax.set_title(f"{metric.heading} per label  {arrow} better", fontsize=9)
        ax.set_xlabel("label", fontsize=8)
    save_figure(fig, path, overwrite=True)
    return True
