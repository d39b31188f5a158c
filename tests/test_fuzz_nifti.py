"""Fuzzing :func:`dirio.io.images.load_image` with damaged NIfTI files.

Every corruption of a small image must end one of two ways: the image is read exactly (same
voxels, affine within the 1e-4 mm grid tolerance), or it is refused with a :class:`DirioError`.
Any other exception is a crash, and any other result is garbage. The corruptions:

* truncations of the ``.nii.gz`` and of the ``.nii`` file at a random length;
* 1 to 3 random bit flips anywhere in the compressed bytes of the ``.nii.gz`` (the gzip CRC-32 and
  length checks refuse damaged voxels; a flip in an unused gzip header byte reads exactly);
* one header field of the uncompressed header set to a random value, then written as ``.nii``
  and as a freshly compressed ``.nii.gz`` (valid CRC): ``sizeof_hdr``, ``dim``, ``datatype``,
  ``bitpix``, ``vox_offset``, ``magic`` and non-finite or zero ``srow`` rows. A change that makes
  another valid file of the same size cannot be told from a real file and is not drawn: a
  datatype of the same width (int32 for float32), two dims swapped, a new scaling slope.

Bit flips in the voxels of an uncompressed ``.nii`` are undetectable (the format has no checksum)
and are not drawn. The test is bounded: a fixed number of cases per kind, a few seconds in all.
"""

from __future__ import annotations

import gzip
import math
import time

import numpy as np
import pytest

from dirio.errors import DirioError
from dirio.io.images import GRID_TOLERANCE_MM, load_image, save_image

SHAPE = (6, 7, 8)
CASES_PER_KIND = 60
# Byte offsets of NIfTI-1 header fields (nifti1.h).
FIELDS = {"sizeof_hdr": (0, "<i4"), "dim": (40, "<i2"), "datatype": (70, "<i2"), "bitpix": (72, "<i2"),
          "vox_offset": (108, "<f4"), "srow_x": (280, "<f4"), "magic": (344, "S4")}
# float32 is 32 bits wide; these codes have another width or none (nifti1.h): uint8, int16, float64,
# int8, uint16, int64, uint64, complex64, complex128, RGB24, and unknown codes.
OTHER_WIDTH_TYPES = (2, 4, 64, 256, 512, 1024, 1280, 32, 1792, 128, 0, 3, 9999, -5)


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    angle = math.radians(12.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0],
                               [0, 0, 1]]) @ np.diag([1.5, 0.9, 2.0])
    affine[:3, 3] = (-30.0, 12.5, 7.0)
    data = np.random.default_rng(0).normal(100.0, 20.0, SHAPE).astype(np.float32)
    save_image(folder / "image.nii.gz", data, affine)
    save_image(folder / "image.nii", data, affine)
    reference = load_image(folder / "image.nii.gz")
    assert np.array_equal(reference.data, data)
    return {"folder": folder, "data": data, "affine": reference.affine,
            "gz": (folder / "image.nii.gz").read_bytes(), "nii": (folder / "image.nii").read_bytes()}


def _outcome(original, path) -> str:
    """``"exact"`` or ``"refused"``; fails the test on a crash or on garbage."""
    try:
        image = load_image(path)
    except DirioError as error:
        assert "\n" not in str(error) and str(path) in str(error)
        return "refused"
    except Exception as error:  # noqa: BLE001 - the property under test
        pytest.fail(f"{path.name}: crashed with {type(error).__name__}: {error}")
    same_data = image.data.shape == original["data"].shape and np.array_equal(image.data, original["data"])
    same_affine = np.abs(image.affine - original["affine"]).max() <= GRID_TOLERANCE_MM
    assert same_data and same_affine, f"{path.name}: read without error but not the original image"
    return "exact"


def _write(original, name: str, content: bytes):
    path = original["folder"] / name
    path.write_bytes(content)
    return path


def test_truncated_files_are_refused(original):
    rng = np.random.default_rng(1)
    for kind in ("gz", "nii"):
        content = original[kind]
        for length in rng.integers(0, len(content), CASES_PER_KIND):
            path = _write(original, f"cut.{'nii.gz' if kind == 'gz' else 'nii'}", content[:length])
            assert _outcome(original, path) == "refused", length


def test_bit_flips_in_the_compressed_bytes_are_refused_or_harmless(original):
    rng = np.random.default_rng(2)
    outcomes = []
    for _ in range(4 * CASES_PER_KIND):
        content = bytearray(original["gz"])
        for _ in range(rng.integers(1, 4)):
            position = int(rng.integers(0, len(content)))
            content[position] ^= 1 << int(rng.integers(0, 8))
        outcomes.append(_outcome(original, _write(original, "flip.nii.gz", bytes(content))))
    assert outcomes.count("refused") > len(outcomes) // 2  # most flips hit the deflate data


def _mutated_header(original, rng) -> bytes:
    raw = bytearray(gzip.decompress(original["gz"]))
    field = list(FIELDS)[int(rng.integers(0, len(FIELDS)))]
    offset, dtype = FIELDS[field]
    if field == "sizeof_hdr":
        value = np.array(rng.choice([0, 1, 347, 349, 540, -348, int(rng.integers(-2**31, 2**31))]), dtype)
    elif field == "dim":
        index = int(rng.integers(0, 4))
        offset += 2 * index
        current = int(np.frombuffer(raw, "<i2", 1, offset)[0])
        value = np.array(rng.choice([v for v in (-1, 0, 1, 2, 5, 8, 9, 100, 32767) if v != current]), dtype)
    elif field == "datatype":
        value = np.array(rng.choice(OTHER_WIDTH_TYPES), dtype)
    elif field == "bitpix":
        value = np.array(rng.choice([0, 8, 16, 64, 128, -32, 31]), dtype)
    elif field == "vox_offset":
        value = np.array(rng.choice([0.0, 100.0, 347.0, 348.0, 351.0, 356.0, 1e6, -352.0, np.nan, np.inf]), dtype)
    elif field == "srow_x":
        row = int(rng.integers(0, 3))
        offset += 16 * row
        value = np.array(rng.choice([[np.nan] * 4, [np.inf, 0, 0, 0], [0.0] * 4]), dtype)
        if row > 0 or value[0] == 0:  # a zero row only makes the affine singular when it is the whole row
            value = np.zeros(4, dtype) if rng.random() < 0.5 else np.full(4, np.nan, dtype)
    else:  # magic
        value = np.array(rng.choice([b"n+2\0", b"ni1\0", b"xyz\0", b"\0\0\0\0"]), dtype)
    encoded = value.tobytes()
    raw[offset:offset + len(encoded)] = encoded
    return bytes(raw)


def test_header_fields_set_to_inconsistent_values_are_refused_or_read_exactly(original):
    rng = np.random.default_rng(3)
    for _ in range(2 * CASES_PER_KIND):
        raw = _mutated_header(original, rng)
        for name, content in (("header.nii", raw), ("header.nii.gz", gzip.compress(raw))):
            _outcome(original, _write(original, name, content))


def test_the_fuzzing_stays_within_a_few_seconds(original):
    start = time.perf_counter()
    rng = np.random.default_rng(4)
    for _ in range(CASES_PER_KIND):
        _outcome(original, _write(original, "timed.nii.gz", gzip.compress(_mutated_header(original, rng))))
    assert time.perf_counter() - start < 5.0
