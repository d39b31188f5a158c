"""The report of a dataset run: one static HTML page with its PNGs, readable offline.

:func:`pair_thumbnail` draws one small PNG per registered pair (a colour overlay of the fixed and
the warped image, and the Jacobian determinant map with folds highlighted); :func:`write_report`
reads a run folder and writes ``OUT/report/index.html`` with the aggregate table, the sortable
metrics table per pair, box plots per metric and per label, the thumbnails, the failures, the
configuration, software versions and timings.

The page references nothing outside the run folder: CSS and the table-sorting script are
inline, images are relative links (``report/*.png`` beside the page, ``../thumbnails/*.png``),
so it works offline and after the run folder is moved or zipped as a whole. Every text taken
from the run folder is HTML-escaped. Files are written atomically (:mod:`dirio.io.atomic`); the
report is a view of the run folder, rebuilt (replaced) by every call of :func:`write_report`.

Run folder layout read here (the runner's contract; a missing optional file or column leaves
out what needs it, and an unreadable file is named on the page instead of failing)::

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
import html
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, TwoSlopeNorm, to_hex

from dirio.errors import DirioError
from dirio.io.atomic import atomic_output, check_writable, write_text
from dirio.viz.figures import (
    FOLD_COLOR,
    JACOBIAN_CMAP,
    _as_array,
    _check_images,
    _check_png_path,
    _jacobian_planes,
    _new_figure,
    _normalised,
    _plane,
    _save,
    _views,
    _window,
)

PathLike = str | os.PathLike

REPORT_DIR = "report"
THUMBNAIL_DIR = "thumbnails"
PAGE_NAME = "index.html"
METRICS_PNG = "metrics.png"
LABELS_PNG = "labels.png"

# Thumbnail geometry: a panel is THUMB_PANEL_INCHES wide at THUMB_DPI (120 pixels), so a 3D
# thumbnail (3 planes x 2 rows) is about 370 x 280 pixels.
THUMB_PANEL_INCHES = 1.5
THUMB_DPI = 80
THUMB_GAP_INCHES = 0.03
# One fixed Jacobian colour scale for every thumbnail, so that pairs can be compared by eye:
# white at det = 1, full blue at half the volume (det <= 0.5), full red at double (det >= 2);
# det <= 0 (folding) is drawn in FOLD_COLOR on top.
THUMB_JACOBIAN_LIMITS = (0.5, 2.0)

# Box plot geometry: width per metric panel and per label, panel height, panels per row.
BOX_PANEL_INCHES = 2.4
BOX_HEIGHT_INCHES = 2.6
BOX_PANELS_PER_ROW = 4
LABEL_BOX_INCHES = 0.3
MIN_LABEL_FIGURE_INCHES = 6.0
MAX_LABEL_FIGURE_INCHES = 40.0
# Per-case points are drawn over the boxes with this horizontal jitter (box widths are 0.6).
POINT_JITTER = 0.12


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
_METRIC_BY_KEY = {m.key: m for m in METRICS}
# Columns of cases.csv that are not shown as table columns of their own.
_TEXT_COLUMNS = ("pair", "fixed", "moving", "status", "error")
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

# Learn2Reg aggregate names of summary.json -> the page's names; statistics' descriptions.
AGGREGATE_NAMES = {
    "DSC": "Dice",
    "DSC_before": "Dice before",
    "HD95": "HD95 (vox)",
    "TRE_kp": "TRE (mm)",
    "TRE_kp_before": "TRE before (mm)",
    "LogJacDetStd": "SDlogJ",
    "num_foldings": "folding voxels",
    "NonPosJacPercent": "folds (%)",
    "NDVPercent": "NDV (%)",
    "seconds": "time per pair (s)",
}
STATISTIC_DESCRIPTIONS = {
    "mean": "mean over the evaluated pairs",
    "std": "standard deviation over the evaluated pairs",
    "30": "30th percentile of the per-pair values (Learn2Reg evaluator: numpy linear quantile 0.3)",
}


# --- thumbnails ----------------------------------------------------------------------------------


def _channels_last(disp: np.ndarray, shape: tuple[int, ...], path: Path) -> np.ndarray:
    """A displacement ``(*S, ndim)`` or ``(ndim, *S)`` as a ``(*S, ndim)`` array (a view)."""
    ndim = len(shape)
    if disp.shape == (*shape, ndim):
        return disp
    if disp.shape == (ndim, *shape):
        return np.moveaxis(disp, 0, -1)
    raise DirioError(
        f"{path}: displacement must have shape {(*shape, ndim)} (*S, ndim) or {(ndim, *shape)} (ndim, *S), "
        f"got {disp.shape}"
    )


def pair_thumbnail(
    path: PathLike, fixed: np.ndarray, warped: np.ndarray, disp: np.ndarray, overwrite: bool = True
) -> Path:
    """Write a small PNG of one registered pair: overlay and Jacobian map of the central slices.

    Top row: colour overlay of each central slice, fixed in magenta and warped in green, each
    scaled to its own intensity window: aligned structures are grey to white, misaligned ones
    magenta or green (readable with red-green colour blindness). Bottom row: the Jacobian
    determinant of ``x -> x + u(x)`` on the same slices on one fixed scale for all pairs,
    THUMB_JACOBIAN_LIMITS (blue compresses, white unchanged, red expands), voxels with
    ``det <= 0`` in FOLD_COLOR. Planes and orientation follow :mod:`dirio.viz.figures` (three
    orthogonal central planes in 3D, vertical axis upwards; one plane in 2D). No text is drawn:
    the page around the thumbnail names the pair and explains the colours.

    Only the shown slices are computed (the determinant on a 3-slice slab around each), so a
    160 x 192 x 224 pair takes about 0.1 s.

    Args:
        path: output file, must end in ``.png``.
        fixed, warped: images of one shape ``S``, ``(D, H, W)`` or ``(H, W)``, any intensity range.
        disp: displacement in voxels, ``(*S, ndim)`` (Learn2Reg on-disk layout) or ``(ndim, *S)``,
            pull convention ``warped(x) = moving(x + u(x))``.
        overwrite: replace an existing ``path`` (the default: a thumbnail is a derived view and
            is redrawn when its pair is registered again).
    Returns:
        ``Path(path)``.
    Raises:
        DirioError: wrong shapes, a non-PNG name, or ``path`` exists and ``overwrite`` is false.
    """
    path = _check_png_path(path)
    fixed, warped = _as_array(fixed, np.float32), _as_array(warped, np.float32)
    shape = _check_images(path, fixed=fixed, warped=warped)
    disp = _channels_last(_as_array(disp, np.float32), shape, path)
    check_writable(path, overwrite)

    views = _views(shape)
    fixed_planes = [_plane(fixed, view, index) for view, index in views]
    warped_planes = [_plane(warped, view, index) for view, index in views]
    det_planes = _jacobian_planes(disp, views)
    fixed_window, warped_window = _window(*fixed_planes), _window(*warped_planes)
    norm = TwoSlopeNorm(vmin=THUMB_JACOBIAN_LIMITS[0], vcenter=1.0, vmax=THUMB_JACOBIAN_LIMITS[1])
    fold_cmap = ListedColormap([FOLD_COLOR])

    # Manual layout, no layout engine (faster; there is no text to make room for): every column
    # THUMB_PANEL_INCHES wide, both rows as high as the tallest plane.
    gap = THUMB_GAP_INCHES
    row_height = max(THUMB_PANEL_INCHES * p.shape[0] / p.shape[1] for p in fixed_planes)
    width = len(views) * (THUMB_PANEL_INCHES + gap) + gap
    height = 2 * (row_height + gap) + gap
    fig = _new_figure(width, height)
    fig.set_layout_engine("none")
    for column, (view, _) in enumerate(views):
        left = (gap + column * (THUMB_PANEL_INCHES + gap)) / width
        for row in range(2):
            bottom = (gap + (1 - row) * (row_height + gap)) / height
            ax = fig.add_axes((left, bottom, THUMB_PANEL_INCHES / width, row_height / height))
            ax.set_axis_off()
            if row == 0:
                f = _normalised(fixed_planes[column], fixed_window)
                w = _normalised(warped_planes[column], warped_window)
                ax.imshow(np.stack([f, w, f], axis=-1), origin=view.origin, interpolation="nearest")
            else:
                det = det_planes[column]
                ax.imshow(det, cmap=JACOBIAN_CMAP, norm=norm, origin=view.origin, interpolation="nearest")
                folds = np.ma.masked_where(~(det <= 0), np.ones_like(det))
                ax.imshow(folds, cmap=fold_cmap, vmin=0, vmax=1, origin=view.origin, interpolation="nearest")
    with atomic_output(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=THUMB_DPI)
    return path


def _jacobian_gradient_css() -> str:
    """CSS ``linear-gradient`` of the thumbnails' Jacobian colours: det 0.5 left, 1 centre, 2 right."""
    cmap = colormaps[JACOBIAN_CMAP]
    stops = [f"{to_hex(cmap(t))} {100 * t:.0f}%" for t in np.linspace(0.0, 1.0, 11)]
    return f"linear-gradient(to right, {', '.join(stops)})"


