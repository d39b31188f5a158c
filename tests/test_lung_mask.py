"""The automatic lung mask: a synthetic chest phantom with known lungs, the real elastix pair
against its provided masks, and its use by register() when no mask is given."""

from pathlib import Path

import numpy as np
import pytest

from dirio.api import register
from dirio.methods.lung_mask import lung_mask

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "elastix-lung-ct"


def chest_phantom(shape=(48, 40, 36), seed=0):
    """Air (-1000 HU) around a body (40 HU) holding two lungs (-850 HU) with vessels (+40 HU);
    scanner padding (-2048) in one corner, and the lungs touching the top of the image (a crop)."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, dtype=np.float32)
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    body = (((grid - centre) / (np.array([22, 18, 40], np.float32)[:, None, None, None])) ** 2).sum(0) <= 1
    lungs = np.zeros(shape, bool)
    for offset in (-8, 8):
        c = centre.copy()
        c[1] += offset
        c[2] -= 8  # towards the top: the lungs reach the image border
        lungs |= (((grid - c) / np.array([15, 6, 30], np.float32)[:, None, None, None]) ** 2).sum(0) <= 1
    lungs &= body
    image = np.full(shape, -1000.0, np.float32)
    image[body] = 40.0
    image[lungs] = -850.0
    vessels = lungs & (rng.random(shape) < 0.02)
    image[vessels] = 40.0
    image[:6, :6, :] = -2048.0  # padding outside the field of view
    image += rng.normal(0, 15, shape).astype(np.float32)
    return image, lungs


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_the_phantom_lungs_are_found_and_the_outside_air_and_padding_are_not():
    image, lungs = chest_phantom()
    mask = lung_mask(image)
    assert dice(mask, lungs) > 0.95
    assert not (mask & (image < -1500)).any()
    outside = image < -900
    outside &= ~lungs
    assert (mask & outside).sum() < 0.02 * outside.sum()


def test_an_image_that_is_not_a_ct_in_hounsfield_units_gives_an_empty_mask():
    assert not lung_mask(np.random.default_rng(1).random((20, 20, 20)).astype(np.float32)).any()


def test_register_uses_automatic_masks_only_when_asked_and_no_mask_is_given():
    image, lungs = chest_phantom()
    moving = np.roll(image, 1, axis=0)
    common = dict(preset="lung-ct", iterations=(3, 3), affine_options={"iterations": (3, 3)}, progress=False,
                  device="cpu")
    auto = register(image, moving, auto_mask="lungs", **common)
    assert auto.stages[0]["stage"] == "lung-mask" and auto.stages[0]["used"]
    assert auto.stages[0]["fixed_fraction"] == pytest.approx(lung_mask(image).mean())
    plain = register(image, moving, auto_mask="none", **common)
    assert all(s["stage"] != "lung-mask" for s in plain.stages)
    given = register(image, moving, auto_mask="lungs", fixed_mask=lungs, moving_mask=np.roll(lungs, 1, 0), **common)
    assert all(s["stage"] != "lung-mask" for s in given.stages)  # the user's masks win


def test_a_non_ct_pair_falls_back_to_no_mask():
    rng = np.random.default_rng(2)
    image = rng.random((24, 24, 24)).astype(np.float32)
    result = register(image, image, auto_mask="lungs", normalise="minmax", iterations=(2, 2), progress=False,
                      device="cpu")
    assert result.stages[0]["stage"] == "lung-mask" and not result.stages[0]["used"]


@pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent (the shared data is not beside the checkout)")
def test_the_elastix_pair_masks_match_the_provided_lung_masks():
    import nibabel as nib

    for name in ("baseline", "followup"):
        image = np.asarray(nib.load(DATA / f"{name}.nii.gz").dataobj)
        provided = np.asarray(nib.load(DATA / f"{name}_mask.nii.gz").dataobj) > 0
        assert dice(lung_mask(image), provided) > 0.97


def test_lung_ct_masks_the_lungs_by_default_and_the_option_turns_it_off():
    from dirio.config.schema import settings_from_values
    from dirio.config.settings import make_settings

    assert make_settings("lung-ct").preprocessing.auto_mask == "lungs"
    assert make_settings("brain-mri").preprocessing.auto_mask == "none"
    assert settings_from_values({"preset": "lung-ct", "auto_mask": "none"}).preprocessing.auto_mask == "none"
