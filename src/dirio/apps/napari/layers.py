"""dirio images <-> napari layers, in world coordinates.

A dirio :class:`~dirio.io.images.Image` is an array with its 4x4 affine (voxel ``(i, j, k)`` -> world
RAS+ mm). Its layer gets that affine as napari's ``affine`` (``(ndim + 1)`` square), so napari's
world axes are ``(x, y, z)`` mm and every layer of a pair lands in its place however anisotropic
or oblique its grid; the exact 4x4 affine also travels in ``layer.metadata["dirio_affine"]``.
Back from a layer, the affine is napari's full data-to-world transform (``affine`` composed with
``scale``, ``translate``, ``rotate``, ``shear``), or the stored one while the two agree (so an
image read from a file goes back to the API bit for bit, and a layer moved in the viewer is taken
where it now is).

Layer data tuples are ``(data, keyword arguments of napari's add_<kind>, kind)`` with ``kind``
``"image"``, ``"labels"`` or ``"vectors"``: what npe2 readers and sample-data functions return.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from dirio.errors import DirioError
from dirio.io.images import Image

AFFINE_KEY = "dirio_affine"
LayerData = tuple[Any, dict, str]
# A stored affine is used while napari's transform agrees with it to this many mm (float32 rounding
# of a displayed transform stays far below; a layer moved by hand does not).
AGREEMENT_MM = 1e-6


def napari_affine(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The ``(ndim + 1, ndim + 1)`` affine napari takes for a dirio 4x4 affine of an ``ndim``-D image."""
    affine = np.asarray(affine, dtype=np.float64)
    if ndim == 3:
        return affine.copy()
    keep = [0, 1, 3]
    return affine[np.ix_(keep, keep)]


def dirio_affine(matrix: np.ndarray) -> np.ndarray:
    """A 4x4 dirio affine from napari's ``(ndim + 1)`` square data-to-world matrix (2D: unit slice axis)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape == (4, 4):
        return matrix.copy()
    if matrix.shape != (3, 3):
        raise DirioError(f"a layer of {matrix.shape[0] - 1} dimensions cannot be registered; dirio takes 2D or 3D images")
    affine = np.eye(4)
    keep = [0, 1, 3]
    affine[np.ix_(keep, keep)] = matrix
    return affine


def image_layer(image: Image, name: str, kind: str = "image", **options) -> LayerData:
    """A layer data tuple of ``image`` placed by its affine; ``options`` go to napari (colormap, ...)."""
    metadata = {AFFINE_KEY: image.affine.copy(), "path": image.path}
    metadata.update(options.pop("metadata", {}))
    return image.data, {"name": name, "affine": napari_affine(image.affine, image.ndim), "metadata": metadata,
                        **options}, kind


def layer_world_matrix(layer) -> np.ndarray:
    """napari's data-to-world transform of ``layer`` as an ``(ndim + 1)`` square matrix."""
    from napari.utils.transforms import Affine

    physical = Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate, shear=layer.shear,
                      ndim=layer.ndim)
    return np.asarray(layer.affine.affine_matrix, dtype=np.float64) @ physical.affine_matrix


def layer_affine(layer) -> np.ndarray:
    """The 4x4 voxel -> world mm affine of a layer: the stored dirio affine while napari's transform
    agrees with it (within :data:`AGREEMENT_MM`), else napari's transform."""
    matrix = layer_world_matrix(layer)
    stored = layer.metadata.get(AFFINE_KEY) if isinstance(layer.metadata, dict) else None
    if stored is not None:
        stored = np.asarray(stored, dtype=np.float64)
        if stored.shape == (4, 4) and np.abs(napari_affine(stored, layer.ndim) - matrix).max() <= AGREEMENT_MM:
            return stored.copy()
    return dirio_affine(matrix)


def image_from_layer(layer, labels: bool = False) -> Image:
    """The :class:`Image` a layer shows: its data (float32 intensities, or an integer label map) on
    its world grid; ``Image.path`` is the layer's name (for messages).

    Raises:
        DirioError: naming the layer, for data that is not 2D or 3D, multiscale, RGB, or a label
            map that is not integer.
    """
    name = layer.name
    if getattr(layer, "multiscale", False):
        raise DirioError(f"layer {name!r} is multiscale; dirio registers single-resolution images")
    if getattr(layer, "rgb", False):
        raise DirioError(f"layer {name!r} is an RGB image; dirio registers scalar images")
    data = np.asarray(layer.data)
    if data.ndim not in (2, 3):
        raise DirioError(f"layer {name!r} has shape {data.shape}; dirio registers 2D or 3D images")
    if labels:
        if not np.issubdtype(data.dtype, np.integer) and not np.issubdtype(data.dtype, np.bool_):
            raise DirioError(f"layer {name!r} is not a label map (voxel type {data.dtype})")
    elif data.dtype != np.float32:
        data = data.astype(np.float32)
    if not labels and not np.isfinite(data).all():
        raise DirioError(f"layer {name!r} contains NaN or infinite values")
    return Image(data, layer_affine(layer), path=name)


def file_name(name: str) -> str:
    """A layer name made safe as part of a file name (``disp_<fixed>_<moving>.nii.gz``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return safe or "image"