# --- reading the run folder ------------------------------------------------------------------------


@dataclass
class _Run:
    """The run folder's contents; ``problems`` lists files that could not be read."""

    out: Path
    info: dict[str, Any] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)
    cases: list[dict[str, str]] = field(default_factory=list)
    labels: list[dict[str, str]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _read_json(run: _Run, name: str) -> dict[str, Any]:
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


def _read_csv(run: _Run, name: str) -> tuple[list[str], list[dict[str, str]]]:
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


def _read_run(out: Path) -> _Run:
    run = _Run(out=out)
    run.info = _read_json(run, "run.json")
    run.summary = _read_json(run, "summary.json")
    run.columns, run.cases = _read_csv(run, "cases.csv")
    _, run.labels = _read_csv(run, "labels.csv")
    if not run.columns and not run.info and not run.problems:
        raise DirioError(f"{out}: not a dirio run folder (neither cases.csv nor run.json found)")
    return run


def _number(text: Any) -> float | None:
    """A finite float from a CSV cell or JSON value; None when empty, not numeric, NaN or infinite."""
    if isinstance(text, bool) or text is None:
        return None
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _values(rows: Sequence[Mapping[str, str]], key: str) -> np.ndarray:
    """The finite values of a column."""
    values = [_number(row.get(key)) for row in rows]
    return np.array([v for v in values if v is not None], dtype=np.float64)


def _failures(run: _Run) -> list[tuple[str, str]]:
    """``(pair, error)`` of every failed pair: summary.json's list, then failed rows of cases.csv."""
    failed: dict[str, str] = {}
    for item in run.summary.get("failed") or []:
        if isinstance(item, Mapping):
            failed[str(item.get("pair", "?"))] = str(item.get("error", ""))
    for row in run.cases:
        if row.get("status") == "failed":
            failed.setdefault(row.get("pair", "?"), row.get("error", ""))
    return list(failed.items())


# --- box plots -------------------------------------------------------------------------------------


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


def _metric_boxplots(path: Path, cases: Sequence[Mapping[str, str]]) -> bool:
    """Write one box plot panel per metric with values (BOX_PANELS); False when there are none."""
    panels = []
    for keys, ticks in BOX_PANELS:
        groups = [(_values(cases, key), tick) for key, tick in zip(keys, ticks)]
        groups = [(values, tick) for values, tick in groups if values.size]
        if groups:
            panels.append((_METRIC_BY_KEY[keys[-1]], groups))
    if not panels:
        return False
    columns = min(len(panels), BOX_PANELS_PER_ROW)
    rows = math.ceil(len(panels) / columns)
    fig = _new_figure(BOX_PANEL_INCHES * columns, BOX_HEIGHT_INCHES * rows)
    for number, (metric, groups) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, number + 1)
        _boxes(ax, [values for values, _ in groups], [tick for _, tick in groups], seed=number)
        arrow = "↑" if metric.better == "higher" else "↓"
        ax.set_title(f"{metric.heading}  {arrow} better, n = {groups[-1][0].size}", fontsize=9)
    _save(fig, path, overwrite=True)
    return True


