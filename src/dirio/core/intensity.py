"""Intensity normalisation of image arrays to [0, 1] (min-max, robust percentiles, a fixed window)."""

from __future__ import annotations

import numpy as np

NORMALISATION_MODES = ("minmax", "percentile", "clip")

# Percentiles of the nonzero voxels used by mode "percentile": the robust range also used by
# nnU-Net's CT normalisation (0.5th / 99.5th percentile of foreground), which ignores a few hot
# or cold outlier voxels.
DEFAULT_PERCENTILES = (0.5, 99.5)


def _rescale(data: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to ``[lo, hi]`` and map linearly to ``[0, 1]``; all zeros when ``hi <= lo``."""
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.float32)
    scaled = (data.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    # Clip after scaling: float32 rounding could otherwise give 1.0000001 at ``hi``.
    return np.clip(scaled, 0.0, 1.0, out=scaled)


def normalise_intensity(
    data: np.ndarray,
    mode: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
) -> np.ndarray:
    """Map intensities to ``[0, 1]`` (float32 out, input unchanged).

    Modes:
        ``"minmax"``: ``(x - min) / (max - min)``.
        ``"percentile"``: clip to the ``percentiles`` (default 0.5th and 99.5th) of the nonzero
            voxels (all voxels if none is nonzero), then map that range to ``[0, 1]``.
        ``"clip"``: clip to ``[lo, hi]`` (both required, in the image's units, e.g. a CT window
            ``lo=-1000, hi=1500`` HU), then map to ``[0, 1]``.
    A constant image (empty range) becomes all zeros.

    Args:
        data: array of any shape.
        mode: one of ``NORMALISATION_MODES``.
    Returns:
        float32 array of the same shape, values in ``[0, 1]``.
    """
    data = np.asarray(data)
    if mode == "minmax":
        if data.size == 0:
            return data.astype(np.float32)
        return _rescale(data, float(data.min()), float(data.max()))
    if mode == "percentile":
        nonzero = data[data != 0]
        sample = nonzero if nonzero.size else data.ravel()
        if sample.size == 0:
            return data.astype(np.float32)
        low, high = np.percentile(sample, percentiles)
        return _rescale(data, float(low), float(high))
    if mode == "clip":
        if lo is None or hi is None:
            raise ValueError("normalise_intensity mode 'clip' needs both lo and hi")
        if hi <= lo:
            raise ValueError(f"normalise_intensity mode 'clip' needs lo < hi, got lo={lo}, hi={hi}")
        return _rescale(data, float(lo), float(hi))
    raise ValueError(f"normalisation mode must be one of {NORMALISATION_MODES}, got {mode!r}")
