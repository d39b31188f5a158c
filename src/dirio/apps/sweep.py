"""Pareto sweeps: one pair registered with a list of regularization weights and combination rules.

The papers on gradient projection ask how to pick the regularization weight for each pair; a
sweep answers it by showing the trade-off. Every (rule, weight) run is scored for accuracy
(Dice with label maps, TRE with keypoints, otherwise the similarity loss at full resolution) and
for regularity (% det <= 0, NDV %, SDlogJ), and the non-dominated runs of each
accuracy-regularity pair form that pair's Pareto front.

``surgery`` uses the regularizer only as a direction, so its result does not depend on a common
scale of the weights: it is run once per sweep (weight reported as NaN).
"""

from __future__ import annotations

import copy
import csv
import io
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dirio.errors import DirioError

# Regularity measures on the x axes (all lower is better): keys of dirio.evaluation.evaluate.evaluate_field.
REGULARITY = (
    ("percent_nonpositive_jacobian", "% det <= 0"),
    ("ndv_percent", "NDV %"),
    ("sdlogj_l2r", "SDlogJ"),
)
# Distinct colours and markers per rule (matplotlib's tab10 colours).
RULE_STYLES = {"sum": ("tab:blue", "o"), "pcgrad": ("tab:orange", "s"), "surgery": ("tab:green", "D")}
# Weights are annotated beside their points with this many significant digits.
WEIGHT_DIGITS = 3
# An x axis whose positive values span more than this ratio is drawn logarithmically (symlog).
LOG_AXIS_RATIO = 100.0


def pareto_mask(costs: np.ndarray) -> np.ndarray:
    """Non-dominated rows of a cost matrix (every column: lower is better).

    A row is dominated when another row is no worse in every column and better in one. Rows with
    a NaN are never on the front and dominate nothing.

    Args:
        costs: ``(N, M)`` array.
    Returns:
        ``(N,)`` bool array, True for the Pareto-optimal rows (ties: all kept).
    """
    costs = np.asarray(costs, dtype=float)
    valid = ~np.isnan(costs).any(axis=1)
    front = valid.copy()
    for i in np.flatnonzero(valid):
        others = costs[valid]
        dominated = np.any(np.all(others <= costs[i], axis=1) & np.any(others < costs[i], axis=1))
        front[i] = not dominated
    return front


def sweep_runs(rules: Sequence[str], weights: Sequence[float]) -> list[tuple[str, float]]:
    """The (rule, weight) runs of a sweep: every weight for each rule, one run for ``surgery``.

    Raises:
        ValueError: no rules or weights, an unknown rule, or a weight that is not positive.
    """
    from dirio.optim.combine import COMBINE_RULES

    if not rules or not weights:
        raise ValueError("a sweep needs at least one rule and one weight")
    unknown = [r for r in rules if r not in COMBINE_RULES]
    if unknown:
        raise ValueError(f"unknown combination rule {unknown[0]!r}; choose from {', '.join(COMBINE_RULES)}")
    if any(not w > 0 for w in weights):
        raise ValueError(f"sweep weights must be positive, got {', '.join(str(w) for w in weights)}")
    runs: list[tuple[str, float]] = []
    for rule in dict.fromkeys(rules):
        if rule == "surgery":
            runs.append((rule, float("nan")))
        else:
            runs.extend((rule, float(w)) for w in sorted(set(weights)))
    return runs


def _valid_options(rule: str) -> set[str]:
    from dirio.optim.combine import COMBINE_RULES

    return set(COMBINE_RULES.options(rule)) - {"generator"}


def _rule_options(rule: str, options: dict) -> dict:
    """The shared ``combine_options`` a rule accepts (e.g. ``project`` only for pcgrad)."""
    valid = _valid_options(rule)
    return {k: v for k, v in options.items() if k in valid}


def check_sweep_options(rules: Sequence[str], options: dict) -> None:
    """Reject ``combine_options`` that no rule of the sweep accepts (a typo would be ignored silently).

    Raises:
        ValueError: naming the option and the options the rules accept.
    """
    valid = set().union(*(_valid_options(rule) for rule in rules))
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"combination option(s) {', '.join(unknown)} are taken by none of the rules "
                         f"{', '.join(rules)}; valid: {', '.join(sorted(valid))}")


