"""The plugin's reader: a ``dirio register`` output folder, a Learn2Reg displacement file, or an
image file, opened as layers in world coordinates (:mod:`.layers`).

* an output folder (it holds ``metrics.json``): the fixed image when its file still exists, the
  warped moving image and labels, and the field's layers (:func:`.results.field_layers`);
* a Learn2Reg displacement file (NIfTI ``(*S, 3)`` or ``(*S, 1, 3)``, voxels of the fixed grid with
  the fixed affine): the field's layers;
* any other image dirio reads (NIfTI; ``.mha`` / ``.nrrd`` with SimpleITK): one image layer, or a
  label layer for a NIfTI file of unscaled integer voxels.

Every problem is a :class:`dirio.errors.DirioError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dirio.apps.napari.layers import LayerData, image_layer
from dirio.apps.napari.results import field_layers
from dirio.errors import DirioError
from dirio.io.fields import load_field_and_affine
from dirio.io.images import ITK_SUFFIXES, NIFTI_SUFFIXES, Image, load_image

MANIFEST = "metrics.json"
READABLE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


def get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """npe2 reader contribution: a function that reads ``path``, or ``None`` for paths this plugin does
    not read (several paths, folders without ``metrics.json``, other suffixes)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    if path.is_dir():
        return read_output_folder if (path / MANIFEST).is_file() else None
    if path.name.lower().endswith(READABLE_SUFFIXES):
        return read_file
    return None


def _one(path) -> Path:
    return Path(path[0] if isinstance(path, (list, tuple)) else path)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in sorted(READABLE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_field_file(path: Path) -> bool:
    """Whether a NIfTI file holds a vector per voxel (a displacement field), from its header only."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return False
    import nibabel

    try:
        shape = nibabel.load(str(path)).shape
    except Exception as error:  # noqa: BLE001 - nibabel raises many kinds for damaged files
        raise DirioError(f"{path}: cannot be read as NIfTI ({type(error).__name__}: {error})") from None
    return len(shape) in (4, 5) and shape[-1] in (2, 3)


def read_file(path) -> list[LayerData]:
    """A displacement file as the field's layers, or an image file as one layer."""
    path = _one(path)
    if is_field_file(path):
        disp, affine = load_field_and_affine(path, ndim=3 if _field_ndim(path) == 3 else 2)
        return field_layers(disp, affine, prefix=f"{_stem(path)}: ")
    if _stores_integers(path):
        return [image_layer(load_image(path, labels=True), _stem(path), kind="labels")]
    return [image_layer(load_image(path), _stem(path))]


def _stores_integers(path: Path) -> bool:
    """Whether a NIfTI file stores integer voxels without intensity scaling (a label map)."""
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        return False
    import nibabel

    image = nibabel.load(str(path))
    slope, intercept = image.header.get_slope_inter()
    unscaled = slope in (None, 1.0) and intercept in (None, 0.0)
    return bool(np.issubdtype(image.get_data_dtype(), np.integer) and unscaled)


def _field_ndim(path: Path) -> int:
    import nibabel

    return int(nibabel.load(str(path)).shape[-1])


def read_output_folder(path) -> list[LayerData]:
    """A ``dirio register`` output folder as layers (see the module docstring)."""
    folder = _one(path)
    try:
        record = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        outputs = {key: folder / Path(name).name for key, name in record["outputs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DirioError(f"{folder / MANIFEST}: not a dirio register record ({type(error).__name__}: {error})") from None
    if "disp" not in outputs or not outputs["disp"].is_file():
        raise DirioError(f"{folder}: its displacement file {outputs.get('disp', 'disp_*.nii.gz')} is missing")
    disp, affine = load_field_and_affine(outputs["disp"], ndim=_field_ndim(outputs["disp"]))
    layers: list[LayerData] = []
    fixed = Path(str(record.get("fixed", "")))
    if fixed.name and fixed.is_file():
        layers.append(image_layer(load_image(fixed, ndim=disp.shape[-1]), _stem(fixed)))
    if outputs.get("warped") is not None and outputs["warped"].is_file():
        warped = load_image(outputs["warped"], ndim=disp.shape[-1])
        layers.append(image_layer(Image(warped.data, affine, warped.path), _stem(outputs["warped"]),
                                  colormap="magenta", blending="additive", metadata={"metrics": record.get("after")}))
    if outputs.get("warped_labels") is not None and outputs["warped_labels"].is_file():
        labels = load_image(outputs["warped_labels"], labels=True, ndim=disp.shape[-1])
        layers.append(image_layer(labels, _stem(outputs["warped_labels"]), kind="labels", opacity=0.5))
    layers.extend(field_layers(disp, affine, prefix=f"{_stem(outputs['disp'])}: "))
    return layers
