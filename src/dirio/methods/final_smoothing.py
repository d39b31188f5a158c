"""Adaptive final smoothing: smooth a dense stage's field when the images do not need its finest detail.

A dense field optimised for a few full-resolution steps carries fine-scale content of two kinds:
alignment of real fine anatomy (a cortex folded differently in two subjects), and noise that the
images do not determine (the field's error on a smooth known warp is mostly fine-scale,
benchmarks/RESULTS.md, issue 19). A Gaussian on the final field removes both, so a fixed
smoothing trades one kind of pair for the other.

The probe tells them apart by what the detail is worth to the similarity: it smooths the field with
``probe_sigma`` and measures how much the stage's own full-resolution similarity loss rises
(:func:`similarity_losses`). Detail that aligns anatomy costs a lot when it is removed; noise
costs little. When the rise is at most ``tolerance``, the field is smoothed with ``sigma``; otherwise
it is kept as it is (``mode="auto"``). ``mode="always"`` smooths without the probe.

The rule's values and what it measured are in benchmarks/RESULTS.md (issue 19, eighth session) and
docs/concepts/final-smoothing.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from dirio.core.filters import gaussian_smooth
from dirio.core.fields import warp

__all__ = ["FINAL_SMOOTHING_MODES", "FinalSmoothing", "SmoothingChoice", "choose_final_smoothing",
           "describe_choice", "similarity_losses"]

FINAL_SMOOTHING_MODES = ("off", "auto", "always")


@dataclass(frozen=True)
class FinalSmoothing:
    """Options of the final smoothing (``final_smoothing`` in the settings).

    Attributes:
        mode: ``"off"``, ``"auto"`` (smooth when the probe allows it) or ``"always"``.
        sigma: standard deviation of the Gaussian applied to the field, in full-grid voxels.
        probe_sigma: the probe's Gaussian, in full-grid voxels.
        tolerance: the largest rise of the similarity loss under the probe's smoothing for which the
            field is smoothed (in the loss's units; LNCC: a fraction of a perfect correlation).
    """

    mode: str = "off"
    sigma: float = 1.5
    probe_sigma: float = 1.5
    tolerance: float = 0.02

    def validate(self) -> None:
        if self.mode not in FINAL_SMOOTHING_MODES:
            raise ValueError(f"final smoothing must be one of {', '.join(FINAL_SMOOTHING_MODES)}, got {self.mode!r}")
        for name in ("sigma", "probe_sigma"):
            value = _number(getattr(self, name))
            if value is None or not 0.0 < value < math.inf:
                raise ValueError(f"final smoothing {name} must be a positive number of voxels, got {getattr(self, name)!r}")
        value = _number(self.tolerance)
        if value is None or not 0.0 <= value < math.inf:
            raise ValueError(f"final smoothing tolerance must be a finite number >= 0, got {self.tolerance!r}")


def _number(value) -> float | None:
    """``value`` as a float, or None when it is not a number."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class SmoothingChoice:
    """What :func:`choose_final_smoothing` did.

    Attributes:
        displacement: ``(B, ndim, *S)`` the field to use (smoothed or the input itself), voxels.
        smoothed: whether it was smoothed.
        loss, probe_loss: the similarity loss of the field and of its probe-smoothed version
            (``None`` in mode ``always``); ``increase`` their difference.
        seconds: wall time of the choice.
    """

    displacement: torch.Tensor
    smoothed: bool
    loss: float | None
    probe_loss: float | None
    seconds: float

    @property
    def increase(self) -> float | None:
        return None if self.loss is None else self.probe_loss - self.loss

    def record(self, options: FinalSmoothing) -> dict:
        """The stage record's entry (``metrics.json``)."""
        out = {"mode": options.mode, "smoothed": self.smoothed, "sigma": float(options.sigma),
               "seconds": self.seconds}
        if self.loss is not None:
            out.update(probe_sigma=float(options.probe_sigma), tolerance=float(options.tolerance),
                       loss=self.loss, probe_loss=self.probe_loss, increase=self.increase)
        return out


@torch.no_grad()
def similarity_losses(fixed: torch.Tensor, moving: torch.Tensor, fields: list[torch.Tensor], similarity,
                      mask: torch.Tensor | None = None) -> list[float]:
    """The similarity loss of ``moving`` warped by each field against ``fixed``.

    Args:
        fixed, moving: ``(1, C, *S)`` images (normalised as the stage saw them).
        fields: ``(1, ndim, *S)`` fields, voxels.
        similarity: a similarity object (:mod:`dirio.losses.base`; lower is better).
        mask: ``(1, 1, *S)`` weights of the fixed grid, or None.
    """
    fixed_features, moving_features = similarity.features(fixed), similarity.features(moving)
    return [float(similarity(fixed_features, warp(moving_features, field), mask)) for field in fields]


def choose_final_smoothing(fixed: torch.Tensor, moving: torch.Tensor, disp: torch.Tensor, similarity,
                           options: FinalSmoothing, *, mask: torch.Tensor | None = None,
                           residual: torch.Tensor | None = None, recompose=None) -> SmoothingChoice:
    """Smooth the field or keep it, as ``options`` say (see the module docstring).

    Args:
        fixed, moving, similarity, mask: as :func:`similarity_losses`.
        disp: ``(1, ndim, *S)`` the stage's total field, voxels.
        options: the rule (mode ``off`` returns ``disp`` untouched).
        residual, recompose: when the field is a residual composed with a fixed affine, the
            residual and the function that composes a residual into a total field: the residual
            is what is smoothed (an affine is left as it is).
    Returns:
        A :class:`SmoothingChoice`.
    """
    start = time.perf_counter()
    if options.mode == "off":
        return SmoothingChoice(disp, False, None, None, 0.0)
    base = disp if residual is None else residual

    def total(field: torch.Tensor) -> torch.Tensor:
        return field if recompose is None else recompose(field)

    loss = probe_loss = probe = None
    if options.mode == "auto":
        with torch.no_grad():
            probe = total(gaussian_smooth(base, options.probe_sigma))
        loss, probe_loss = similarity_losses(fixed, moving, [disp, probe], similarity, mask)
        if probe_loss - loss > options.tolerance:
            return SmoothingChoice(disp, False, loss, probe_loss, time.perf_counter() - start)
    if probe is None or float(options.probe_sigma) != float(options.sigma):
        with torch.no_grad():
            probe = total(gaussian_smooth(base, options.sigma))
    return SmoothingChoice(probe, True, loss, probe_loss, time.perf_counter() - start)


def describe_choice(record: dict) -> str:
    """One line on a :meth:`SmoothingChoice.record` (the figure's notes, the report)."""
    sigma = f"sigma {record['sigma']:g} voxels"
    if "increase" not in record:
        return f"final smoothing ({record['mode']}): smoothed, {sigma}"
    rise = f"similarity loss rise {record['increase']:.4f} under sigma {record['probe_sigma']:g}"
    if record["smoothed"]:
        return f"final smoothing (auto): smoothed, {sigma} ({rise} <= {record['tolerance']:g})"
    return f"final smoothing (auto): field kept ({rise} > {record['tolerance']:g})"
