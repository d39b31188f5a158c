"""Every metric a field's inputs allow, as one JSON-ready dict (:func:`evaluate_field`).

Inputs follow the conventions of :mod:`dirio.evaluation` (numpy arrays; fields ``(*S, ndim)`` in voxels).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np

from dirio.evaluation._checks import as_field, labels_present, nanmean, spacing_array
from dirio.evaluation.jacobian import (
    fraction_nonpositive_from_determinant,
    jacobian_determinant_l2r,
    non_diffeomorphic_volume_map,
    sdlogj_from_determinant,
    sdlogj_l2r_from_determinant,
)
from dirio.evaluation.landmarks import tre
from dirio.evaluation.overlap import dice_per_label, mean_dice, warp_labels
from dirio.evaluation.surface import hd95_per_label


def _json_floats(per_label: Mapping[int, float]) -> dict[str, float]:
    return {str(label): float(value) for label, value in per_label.items()}


def evaluate_field(
    disp: np.ndarray,
    *,
    fixed_labels: np.ndarray | None = None,
    moving_labels: np.ndarray | None = None,
    labels: Sequence[int] | None = None,
    fixed_points: np.ndarray | None = None,
    moving_points: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    tre_order: int = 3,
    regularity: bool = True,
    hd95: bool = True,
    warped_labels: np.ndarray | None = None,
) -> dict:
    """Every metric the inputs allow, as a JSON-ready dict.

    Always: ``sdlogj_l2r``, ``sdlogj``, ``percent_nonpositive_jacobian`` (cropped grid, 0..100),
    ``ndv_voxels``, ``ndv_percent`` (0..100). With ``fixed_labels`` and ``moving_labels``:
    ``dice_per_label``, ``dice_mean``, ``hd95_voxels_per_label``, ``hd95_voxels`` (NaN-ignoring
    mean over labels, Learn2Reg's number), ``hd95_mm_per_label``, ``hd95_mm``. With both point
    sets: ``tre_mm`` (per point), ``tre_mm_mean``, ``tre_mm_median``, ``tre_mm_std`` (ddof=0),
    ``tre_order``.

    Values are Python floats; NaN and inf stay ``float('nan')`` / ``float('inf')`` (``json.dumps``
    writes them as ``NaN`` / ``Infinity`` with its default ``allow_nan=True``); per-label dicts have
    string keys so that a JSON round trip keeps them.

    Args:
        disp: ``(*S, ndim)`` displacement in voxels.
        fixed_labels, moving_labels: ``S`` label maps; the moving one is warped with
            :func:`dirio.evaluation.overlap.warp_labels`, and presence of a label is checked as Learn2Reg does.
        labels: labels to score (default: every nonzero label of either map).
        fixed_points, moving_points: ``(N, ndim)`` voxel coordinates of corresponding points.
        spacing: voxel size (mm) of the fixed grid, for TRE and ``hd95_mm``; ``None`` = ones.
        tre_order: interpolation order for TRE (3 = Learn2Reg's cubic, 1 = trilinear).
        regularity: include the Jacobian-based metrics (SDlogJ, folding, NDV); callers scoring
            the identity ("before registration") skip them, their values being known.
        hd95: include HD95 (the most expensive overlap metric).
        warped_labels: ``moving_labels`` already warped by ``disp`` with
            :func:`dirio.evaluation.overlap.warp_labels` (a caller that also writes them out);
            computed here when ``None``.
    """
    field = as_field(disp)
    ndim = field.shape[-1]
    scale = spacing_array(spacing, ndim)
    if (fixed_labels is None) != (moving_labels is None):
        raise ValueError("label metrics need both fixed_labels and moving_labels")
    if (fixed_points is None) != (moving_points is None):
        raise ValueError("TRE needs both fixed_points and moving_points")
    result: dict = {}
    # The label metrics and the Jacobian ones are independent and spend their time in numpy and
    # scipy code that releases the GIL: two threads take ~half the time on two cores.
    with ThreadPoolExecutor(max_workers=2) as pool:
        regular = pool.submit(regularity_metrics, field) if regularity else None
        if fixed_labels is not None:
            result.update(_overlap(field, np.asarray(fixed_labels), np.asarray(moving_labels), labels, scale, hd95,
                                   warped_labels))
        if fixed_points is not None:
            result.update(_tre(field, fixed_points, moving_points, scale, tre_order))
        if regular is not None:
            result.update(regular.result())
    return result


def _overlap(field: np.ndarray, fixed: np.ndarray, moving: np.ndarray, labels, scale: np.ndarray, hd95: bool,
             warped: np.ndarray | None = None) -> dict:
    """Dice (and HD95) of the moving labels warped by ``field`` (``warped``, when given) against the fixed ones."""
    result: dict = {}
    if warped is None:
        warped = warp_labels(moving, field)
    elif np.shape(warped) != np.shape(moving):
        raise ValueError(f"warped labels of shape {np.shape(warped)} do not match the moving labels {np.shape(moving)}")
    if labels is None:
        labels = labels_present(fixed, moving)
    dice = dice_per_label(fixed, warped, labels, moving_labels=moving)
    result["dice_per_label"] = _json_floats(dice)
    result["dice_mean"] = mean_dice(dice)
    if hd95:
        hd_voxels = hd95_per_label(fixed, warped, labels, None, moving_labels=moving)
        result["hd95_voxels_per_label"] = _json_floats(hd_voxels)
        result["hd95_voxels"] = nanmean(hd_voxels.values())
        if np.all(scale == 1.0):
            hd_mm = hd_voxels
        else:
            hd_mm = hd95_per_label(fixed, warped, labels, tuple(scale), moving_labels=moving)
        result["hd95_mm_per_label"] = _json_floats(hd_mm)
        result["hd95_mm"] = nanmean(hd_mm.values())
    return result


def _tre(field: np.ndarray, fixed_points, moving_points, scale: np.ndarray, tre_order: int) -> dict:
    """Target registration error of corresponding points, per point and summarised (mm)."""
    errors = tre(fixed_points, moving_points, field, tuple(scale), order=tre_order)
    empty = errors.size == 0  # no points: NaN summaries rather than numpy's warnings
    return {
        "tre_mm": [float(e) for e in errors],
        "tre_mm_mean": float("nan") if empty else float(np.mean(errors)),
        "tre_mm_median": float("nan") if empty else float(np.median(errors)),
        "tre_mm_std": float("nan") if empty else float(np.std(errors)),
        "tre_order": int(tre_order),
    }


def regularity_metrics(disp: np.ndarray) -> dict:
    """SDlogJ (Learn2Reg's and the plain one), % det <= 0 and the non-diffeomorphic volume of a
    ``(*S, ndim)`` field in voxels: the Jacobian metrics of :func:`evaluate_field`, in its keys and order."""
    field = as_field(disp)
    det = jacobian_determinant_l2r(field)  # once for the three Jacobian summaries
    volume = non_diffeomorphic_volume_map(field)
    return {
        "sdlogj_l2r": sdlogj_l2r_from_determinant(det, None, field.shape[:-1]),
        "sdlogj": sdlogj_from_determinant(det),
        "percent_nonpositive_jacobian": 100.0 * fraction_nonpositive_from_determinant(det),
        "ndv_voxels": float(volume.sum()),
        "ndv_percent": 100.0 * float(volume.sum() / volume.size),
    }
