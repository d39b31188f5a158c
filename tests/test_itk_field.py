"""ITK displacement-field output (:mod:`dirio.io.itk_fields`, ``--itk-field``, ``dirio convert``).

The property: resampling the moving image with SimpleITK through the written
``DisplacementFieldTransform`` (physical LPS mm) reproduces ``dirio warp`` of the Learn2Reg field to
interpolation accuracy, on grids that are anisotropic, oblique, and stored LPS-flipped against the
moving image. Both use linear interpolation and the field is sampled at voxel centres, so away from
the image border (where the two treat outside points differently) they agree to float rounding.
With ANTs installed, ``ants.apply_transforms`` gives the same; otherwise that test is skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from dirio.io.itk_fields import load_itk_field, save_itk_field
from dirio.testing.synthetic import smooth_random_field
from cli_helpers import run_cli

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (pip install dirio[itk])")

SHAPE = (18, 20, 16)
TOLERANCE = 1e-3  # intensities in [0, 100]: float32 rounding of two linear interpolations


def _rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    i, j = [a for a in range(3) if a != axis]
    matrix = np.eye(3)
    matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
    return matrix


def _affine(linear: np.ndarray, origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = origin
    return affine


ANISOTROPIC = _affine(np.diag([1.5, 0.8, 2.5]), (-12.0, 20.0, 3.0))
OBLIQUE = _affine(_rotation(2, 17.0) @ _rotation(0, -9.0) @ np.diag([1.2, 1.0, 2.0]), (30.0, -15.0, 8.0))
# An LPS-stored grid: the first two voxel axes run right-to-left and anterior-to-posterior.
LPS_STORED = _affine(np.diag([-1.3, -1.1, 1.8]), (25.0, 22.0, -4.0))


def _flipped_storage(data: np.ndarray, affine: np.ndarray):
    """The same image stored with its first two axes reversed (RAS order if it was LPS): same world."""
    flipped = data[::-1, ::-1, :].copy()
    shape = np.array(data.shape)
    new = affine.copy()
    new[:3, 0], new[:3, 1] = -affine[:3, 0], -affine[:3, 1]
    new[:3, 3] = affine[:3, :3] @ np.array([shape[0] - 1, shape[1] - 1, 0]) + affine[:3, 3]
    return flipped, new


_run = run_cli


def _volume(seed: int) -> np.ndarray:
    volume = gaussian_filter(np.random.default_rng(seed).standard_normal(SHAPE), 2.0)
    return ((volume - volume.min()) / np.ptp(volume) * 100.0).astype(np.float32)


def _field(seed: int) -> np.ndarray:
    u = smooth_random_field(SHAPE, sigma=4.0, max_displacement=2.5, seed=seed)
    return np.ascontiguousarray(u[0].numpy().transpose(1, 2, 3, 0))


def _inside(disp: np.ndarray, margin: float = 1.0) -> np.ndarray:
    """Voxels whose sampling point ``x + u(x)`` lies at least ``margin`` voxels inside the grid."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    target = grid + disp
    return np.all((target >= margin) & (target <= np.array(SHAPE) - 1 - margin), axis=-1)


