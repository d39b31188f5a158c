"""The *Register* dock widget (magicgui widgets over :mod:`.session`).

Choose the fixed and moving image layers (optionally label layers and masks), a preset or method
and the few options a person changes (levels, iterations, regularizer weight, device), and press
*Register*. The registration runs in a napari thread worker, so the viewer stays responsive; the
progress bar follows the optimisation's iterations and levels (:mod:`dirio.optim.progress`), and
*Cancel* stops it between two steps, leaving the viewer as it was. When it ends, the result layers
(:func:`.session.result_layers`) replace those of the previous run and the metrics of
``dirio register`` appear in the widget; *Save* writes the files of ``dirio register`` into the
chosen folder. Every problem is shown as one line in the widget (and as a napari notification),
never as a traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
)
from qtpy.QtCore import QObject, Signal

from dirio.apps.napari.session import (
    DEVICES,
    METHODS,
    Outcome,
    Run,
    inputs_from_layers,
    metrics_text,
    result_layers,
    save,
    widget_settings,
)
from dirio.config.presets import PRESETS
from dirio.errors import DirioError
from dirio.optim.progress import Cancelled, Progress

logger = logging.getLogger(__name__)
NO_PRESET = "(none)"


@dataclass(frozen=True)
class _Failed:
    """A worker's expected failure (a user error or a cancellation), handed back as its value."""

    error: Exception


class _Relay(QObject):
    """Carries progress reports from the worker thread to the widget (a queued Qt signal)."""

    progressed = Signal(object)


