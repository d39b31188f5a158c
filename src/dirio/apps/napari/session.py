"""What the *Register* widget runs, free of Qt: layers in, the API's result and scores out.

The settings are parsed by the option schema from the same text a person types on the command
line (:func:`dirio.config.schema.settings_from_values`), the pair is registered by
:func:`dirio.apps.workflow.register_inputs` and scored by :func:`dirio.apps.workflow.score_registration`,
and saved by :func:`dirio.apps.workflow.write_registration`: the code of ``dirio register``, so the
field and the metrics are the command line's for the same settings.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dirio.api import RegistrationResult
from dirio.apps.napari.layers import LayerData, file_name, image_from_layer, image_layer
from dirio.apps.napari.results import field_layers
from dirio.apps.workflow import (
    Inputs,
    check_grid_size,
    register_inputs,
    score_registration,
    write_registration,
)
from dirio.config.schema import settings_from_values
from dirio.config.settings import Settings
from dirio.errors import DirioError
from dirio.io.images import Image, check_same_grid
from dirio.optim.progress import Cancelled, Progress

# The settings a person changes in the widget (keys of the option schema, as on the command line).
WIDGET_OPTIONS = ("preset", "method", "levels", "iterations", "weight")
METHODS = ("dense", "network", "network-io", "nio", "network+dense")
DEVICES = ("auto", "cpu", "cuda")


def widget_settings(values: Mapping[str, str | None]) -> Settings:
    """Settings from the widget's texts (``preset``, ``method``, ``levels`` ``"4,2"``, ``iterations``,
    ``weight``; empty or ``None``: the preset's value), parsed as the command line parses them, with
    progress bars on stderr off.

    Raises:
        DirioError: an unknown key or a refused value, naming the option.
    """
    unknown = set(values) - set(WIDGET_OPTIONS)
    if unknown:
        raise ValueError(f"not options of the widget: {sorted(unknown)}")
    given = {key: value for key, value in values.items() if value not in (None, "")}
    return settings_from_values({**given, "quiet": True})


def inputs_from_layers(fixed, moving, *, fixed_labels=None, moving_labels=None, fixed_mask=None,
                       moving_mask=None) -> Inputs:
    """The pair of layers as :class:`dirio.apps.workflow.Inputs` (images, optional label maps and masks,
    all on the fixed grid).

    Raises:
        DirioError: a layer that is not a 2D/3D scalar image or an integer label map, a grid too small,
            a layer on another grid than the fixed image, or labels given for one image only.
    """
    if (fixed_labels is None) != (moving_labels is None):
        raise DirioError("choose label layers for both images or for neither (Dice compares the two)")
    fixed_image = image_from_layer(fixed)
    check_grid_size(fixed_image.shape, f"layer {fixed.name!r}")
    inputs = Inputs(fixed_image, _on_grid(image_from_layer(moving), fixed_image, "moving"))
    for attribute, layer in (("fixed_labels", fixed_labels), ("moving_labels", moving_labels),
                             ("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        if layer is not None:
            setattr(inputs, attribute, _on_grid(image_from_layer(layer, labels=True), fixed_image,
                                                attribute.replace("_", " ")))
    return inputs


def _on_grid(image: Image, fixed: Image, what: str) -> Image:
    """``image`` when it lies on the fixed grid; else the grid check's message, worded for the viewer."""
    check_same_grid(fixed, image, what=what, hint="dirio registers images on one grid: resample it onto the fixed "
                                                  "grid first (dirio register --resample does)")
    return image


@dataclass
class Outcome:
    """A finished registration: the inputs, the API's result, and ``dirio register``'s scores
    (``before``, ``after``, ``warped_labels``)."""

    inputs: Inputs
    result: RegistrationResult
    before: dict
    after: dict
    warped_labels: np.ndarray | None = None
    names: tuple[str, str] = ("fixed", "moving")

    @property
    def scores(self) -> tuple[dict, dict, np.ndarray | None]:
        return self.before, self.after, self.warped_labels


@dataclass
class Run:
    """One registration with progress reports and cancellation, meant for a worker thread.

    ``cancel()`` (from any thread) stops it between two optimisation steps: :meth:`__call__` raises
    :class:`dirio.optim.progress.Cancelled` and returns nothing.
    """

    inputs: Inputs
    settings: Settings
    device: str = "auto"
    names: tuple[str, str] = ("fixed", "moving")
    on_progress: Callable[[Progress], None] | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _report(self, progress: Progress) -> None:
        if self._cancelled.is_set():
            raise Cancelled("registration cancelled")
        if self.on_progress is not None:
            self.on_progress(progress)

    def __call__(self) -> Outcome:
        result = register_inputs(self.inputs, self.settings, self.device, progress_callback=self._report)
        if self._cancelled.is_set():  # cancelled during the last step: the result is dropped too
            raise Cancelled("registration cancelled")
        before, after, warped_labels = score_registration(self.inputs, result.disp)
        if self._cancelled.is_set():  # cancelled while scoring
            raise Cancelled("registration cancelled")
        return Outcome(self.inputs, result, before, after, warped_labels, self.names)


def result_layers(outcome: Outcome) -> list[LayerData]:
    """The layers of a registration: the warped moving image (magenta, added over the fixed one),
    the warped moving labels (hidden at first), and the field's layers (:func:`dirio.apps.napari.results.field_layers`)."""
    fixed, moving = outcome.names
    affine = outcome.inputs.fixed.affine
    layers = [image_layer(Image(outcome.result.warped, affine), f"{moving} warped", colormap="magenta",
                          blending="additive")]
    if outcome.warped_labels is not None:
        layers.append(image_layer(Image(outcome.warped_labels, affine), f"{moving} labels warped", kind="labels",
                                  opacity=0.5, visible=False))
    layers.extend(field_layers(outcome.result.disp, affine, prefix=f"{moving} -> {fixed}: "))
    return layers


def metrics_text(outcome: Outcome) -> str:
    """The metrics as lines for the widget: Dice and HD95 before -> after (with label maps), folding,
    SDlogJ, NDV, time."""
    before, after = outcome.before, outcome.after
    lines = []
    if "dice_mean" in after:
        lines.append(f"Dice {before['dice_mean']:.3f} -> {after['dice_mean']:.3f}")
        lines.append(f"HD95 {after['hd95_mm']:.2f} mm after")
    lines.append(f"det <= 0: {after['percent_nonpositive_jacobian']:.4f}% of voxels")
    lines.append(f"SDlogJ (Learn2Reg) {after['sdlogj_l2r']:.4f}, NDV {after['ndv_percent']:.4f}%")
    lines.append(f"{outcome.result.seconds:.1f} s on {outcome.result.device}")
    return "\n".join(lines)


def save(outcome: Outcome, folder: str | Path, *, overwrite: bool = False, itk_field: bool = True,
         figure: bool = True) -> dict:
    """Write the files of ``dirio register`` for ``outcome`` into ``folder`` (names from the layer
    names); see :func:`dirio.apps.workflow.write_registration`. Returns the ``metrics.json`` record."""
    fixed, moving = (file_name(name) for name in outcome.names)
    return write_registration(outcome.inputs, outcome.result, folder, fixed=fixed, moving=moving,
                              overwrite=overwrite, figure=figure, itk_field=itk_field and outcome.inputs.fixed.ndim == 3,
                              scores=outcome.scores)