def _sitk_resample(moving: Path, fixed: Path, transform) -> np.ndarray:
    moving_image = sitk.ReadImage(str(moving), sitk.sitkFloat32)
    reference = sitk.ReadImage(str(fixed), sitk.sitkFloat32)
    result = sitk.Resample(moving_image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(result).transpose(2, 1, 0)


@pytest.mark.parametrize("grid, moving_flipped", [(ANISOTROPIC, False), (OBLIQUE, False), (LPS_STORED, True)],
                         ids=["anisotropic", "oblique", "lps-stored-fixed-ras-stored-moving"])
@pytest.mark.parametrize("suffix", [".nii.gz", ".h5", ".mha"])
def test_simpleitk_resampling_through_the_itk_field_reproduces_dirio_warp(tmp_path, grid, moving_flipped, suffix):
    fixed_data, moving_data, disp = _volume(0), _volume(1), _field(2)
    fixed = tmp_path / "fixed.nii.gz"
    nib.save(nib.Nifti1Image(fixed_data, grid), str(fixed))
    moving = tmp_path / "moving.nii.gz"
    stored, stored_affine = _flipped_storage(moving_data, grid) if moving_flipped else (moving_data, grid)
    nib.save(nib.Nifti1Image(stored, stored_affine), str(moving))
    field = tmp_path / "disp.nii.gz"
    nib.save(nib.Nifti1Image(disp, grid), str(field))

    warp_args = ["warp", moving, field, "-o", tmp_path / "warped.nii.gz"] + (["--resample"] if moving_flipped else [])
    assert _run(warp_args).rc == 0
    dirio_warped = np.asarray(nib.load(tmp_path / "warped.nii.gz").dataobj)

    itk_field = tmp_path / f"itk{suffix}"
    result = _run(["convert", field, "-o", itk_field])
    assert result.rc == 0, result.err
    if suffix == ".h5":
        transform = sitk.ReadTransform(str(itk_field))
    else:
        transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(itk_field)), sitk.sitkVectorFloat64))
    itk_warped = _sitk_resample(moving, fixed, transform)

    inside = _inside(disp)
    assert inside.mean() > 0.5
    assert np.abs(itk_warped - dirio_warped)[inside].max() < TOLERANCE


def test_the_nifti_itk_field_has_the_vector_intent_the_fixed_grid_and_lps_millimetres(tmp_path):
    disp = _field(3)
    save_itk_field(tmp_path / "itk.nii.gz", disp, OBLIQUE)
    img = nib.load(tmp_path / "itk.nii.gz")
    assert img.shape == SHAPE + (1, 3) and img.get_data_dtype() == np.float32
    assert int(img.header["intent_code"]) == 1007  # NIFTI_INTENT_VECTOR, the ANTs layout
    assert np.allclose(img.affine, OBLIQUE, atol=1e-5)
    ras = np.einsum("ij,...j->...i", OBLIQUE[:3, :3], disp)
    np.testing.assert_allclose(np.asarray(img.dataobj)[..., 0, :], ras * [-1, -1, 1], atol=1e-5)
    lps, affine = load_itk_field(tmp_path / "itk.nii.gz")
    np.testing.assert_allclose(lps, ras * [-1, -1, 1], atol=1e-5)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".h5"])
def test_convert_turns_a_learn2reg_field_into_an_itk_field_and_back(tmp_path, suffix):
    disp = _field(4)
    nib.save(nib.Nifti1Image(disp, OBLIQUE), str(tmp_path / "disp.nii.gz"))
    assert _run(["convert", tmp_path / "disp.nii.gz", "-o", tmp_path / f"itk{suffix}"]).rc == 0
    result = _run(["convert", tmp_path / f"itk{suffix}", "-o", tmp_path / "back.nii.gz"])
    assert result.rc == 0 and "Learn2Reg" in result.out
    back = nib.load(tmp_path / "back.nii.gz")
    np.testing.assert_allclose(np.asarray(back.dataobj), disp, atol=1e-4)
    assert np.allclose(back.affine, OBLIQUE, atol=1e-4)


def test_an_itk_field_given_where_a_learn2reg_field_is_expected_is_refused(tmp_path):
    save_itk_field(tmp_path / "itk.nii.gz", _field(5), ANISOTROPIC)
    nib.save(nib.Nifti1Image(_volume(0), ANISOTROPIC), str(tmp_path / "image.nii.gz"))
    result = _run(["warp", tmp_path / "image.nii.gz", tmp_path / "itk.nii.gz", "-o", tmp_path / "w.nii.gz"])
    assert result.rc == 2 and "ITK displacement field" in result.err and "dirio convert" in result.err