def settings_for_run(settings, rule: str, weight: float):
    """A copy of ``settings`` with the combination rule and every regularizer weight replaced."""
    run = copy.deepcopy(settings)
    run.optimization.combine = rule
    run.optimization.combine_options = _rule_options(rule, settings.optimization.combine_options)
    if not math.isnan(weight):
        run.terms.regularizers = {name: weight for name in settings.terms.regularizers}
    return run


def full_resolution_similarity(fixed, moving, disp: np.ndarray, settings, fixed_mask=None) -> float:
    """The settings' similarity loss between the fixed image and the warped moving image.

    Both images are normalised as for registration; the moving image is warped by ``disp``
    (``(*S, ndim)`` voxels) on the full grid. Lower is better.
    """
    from dirio.api import normalised
    from dirio.core.fields import field_from_numpy, warp
    from dirio.losses.by_level import at_level

    similarity = at_level(settings.terms.similarity_object(), len(settings.pyramid.levels) - 1)  # the finest level's

    def tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]

    fixed_t = tensor(normalised(fixed, settings))
    warped = warp(tensor(normalised(moving, settings)), field_from_numpy(disp))
    mask = None if fixed_mask is None else tensor(np.asarray(fixed_mask) != 0)
    with torch.no_grad():
        return float(similarity(similarity.features(fixed_t), similarity.features(warped), mask))


def accuracy_key(rows: Sequence[dict]) -> tuple[str, str, bool]:
    """The accuracy measure of a sweep: ``(key, label, higher_is_better)``.

    Dice when the rows have it, else TRE, else the similarity loss.
    """
    if rows and "dice_mean" in rows[0]:
        return "dice_mean", "Dice (mean over labels)", True
    if rows and "tre_mm_mean" in rows[0]:
        return "tre_mm_mean", "TRE mm (mean)", False
    return "similarity", "similarity loss (full resolution)", False


def mark_fronts(rows: list[dict]) -> None:
    """Add ``front_<regularity key>`` (bool) to every row: on that accuracy-regularity front."""
    key, _, higher = accuracy_key(rows)
    accuracy = np.array([r.get(key, np.nan) for r in rows], dtype=float)
    for reg_key, _ in REGULARITY:
        costs = np.stack([-accuracy if higher else accuracy, [r[reg_key] for r in rows]], axis=1)
        for row, on in zip(rows, pareto_mask(costs)):
            row[f"front_{reg_key}"] = bool(on)


def run_sweep(
    fixed,
    moving,
    *,
    settings,
    weights: Sequence[float],
    rules: Sequence[str] = ("sum", "pcgrad", "surgery"),
    fixed_labels=None,
    moving_labels=None,
    label_ids: Sequence[int] | None = None,
    fixed_points=None,
    moving_points=None,
    spacing: Sequence[float] | None = None,
    fixed_mask=None,
    moving_mask=None,
    device="auto",
    log=None,
) -> list[dict]:
    """Register one pair once per (rule, weight) and score each field.

    Args:
        fixed, moving: ``S`` arrays on the same grid.
        settings: the base :class:`dirio.config.settings.Settings`; each run replaces the combination
            rule and sets every regularizer's weight to the run's weight. ``combine_options``
            apply to the rules that accept them (e.g. ``scope``), the others ignore them.
        weights, rules: the sweep (see :func:`sweep_runs`).
        fixed_labels, moving_labels, label_ids: label maps for Dice and HD95.
        fixed_points, moving_points, spacing: keypoints (voxels) and voxel size (mm) for TRE.
        log: optional ``callable(str)`` for one progress line per run.
    Returns:
        One dict per run: ``rule``, ``weight`` (NaN for surgery), ``seconds``, ``similarity``,
        the regularity and accuracy metrics of :func:`dirio.evaluation.evaluate.evaluate_field` (scalars
        only), ``conflict_rate`` (NaN when the rule logs none) and ``front_<measure>`` flags.
    """
    from dirio.api import register
    from dirio.evaluation.evaluate import evaluate_field

    rows = []
    runs = sweep_runs(rules, weights)
    check_sweep_options(rules, settings.optimization.combine_options)
    for number, (rule, weight) in enumerate(runs, 1):
        run_settings = settings_for_run(settings, rule, weight)
        start = time.perf_counter()
        result = register(fixed, moving, settings=run_settings, fixed_mask=fixed_mask, moving_mask=moving_mask,
                          device=device)
        seconds = time.perf_counter() - start
        metrics = evaluate_field(
            result.disp, fixed_labels=fixed_labels, moving_labels=moving_labels, labels=label_ids,
            fixed_points=fixed_points, moving_points=moving_points, spacing=spacing,
        )
        row = {"rule": rule, "weight": weight, "seconds": seconds,
               "similarity": full_resolution_similarity(fixed, moving, result.disp, run_settings, fixed_mask)}
        row.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        # the running rate of the last row that has one (a run's last, step-less row has none)
        rates = [r["conflict_rate"] for r in result.history if "conflict_rate" in r]
        row["conflict_rate"] = float(rates[-1]) if rates else float("nan")
        rows.append(row)
        if log is not None:
            shown = "-" if math.isnan(weight) else f"{weight:g}"
            log(f"sweep {number}/{len(runs)}: {rule} weight {shown}: {seconds:.1f} s")
    mark_fronts(rows)
    return rows


