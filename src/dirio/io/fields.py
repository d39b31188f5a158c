"""Displacement fields on disk in the Learn2Reg layout: NIfTI ``(*S, ndim)`` float32 in voxels of
the fixed grid, with the fixed image's affine (ITK world-space fields: :mod:`dirio.io.itk_fields`)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from dirio.errors import DirioError
from dirio.io.images import NIFTI_SUFFIXES, PathLike, _check_exists, _check_finite, _read_nifti, _suffix, _to_numpy, _write_nifti


def save_field(path: PathLike, disp: np.ndarray, affine: np.ndarray, *, overwrite: bool = False) -> None:
    """Write a displacement field in the Learn2Reg layout: NIfTI array ``(*S, ndim)`` float32.

    Args:
        path: ``.nii`` or ``.nii.gz`` file (Learn2Reg names it ``disp_<fixed>_<moving>.nii.gz``).
        disp: ``(*S, ndim)`` displacement in voxels of the fixed grid, components ``(i, j, k)``
            (see :func:`dirio.core.fields.field_to_numpy` for the tensor conversion).
        affine: the fixed image's ``(4, 4)`` affine.
        overwrite: allow replacing an existing file.
    """
    path = Path(path)
    array = _to_numpy(disp)
    if array.ndim not in (3, 4) or array.shape[-1] != array.ndim - 1:
        raise ValueError(f"a displacement field must have shape (*S, ndim) with ndim = 2 or 3, got {array.shape}")
    if _suffix(path) not in NIFTI_SUFFIXES:
        raise DirioError(f"{path}: displacement fields are written as NIfTI; use a .nii.gz name")
    field32 = np.ascontiguousarray(array, dtype=np.float32)
    _write_nifti(path, field32, np.asarray(affine, dtype=np.float64), overwrite)


def load_field(path: PathLike, ndim: int = 3) -> np.ndarray:
    """The displacement of :func:`load_field_and_affine`, without the affine."""
    return load_field_and_affine(path, ndim)[0]


def load_field_and_affine(path: PathLike, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Read a Learn2Reg displacement field and the affine of the grid it is defined on.

    Accepts NIfTI arrays ``(*S, ndim)`` (the Learn2Reg layout); the NIfTI vector layout ``(*S, 1,
    ndim)`` is refused: with a vector intent it is an ITK field in mm (``dirio convert`` reads it),
    without one it is ambiguous.

    Args:
        path: ``.nii`` / ``.nii.gz`` file.
        ndim: spatial dimensions (2 or 3).
    Returns:
        ``(*S, ndim)`` float32 displacement in voxels of the fixed grid, and the file's
        ``(4, 4)`` affine (the fixed image's, by the Learn2Reg convention).
    Raises:
        DirioError: naming the file, when it is missing, unreadable, of the wrong shape, or
            contains NaN/Inf.
    """
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    path = Path(path)
    _check_exists(path)
    if _suffix(path) not in NIFTI_SUFFIXES:
        raise DirioError(f"{path}: displacement fields are read from NIfTI (.nii, .nii.gz) files")
    data, affine = _read_nifti(path)
    # NIfTI intent codes 1006 (displacement vector) and 1007 (vector) with the (*S, 1, 3) layout:
    # an ITK / ANTs field in physical mm, which read as voxels would be silently wrong.
    if data.ndim == ndim + 2 and int(nib.load(str(path)).header["intent_code"]) in (1006, 1007):
        raise DirioError(
            f"{path}: is an ITK displacement field (NIfTI vector intent, physical LPS mm), not a Learn2Reg field "
            f"in voxels; convert it first: dirio convert {path} -o disp.nii.gz"
        )
    if data.ndim == ndim + 2 and data.shape[ndim] == 1:
        # The NIfTI vector layout without a vector intent: values in voxels or in mm? A Learn2Reg field
        # is (*S, ndim); guessing would be silently wrong either way.
        raise DirioError(
            f"{path}: has shape {tuple(data.shape)}, the NIfTI vector layout, without a vector intent: a Learn2Reg "
            f"field is {'(D, H, W, 3)' if ndim == 3 else '(H, W, 2)'} in voxels, an ITK field (D, H, W, 1, 3) with "
            f"intent 1007 in LPS mm; write the field in one of these layouts"
        )
    if data.ndim != ndim + 1 or data.shape[-1] != ndim:
        expected = "(D, H, W, 3)" if ndim == 3 else "(H, W, 2)"
        raise DirioError(f"{path}: has shape {tuple(data.shape)}; expected a displacement field {expected}")
    if not np.issubdtype(data.dtype, np.number):
        raise DirioError(f"{path}: has voxel type {data.dtype}; expected a numeric displacement field")
    data = data.astype(np.float32, copy=False)
    _check_finite(data, path)
    return np.ascontiguousarray(data), affine
