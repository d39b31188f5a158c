"""Specification of dirio.io.images: faithful IO, one-line errors that name the file, grids, keypoints."""

import gzip
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dirio.errors import DirioError
from dirio.io.images import Image, check_same_grid, itk_to_ras_affine, load_image, resample_to_grid, save_image
from dirio.io.fields import load_field, save_field
from dirio.io.keypoints import load_keypoints, save_keypoints
from dirio.core.intensity import normalise_intensity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _rotation(angles):
    """Rotation matrix from Euler angles (radians) about x, then y, then z."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(spacing=(0.8, 1.2, 2.5), translation=(-90.5, 12.25, 40.0)):
    """A rotated, anisotropic affine whose entries are exactly representable in float32 (NIfTI storage)."""
    affine = np.eye(4)
    affine[:3, :3] = _rotation((0.3, -0.2, 0.5)) @ np.diag(spacing)
    affine[:3, 3] = translation
    return affine.astype(np.float32).astype(np.float64)


def random_volume(shape=(6, 7, 8), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def write_nifti(path, data, affine=None):
    """Write with plain nibabel (bypassing save_image) to build test inputs."""
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


# --- Image -----------------------------------------------------------------------------------------


def test_image_properties_come_from_data_and_affine_columns():
    affine = oblique_affine(spacing=(0.8, 1.2, 2.5))
    image = Image(data=np.zeros((4, 5, 6), np.float32), affine=affine)
    assert image.shape == (4, 5, 6) and image.ndim == 3
    np.testing.assert_allclose(image.spacing, (0.8, 1.2, 2.5), rtol=1e-6)
    tensor = image.to_tensor()
    assert tensor.shape == (1, 1, 4, 5, 6) and tensor.dtype == torch.float32

    flat = Image(data=np.zeros((4, 5), np.uint8), affine=np.diag([2.0, 3.0, 1.0, 1.0]))
    assert flat.ndim == 2 and flat.spacing == (2.0, 3.0)
    assert flat.to_tensor().shape == (1, 1, 4, 5)


# --- NIfTI round trips -----------------------------------------------------------------------------


def test_nifti_round_trip_keeps_oblique_affine_exactly_and_float32(tmp_path):
    data, affine = random_volume(), oblique_affine()
    path = tmp_path / "img.nii.gz"
    save_image(path, data.astype(np.float64), affine)  # float64 in -> float32 on disk
    image = load_image(path)
    assert image.data.dtype == np.float32
    np.testing.assert_array_equal(image.data, data)
    np.testing.assert_array_equal(image.affine, affine)
    assert image.path == str(path)
    header = nib.load(str(path)).header
    assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1  # scanner coordinates
    assert header.get_data_dtype() == np.float32
    # The qform (rotation + zooms) represents the same rigid affine to float32 precision.
    np.testing.assert_allclose(header.get_qform(), affine, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_nifti_round_trip_keeps_label_dtype(tmp_path, dtype):
    labels = np.random.default_rng(1).integers(0, 5, size=(5, 6, 7)).astype(dtype)
    path = tmp_path / "seg.nii.gz"
    save_image(path, labels, oblique_affine())
    assert nib.load(str(path)).get_data_dtype() == dtype
    image = load_image(path, labels=True)
    assert image.data.dtype == dtype
    np.testing.assert_array_equal(image.data, labels)
    # The same file read as intensities becomes float32.
    assert load_image(path).data.dtype == np.float32


def test_nii_gz_is_one_deterministic_gzip_member_of_nibabels_bytes(tmp_path):
    """dirio's .nii.gz: the bytes nibabel would write uncompressed, deflated as one gzip member with
    no name or time stamp (the same data gives the same file), read back by gzip, nibabel and dirio."""
    rng = np.random.default_rng(0)
    field = rng.normal(size=(9, 10, 11, 3)).astype(np.float32)
    affine = np.diag([1.5, 1.0, 2.0, 1.0])
    first, second = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    save_field(first, field, affine)
    save_field(second, field, affine)
    assert first.read_bytes() == second.read_bytes()
    raw = gzip.decompress(first.read_bytes())
    reference = nib.Nifti1Image.from_bytes(raw)
    assert raw == reference.to_bytes()
    np.testing.assert_array_equal(np.asarray(nib.load(first).dataobj), field)
    np.testing.assert_array_equal(load_field(first), field)
    header = first.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08" and header[3] == 0 and header[4:8] == b"\0\0\0\0"  # no name, no mtime


def test_save_image_casts_floats_to_a_requested_integer_type_by_rounding(tmp_path):
    path = tmp_path / "seg.nii"
    save_image(path, np.array([[[0.2, 0.9, 2.6]]]), np.eye(4), dtype=np.uint8)
    image = load_image(path, labels=True)
    assert image.data.dtype == np.uint8
    np.testing.assert_array_equal(image.data, [[[0, 1, 3]]])


def test_save_image_refuses_to_overwrite_without_the_flag(tmp_path):
    path = tmp_path / "img.nii.gz"
    save_image(path, np.zeros((2, 2, 2)), np.eye(4))
    with pytest.raises(DirioError, match=r"img\.nii\.gz exists; pass `overwrite`"):
        save_image(path, np.ones((2, 2, 2)), np.eye(4))
    save_image(path, np.ones((2, 2, 2)), np.eye(4), overwrite=True)
    assert load_image(path).data.min() == 1.0


def test_float_label_file_with_integer_values_becomes_integer(tmp_path):
    path = write_nifti(tmp_path / "seg.nii.gz", np.array([[[0.0, 1.0], [2.0, 300.0]]], np.float32))
    image = load_image(path, labels=True)
    assert np.issubdtype(image.data.dtype, np.integer)
    np.testing.assert_array_equal(image.data, [[[0, 1], [2, 300]]])


def test_trailing_singleton_axes_are_dropped(tmp_path):
    flat = write_nifti(tmp_path / "slice.nii.gz", random_volume((5, 6, 1)))
    image = load_image(flat, ndim=2)
    assert image.shape == (5, 6) and image.ndim == 2
    vol = write_nifti(tmp_path / "vol.nii.gz", random_volume((4, 5, 6, 1)))
    assert load_image(vol).shape == (4, 5, 6)


def test_2d_round_trip(tmp_path):
    data = random_volume((5, 6))
    affine = np.diag([0.5, 0.7, 1.0, 1.0])
    path = tmp_path / "slice.nii.gz"
    save_image(path, data, affine)
    image = load_image(path, ndim=2)
    np.testing.assert_array_equal(image.data, data)
    assert image.spacing == pytest.approx((0.5, 0.7))


# --- SimpleITK formats ---------------------------------------------------------------------------


def _sitk():
    return pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (the `itk` extra)")


def test_mha_written_by_simpleitk_is_read_in_ijk_order_with_a_ras_affine(tmp_path):
    sitk = _sitk()
    data_ijk = random_volume((4, 5, 6))
    img = sitk.GetImageFromArray(data_ijk.transpose(2, 1, 0))  # SimpleITK arrays are (k, j, i)
    img.SetSpacing((2.0, 3.0, 4.0))
    img.SetOrigin((10.0, 20.0, 30.0))
    path = tmp_path / "img.mha"
    sitk.WriteImage(img, str(path))

    image = load_image(path)
    assert image.shape == (4, 5, 6) and image.data.dtype == np.float32
    np.testing.assert_array_equal(image.data, data_ijk)
    assert image.spacing == pytest.approx((2.0, 3.0, 4.0))
    # LPS origin (10, 20, 30) is RAS (-10, -20, 30); the x and y axes point the other way.
    expected = np.array([[-2.0, 0, 0, -10.0], [0, -3.0, 0, -20.0], [0, 0, 4.0, 30.0], [0, 0, 0, 1]])
    np.testing.assert_allclose(image.affine, expected)


def test_mha_and_nifti_written_by_simpleitk_agree(tmp_path):
    sitk = _sitk()
    img = sitk.GetImageFromArray(random_volume((4, 5, 6)))
    img.SetSpacing((1.5, 0.8, 2.0))
    img.SetOrigin((-3.0, 7.5, 12.0))
    img.SetDirection(tuple(_rotation((0.2, 0.1, -0.4)).ravel()))
    sitk.WriteImage(img, str(tmp_path / "a.mha"))
    sitk.WriteImage(img, str(tmp_path / "a.nii.gz"))
    from_mha, from_nifti = load_image(tmp_path / "a.mha"), load_image(tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(from_mha.data, from_nifti.data)
    np.testing.assert_allclose(from_mha.affine, from_nifti.affine, atol=1e-5)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_round_trip_keeps_array_spacing_and_origin(tmp_path, suffix):
    sitk = _sitk()
    data = random_volume((4, 5, 6))
    affine = oblique_affine()
    path = tmp_path / f"img{suffix}"
    save_image(path, data, affine)
    image = load_image(path)
    np.testing.assert_array_equal(image.data, data)
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    # And what SimpleITK itself sees: LPS origin and spacing.
    raw = sitk.ReadImage(str(path))
    assert raw.GetSpacing() == pytest.approx((0.8, 1.2, 2.5), rel=1e-6)
    assert raw.GetOrigin() == pytest.approx((90.5, -12.25, 40.0))
    labels = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    save_image(tmp_path / f"seg{suffix}", labels, affine)
    read = load_image(tmp_path / f"seg{suffix}", labels=True)
    assert read.data.dtype == np.int16
    np.testing.assert_array_equal(read.data, labels)


def test_itk_affine_conversion_flips_x_and_y():
    affine = itk_to_ras_affine((1.0, 2.0), (5.0, 6.0), (0.0, -1.0, 1.0, 0.0))
    # Index (1, 0) -> LPS (5, 6) + (0, 1) = (5, 7) -> RAS (-5, -7).
    np.testing.assert_allclose(affine @ [1, 0, 0, 1], [-5.0, -7.0, 0.0, 1.0])


def test_mha_without_simpleitk_explains_how_to_install_it(tmp_path, monkeypatch):
    path = tmp_path / "img.mha"
    path.write_bytes(b"ObjectType = Image\n")
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # makes `import SimpleITK` fail
    with pytest.raises(DirioError) as info:
        load_image(path)
    message = str(info.value)
    assert "img.mha" in message and "pip install SimpleITK" in message and "itk" in message


def test_save_image_refuses_a_sheared_affine_in_itk_formats(tmp_path):
    _sitk()
    sheared = np.eye(4)
    sheared[0, 1] = 0.5
    with pytest.raises(DirioError, match=r"img\.mha.*shear"):
        save_image(tmp_path / "img.mha", np.zeros((2, 2, 2)), sheared)
    assert list(tmp_path.iterdir()) == []


# --- bad inputs: one DirioError naming the file --------------------------------------------------


def _error_message(call, *args, **kwargs) -> str:
    with pytest.raises(DirioError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    message = _error_message(load_image, tmp_path / "absent.nii.gz")
    assert "absent.nii.gz" in message and "no such file" in message


def test_truncated_nifti(tmp_path):
    path = write_nifti(tmp_path / "cut.nii.gz", random_volume((20, 20, 20)))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    assert "cut.nii.gz" in _error_message(load_image, path)


def test_uncompressed_truncated_nifti(tmp_path):
    path = write_nifti(tmp_path / "cut.nii", random_volume((10, 10, 10)))
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])
    assert "cut.nii" in _error_message(load_image, path)


def test_text_file_named_nifti(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n")
    assert "notes.nii.gz" in _error_message(load_image, path)
    gz = tmp_path / "zipped.nii.gz"
    gz.write_bytes(gzip.compress(b"still not an image" * 30))
    assert "zipped.nii.gz" in _error_message(load_image, gz)


def test_unsupported_format(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"\x89PNG")
    message = _error_message(load_image, path)
    assert "photo.png" in message and ".png" in message


def test_4d_image(tmp_path):
    path = write_nifti(tmp_path / "series.nii.gz", random_volume((4, 5, 6, 2)))
    message = _error_message(load_image, path)
    assert "series.nii.gz" in message and "has 4 dimensions (4, 5, 6, 2); expected a 3D image" in message


def test_2d_image_where_3d_expected(tmp_path):
    path = write_nifti(tmp_path / "slice.nii.gz", random_volume((5, 6)))
    message = _error_message(load_image, path)
    assert "slice.nii.gz" in message and "has 2 dimensions" in message and "expected a 3D image" in message


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad):
    data = random_volume()
    data[1, 2, 3] = bad
    data[0, 0, 0] = bad
    path = write_nifti(tmp_path / "bad.nii.gz", data)
    message = _error_message(load_image, path)
    assert "bad.nii.gz" in message and "contains 2 NaN/Inf voxels" in message


def test_non_integer_label_map(tmp_path):
    path = write_nifti(tmp_path / "seg.nii.gz", np.array([[[0.0, 1.0], [0.5, 2.0]]], np.float32))
    message = _error_message(load_image, path, labels=True)
    assert "seg.nii.gz" in message and "non-integer values such as 0.5" in message
    # The same file is a valid intensity image.
    assert load_image(path).data.dtype == np.float32


def test_negative_label_map(tmp_path):
    path = write_nifti(tmp_path / "seg.nii.gz", np.array([[[0, 1], [-1, 2]]], np.int16))
    message = _error_message(load_image, path, labels=True)
    assert "seg.nii.gz" in message and "negative" in message


# --- displacement fields -------------------------------------------------------------------------


def test_field_round_trip_in_learn2reg_layout(tmp_path):
    disp = random_volume((4, 5, 6, 3))
    affine = oblique_affine()
    path = tmp_path / "disp_0001_0002.nii.gz"
    save_field(path, disp, affine)
    stored = nib.load(str(path))
    assert stored.shape == (4, 5, 6, 3) and stored.get_data_dtype() == np.float32
    np.testing.assert_array_equal(stored.affine, affine)
    loaded = load_field(path)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, disp)
    # The NIfTI vector layout (*S, 1, 3) without a vector intent is ambiguous (voxels or mm?): refused
    # (issue 18), the Learn2Reg layout being (D, H, W, 3).
    vector = write_nifti(tmp_path / "vector.nii.gz", disp[:, :, :, None, :])
    message = _error_message(load_field, vector)
    assert "vector.nii.gz" in message and "(4, 5, 6, 1, 3)" in message and "without a vector intent" in message


def test_field_of_wrong_shape_or_with_nan(tmp_path):
    scalar = write_nifti(tmp_path / "scalar.nii.gz", random_volume((4, 5, 6)))
    message = _error_message(load_field, scalar)
    assert "scalar.nii.gz" in message and "(4, 5, 6)" in message
    two_components = write_nifti(tmp_path / "two.nii.gz", random_volume((4, 5, 6, 2)))
    assert "two.nii.gz" in _error_message(load_field, two_components)
    disp = random_volume((4, 5, 6, 3))
    disp[0, 0, 0, 1] = np.nan
    nan = write_nifti(tmp_path / "nan.nii.gz", disp)
    assert "nan.nii.gz" in _error_message(load_field, nan)
    assert "absent.nii.gz" in _error_message(load_field, tmp_path / "absent.nii.gz")


# --- grids ---------------------------------------------------------------------------------------


def test_check_same_grid_accepts_float32_rounding_and_names_both_files_otherwise():
    affine = oblique_affine()
    fixed = Image(np.zeros((4, 5, 6), np.float32), affine, path="a.nii.gz")
    nearly = affine.copy()
    nearly[0, 3] += 1e-6  # below the 1e-4 mm tolerance
    check_same_grid(fixed, Image(np.zeros((4, 5, 6), np.float32), nearly, path="b.nii.gz"))

    other_shape = Image(np.zeros((4, 5, 7), np.float32), affine, path="b.nii.gz")
    message = _error_message(check_same_grid, fixed, other_shape)
    assert message == (
        "moving image 'b.nii.gz' is on a different grid from the fixed image 'a.nii.gz' "
        "(shape (4, 5, 7) vs (4, 5, 6)); pass `resample` to resample it onto the fixed grid"
    )
    shifted = affine.copy()
    shifted[2, 3] += 0.5
    message = _error_message(check_same_grid, fixed, Image(np.zeros((4, 5, 6), np.float32), shifted, path="b.nii.gz"))
    assert "'b.nii.gz'" in message and "'a.nii.gz'" in message and "`resample`" in message


def test_resample_pure_translation_shifts_the_array():
    data = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    moved = np.eye(4)
    moved[:3, 3] = (2.0, 0.0, -1.0)  # image voxel (i, j, k) sits at world (i + 2, j, k - 1)
    image = Image(data, moved)
    target = Image(np.zeros((5, 4, 3), np.float32), np.eye(4))
    out = resample_to_grid(image, target)
    # Target voxel x is at world x = image voxel x - (2, 0, -1).
    assert out.data.dtype == np.float32 and out.shape == (5, 4, 3)
    np.testing.assert_array_equal(out.affine, target.affine)
    np.testing.assert_allclose(out.data[2:, :, :2], data[:3, :, 1:])
    # Outside the image, intensities repeat the nearest edge voxel.
    np.testing.assert_allclose(out.data[0], data[0, :, np.r_[1, 2, 2]].T)

    labels = Image((data % 3).astype(np.uint8), moved)
    out_labels = resample_to_grid(labels, target, labels=True)
    assert out_labels.data.dtype == np.uint8
    np.testing.assert_array_equal(out_labels.data[2:, :, :2], labels.data[:3, :, 1:])
    assert (out_labels.data[:2] == 0).all() and (out_labels.data[:, :, 2] == 0).all()  # outside -> 0


def test_resample_onto_a_finer_grid_interpolates_linearly():
    coarse = Image(np.arange(4, dtype=np.float32).reshape(4, 1, 1) * 10.0, np.diag([2.0, 1.0, 1.0, 1.0]))
    fine = Image(np.zeros((8, 1, 1), np.float32), np.eye(4))
    out = resample_to_grid(coarse, fine)
    # Fine voxel x at world x mm is coarse voxel x / 2, value 10 * x / 2, clamped at the last voxel (30).
    np.testing.assert_allclose(out.data[:, 0, 0], [0, 5, 10, 15, 20, 25, 30, 30])


# --- keypoints -----------------------------------------------------------------------------------


def test_keypoints_round_trip_nlst_style(tmp_path):
    points = np.array([[94, 92, 114], [77.25, 81, 105.5]])
    path = tmp_path / "kp.csv"
    save_keypoints(path, points)
    assert path.read_text().splitlines()[0] == "94,92,114"  # integers as NLST writes them
    loaded = load_keypoints(path, shape=(120, 160, 130))
    assert loaded.dtype == np.float64
    np.testing.assert_array_equal(loaded, points)


def test_keypoints_header_and_named_columns(tmp_path):
    path = tmp_path / "landmarks.csv"
    path.write_text("id,fixed_i,fixed_j,fixed_k,x_mm\n0,1,2,3,-25.4\n1,4,5,6,-48.6\n")
    points = load_keypoints(path, columns=["fixed_i", "fixed_j", "fixed_k"])
    np.testing.assert_array_equal(points, [[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(load_keypoints(path, columns=[1, 2, 3]), points)
    headed = tmp_path / "headed.csv"
    headed.write_text("i,j,k\n1,2,3\n")
    np.testing.assert_array_equal(load_keypoints(headed), [[1, 2, 3]])


def test_keypoints_with_wrong_columns(tmp_path):
    path = tmp_path / "kp.csv"
    path.write_text("1,2,3\n4,5,6,7\n")
    message = _error_message(load_keypoints, path)
    assert "kp.csv" in message and "line 2 has 4 columns; expected 3" in message
    short = tmp_path / "short.csv"
    short.write_text("1,2\n")
    assert "short.csv" in _error_message(load_keypoints, short)


def test_keypoints_outside_the_image(tmp_path):
    path = tmp_path / "kp.csv"
    path.write_text("0,0,0\n9.5,0,0\n1,2,3\n1,2,10\n")
    # The voxel extent reaches half a voxel beyond the first and last voxel centres.
    assert load_keypoints(path, shape=(10, 10, 11)).shape == (4, 3)
    message = _error_message(load_keypoints, path, shape=(10, 10, 10))
    assert "kp.csv" in message and "keypoint 3" in message and "(1, 2, 10)" in message
    assert "outside the image of shape (10, 10, 10)" in message


def test_keypoints_bad_values_and_missing_file(tmp_path):
    nan = tmp_path / "nan.csv"
    nan.write_text("1,2,3\nnan,2,3\n")
    assert "nan.csv" in _error_message(load_keypoints, nan)
    word = tmp_path / "word.csv"
    word.write_text("1,2,3\n1,two,3\n")
    assert "word.csv" in _error_message(load_keypoints, word)
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    assert "empty.csv" in _error_message(load_keypoints, empty)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    assert "binary.csv" in _error_message(load_keypoints, binary)
    assert "absent.csv" in _error_message(load_keypoints, tmp_path / "absent.csv")


# --- intensity normalisation ---------------------------------------------------------------------


def test_normalise_minmax_and_clip():
    data = np.array([-2048.0, -1000.0, 250.0, 1500.0, 3000.0])
    np.testing.assert_allclose(normalise_intensity(data, "minmax"), (data + 2048) / 5048, rtol=1e-6)
    clipped = normalise_intensity(data, "clip", lo=-1000, hi=1500)
    assert clipped.dtype == np.float32
    np.testing.assert_allclose(clipped, [0.0, 0.0, 0.5, 1.0, 1.0])
    assert (normalise_intensity(np.full(4, 7.0), "minmax") == 0).all()
    with pytest.raises(ValueError, match="lo and hi"):
        normalise_intensity(data, "clip")
    with pytest.raises(ValueError, match="minmax"):
        normalise_intensity(data, "zscore")


def test_normalise_percentile_ignores_zero_background():
    data = np.concatenate([np.zeros(1000), np.arange(1, 201, dtype=np.float64)])
    out = normalise_intensity(data, "percentile")
    # Percentiles of the 200 nonzero values 1..200 (linear interpolation): 0.5% -> 1.995, 99.5% -> 199.005.
    low, high = 1 + 0.005 * 199, 1 + 0.995 * 199
    np.testing.assert_allclose(out[1000 + 99], (100 - low) / (high - low), rtol=1e-5)
    assert out[0] == 0.0 and out[-1] == 1.0 and out.dtype == np.float32


# --- shared real data (skipped when absent) ------------------------------------------------------


def _shared(*parts):
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} is absent")
    return path


def test_voxelmorph_brain_scan_loads_as_float32():
    image = load_image(_shared("voxelmorph-brain", "test_scan_vol.nii.gz"))
    assert image.shape == (160, 192, 224) and image.data.dtype == np.float32
    assert image.spacing == pytest.approx((1.0, 1.0, 1.0))


def test_lung_ct_mha_and_nifti_agree():
    _sitk()
    from_mha = load_image(_shared("elastix-lung-ct", "original_mha", "3DCT_lung_baseline_small.mha"))
    from_nifti = load_image(_shared("elastix-lung-ct", "baseline_small.nii.gz"))
    assert from_mha.shape == (57, 78, 64)
    np.testing.assert_array_equal(from_mha.data, from_nifti.data)
    np.testing.assert_allclose(from_mha.affine, from_nifti.affine, atol=1e-4)
    # ITK origin (-152.461, -148.986, -1432) LPS is RAS (152.461, 148.986, -1432).
    np.testing.assert_allclose(from_mha.affine[:3, 3], [152.461, 148.986, -1432.0], atol=1e-3)


def test_lung_landmarks_lie_inside_their_images():
    baseline = load_image(_shared("elastix-lung-ct", "baseline.nii.gz"))
    points = load_keypoints(
        _shared("elastix-lung-ct", "landmarks_10pairs.csv"),
        shape=baseline.shape,
        columns=["baseline_i", "baseline_j", "baseline_k"],
    )
    assert points.shape == (10, 3)
    np.testing.assert_array_equal(points[0], [94, 92, 114])