def test_register_itk_field_writes_fields_that_simpleitk_applies_like_the_warped_output(tmp_path):
    """End to end, with an affine stage composed: the ITK field alone is the whole transform."""
    fixed_data = _volume(0)
    moving_data = np.roll(fixed_data, 1, axis=0)
    nib.save(nib.Nifti1Image(fixed_data, OBLIQUE), str(tmp_path / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(moving_data, OBLIQUE), str(tmp_path / "moving.nii.gz"))
    out = tmp_path / "out"
    result = _run(["register", tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz", "-o", out, "--itk-field",
                   "--affine", "translation", "--affine-levels", "1", "--affine-iterations", "5",
                   "--levels", "2,1", "--iterations", "3,2", "-q", "--no-figure"])
    assert result.rc == 0, result.err
    disp = np.asarray(nib.load(out / "disp_fixed_moving.nii.gz").dataobj)
    dirio_warped = np.asarray(nib.load(out / "warped_moving.nii.gz").dataobj)
    inside = _inside(disp)
    for name in ("itk_disp_fixed_moving.nii.gz", "itk_disp_fixed_moving.h5"):
        if name.endswith(".h5"):
            transform = sitk.ReadTransform(str(out / name))
        else:
            transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(out / name)), sitk.sitkVectorFloat64))
        itk_warped = _sitk_resample(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", transform)
        assert np.abs(itk_warped - dirio_warped)[inside].max() < TOLERANCE, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"itk_field", "itk_transform"} <= set(metrics["outputs"])


def test_ants_apply_transforms_reproduces_dirio_warp(tmp_path):
    ants = pytest.importorskip("ants", reason="ANTsPy (antspyx) is not installed; the SimpleITK tests cover ITK")
    fixed_data, moving_data, disp = _volume(0), _volume(1), _field(2)
    for name, data in (("fixed", fixed_data), ("moving", moving_data), ("disp", disp)):
        nib.save(nib.Nifti1Image(data, OBLIQUE), str(tmp_path / f"{name}.nii.gz"))
    assert _run(["warp", tmp_path / "moving.nii.gz", tmp_path / "disp.nii.gz", "-o", tmp_path / "w.nii.gz"]).rc == 0
    assert _run(["convert", tmp_path / "disp.nii.gz", "-o", tmp_path / "warp_itk.nii.gz"]).rc == 0
    warped = ants.apply_transforms(fixed=ants.image_read(str(tmp_path / "fixed.nii.gz")),
                                   moving=ants.image_read(str(tmp_path / "moving.nii.gz")),
                                   transformlist=[str(tmp_path / "warp_itk.nii.gz")], interpolator="linear")
    inside = _inside(disp)
    difference = np.abs(warped.numpy() - np.asarray(nib.load(tmp_path / "w.nii.gz").dataobj))
    assert difference[inside].max() < TOLERANCE


def test_dirio_run_itk_field_writes_one_itk_field_per_pair_beside_the_official_fields(tmp_path):
    root = tmp_path / "data"
    affine = OBLIQUE
    for case in ("0001", "0002"):
        path = root / "imagesTr" / f"T_{case}_0000.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(_volume(int(case)), affine), str(path))
    (root / "T_dataset.json").write_text(json.dumps({"name": "T", "registration_val": [
        {"fixed": "./imagesTr/T_0001_0000.nii.gz", "moving": "./imagesTr/T_0002_0000.nii.gz"}]}))
    out = tmp_path / "run"
    result = _run(["run", root / "T_dataset.json", "-o", out, "-q", "--no-report", "--itk-field",
                   "--levels", "2,1", "--iterations", "3,2"])
    assert result.rc == 0, result.err
    disp = np.asarray(nib.load(out / "disp_0001_0000_0002_0000.nii.gz").dataobj)
    for name in ("disp_0001_0000_0002_0000.nii.gz", "disp_0001_0000_0002_0000.h5"):
        lps, grid = load_itk_field(out / "itk" / name)
        np.testing.assert_allclose(lps, np.einsum("ij,...j->...i", affine[:3, :3], disp) * [-1, -1, 1], atol=1e-4)
        assert np.allclose(grid, affine, atol=1e-4)
