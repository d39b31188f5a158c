"""Label overlap: nearest-neighbour label warping, Dice per label, its NaN-ignoring mean and DSC30.

What reproduces the Learn2Reg evaluator (``evaluation.py`` / ``utils.py`` of the challenge's
evaluation code, MICCAI 2021-2023, eval_version 2.0) on the same field:
:func:`warp_labels` (nearest neighbour through ``scipy.ndimage.map_coordinates``),
:func:`dice_per_label` / :func:`mean_dice` (its ``compute_dice``) and :func:`dsc30` (its ``'30'``
aggregate).

Inputs follow the conventions of :mod:`dirio.evaluation` (numpy arrays; fields ``(*S, ndim)`` in voxels).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from dirio.evaluation._checks import as_field, nanmean, scores_per_label

# DSC30 is the 0.3 quantile of per-case values (``np.quantile(all_means_metric, .3)``).
DSC30_QUANTILE = 0.3


def warp_labels(moving_labels: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Warp a label map with nearest neighbour, as the Learn2Reg evaluator does.

    ``warped[x] = moving[round(x + u(x))]`` through ``scipy.ndimage.map_coordinates(order=0)``
    on ``identity + disp``, with the evaluator's boundary handling (``mode="constant"``,
    ``cval=0``): every point outside ``[0, n - 1]`` along some axis gets label 0, even one that is
    less than half a voxel past the outermost voxel centre.

    Args:
        moving_labels: ``S`` label map on the same grid as the field (integer, bool or float).
        disp: ``(*S, ndim)`` displacement in voxels.
    Returns:
        ``S`` warped label map with the dtype of ``moving_labels``.
    """
    field = as_field(disp)
    labels = np.asarray(moving_labels)
    if labels.shape != field.shape[:-1]:
        raise ValueError(f"label map of shape {labels.shape} does not match the field grid {field.shape[:-1]}")
    if not field.any():
        # The identity samples every voxel at its own centre: the map itself (the "before" scores).
        return labels.copy()
    grid = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in labels.shape], indexing="ij")
    coords = np.stack(grid, axis=0) + np.moveaxis(field, -1, 0)
    source = labels.astype(np.uint8) if labels.dtype == bool else labels
    warped = ndimage.map_coordinates(source, coords, order=0, mode="constant", cval=0)
    return warped.astype(labels.dtype, copy=False)



def dice_per_label(
    fixed_labels: np.ndarray,
    warped_labels: np.ndarray,
    labels: Sequence[int] | None = None,
    *,
    moving_labels: np.ndarray | None = None,
) -> dict[int, float]:
    """Dice overlap ``2 |F & W| / (|F| + |W|)`` per label, in ``[0, 1]``, higher is better.

    Missing labels (Learn2Reg's ``compute_dice`` convention): a label absent from the fixed map,
    or absent from the moving map, gives **NaN** (it is left out of :func:`mean_dice`), never 0.
    The evaluator checks presence in the *moving* map, so a label that is present in both fixed
    and moving but warped out of the image scores 0. Pass ``moving_labels`` to get exactly that;
    without it presence is checked in ``warped_labels`` instead (the only map at hand).

    Args:
        fixed_labels: ``S`` label map of the fixed image.
        warped_labels: ``S`` warped moving label map (:func:`warp_labels`).
        labels: labels to score; default: the union of the nonzero labels of all maps given.
        moving_labels: the unwarped moving label map, used only for the presence check.
    Returns:
        ``{label: dice}`` in the order of ``labels``.
    """
    return scores_per_label(fixed_labels, warped_labels, labels, moving_labels, _dice)


def _dice(in_fixed: np.ndarray, in_warped: np.ndarray) -> float:
    """``2 |F & W| / (|F| + |W|)`` of two boolean masks (``F`` not empty)."""
    total = np.count_nonzero(in_fixed) + np.count_nonzero(in_warped)
    return 2.0 * int(np.count_nonzero(in_fixed & in_warped)) / total


def mean_dice(per_label: Mapping[int, float]) -> float:
    """Mean of ``{label: Dice}`` values ignoring NaN (``np.nanmean``, as Learn2Reg): a label absent from
    either map does not count; NaN if all are NaN."""
    return nanmean(per_label.values())


def dsc30(per_case_values: Sequence[float], *, skip_nan: bool = False) -> float:
    """The 0.3 quantile of per-case values, Learn2Reg's robustness aggregate ("DSC30").

    The evaluator (eval_version 2.0) computes ``np.quantile(values, .3)`` with numpy's default
    ``method="linear"`` (the older pandas-based evaluator used ``DataFrame.quantile(.3)``, whose
    default interpolation is the same linear one). With that method a NaN case makes the result
    NaN, as in the evaluator; ``skip_nan=True`` drops NaN cases first, as pandas did.

    Args:
        per_case_values: one value per case (e.g. mean Dice per registration pair).
    Returns:
        The quantile; NaN for an empty input.
    """
    values = np.asarray(list(per_case_values), dtype=np.float64)
    if skip_nan:
        values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan")
    return float(np.quantile(values, DSC30_QUANTILE, method="linear"))
