"""ITK displacement-field files: the deformable transform in physical LPS millimetres.

A Learn2Reg field (:func:`dirio.io.fields.save_field`) is in voxels of the fixed grid; ITK tools
(``antsApplyTransforms``, SimpleITK / ITK ``DisplacementFieldTransform``, ITK-SNAP, 3D Slicer)
take a displacement in physical LPS mm on a grid with ITK geometry: a fixed point ``p`` maps to
the moving point ``p + d(p)``, which is exactly the Learn2Reg pull convention written in world
coordinates (:func:`dirio.core.fields.voxel_to_itk_displacement`).

Formats (chosen by the file suffix):

* ``.nii.gz`` / ``.nii``: NIfTI array ``(D, H, W, 1, 3)`` float32 with intent code 1007
  (``NIFTI_INTENT_VECTOR``) and the fixed image's affine in sform and qform. This is the layout of
  ANTs' ``*Warp.nii.gz``; ITK reads the vector values of this intent as LPS without conversion
  (unlike intent 1006 ``DISPVECT``, whose values ITK 5.4 takes as RAS and flips).
* ``.mha``: MetaImage vector image (float32), needs SimpleITK.
* ``.h5``: an ITK transform file holding one ``DisplacementFieldTransform`` (float64), needs
  SimpleITK; ``sitk.ReadTransform`` and ``antsApplyTransforms -t`` read it directly.

ITK geometry cannot store shear, so a grid whose affine has shear is refused.
"""

from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

from dirio.core.fields import itk_to_voxel_displacement, voxel_to_itk_displacement
from dirio.errors import DirioError
from dirio.io.atomic import atomic_output
from dirio.io.images import (NIFTI_XFORM_SCANNER, _import_simpleitk, _read_nifti, _suffix, itk_to_ras_affine,
                              ras_affine_to_itk, save_nifti)

PathLike = str | os.PathLike

# NIfTI-1 intent codes (nifti1.h): a vector per voxel, and a displacement vector per voxel.
NIFTI_INTENT_VECTOR = 1007
NIFTI_INTENT_DISPVECT = 1006
ITK_FIELD_SUFFIXES = (".nii.gz", ".nii", ".mha", ".h5")
DESCRIPTION = b"dirio ITK displacement field, LPS mm"


def is_itk_field_name(path: PathLike) -> bool:
    """True for the suffixes :func:`save_itk_field` writes."""
    return _suffix(Path(path)) in ITK_FIELD_SUFFIXES


def itk_geometry(affine: np.ndarray, path: PathLike):
    """``(spacing, origin, direction)`` of a grid in ITK's terms.

    Raises:
        DirioError: naming ``path`` (the file whose grid it is) when the affine has shear.
    """
    try:
        return ras_affine_to_itk(affine, 3)
    except ValueError as exc:
        raise DirioError(f"{path}: {exc}; an ITK displacement field needs a grid without shear") from None