def _label_order(label: str) -> tuple:
    """Sort key: numeric labels by value, then other names alphabetically."""
    number = _number(label)
    return (0, number, label) if number is not None else (1, 0.0, label)


def _label_boxplots(path: Path, rows: Sequence[Mapping[str, str]]) -> bool:
    """Write one row of box plots per label metric (labels.csv); False when there are no values."""
    labels = sorted({row.get("label", "") for row in rows if row.get("label", "")}, key=_label_order)
    panels = []
    for key in LABEL_METRICS:
        groups = [_values([r for r in rows if r.get("label") == label], key) for label in labels]
        if any(g.size for g in groups):
            panels.append((_METRIC_BY_KEY[key], groups))
    if not panels:
        return False
    width = min(max(MIN_LABEL_FIGURE_INCHES, LABEL_BOX_INCHES * len(labels) + 1.0), MAX_LABEL_FIGURE_INCHES)
    fig = _new_figure(width, BOX_HEIGHT_INCHES * len(panels))
    for number, (metric, groups) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, number + 1)
        _boxes(ax, groups, labels, seed=number)
        if len(labels) > 20:
            ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        arrow = "↑" if metric.better == "higher" else "↓"
        ax.set_title(f"{metric.heading} per label  {arrow} better", fontsize=9)
        ax.set_xlabel("label", fontsize=8)
    _save(fig, path, overwrite=True)
    return True


