"""The Learn2Reg evaluator's result structure: per-case dicts and the mean / std / "30" aggregates.

The official evaluation script (``evaluation.py`` of the challenge's evaluation code,
``eval_version`` 2.0) writes ``{"name", "aggregates", "cases", "eval_version"}``:

* ``cases`` maps ``"<fixedcase>_<fixedmod><--<movingcase>_<movingmod>"`` to one dict per case with
  ``{metric name: {"mean": value, "detailed": value or list}}``; metric names come from its
  evaluation config (``LogJacDetStd`` for SDlogJ, ``DSC`` for Dice, ``HD95``, ``TRE_kp`` / ``TRE_lm``);
  ``detailed`` is the per-label list for DSC and HD95 (NaN for a label absent from the fixed or the
  moving map), the per-point list for TRE, and the value itself for SDlogJ.
* ``aggregates`` maps every metric name to ``{"mean", "std", "30"}`` over the cases' ``mean``
  values: ``numpy`` mean, population standard deviation (``ddof=0``), and ``"30"`` =
  ``np.quantile(values, q)`` (linear interpolation) with ``q = 0.3`` for ``dice`` and ``hd95`` and
  ``q = 0.7`` for ``sdlogj`` and ``tre``. For DSC that is :func:`dirio.evaluation.overlap.dsc30` (the 30 % of
  cases with the lowest Dice lie below it). Note the evaluator's choice for HD95: 0.3 is the *better*
  side of a lower-is-better metric; it is reproduced as written there.

Differences from the evaluator, all stated in ``summary.json["dirio"]``:

* A case the evaluator would refuse (missing field) makes it fail as a whole; here failed pairs are
  listed under ``failed`` and left out of the aggregates.
* A metric missing in some cases (a pair without labels or keypoints) is aggregated over the cases
  that have it (the evaluator expects it in every case).
* ``num_foldings``: the evaluator counts ``det <= 0`` *after* adding 3 and clipping to ``[1e-9, 1e9]``,
  which is always 0; here it is the number of voxels with ``det <= 0`` of the same cropped
  central-difference Jacobian (what the name promises).
* dirio extras beside the official metrics: ``NonPosJacPercent``, ``NDVPercent``, ``DSC_before``,
  ``TRE_kp_before``, ``seconds``; their ``"30"`` is taken on the worse side (0.3 for Dice, 0.7 for
  the lower-is-better ones).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from dirio.evaluation.overlap import dsc30

EVAL_VERSION = "2.0"
# Official metric names (the challenge's evaluation configs) -> the evaluator's metric kinds.
OFFICIAL_METRICS = {"LogJacDetStd": "sdlogj", "DSC": "dice", "HD95": "hd95", "TRE_kp": "tre"}
# Quantile of the "30" aggregate per metric name (evaluator's rule for the official kinds).
QUANTILE_30 = {
    "LogJacDetStd": 0.7,
    "DSC": 0.3,
    "HD95": 0.3,
    "TRE_kp": 0.7,
    "num_foldings": 0.7,
    "NonPosJacPercent": 0.7,
    "NDVPercent": 0.7,
    "DSC_before": 0.3,
    "TRE_kp_before": 0.7,
    "seconds": 0.7,
}

CONVENTIONS = (
    "Structure and aggregates of the Learn2Reg evaluator (eval_version 2.0): per case "
    "{metric: {mean, detailed}}; aggregates mean, std (ddof=0) and '30' = np.quantile(case means, q), "
    "q = 0.3 for DSC and HD95 (as the evaluator, also for HD95), 0.7 for LogJacDetStd and TRE_kp. "
    "Differences: failed pairs are listed under 'failed' and left out of the aggregates; a metric "
    "missing in some cases is aggregated over the cases that have it; num_foldings counts det <= 0 "
    "(the evaluator counts after its +3 clip, always 0); extras NonPosJacPercent, NDVPercent, "
    "DSC_before, TRE_kp_before, seconds take '30' on their worse side. HD95 in voxels, TRE in mm, "
    "SDlogJ = std(log(clip(det + 3, 1e-9, 1e9))) on central differences cropped by 2 voxels."
)


def _per_label_list(per_label: Mapping[str, float], label_ids: Sequence[int] | None) -> list[float]:
    if label_ids is None:
        return [float(v) for v in per_label.values()]
    return [float(per_label.get(str(label), float("nan"))) for label in label_ids]


def case_result(after: Mapping, before: Mapping | None = None, *, seconds: float | None = None,
                grid_shape: Sequence[int] | None = None, label_ids: Sequence[int] | None = None) -> dict:
    """The evaluator's dict of one case from dirio's metrics (:func:`dirio.evaluation.evaluate.evaluate_field`).

    Args:
        after: metrics of the registration field.
        before: metrics of the identity (``DSC_before``, ``TRE_kp_before``), optional.
        seconds: time of the pair, optional.
        grid_shape: the field's grid ``S``, to turn the folding percentage into a voxel count.
        label_ids: order of the per-label ``detailed`` lists (default: the metrics' order).
    Returns:
        ``{metric name: {"mean": float, "detailed": float or list}}``.
    """
    result: dict = {}
    if "sdlogj_l2r" in after:
        value = float(after["sdlogj_l2r"])
        result["LogJacDetStd"] = {"mean": value, "detailed": value}
    if "dice_mean" in after:
        result["DSC"] = {"mean": float(after["dice_mean"]),
                         "detailed": _per_label_list(after["dice_per_label"], label_ids)}
    if "hd95_voxels" in after:
        result["HD95"] = {"mean": float(after["hd95_voxels"]),
                          "detailed": _per_label_list(after["hd95_voxels_per_label"], label_ids)}
    if "tre_mm_mean" in after:
        result["TRE_kp"] = {"mean": float(after["tre_mm_mean"]), "detailed": [float(v) for v in after["tre_mm"]]}
    if "percent_nonpositive_jacobian" in after:
        percent = float(after["percent_nonpositive_jacobian"])
        if grid_shape is not None:
            cropped = math.prod(max(int(n) - 4, 0) for n in grid_shape)
            count = float(round(percent * cropped / 100.0))
            result["num_foldings"] = {"mean": count, "detailed": count}
        result["NonPosJacPercent"] = {"mean": percent, "detailed": percent}
    if "ndv_percent" in after:
        value = float(after["ndv_percent"])
        result["NDVPercent"] = {"mean": value, "detailed": value}
    if before is not None:
        if "dice_mean" in before:
            result["DSC_before"] = {"mean": float(before["dice_mean"]),
                                    "detailed": _per_label_list(before["dice_per_label"], label_ids)}
        if "tre_mm_mean" in before:
            result["TRE_kp_before"] = {"mean": float(before["tre_mm_mean"]),
                                       "detailed": [float(v) for v in before["tre_mm"]]}
    if seconds is not None:
        result["seconds"] = {"mean": float(seconds), "detailed": float(seconds)}
    return result


def aggregate_metric(values: Iterable[float], quantile: float) -> dict:
    """``{"mean", "std", "30"}`` of per-case values as the evaluator computes them.

    A NaN case makes all three NaN (numpy's plain mean / std / quantile, as the evaluator).
    """
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "30": nan}
    with np.errstate(invalid="ignore"):  # inf cases (HD95 of a label warped away) give a NaN std, silently
        if quantile == 0.3:
            thirty = dsc30(array)
        else:
            thirty = float(np.quantile(array, quantile, method="linear"))
        return {"mean": float(array.mean()), "std": float(array.std()), "30": thirty}


def aggregates(cases: Mapping[str, Mapping[str, Mapping]]) -> dict:
    """Aggregates of every metric that appears in some case (official names first)."""
    names: list[str] = []
    for case in cases.values():
        names.extend(name for name in case if name not in names)
    order = [n for n in QUANTILE_30 if n in names] + [n for n in names if n not in QUANTILE_30]
    result = {}
    for name in order:
        values = [case[name]["mean"] for case in cases.values() if name in case]
        result[name] = aggregate_metric(values, QUANTILE_30.get(name, 0.7))
    return result


def summary(name: str, cases: Mapping[str, Mapping], failed: Sequence[Mapping] = ()) -> dict:
    """The whole ``summary.json``: the evaluator's structure plus ``failed`` and a conventions note."""
    return {
        "name": name,
        "aggregates": aggregates(cases),
        "cases": dict(cases),
        "eval_version": EVAL_VERSION,
        "failed": [dict(item) for item in failed],
        "pairs": len(cases) + len(failed),
        "done": len(cases),
        "dirio": CONVENTIONS,
    }
