"""dirio in the napari viewer: an npe2 plugin (``napari.yaml``) over the same API as the command line.

* :mod:`.widget` — the *Register* dock widget: layers in, settings, a thread worker with progress and
  Cancel, result layers, metrics, and *Save* (the files of ``dirio register``).
* :mod:`.session` — what the widget runs, free of Qt: layers -> :class:`dirio.apps.workflow.Inputs`,
  settings from the option schema, :func:`dirio.apps.workflow.register_inputs`, the scores.
* :mod:`.layers` — dirio images <-> napari layers in world coordinates (the images' affines).
* :mod:`.results` — a field -> layers: warped image and labels, Jacobian determinant, folds,
  deformed grid, displacement vectors.
* :mod:`.reader` — a Learn2Reg displacement file, a ``dirio register`` output folder, or an image
  file, opened as layers. :mod:`.sample` — the demo pair under File > Open Sample.

Nothing here registers or scores by itself: numbers come from :mod:`dirio.api` and
:mod:`dirio.apps.workflow`, so they equal the command line's. napari is imported only by the
widget (install the ``napari`` extra).
"""
