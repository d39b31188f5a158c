"""Input checks and helpers shared by the evaluation modules: fields, spacings, label sets, NaN means,
and the per-label loop with Learn2Reg's missing-label convention."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def as_field(disp) -> np.ndarray:
    """Validate a ``(*S, ndim)`` field (ndim 2 or 3) and return it as float64."""
    array = np.asarray(disp, dtype=np.float64)
    if array.ndim not in (3, 4) or array.shape[-1] != array.ndim - 1:
        raise ValueError(
            f"expected a displacement field of shape (D, H, W, 3) or (H, W, 2), got {array.shape}"
        )
    return array


def check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def spacing_array(spacing, ndim: int) -> np.ndarray:
    """Spacing as a float64 vector of length ``ndim`` (ones for ``None``)."""
    if spacing is None:
        return np.ones(ndim)
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size != ndim or not np.all(values > 0):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing!r}")
    return values


def nanmean(values: Sequence[float]) -> float:
    """Mean over the non-NaN values (``np.nanmean``), NaN without a warning when there are none."""
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0 or np.all(np.isnan(array)):
        return float("nan")
    return float(np.nanmean(array))



def labels_present(*label_maps: np.ndarray) -> list[int]:
    """Sorted nonzero labels present in any of the maps."""
    found: set[int] = set()
    for label_map in label_maps:
        found.update(int(v) for v in np.unique(label_map) if v != 0)
    return sorted(found)


def scores_per_label(
    fixed_labels: np.ndarray,
    warped_labels: np.ndarray,
    labels: Sequence[int] | None,
    moving_labels: np.ndarray | None,
    score: Callable[[np.ndarray, np.ndarray], float],
) -> dict[int, float]:
    """``{label: score(fixed == label, warped == label)}`` with Learn2Reg's missing-label convention.

    A label absent from the fixed map, or absent from the moving map, gives NaN without calling
    ``score``. Presence is checked in ``moving_labels`` when given, else in ``warped_labels``.
    ``labels`` defaults to the union of the nonzero labels of all maps given.
    """
    fixed = np.asarray(fixed_labels)
    warped = np.asarray(warped_labels)
    check_same_shape("fixed_labels", fixed, "warped_labels", warped)
    reference = warped if moving_labels is None else np.asarray(moving_labels)
    if labels is None:
        labels = labels_present(fixed, warped, reference)
    result: dict[int, float] = {}
    for label in labels:
        in_fixed = fixed == label
        if not in_fixed.any() or not np.any(reference == label):
            result[int(label)] = float("nan")
            continue
        result[int(label)] = score(in_fixed, warped == label)
    return result