class RegisterWidget(Container):
    """The dock widget. Attributes useful from Python: ``outcome`` (the last :class:`.session.Outcome`),
    ``worker`` (the running napari worker, or ``None``), ``status`` and ``metrics`` (label widgets)."""

    def __init__(self, napari_viewer):
        super().__init__(labels=True)
        viewer = self._viewer = napari_viewer
        self.fixed = ComboBox(label="fixed", choices=self._layer_choices("Image"))
        self.moving = ComboBox(label="moving", choices=self._layer_choices("Image"))
        self.fixed_labels = ComboBox(label="fixed labels", choices=self._layer_choices("Labels", optional=True))
        self.moving_labels = ComboBox(label="moving labels", choices=self._layer_choices("Labels", optional=True))
        self.fixed_mask = ComboBox(label="fixed mask", choices=self._layer_choices("Labels", optional=True))
        self.moving_mask = ComboBox(label="moving mask", choices=self._layer_choices("Labels", optional=True))
        self.preset = ComboBox(label="preset", choices=(NO_PRESET, *PRESETS), value=NO_PRESET)
        self.method = ComboBox(label="method", choices=METHODS, value="dense")
        self.levels = LineEdit(label="levels", tooltip="pyramid shrink factors, coarse to fine, e.g. 4,2 "
                                                       "(empty: the preset's)")
        self.iterations = LineEdit(label="iterations", tooltip="iterations per level, e.g. 80,40 (empty: the preset's)")
        self.weight = LineEdit(label="weight", tooltip="weight of the regularizer(s) (empty: the preset's)")
        self.device = ComboBox(label="device", choices=DEVICES, value="auto")
        self.run_button = PushButton(text="Register")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="progress", min=0, max=1, value=0)
        self.status = Label(label="status", value="choose the layers and press Register")
        self.metrics = Label(label="metrics", value="")
        self.folder = FileEdit(label="save to", mode="d")
        self.overwrite = CheckBox(text="overwrite", value=False)
        self.itk_field = CheckBox(text="ITK field", value=True)
        self.save_button = PushButton(text="Save", enabled=False)
        self.extend([self.fixed, self.moving, self.fixed_labels, self.moving_labels, self.fixed_mask,
                     self.moving_mask, self.preset, self.method, self.levels, self.iterations, self.weight,
                     self.device, self.run_button, self.cancel_button, self.progress, self.status, self.metrics,
                     self.folder, self.overwrite, self.itk_field, self.save_button])
        self.outcome: Outcome | None = None
        self.worker = None
        self._run: Run | None = None
        self._result_layers: list = []
        self._relay = _Relay()
        self._relay.progressed.connect(self._on_progress)
        self.run_button.changed.connect(self.register)
        self.cancel_button.changed.connect(self.cancel)
        self.save_button.changed.connect(self.save)
        events = viewer.layers.events
        for event in (events.inserted, events.removed, events.reordered):
            event.connect(self._refresh_choices)
        self._refresh_choices()

    # --- layer choices ------------------------------------------------------------------------

    def _layer_choices(self, kind: str, optional: bool = False):
        def choices(widget=None):
            import napari.layers

            layer_type = getattr(napari.layers, kind)
            found = [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, layer_type)]
            return [("(none)", None), *found] if optional else found
        return choices

    def _refresh_choices(self, event=None) -> None:
        self.reset_choices()

    # --- registering --------------------------------------------------------------------------

    def _settings_values(self) -> dict:
        return {"preset": None if self.preset.value == NO_PRESET else self.preset.value, "method": self.method.value,
                "levels": self.levels.value, "iterations": self.iterations.value, "weight": self.weight.value}

    def register(self, *_) -> None:
        """Check the inputs and settings, then start the registration in a thread worker."""
        if self.worker is not None:
            return
        try:
            if self.fixed.value is None or self.moving.value is None:
                raise DirioError("choose a fixed and a moving image layer")
            settings = widget_settings(self._settings_values())
            inputs = inputs_from_layers(self.fixed.value, self.moving.value, fixed_labels=self.fixed_labels.value,
                                        moving_labels=self.moving_labels.value, fixed_mask=self.fixed_mask.value,
                                        moving_mask=self.moving_mask.value)
        except DirioError as error:
            self._show_error(error)
            return
        self._run = Run(inputs, settings, device=self.device.value, names=(self.fixed.value.name, self.moving.value.name),
                        on_progress=self._relay.progressed.emit)
        self.progress.value = 0
        self.status.value = "registering..."
        self._start(self._run, self._on_registered)
        self.cancel_button.enabled = True

    def cancel(self, *_) -> None:
        """Stop the running registration between two optimisation steps; nothing in the viewer changes."""
        if self._run is not None:
            self._run.cancel()
            self.status.value = "cancelling..."

    def _on_progress(self, progress: Progress) -> None:
        if self._run is None or self._run.cancelled:
            return
        self.progress.max = max(progress.total, 1)
        self.progress.value = min(progress.done, progress.total)
        self.status.value = (f"{progress.description}: level {progress.level + 1}/{progress.levels}, "
                             f"iteration {progress.iteration}/{progress.iterations}")

    def _on_registered(self, outcome: Outcome | _Failed) -> None:
        if isinstance(outcome, _Failed):
            if isinstance(outcome.error, Cancelled):
                self.status.value = "cancelled; nothing changed"
            else:
                self._show_error(outcome.error)
            return
        for layer in self._result_layers:
            if layer in self._viewer.layers:
                self._viewer.layers.remove(layer)
        self._result_layers = [getattr(self._viewer, f"add_{kind}")(data, **options)
                               for data, options, kind in result_layers(outcome)]
        self.outcome = outcome
        self.metrics.value = metrics_text(outcome)
        self.progress.value = self.progress.max
        self.status.value = "done"

    # --- saving -------------------------------------------------------------------------------

    def save(self, *_) -> None:
        """Write the files of ``dirio register`` for the last registration into the chosen folder
        (in a thread worker)."""
        if self.outcome is None or self.worker is not None:
            return
        folder = self.folder.value
        if folder is None or str(folder) in ("", "."):
            self._show_error(DirioError("choose the folder to save into"))
            return
        outcome, overwrite, itk_field = self.outcome, bool(self.overwrite.value), bool(self.itk_field.value)
        self.status.value = f"saving to {folder}..."
        self._start(lambda: save(outcome, folder, overwrite=overwrite, itk_field=itk_field), self._on_saved)

    def _on_saved(self, record: dict | _Failed) -> None:
        if isinstance(record, _Failed):
            self._show_error(record.error)
            return
        self.status.value = f"saved {len(record['outputs'])} files to {Path(record['outputs']['metrics']).parent}"

    # --- the worker and messages ----------------------------------------------------------------

    def _start(self, function, on_returned) -> None:
        """Run ``function`` in a napari thread worker. Its user errors and cancellation come back as its
        value (``on_returned`` words them as one line; napari would show them with a traceback); an
        unexpected error is shown by the widget and by napari."""
        from napari.qt.threading import create_worker

        def call():
            try:
                return function()
            except (DirioError, Cancelled) as error:
                return _Failed(error)  # a returned exception would be raised again by the worker

        self.worker = create_worker(call, _start_thread=False, _connect={
            "returned": on_returned, "errored": self._show_error, "finished": self._on_finished})
        self.run_button.enabled = False
        self.save_button.enabled = False
        self.worker.start()

    def _on_finished(self) -> None:
        self.worker = None
        self._run = None
        self.run_button.enabled = True
        self.cancel_button.enabled = False
        self.save_button.enabled = self.outcome is not None

    def _show_error(self, error: BaseException) -> None:
        """One line in the widget and a notification (options worded as the widget's); an unexpected
        error's traceback goes to the log."""
        if isinstance(error, DirioError):
            message = f"dirio: error: {error}"
            for option in ("`overwrite`", "--overwrite"):
                message = message.replace(f"pass {option}", "tick 'overwrite'")
            message = message.replace("choose another -o", "choose another folder")
        else:
            message = f"dirio: unexpected error: {type(error).__name__}: {error}"
            logger.error("dirio plugin", exc_info=error)
        self.status.value = message
        from napari.utils.notifications import show_error

        show_error(message)