# --- HTML ----------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    """HTML-escaped text (quotes included, so it is safe in attribute values too)."""
    return html.escape(str(value), quote=True)


def _href(*parts: str) -> str:
    """A relative URL from path parts, each percent-encoded, HTML-escaped for an attribute."""
    return _e("/".join(quote(part, safe="") if part != ".." else part for part in parts))


def _png_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG's IHDR chunk; None when it is not a readable PNG."""
    try:
        with path.open("rb") as handle:
            head = handle.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


def _img(src_parts: Sequence[str], file: Path, alt: str, lazy: bool = False) -> str:
    size = _png_size(file)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    loading = ' loading="lazy"' if lazy else ""
    return f'<img src="{_href(*src_parts)}" alt="{_e(alt)}"{dims}{loading}>'


def _format(value: float | None, digits: int) -> str:
    return '<span class="na">–</span>' if value is None else f"{value:.{digits}f}"


def _format_any(value: Any) -> str:
    """A JSON value as page text: numbers compact, containers as JSON, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=False)
    return str(value)


def _key_value_table(mapping: Mapping[str, Any], css_class: str = "kv") -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_format_any(v))}</td></tr>" for k, v in mapping.items())
    return f'<table class="{css_class}"><tbody>{rows}</tbody></table>'


def _table_columns(run: _Run) -> list[tuple[str, Metric | None]]:
    """Columns of the per-pair table: pair, status, every numeric column with a value, error."""
    columns: list[tuple[str, Metric | None]] = [("pair", None), ("status", None)]
    numeric = [m.key for m in METRICS] + [c for c in run.columns if c not in _METRIC_BY_KEY and c not in _TEXT_COLUMNS]
    for key in numeric:
        if key not in run.columns or not any(row.get(key) for row in run.cases):
            continue
        metric = _METRIC_BY_KEY.get(key) or Metric(key, key, "", "", 4, f"column {key} of cases.csv")
        columns.append((key, metric))
    if any(row.get("error") for row in run.cases):
        columns.append(("error", None))
    return columns


def _cases_table(run: _Run, thumbnails: Mapping[str, int]) -> str:
    columns = _table_columns(run)
    head = []
    for key, metric in columns:
        if metric is None:
            kind, title, tip = "text", key, {"pair": "fixed_moving case ids", "status": "done or failed"}.get(key, "")
        else:
            kind, title = "number", metric.heading
            tip = metric.description + (f"; {metric.better} is better" if metric.better else "")
        css = ' class="num"' if kind == "number" else ""
        head.append(
            f'<th scope="col" data-key="{_e(key)}" data-type="{kind}" aria-sort="none" title="{_e(tip)}"{css}>'
            f'<button type="button">{_e(title)}</button></th>'
        )
    body = []
    for row in run.cases:
        pair = row.get("pair", "")
        cells = []
        for key, metric in columns:
            raw = row.get(key, "")
            if key == "pair" and pair in thumbnails:
                cells.append(f'<td data-value="{_e(pair)}"><a href="#pair-{thumbnails[pair]}">{_e(pair)}</a></td>')
            elif metric is None:
                css = ' class="error"' if key == "error" else ""
                cells.append(f'<td data-value="{_e(raw)}"{css}>{_e(raw)}</td>')
            else:
                value = _number(raw)
                data = "" if value is None else f' data-value="{value!r}"'
                shown = _format(value, metric.digits) if value is not None or not raw else _e(raw)
                cells.append(f'<td class="num"{data}>{shown}</td>')
        status = row.get("status", "")
        css = ' class="failed"' if status == "failed" else ""
        body.append(f"<tr{css}>{''.join(cells)}</tr>")
    return (
        '<table id="cases" class="sortable">'
        f"<thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _aggregates_table(summary: Mapping[str, Any]) -> str:
    aggregates = summary.get("aggregates")
    if not isinstance(aggregates, Mapping) or not aggregates:
        return ""
    statistics: list[str] = []
    for values in aggregates.values():
        for stat in values if isinstance(values, Mapping) else ["value"]:
            if stat not in statistics:
                statistics.append(stat)
    head = "".join(
        f'<th scope="col" class="num" title="{_e(STATISTIC_DESCRIPTIONS.get(s, ""))}">'
        f"{_e('30th percentile' if s == '30' else s)}</th>"
        for s in statistics
    )
    rows = []
    for name, values in aggregates.items():
        values = values if isinstance(values, Mapping) else {"value": values}
        cells = "".join(f'<td class="num">{_e(_format_any(values.get(s)))}</td>' for s in statistics)
        shown = AGGREGATE_NAMES.get(name, name)
        rows.append(f'<tr><th scope="row">{_e(shown)} <span class="muted">{_e(name)}</span></th>{cells}</tr>')
    return (
        f'<table id="aggregates"><thead><tr><th scope="col">metric</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _thumbnail_gallery(run: _Run, thumbnails: Mapping[str, int]) -> str:
    cards = []
    for row in run.cases:
        pair = row.get("pair", "")
        if pair not in thumbnails:
            continue
        file = run.out / THUMBNAIL_DIR / f"{pair}.png"
        parts = ("..", THUMBNAIL_DIR, f"{pair}.png")
        facts = []
        for key in ("dice", "tre_mm", "fold_percent"):
            value = _number(row.get(key))
            if value is not None:
                metric = _METRIC_BY_KEY[key]
                unit = f" {metric.unit}" if metric.unit else ""
                facts.append(f"{metric.title} {value:.{metric.digits}f}{unit}")
        caption = f"<b>{_e(pair)}</b>"
        if row.get("fixed") or row.get("moving"):
            fixed, moving = _e(row.get("fixed", "")), _e(row.get("moving", ""))
            caption += f'<br><span class="muted">fixed {fixed}<br>moving {moving}</span>'
        if facts:
            caption += f"<br>{_e(' · '.join(facts))}"
        cards.append(
            f'<figure id="pair-{thumbnails[pair]}"><a href="{_href(*parts)}">'
            f"{_img(parts, file, f'thumbnail of {pair}', lazy=True)}</a><figcaption>{caption}</figcaption></figure>"
        )
    return f'<div class="gallery">{"".join(cards)}</div>' if cards else ""


def _timings(run: _Run) -> dict[str, Any]:
    info = run.info
    shown: dict[str, Any] = {}
    for key in ("started", "finished", "device", "world_size", "threads", "pairs", "done", "failed"):
        if key in info:
            shown[key] = info[key]
    seconds = _number(info.get("seconds"))
    if seconds is not None:
        minutes, secs = divmod(seconds, 60.0)
        shown["wall time"] = f"{seconds:.1f} s ({int(minutes // 60)}:{int(minutes % 60):02d}:{secs:04.1f})"
        done = _number(info.get("done"))
        if done and seconds > 0:
            shown["throughput"] = f"{60.0 * done / seconds:.3g} pairs per minute (this invocation's wall time)"
    per_pair = _values([r for r in run.cases if r.get("status") == "done"], "seconds")
    if per_pair.size:
        shown["time per done pair"] = (
            f"mean {per_pair.mean():.1f} s, median {np.median(per_pair):.1f} s, max {per_pair.max():.1f} s"
        )
    return shown


_CSS = """
:root { --fg: #1b1b1b; --muted: #666; --line: #d9d9d9; --bad: #b00020; --head: #f1f3f5; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); margin: 0 auto; max-width: 1500px; padding: 0 1.5rem 3rem; }
h1 { font-size: 1.5rem; margin: 1.2rem 0 0.2rem; }
h2 { font-size: 1.2rem; margin: 2rem 0 0.5rem; border-bottom: 1px solid var(--line); padding-bottom: 0.2rem; }
nav a { margin-right: 1rem; }
.muted, .na { color: var(--muted); }
table { border-collapse: collapse; margin: 0.4rem 0 1rem; }
th, td { border-bottom: 1px solid var(--line); padding: 0.2rem 0.6rem; text-align: left; vertical-align: top; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: var(--head); position: sticky; top: 0; white-space: nowrap; }
#cases tbody tr:nth-child(even) { background: #fafafa; }
#cases tbody tr:hover { background: #eef4ff; }
th button { font: inherit; font-weight: bold; color: inherit; background: none; border: 0; padding: 0;
            cursor: pointer; }
th[aria-sort="none"] button::after { content: " \\21C5"; color: #aaa; }
th[aria-sort="ascending"] button::after { content: " \\25B2"; }
th[aria-sort="descending"] button::after { content: " \\25BC"; }
tr.failed td { color: var(--bad); }
td.error { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 0.8rem; max-width: 36rem; }
table.kv th { font-weight: normal; color: var(--muted); white-space: nowrap; }
table.kv td { font-family: ui-monospace, monospace; font-size: 0.85rem; word-break: break-all; }
.plots img { max-width: 100%; height: auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(390px, 1fr)); gap: 0.8rem; }
figure { margin: 0; border: 1px solid var(--line); padding: 0.4rem; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.82rem; word-break: break-all; }
.legend span.box { display: inline-block; width: 1em; height: 1em; vertical-align: -0.15em; border: 1px solid #888; }
.legend span.scale { display: inline-block; width: 12rem; height: 0.9em; vertical-align: -0.1em;
                     border: 1px solid #888; }
.problems { color: var(--bad); }
ul.failures li { margin-bottom: 0.4rem; }
ul.failures code { white-space: pre-wrap; }
"""

# The per-pair table sorts on a click on its header: numbers by value, text in natural order
# (case ids "0002" < "0010"), cells without a value always last, ties kept in their current
# order (so sorting by one column then another sorts by both); a second click reverses.
_SCRIPT = """
(function () {
  "use strict";
  function sortKey(cell, numeric) {
    var raw = cell ? cell.getAttribute("data-value") : null;
    if (raw === null || raw === "") { return null; }
    if (!numeric) { return raw; }
    var value = Number(raw);
    return isFinite(value) ? value : null;
  }
  function sortTable(table, column, descending) {
    var header = table.tHead.rows[0].cells;
    var numeric = header[column].getAttribute("data-type") === "number";
    var body = table.tBodies[0];
    var items = Array.prototype.map.call(body.rows, function (row, index) {
      return { row: row, key: sortKey(row.cells[column], numeric), index: index };
    });
    items.sort(function (a, b) {
      if (a.key === null || b.key === null) {
        return a.key === b.key ? a.index - b.index : (a.key === null ? 1 : -1);
      }
      var order = numeric ? (a.key < b.key ? -1 : (a.key > b.key ? 1 : 0))
                          : a.key.localeCompare(b.key, undefined, { numeric: true });
      return (descending ? -order : order) || a.index - b.index;
    });
    items.forEach(function (item) { body.appendChild(item.row); });
    for (var i = 0; i < header.length; i += 1) {
      header[i].setAttribute("aria-sort", i === column ? (descending ? "descending" : "ascending") : "none");
    }
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      var button = th.querySelector("button");
      if (!button) { return; }
      button.addEventListener("click", function () {
        sortTable(table, column, th.getAttribute("aria-sort") === "ascending");
      });
    });
  });
})();
"""


def _page(run: _Run, images: Mapping[str, str], thumbnails: Mapping[str, int]) -> str:
    info = run.info
    dataset = str(info.get("dataset") or run.summary.get("name") or run.out.name)
    split = info.get("split")
    name = Path(dataset).stem if dataset.endswith(".json") else Path(dataset).name
    title = f"dirio run: {name}" + (f", {split}" if split else "")
    failures = _failures(run)
    count = len(run.cases) or info.get("pairs", 0)
    done = sum(row.get("status") == "done" for row in run.cases) if run.cases else info.get("done", 0)
    sections = []
    nav = []

    def section(anchor: str, heading: str, content: str) -> None:
        nav.append(f'<a href="#{anchor}">{_e(heading)}</a>')
        sections.append(f'<section id="{anchor}"><h2>{_e(heading)}</h2>{content}</section>')

    if run.problems:
        sections.append(
            '<ul class="problems">' + "".join(f"<li>{_e(p)}</li>" for p in run.problems) + "</ul>"
        )
    aggregates = _aggregates_table(run.summary)
    if aggregates:
        section("summary", "Summary", aggregates)
    if run.cases:
        section(
            "pairs",
            "Pairs",
            '<p class="muted">Click a column header to sort (again to reverse); empty cells stay last. '
            "Hover a header for the definition.</p>" + _cases_table(run, thumbnails),
        )
    plots = []
    if "metrics" in images:
        plots.append(_img([images["metrics"]], run.out / REPORT_DIR / images["metrics"], "box plots per metric"))
    if "labels" in images:
        plots.append(_img([images["labels"]], run.out / REPORT_DIR / images["labels"], "box plots per label"))
    if plots:
        section("plots", "Box plots", '<div class="plots">' + "<br>".join(plots) + "</div>")
    gallery = _thumbnail_gallery(run, thumbnails)
    if gallery:
        legend = (
            '<p class="legend muted">Top row: central slices, fixed in magenta, warped in green '
            "(aligned: grey to white). Bottom row: Jacobian determinant, one scale for all pairs: "
            f"{THUMB_JACOBIAN_LIMITS[0]:g} (compression) "
            f'<span class="scale" style="background: {_jacobian_gradient_css()}"></span> '
            f"{THUMB_JACOBIAN_LIMITS[1]:g} (expansion), white at 1; "
            f'<span class="box" style="background: {to_hex(FOLD_COLOR)}"></span> folding (det ≤ 0). '
            "Click a thumbnail for full size.</p>"
        )
        section("thumbnails", "Thumbnails", legend + gallery)
    if failures:
        items = "".join(f"<li><b>{_e(pair)}</b>: <code>{_e(error)}</code></li>" for pair, error in failures)
        section("failures", f"Failures ({len(failures)})", f'<ul class="failures">{items}</ul>')
    run_parts = []
    timings = _timings(run)
    if timings:
        run_parts.append("<h3>Timings</h3>" + _key_value_table(timings))
    settings = {}
    for key in ("dataset", "split", "config_file", "config_hash"):
        if key in info:
            settings[key] = info[key]
    for key in ("config", "run_options"):
        if isinstance(info.get(key), Mapping):
            settings.update({f"{key}.{k}": v for k, v in info[key].items()})
    if settings:
        run_parts.append("<h3>Configuration</h3>" + _key_value_table(settings))
    if isinstance(info.get("versions"), Mapping) and info["versions"]:
        run_parts.append("<h3>Software versions</h3>" + _key_value_table(info["versions"]))
    if run_parts:
        section("run", "Run", "".join(run_parts))

    counts = f"{count} pairs, {done} done, {len(failures)} failed"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<header>
<h1>{_e(title)}</h1>
<p class="muted">{_e(dataset)} · {_e(counts)}</p>
<nav>{"".join(nav)}</nav>
</header>
<main>
{"".join(sections)}
</main>
<script>{_SCRIPT}</script>
</body>
</html>
"""