# --- outputs -----------------------------------------------------------------------------------------


def _columns(rows: Sequence[dict]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    return columns


def rows_csv(rows: Sequence[dict]) -> str:
    """The sweep table as CSV text (one column per key)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(value, digits: int = 4) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def rows_markdown(rows: Sequence[dict]) -> str:
    """The sweep table as GitHub markdown: rule, weight, accuracy, regularity, time, fronts."""
    key, label, _ = accuracy_key(rows)
    header = ["rule", "weight", label, "similarity", *(name for _, name in REGULARITY), "conflict rate", "s",
              "on front of"]
    if key == "dice_mean" and "hd95_voxels" in rows[0]:
        header.insert(3, "HD95 vox")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        fronts = ", ".join(name for reg, name in REGULARITY if row.get(f"front_{reg}"))
        cells = [row["rule"], _cell(row["weight"], 3), _cell(row.get(key, float("nan"))), _cell(row["similarity"])]
        if "HD95 vox" in header:
            cells.insert(3, _cell(row.get("hd95_voxels", float("nan"))))
        cells += [_cell(row[reg]) for reg, _ in REGULARITY]
        cells += [_cell(row["conflict_rate"], 3), _cell(row["seconds"], 3), fronts]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pareto_figure(path, rows: Sequence[dict], title: str | None = None, overwrite: bool = False) -> Path:
    """Accuracy against each regularity measure, one panel each, with the Pareto fronts.

    Each rule's runs are joined in order of weight (its trade-off curve) and labelled with their
    weight; the black dashed staircase joins the panel's non-dominated runs (all rules together).
    Written atomically as PNG.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dirio.io.atomic import atomic_output

    key, label, higher = accuracy_key(rows)
    fig = Figure(figsize=(4.2 * len(REGULARITY), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(REGULARITY))
    for ax, (reg_key, reg_name) in zip(axes, REGULARITY):
        for rule in dict.fromkeys(r["rule"] for r in rows):
            mine = sorted((r for r in rows if r["rule"] == rule), key=lambda r: (math.isnan(r["weight"]), r["weight"]))
            color, marker = RULE_STYLES.get(rule, ("tab:gray", "^"))
            xs = [r[reg_key] for r in mine]
            ys = [r.get(key, np.nan) for r in mine]
            ax.plot(xs, ys, color=color, marker=marker, linewidth=1.0, label=rule)
            for r, x, y in zip(mine, xs, ys):
                if not math.isnan(r["weight"]):
                    ax.annotate(f"{r['weight']:.{WEIGHT_DIGITS}g}", (x, y), textcoords="offset points",
                                xytext=(4, 3), fontsize=7, color=color)
        front = sorted((r for r in rows if r.get(f"front_{reg_key}")), key=lambda r: r[reg_key])
        if len(front) > 1:
            ax.plot([r[reg_key] for r in front], [r.get(key, np.nan) for r in front], color="black",
                    linestyle="--", linewidth=0.8, drawstyle="steps-post", label="Pareto front")
        positive = [r[reg_key] for r in rows if r[reg_key] > 0]
        if positive and max(positive) > LOG_AXIS_RATIO * min(positive):
            # an outlier (a folding run) would squeeze the front into one line: logarithmic axis,
            # linear below the smallest positive value so that zeros stay visible
            ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlabel(f"{reg_name} (lower is smoother)", fontsize=9)
        ax.set_ylabel(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    try:
        with atomic_output(path, overwrite=overwrite) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        fig.clear()
    return path


def sweep_output_paths(out_dir) -> dict[str, Path]:
    """Files :func:`sweep_files` writes into ``out_dir``."""
    out_dir = Path(out_dir)
    return {"json": out_dir / "sweep.json", "csv": out_dir / "sweep.csv", "table": out_dir / "sweep.md",
            "figure": out_dir / "pareto.png"}


def sweep_files(
    fixed,
    moving,
    out_dir,
    *,
    settings,
    weights: Sequence[float],
    rules: Sequence[str] = ("sum", "pcgrad", "surgery"),
    fixed_labels=None,
    moving_labels=None,
    fixed_mask=None,
    moving_mask=None,
    fixed_keypoints=None,
    moving_keypoints=None,
    label_ids: Sequence[int] | None = None,
    resample: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    ndim: int = 3,
    log=None,
) -> dict:
    """Sweep a pair of image files and write ``sweep.json``, ``sweep.csv``, ``sweep.md`` and ``pareto.png``.

    Inputs are read and checked as by ``dirio register`` (:func:`dirio.apps.workflow.load_inputs`).
    Nothing existing is replaced unless ``overwrite``, and then only files an earlier sweep wrote
    (``sweep.json`` is their manifest: :mod:`dirio.io.manifest`). Returns the JSON record.
    """
    from dirio.io.atomic import check_output_folder, check_writable, write_json, write_text
    from dirio.io.manifest import check_replaceable, earlier_outputs, files_with_checksums, sign_record
    from dirio.apps.workflow import load_inputs, software_versions

    paths = sweep_output_paths(out_dir)
    check_output_folder(out_dir)
    check_writable(paths.values(), overwrite)
    if overwrite:
        check_replaceable(out_dir, [path.name for path in paths.values()], earlier_outputs(out_dir, kinds=("sweep",)))
    try:
        sweep_runs(rules, weights)
        check_sweep_options(rules, settings.optimization.combine_options)
        for rule in dict.fromkeys(rules):  # every run's settings are valid before the first one starts
            settings_for_run(settings, rule, 1.0).optimization.validate()
    except ValueError as error:
        raise DirioError(str(error)) from None
    inputs = load_inputs(
        fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, fixed_mask=fixed_mask,
        moving_mask=moving_mask, fixed_keypoints=fixed_keypoints, moving_keypoints=moving_keypoints,
        resample=resample, ndim=ndim,
    )

    def data(image):
        return None if image is None else image.data

    rows = run_sweep(
        inputs.fixed.data, inputs.moving.data, settings=settings, weights=weights, rules=rules,
        fixed_labels=data(inputs.fixed_labels), moving_labels=data(inputs.moving_labels), label_ids=label_ids,
        fixed_points=inputs.fixed_points, moving_points=inputs.moving_points, spacing=inputs.fixed.spacing,
        fixed_mask=data(inputs.fixed_mask), moving_mask=data(inputs.moving_mask), device=device, log=log,
    )
    record = {
        "fixed": str(fixed),
        "moving": str(moving),
        "weights": list(weights),
        "rules": list(rules),
        "accuracy": accuracy_key(rows)[0],
        "rows": rows,
        "settings": settings.to_dict(),
        "versions": software_versions(),
    }
    table = rows_markdown(rows)
    pareto_figure(paths["figure"], rows, title=f"{Path(fixed).name} <- {Path(moving).name}", overwrite=overwrite)
    write_text(paths["csv"], rows_csv(rows), overwrite=overwrite)
    write_text(paths["table"], table, overwrite=overwrite)
    record["files"] = files_with_checksums(out_dir, [paths[key].name for key in ("figure", "csv", "table")])
    record = sign_record(record)
    write_json(paths["json"], record, overwrite=overwrite)
    record["table"] = table
    record["outputs"] = {k: str(v) for k, v in paths.items()}
    return record
