"""What a displacement field looks like in the viewer: layer data tuples (:mod:`.layers`) on the
fixed grid.

* the Jacobian determinant of ``x -> x + u(x)`` (Learn2Reg's, :func:`dirio.evaluation.jacobian.
  jacobian_determinant_l2r`: central differences, 2 voxels cropped on every side, so its layer is
  shifted by 2 voxels) and the folds, ``det <= 0``, as a red label layer;
* a deformed grid: planes every ``spacing`` voxels, warped like an image by
  :func:`dirio.api.apply_field` (it shows the moving image's grid as it is pulled onto the fixed one);
* the displacement as vectors from ``x`` to ``x + u(x)`` (where the fixed-grid point ``x`` takes its
  value from in the moving image), every ``spacing`` voxels.

Fields are ``(*S, ndim)`` float32 in voxels of the fixed grid (Learn2Reg layout).
"""

from __future__ import annotations

import numpy as np

from dirio.api import apply_field
from dirio.apps.napari.layers import LayerData, image_layer, napari_affine
from dirio.evaluation.jacobian import L2R_JACOBIAN_CROP, jacobian_determinant_l2r
from dirio.io.images import Image

# Grid planes and vectors every this many voxels at most, and at least this many per axis.
GRID_SPACING = 8
MIN_LINES = 4
FOLD_COLOR = "red"


def grid_spacing(shape: tuple[int, ...]) -> int:
    """Voxels between grid planes (and vectors): :data:`GRID_SPACING`, smaller on small grids so
    that every axis has at least :data:`MIN_LINES`."""
    return max(1, min(GRID_SPACING, min(shape) // MIN_LINES))


def grid_image(shape: tuple[int, ...], spacing: int) -> np.ndarray:
    """``S`` float32 image: 1 on the planes ``index % spacing == 0`` of every axis, else 0."""
    grid = np.zeros(shape, dtype=bool)
    for axis, n in enumerate(shape):
        index = [np.newaxis] * len(shape)
        index[axis] = slice(None)
        grid |= (np.arange(n) % spacing == 0)[tuple(index)]
    return grid.astype(np.float32)


def vectors(disp: np.ndarray, spacing: int) -> np.ndarray:
    """napari vectors ``(N, 2, ndim)``: positions on a lattice every ``spacing`` voxels (offset by half
    a spacing) and the displacement there (voxels)."""
    shape = disp.shape[:-1]
    axes = [np.arange(min(spacing // 2, n - 1), n, spacing) for n in shape]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(shape))
    return np.stack([points, disp[tuple(points.T)]], axis=1).astype(np.float32)


def jacobian_layers(disp: np.ndarray, affine: np.ndarray, prefix: str = "") -> list[LayerData]:
    """The Jacobian determinant (colour map from 0.5, pink: compressed, to 1.5, green: stretched,
    white at 1: volume kept) and the folds (``det <= 0``, red), placed on the cropped grid."""
    ndim = disp.shape[-1]
    det = jacobian_determinant_l2r(disp).astype(np.float32)
    shift = np.eye(4)
    shift[:ndim, 3] = L2R_JACOBIAN_CROP
    cropped = affine @ shift
    folds = (det <= 0).astype(np.uint8)
    return [
        image_layer(Image(det, cropped), f"{prefix}Jacobian determinant", colormap="PiYG",
                    contrast_limits=(0.5, 1.5), visible=False,
                    metadata={"folding_percent": float(100.0 * folds.mean())}),
        image_layer(Image(folds, cropped), f"{prefix}folds (det <= 0)", kind="labels",
                    colormap={0: "transparent", 1: FOLD_COLOR, None: "transparent"}),
    ]


def field_layers(disp: np.ndarray, affine: np.ndarray, prefix: str = "") -> list[LayerData]:
    """Every layer of a field: Jacobian determinant, folds, deformed grid, displacement vectors."""
    ndim = disp.shape[-1]
    shape = disp.shape[:-1]
    spacing = grid_spacing(shape)
    grid = apply_field(grid_image(shape, spacing), disp)
    layers = jacobian_layers(disp, affine, prefix)
    # dark lines over whatever lies below (minimum blending: the white between the lines changes nothing)
    layers.append(image_layer(Image(grid, affine), f"{prefix}deformed grid", colormap="gray_r",
                              blending="minimum", contrast_limits=(0.0, 1.0), visible=False))
    layers.append((vectors(disp, spacing), {
        "name": f"{prefix}displacement", "affine": napari_affine(affine, ndim), "edge_color": "cyan",
        "edge_width": 0.3, "vector_style": "arrow", "visible": False,
        "metadata": {"spacing_voxels": spacing},
    }, "vectors"))
    return layers