#: The signature of an HDF5 file, at offset 0, 512, 1024, 2048... (the HDF5 superblock).
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: Path) -> bool:
    """Whether ``path`` starts an HDF5 superblock at offset 0 or a power of two from 512."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + len(HDF5_SIGNATURE) <= size:
            handle.seek(offset)
            if handle.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def itk_reason(error: Exception) -> str:
    """An ITK / SimpleITK exception as one short line: the description, without the C++ source paths,
    line numbers and object addresses ITK puts around it."""
    text = " ".join(str(error).split())
    if "Description:" in text:
        text = text.split("Description:", 1)[1]
    elif "ITK ERROR:" in text:
        text = text.split("ITK ERROR:", 1)[1]
    text = re.sub(r"\S*/\S*:\d+:?", "", text)  # /build/.../file.cxx:123:
    text = re.sub(r"\(?0x[0-9a-fA-F]+\)?:?", "", text)  # object addresses
    text = re.sub(r"\b\w+ ERROR:\s*", "", text)
    text = re.sub(r"\s*Tried to create one of the following:.*", "", text)  # ITK's list of reader classes
    return " ".join(text.split()).strip(" :") or "unreadable"


@contextmanager
def _c_stderr_silenced():
    """Silence what C libraries write to file descriptor 2 (the HDF5 library's diagnostic stack of a
    file it cannot open) for the duration; the error still arrives as the exception."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real descriptor 2 (an embedding host)
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def save_itk_field(path: PathLike, disp: np.ndarray, affine: np.ndarray, *, overwrite: bool = False) -> None:
    """Write a Learn2Reg field as an ITK displacement field (physical LPS mm), atomically.

    Args:
        path: ``.nii.gz`` / ``.nii`` (vector intent), ``.mha`` or ``.h5`` (SimpleITK).
        disp: ``(D, H, W, 3)`` displacement in voxels of the fixed grid (Learn2Reg convention).
        affine: the fixed grid's ``(4, 4)`` voxel -> RAS affine.
        overwrite: allow replacing an existing file.
    Raises:
        DirioError: unknown suffix, a 2D field, an affine with shear, or SimpleITK missing for
            ``.mha`` / ``.h5``.
    """
    path = Path(path)
    disp = np.asarray(disp)
    if disp.ndim != 4 or disp.shape[-1] != 3:
        raise DirioError(f"{path}: ITK displacement fields are written for 3D fields (D, H, W, 3), got {disp.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    spacing, origin, direction = itk_geometry(affine, path)
    lps = voxel_to_itk_displacement(disp, affine)
    suffix = _suffix(path)
    if suffix in (".nii.gz", ".nii"):
        img = nib.Nifti1Image(np.ascontiguousarray(lps[..., None, :], dtype=np.float32), affine)
        img.set_sform(affine, code=NIFTI_XFORM_SCANNER)
        img.set_qform(affine, code=NIFTI_XFORM_SCANNER)
        img.header.set_intent(NIFTI_INTENT_VECTOR)
        img.header.set_xyzt_units(xyz="mm")
        img.header["descrip"] = DESCRIPTION
        with atomic_output(path, overwrite=overwrite) as tmp:
            save_nifti(img, tmp)
        return
    if suffix not in (".mha", ".h5"):
        raise DirioError(f"{path}: ITK displacement fields are written as {', '.join(ITK_FIELD_SUFFIXES)}")
    sitk = _import_simpleitk(path, "writing")
    pixel = np.float32 if suffix == ".mha" else np.float64  # DisplacementFieldTransform needs float64
    image = sitk.GetImageFromArray(np.ascontiguousarray(lps.transpose(2, 1, 0, 3), dtype=pixel), isVector=True)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    with atomic_output(path, overwrite=overwrite) as tmp:
        if suffix == ".mha":
            sitk.WriteImage(image, str(tmp), useCompression=True)
        else:
            sitk.WriteTransform(sitk.DisplacementFieldTransform(image), str(tmp))


def is_itk_nifti_header(header) -> bool:
    """True for a NIfTI header of a vector / displacement-vector intent with the ``(*S, 1, 3)`` layout."""
    shape = header.get_data_shape()
    return int(header["intent_code"]) in (NIFTI_INTENT_VECTOR, NIFTI_INTENT_DISPVECT) and len(shape) == 5


def load_itk_field(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read an ITK displacement field: ``(D, H, W, 3)`` float32 LPS mm and the grid's RAS affine.

    NIfTI: intent 1007 (vector, LPS values, the ANTs layout) is read as is; intent 1006
    (``DISPVECT``) holds RAS vectors by ITK 5.4's reading, so its x and y are flipped to LPS.

    Raises:
        DirioError: naming the file when it is missing, unreadable or not a 3D displacement field.
    """
    path = Path(path)
    if not path.is_file():
        raise DirioError(f"{path}: no such file")
    suffix = _suffix(path)
    if suffix in (".nii.gz", ".nii"):
        data, affine = _read_nifti(path)
        intent = int(nib.load(str(path)).header["intent_code"])
        if data.ndim == 5 and data.shape[3] == 1:
            data = data[..., 0, :]
        if data.ndim != 4 or data.shape[-1] != 3:
            raise DirioError(f"{path}: has shape {tuple(data.shape)}; expected an ITK displacement field (D, H, W, 1, 3)")
        lps = np.array(data, dtype=np.float32)
        if intent == NIFTI_INTENT_DISPVECT:
            lps[..., :2] *= -1.0
    elif suffix in (".mha", ".h5"):
        if suffix == ".h5" and not is_hdf5(path):
            raise DirioError(f"{path}: not an HDF5 file; an ITK transform file (.h5) is HDF5, as ITK and ANTs write it")
        sitk = _import_simpleitk(path, "reading")
        try:
            if suffix == ".h5":
                with _c_stderr_silenced():
                    transform = sitk.ReadTransform(str(path))
                if transform.GetName() == "CompositeTransform":
                    transform = sitk.CompositeTransform(transform)
                    if transform.GetNumberOfTransforms() != 1:
                        raise DirioError(f"{path}: holds {transform.GetNumberOfTransforms()} transforms; "
                                         "expected one displacement field")
                    transform = transform.GetNthTransform(0)
                if transform.GetName() != "DisplacementFieldTransform":
                    raise DirioError(f"{path}: holds a {transform.GetName()}, not a DisplacementFieldTransform")
                image = sitk.DisplacementFieldTransform(transform).GetDisplacementField()
            else:
                image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise DirioError(f"{path}: cannot read as an ITK displacement field ({itk_reason(exc)})") from None
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 3:
            raise DirioError(f"{path}: expected a 3D field of 3-vectors, got {image.GetDimension()}D with "
                             f"{image.GetNumberOfComponentsPerPixel()} components")
        lps = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0, 3), dtype=np.float32)
        affine = itk_to_ras_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    else:
        raise DirioError(f"{path}: ITK displacement fields are read from {', '.join(ITK_FIELD_SUFFIXES)}")
    if not np.isfinite(lps).all():
        raise DirioError(f"{path}: contains NaN/Inf displacements")
    return lps, affine


def itk_field_to_learn2reg(path: PathLike) -> tuple[np.ndarray, np.ndarray]:
    """An ITK displacement field file as a Learn2Reg field: ``(D, H, W, 3)`` voxels of its grid, and the affine."""
    lps, affine = load_itk_field(path)
    return itk_to_voxel_displacement(lps, affine), affine
