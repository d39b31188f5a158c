"""The adaptive final smoothing of the dense stage's field (dirio.methods.final_smoothing)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dirio.api import normalised, register
from dirio.config.schema import settings_from_values
from dirio.config.settings import make_settings
from dirio.core.fields import field_from_numpy, warp
from dirio.errors import DirioError
from dirio.losses.similarity import make_similarity
from dirio.core.filters import gaussian_smooth
from dirio.methods.final_smoothing import FinalSmoothing, choose_final_smoothing, describe_choice
from dirio.transforms.affine import compose_affine_field
from dirio.transforms.fixed import FixedDisplacement

SHAPE = (24, 24, 24)


def _texture(seed: int, sigma: float) -> torch.Tensor:
    """A ``(1, 1, *SHAPE)`` random texture smoothed by ``sigma`` voxels, in [0, 1]."""
    noise = torch.rand((1, 1, *SHAPE), generator=torch.Generator().manual_seed(seed))
    image = gaussian_smooth(noise, sigma)
    return (image - image.min()) / (image.max() - image.min())


def _ripple(amplitude: float, period: float) -> torch.Tensor:
    """A displacement along axis 0 that oscillates along axis 1 (``(1, 3, *SHAPE)``, voxels)."""
    disp = torch.zeros((1, 3, *SHAPE))
    y = torch.arange(SHAPE[1], dtype=torch.float32)
    disp[0, 0] = amplitude * torch.sin(2 * math.pi * y / period)[None, :, None]
    return disp


def test_detail_the_images_need_is_kept_and_noise_they_do_not_is_smoothed():
    lncc = make_similarity("lncc", window=5)
    options = FinalSmoothing(mode="auto", sigma=1.5, probe_sigma=1.5, tolerance=0.02)
    # A fine ripple that the images carry: the fixed image is the moving one warped by it, so the
    # ripple is the right answer and smoothing it away costs the similarity much.
    moving = _texture(0, 1.0)
    ripple = _ripple(1.5, 4.0)
    fixed = warp(moving, ripple)
    kept = choose_final_smoothing(fixed, moving, ripple, lncc, options)
    assert not kept.smoothed and kept.displacement is ripple
    assert kept.increase > 0.1
    # Fine detail on identical images: noise that the images do not ask for, so smoothing it costs
    # nothing (here it brings the images closer) and it is smoothed.
    smooth_image = _texture(1, 3.0)
    noise = 0.3 * torch.randn((1, 3, *SHAPE), generator=torch.Generator().manual_seed(2))
    smoothed = choose_final_smoothing(smooth_image, smooth_image, noise, lncc, options)
    assert smoothed.smoothed and smoothed.increase < 0
    torch.testing.assert_close(smoothed.displacement, gaussian_smooth(noise, 1.5))
    record = smoothed.record(options)
    assert record["smoothed"] and record["loss"] == smoothed.loss and record["increase"] == smoothed.increase


def test_the_tolerance_decides_and_the_modes_off_and_always_skip_the_probe():
    lncc = make_similarity("lncc", window=5)
    moving = _texture(0, 1.0)
    ripple = _ripple(1.5, 4.0)
    fixed = warp(moving, ripple)
    increase = choose_final_smoothing(fixed, moving, ripple, lncc, FinalSmoothing(mode="auto")).increase
    assert choose_final_smoothing(fixed, moving, ripple, lncc,
                                  FinalSmoothing(mode="auto", tolerance=increase * 1.01)).smoothed
    assert not choose_final_smoothing(fixed, moving, ripple, lncc,
                                      FinalSmoothing(mode="auto", tolerance=increase * 0.99)).smoothed
    off = choose_final_smoothing(fixed, moving, ripple, lncc, FinalSmoothing(mode="off"))
    assert off.displacement is ripple and not off.smoothed and off.loss is None
    always = choose_final_smoothing(fixed, moving, ripple, lncc, FinalSmoothing(mode="always", sigma=2.0))
    assert always.smoothed and always.loss is None and "increase" not in always.record(FinalSmoothing("always"))
    torch.testing.assert_close(always.displacement, gaussian_smooth(ripple, 2.0))


def test_a_probe_sigma_other_than_sigma_probes_with_one_and_smooths_with_the_other():
    smooth_image = _texture(1, 3.0)
    noise = 0.3 * torch.randn((1, 3, *SHAPE), generator=torch.Generator().manual_seed(2))
    lncc = make_similarity("lncc", window=5)
    choice = choose_final_smoothing(smooth_image, smooth_image, noise, lncc,
                                    FinalSmoothing(mode="auto", sigma=2.0, probe_sigma=1.0, tolerance=1.0))
    torch.testing.assert_close(choice.displacement, gaussian_smooth(noise, 2.0))
    probe = warp(smooth_image, gaussian_smooth(noise, 1.0))
    assert choice.probe_loss == pytest.approx(float(lncc(smooth_image, probe)), rel=1e-6)


def test_an_affine_is_kept_and_only_the_residual_is_smoothed():
    lncc = make_similarity("lncc", window=5)
    image = _texture(1, 3.0)
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] += torch.tensor([[0.05, 0.02, 0.0], [0.0, -0.04, 0.03], [0.01, 0.0, 0.02]], dtype=torch.float64)
    matrix[:3, 3] = torch.tensor([1.5, -2.0, 0.5], dtype=torch.float64)
    residual = 0.3 * torch.randn((1, 3, *SHAPE), generator=torch.Generator().manual_seed(3))

    def recompose(field):
        return compose_affine_field(matrix, field)

    total = recompose(residual)
    choice = choose_final_smoothing(image, image, total, lncc, FinalSmoothing(mode="always"), residual=residual,
                                    recompose=recompose)
    torch.testing.assert_close(choice.displacement, recompose(gaussian_smooth(residual, 1.5)))
    # smoothing the total field instead would bend the affine at the border (replicated edges)
    assert (choice.displacement - gaussian_smooth(total, 1.5)).abs().max() > 0.01


def test_the_options_are_checked_with_one_line_reasons():
    with pytest.raises(ValueError, match="final smoothing must be one of off, auto, always"):
        FinalSmoothing(mode="sometimes").validate()
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        FinalSmoothing(sigma=0.0).validate()
    with pytest.raises(ValueError, match="probe_sigma must be a positive number"):
        FinalSmoothing(probe_sigma=float("nan")).validate()
    with pytest.raises(ValueError, match="tolerance must be a finite number >= 0"):
        FinalSmoothing(tolerance=-0.1).validate()
    with pytest.raises(ValueError, match="sigma must be a positive number of voxels, got 'wide'"):
        FinalSmoothing(sigma="wide").validate()
    with pytest.raises(DirioError, match="unknown final_smoothing setting 'sigmas'"):
        settings_from_values({"final_smoothing_options": "sigmas=2"})
    with pytest.raises(DirioError, match="final_smoothing"):
        settings_from_values({"final_smoothing": "sometimes"})


def test_brain_mri_smooths_automatically_and_the_options_override_it():
    assert make_settings("brain-mri").final_smoothing == FinalSmoothing(mode="auto")
    assert make_settings().final_smoothing.mode == "off"
    settings = settings_from_values({"preset": "brain-mri", "final_smoothing": "always",
                                     "final_smoothing_options": "sigma=2,tolerance=0.05"})
    assert settings.final_smoothing == FinalSmoothing(mode="always", sigma=2.0, probe_sigma=1.5, tolerance=0.05)
    assert settings.dense_stage().final_smoothing is settings.final_smoothing
    assert settings_from_values({"preset": "brain-mri", "final_smoothing": "off"}).final_smoothing.mode == "off"


def test_the_stage_returns_the_smoothed_field_records_the_choice_and_inverts_the_smoothed_field():
    rng = np.random.default_rng(0)
    fixed = np.asarray(gaussian_smooth(torch.from_numpy(rng.random((1, 1, 20, 22, 18), dtype=np.float32)), 1.5)[0, 0])
    moving = np.roll(fixed, 1, axis=0)
    common = dict(levels=(2, 1), iterations=(4, 3), lr=0.5, progress=False, regularizers={"diffusion": 0.1})
    plain = register(fixed, moving, **common)
    smoothed = register(fixed, moving, final_smoothing={"mode": "always", "sigma": 1.0}, inverse=True, **common)
    expected = gaussian_smooth(field_from_numpy(plain.disp), 1.0)
    np.testing.assert_allclose(smoothed.disp, np.moveaxis(expected[0].numpy(), 0, -1), atol=1e-6)
    dense = [stage for stage in smoothed.stages if stage["stage"] == "dense"][0]
    assert dense["final_smoothing"]["smoothed"] and dense["final_smoothing"]["sigma"] == 1.0
    assert smoothed.inverse["method"] != "exact" and smoothed.inverse["residual_voxels_mean"] < 0.01
    # auto: the stage probes with the full-resolution level's similarity and follows the rule
    auto = register(fixed, moving, final_smoothing={"mode": "auto", "tolerance": 0.0}, **common)
    record = [stage for stage in auto.stages if stage["stage"] == "dense"][0]["final_smoothing"]
    lncc = make_similarity("lncc")  # the default similarity (window 5)
    images = [torch.from_numpy(normalised(a, plain.settings))[None, None] for a in (fixed, moving)]
    loss = float(lncc(images[0], warp(images[1], field_from_numpy(plain.disp))))
    assert record["loss"] == pytest.approx(loss, abs=1e-5)
    assert record["smoothed"] == (record["increase"] <= 0.0)
    expected = plain.disp if not record["smoothed"] else np.moveaxis(
        gaussian_smooth(field_from_numpy(plain.disp), 1.5)[0].numpy(), 0, -1)
    np.testing.assert_allclose(auto.disp, expected, atol=1e-6)


def test_a_fixed_displacement_is_itself_on_its_grid_and_resampled_on_another():
    disp = torch.randn((1, 3, 6, 7, 8), generator=torch.Generator().manual_seed(0))
    transform = FixedDisplacement(disp)
    assert transform.displacement((6, 7, 8)) is transform.fixed_displacement
    assert tuple(transform.displacement((3, 4, 4)).shape) == (1, 3, 3, 4, 4)
    assert list(transform.parameters()) == []


def test_the_choice_is_described_in_one_line_for_the_figure():
    from dirio.apps.workflow import figure_notes

    kept = {"mode": "auto", "smoothed": False, "sigma": 1.5, "probe_sigma": 1.5, "tolerance": 0.02,
            "loss": -0.332, "probe_loss": -0.288, "increase": 0.0438, "seconds": 0.6}
    assert describe_choice(kept) == ("final smoothing (auto): field kept (similarity loss rise 0.0438 under sigma "
                                     "1.5 > 0.02)")
    smoothed = {**kept, "smoothed": True, "increase": 0.0083}
    assert describe_choice(smoothed).startswith("final smoothing (auto): smoothed, sigma 1.5 voxels (")
    assert describe_choice({"mode": "always", "smoothed": True, "sigma": 2.0, "seconds": 0.1}) == (
        "final smoothing (always): smoothed, sigma 2 voxels")

    class Result:
        stages = [{"stage": "dense", "final_smoothing": kept}]
        inverse = None

    assert figure_notes(Result()) == [describe_choice(kept)]