def write_report(out_dir: PathLike) -> Path:
    """Write the HTML report of a run folder: ``OUT/report/index.html`` and its PNGs.

    Reads ``run.json``, ``cases.csv``, ``labels.csv``, ``summary.json`` and ``thumbnails/`` of
    ``out_dir`` (layout in the module docstring); every one is optional, but at least
    ``cases.csv`` or ``run.json`` must be there. Box plots are drawn for the metrics and labels
    that have values; failed pairs appear in the table (red, with their error) and in the
    failure list; files that cannot be parsed are named at the top of the page. The report
    folder's files are replaced, each atomically.

    Args:
        out_dir: the run folder (``-o OUT`` of ``dirio run``).
    Returns:
        The path of ``index.html``.
    Raises:
        DirioError: ``out_dir`` is not a folder, or holds neither ``cases.csv`` nor ``run.json``.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise DirioError(f"{out}: no such run folder")
    run = _read_run(out)
    report_dir = out / REPORT_DIR
    report_dir.mkdir(exist_ok=True)

    images: dict[str, str] = {}
    done = [row for row in run.cases if row.get("status", "done") == "done"]
    for name, file, draw, rows in (
        ("metrics", METRICS_PNG, _metric_boxplots, done),
        ("labels", LABELS_PNG, _label_boxplots, run.labels),
    ):
        if draw(report_dir / file, rows):
            images[name] = file
        else:
            (report_dir / file).unlink(missing_ok=True)  # left from an earlier build; not shown now
    thumbnails = {}
    for row in run.cases:
        pair = row.get("pair", "")
        if pair and pair not in thumbnails and (out / THUMBNAIL_DIR / f"{pair}.png").is_file():
            thumbnails[pair] = len(thumbnails)
    path = report_dir / PAGE_NAME
    write_text(path, _page(run, images, thumbnails), overwrite=True)
    return path
