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

The run folder's layout and its parsing are in :mod:`dirio.viz.run_report`; the page's markup,
CSS and script are template files in ``dirio/viz/templates`` (:class:`string.Template`, every
value HTML-escaped unless it is markup built here from escaped parts).
"""

from __future__ import annotations

import functools
import html
import json
import os
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap, TwoSlopeNorm, to_hex
from PIL import Image

from dirio.errors import DirioError
from dirio.io.atomic import atomic_output, check_writable, write_text
from dirio.viz.boxplots import label_boxplots, metric_boxplots
from dirio.viz.canvas import check_png_path, new_figure
from dirio.viz.figures import FOLD_COLOR, JACOBIAN_CMAP
from dirio.viz.run_report import (
    METRIC_BY_KEY,
    METRICS,
    TEXT_COLUMNS,
    Metric,
    RunFolder,
    failures,
    finite_number,
    read_run,
    timings,
)
from dirio.viz.slices import (
    as_array,
    central_views,
    check_images,
    display_window,
    jacobian_planes,
    normalised_to_window,
    view_plane,
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
    ``det <= 0`` in FOLD_COLOR. Planes and orientation follow :mod:`dirio.viz.slices` (three
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
    path = check_png_path(path)
    fixed, warped = as_array(fixed, np.float32), as_array(warped, np.float32)
    shape = check_images(path, fixed=fixed, warped=warped)
    disp = _channels_last(as_array(disp, np.float32), shape, path)
    check_writable(path, overwrite)

    views = central_views(shape)
    fixed_planes = [view_plane(fixed, view, index) for view, index in views]
    warped_planes = [view_plane(warped, view, index) for view, index in views]
    det_planes = jacobian_planes(disp, views)
    fixed_window, warped_window = display_window(*fixed_planes), display_window(*warped_planes)
    norm = TwoSlopeNorm(vmin=THUMB_JACOBIAN_LIMITS[0], vcenter=1.0, vmax=THUMB_JACOBIAN_LIMITS[1])
    fold_cmap = ListedColormap([FOLD_COLOR])

    # Manual layout, no layout engine (faster; there is no text to make room for): every column
    # THUMB_PANEL_INCHES wide, both rows as high as the tallest plane.
    gap = THUMB_GAP_INCHES
    row_height = max(THUMB_PANEL_INCHES * p.shape[0] / p.shape[1] for p in fixed_planes)
    width = len(views) * (THUMB_PANEL_INCHES + gap) + gap
    height = 2 * (row_height + gap) + gap
    fig = new_figure(width, height)
    fig.set_layout_engine("none")
    for column, (view, _) in enumerate(views):
        left = (gap + column * (THUMB_PANEL_INCHES + gap)) / width
        for row in range(2):
            bottom = (gap + (1 - row) * (row_height + gap)) / height
            ax = fig.add_axes((left, bottom, THUMB_PANEL_INCHES / width, row_height / height))
            ax.set_axis_off()
            if row == 0:
                f = normalised_to_window(fixed_planes[column], fixed_window)
                w = normalised_to_window(warped_planes[column], warped_window)
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


# --- HTML ----------------------------------------------------------------------------------------


class _Markup(str):
    """HTML built here from escaped parts: inserted into a template as it is."""


@functools.lru_cache(maxsize=None)
def _resource(name: str) -> str:
    """The text of ``templates/<name>`` without its final newline (files end in one, POSIX style)."""
    text = resources.files("dirio.viz").joinpath("templates").joinpath(name).read_text(encoding="utf-8")
    return text[:-1] if text.endswith("\n") else text


def _render(name: str, **values: Any) -> _Markup:
    """Template ``templates/<name>`` with ``values`` substituted, each HTML-escaped unless it is
    :class:`_Markup`; every ``$name`` of the template must be given."""
    escaped = {key: value if isinstance(value, _Markup) else _e(value) for key, value in values.items()}
    return _Markup(Template(_resource(name)).substitute(escaped))


def _e(value: Any) -> str:
    """HTML-escaped text (quotes included, so it is safe in attribute values too)."""
    return html.escape(str(value), quote=True)


def _href(*parts: str) -> _Markup:
    """A relative URL from path parts, each percent-encoded, HTML-escaped for an attribute."""
    return _Markup(_e("/".join(quote(part, safe="") if part != ".." else part for part in parts)))


def _image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` in pixels of an image file (PIL reads the header only); None when it
    cannot be read as an image."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError:  # missing, unreadable or not an image (PIL.UnidentifiedImageError)
        return None


def _img(src_parts: Sequence[str], file: Path, alt: str, lazy: bool = False) -> _Markup:
    size = _image_size(file)
    dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
    loading = ' loading="lazy"' if lazy else ""
    return _Markup(f'<img src="{_href(*src_parts)}" alt="{_e(alt)}"{dims}{loading}>')


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


def _table_columns(run: RunFolder) -> list[tuple[str, Metric | None]]:
    """Columns of the per-pair table: pair, status, every numeric column with a value, error."""
    columns: list[tuple[str, Metric | None]] = [("pair", None), ("status", None)]
    numeric = [m.key for m in METRICS] + [c for c in run.columns if c not in METRIC_BY_KEY and c not in TEXT_COLUMNS]
    for key in numeric:
        if key not in run.columns or not any(row.get(key) for row in run.cases):
            continue
        metric = METRIC_BY_KEY.get(key) or Metric(key, key, "", "", 4, f"column {key} of cases.csv")
        columns.append((key, metric))
    if any(row.get("error") for row in run.cases):
        columns.append(("error", None))
    return columns


def _cases_table(run: RunFolder, thumbnails: Mapping[str, int]) -> str:
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
                value = finite_number(raw)
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


def _thumbnail_gallery(run: RunFolder, thumbnails: Mapping[str, int]) -> str:
    cards = []
    for row in run.cases:
        pair = row.get("pair", "")
        if pair not in thumbnails:
            continue
        file = run.out / THUMBNAIL_DIR / f"{pair}.png"
        parts = ("..", THUMBNAIL_DIR, f"{pair}.png")
        facts = []
        for key in ("dice", "tre_mm", "fold_percent"):
            value = finite_number(row.get(key))
            if value is not None:
                metric = METRIC_BY_KEY[key]
                unit = f" {metric.unit}" if metric.unit else ""
                facts.append(f"{metric.title} {value:.{metric.digits}f}{unit}")
        caption = f"<b>{_e(pair)}</b>"
        if row.get("fixed") or row.get("moving"):
            fixed, moving = _e(row.get("fixed", "")), _e(row.get("moving", ""))
            caption += f'<br><span class="muted">fixed {fixed}<br>moving {moving}</span>'
        if facts:
            caption += f"<br>{_e(' · '.join(facts))}"
        image = _img(parts, file, f"thumbnail of {pair}", lazy=True)
        cards.append(
            _render(
                "thumbnail.html", number=thumbnails[pair], href=_href(*parts), image=image, caption=_Markup(caption)
            )
        )
    return f'<div class="gallery">{"".join(cards)}</div>' if cards else ""


def _page(run: RunFolder, images: Mapping[str, str], thumbnails: Mapping[str, int]) -> str:
    info = run.info
    dataset = str(info.get("dataset") or run.summary.get("name") or run.out.name)
    split = info.get("split")
    name = Path(dataset).stem if dataset.endswith(".json") else Path(dataset).name
    title = f"dirio run: {name}" + (f", {split}" if split else "")
    failed = failures(run)
    count = len(run.cases) or info.get("pairs", 0)
    done = sum(row.get("status") == "done" for row in run.cases) if run.cases else info.get("done", 0)
    sections = []
    nav = []

    def section(anchor: str, heading: str, content: str) -> None:
        nav.append(f'<a href="#{_e(anchor)}">{_e(heading)}</a>')
        sections.append(_render("section.html", anchor=anchor, heading=heading, content=_Markup(content)))

    if run.problems:
        sections.append(
            '<ul class="problems">' + "".join(f"<li>{_e(p)}</li>" for p in run.problems) + "</ul>"
        )
    aggregates = _aggregates_table(run.summary)
    if aggregates:
        section("summary", "Summary", aggregates)
    if run.cases:
        section("pairs", "Pairs", _render("pairs.html", table=_Markup(_cases_table(run, thumbnails))))
    plots = []
    if "metrics" in images:
        plots.append(_img([images["metrics"]], run.out / REPORT_DIR / images["metrics"], "box plots per metric"))
    if "labels" in images:
        plots.append(_img([images["labels"]], run.out / REPORT_DIR / images["labels"], "box plots per label"))
    if plots:
        section("plots", "Box plots", '<div class="plots">' + "<br>".join(plots) + "</div>")
    gallery = _thumbnail_gallery(run, thumbnails)
    if gallery:
        legend = _render(
            "legend.html",
            low=f"{THUMB_JACOBIAN_LIMITS[0]:g}",
            high=f"{THUMB_JACOBIAN_LIMITS[1]:g}",
            gradient=_jacobian_gradient_css(),
            fold_color=to_hex(FOLD_COLOR),
        )
        section("thumbnails", "Thumbnails", legend + gallery)
    if failed:
        items = "".join(f"<li><b>{_e(pair)}</b>: <code>{_e(error)}</code></li>" for pair, error in failed)
        section("failures", f"Failures ({len(failed)})", f'<ul class="failures">{items}</ul>')
    run_parts = []
    timing = timings(run)
    if timing:
        run_parts.append("<h3>Timings</h3>" + _key_value_table(timing))
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

    counts = f"{count} pairs, {done} done, {len(failed)} failed"
    return _render(
        "page.html",
        title=title,
        css=_Markup(_resource("report.css")),
        dataset=dataset,
        counts=counts,
        nav=_Markup("".join(nav)),
        sections=_Markup("".join(sections)),
        # report.js sorts the per-pair table on a click on its header: numbers by value, text in
        # natural order (case ids "0002" < "0010"), cells without a value always last, ties kept in
        # their current order (so sorting by one column then another sorts by both); a second click
        # reverses.
        script=_Markup(_resource("report.js")),
    )


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
    run = read_run(out)
    report_dir = out / REPORT_DIR
    report_dir.mkdir(exist_ok=True)

    images: dict[str, str] = {}
    done = [row for row in run.cases if row.get("status", "done") == "done"]
    for name, file, draw, rows in (
        ("metrics", METRICS_PNG, metric_boxplots, done),
        ("labels", LABELS_PNG, label_boxplots, run.labels),
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
    write_text(path, _page(run, images, thumbnails) + "\n", overwrite=True)
    return path
