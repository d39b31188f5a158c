"""The instance-optimisation engine on small synthetic problems with known answers."""

import numpy as np
import pytest
import torch

from dirio.errors import DirioError
from dirio.core.fields import jacobian_determinant, warp
from engine_helpers import EngineConfig, Objective, optimise
from dirio.testing.synthetic import endpoint_error, smooth_random_field


class MeanSquares:
    """A minimal similarity following the engine's contract (features once, loss per iteration)."""

    def features(self, image):
        return image

    def __call__(self, fixed, warped, mask=None):
        if mask is None:
            return ((fixed - warped) ** 2).mean()
        return (mask * (fixed - warped) ** 2).sum() / mask.sum()


def diffusion(u):
    return sum((u.diff(dim=d) ** 2).mean() for d in range(2, u.dim()))


def blob_image(shape, seed=0):
    """A smooth random image with structure at several scales, values about [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *shape, generator=generator)
    from dirio.core.filters import gaussian_smooth

    image = gaussian_smooth(noise, 2.0) + 0.5 * gaussian_smooth(noise, 1.0)
    image = (image - image.min()) / (image.max() - image.min())
    return image


def known_pair(shape, max_displacement=3.0, seed=0):
    moving = blob_image(shape, seed)
    true = smooth_random_field(shape, sigma=shape[0] / 6, max_displacement=max_displacement, seed=seed)
    fixed = warp(moving, true)
    return fixed, moving, true


def objectives(weight=0.05):
    return [
        Objective("mse", "similarity", MeanSquares(), 1.0),
        Objective("diffusion", "regularizer", diffusion, weight),
    ]


def interior_error(disp, true, margin=4):
    sl = (slice(None), slice(None)) + tuple(slice(margin, -margin) for _ in disp.shape[2:])
    return (disp - true)[sl].norm(dim=1).mean().item()


@pytest.mark.parametrize("shape", [(64, 64), (32, 36, 40)])
def test_engine_recovers_a_known_smooth_deformation(shape):
    fixed, moving, true = known_pair(shape, max_displacement=4.0)
    config = EngineConfig(levels=(2, 1), iterations=(80, 60), lr=0.5, progress=False)
    result = optimise(fixed, moving, objectives(0.02), config)
    before = interior_error(torch.zeros_like(true), true)
    after = interior_error(result.displacement, true)
    assert after < 0.3 * before, (before, after)
    assert result.displacement.shape == true.shape


def test_velocity_field_is_diffeomorphic_and_recovers_the_warp():
    fixed, moving, true = known_pair((48, 48), max_displacement=4.0, seed=3)
    config = EngineConfig(levels=(2, 1), iterations=(60, 40), lr=0.5, diffeomorphic=True, progress=False)
    result = optimise(fixed, moving, objectives(0.01), config)
    assert interior_error(result.displacement, true) < 0.35 * interior_error(torch.zeros_like(true), true)
    assert jacobian_determinant(result.displacement).min() > 0


def test_coarse_parameter_grid_gives_a_field_on_the_full_grid():
    fixed, moving, true = known_pair((40, 40, 40), seed=1)
    config = EngineConfig(levels=(1,), iterations=(80,), grid_spacing=2, lr=0.5, progress=False)
    result = optimise(fixed, moving, objectives(), config)
    assert result.levels[0]["grid"] == [20, 20, 20]
    assert result.displacement.shape == (1, 3, 40, 40, 40)
    assert interior_error(result.displacement, true) < 0.4 * interior_error(torch.zeros_like(true), true)


def test_log_has_every_term_at_every_iteration_and_the_schedule_lr():
    fixed, moving, _ = known_pair((24, 24))
    config = EngineConfig(levels=(2, 1), iterations=(5, 3), lr=2.0, schedule="cosine",
                          schedule_options={"final": 0.5}, progress=False)
    result = optimise(fixed, moving, objectives(), config)
    assert len(result.history) == 8
    assert [row["level"] for row in result.history] == [0] * 5 + [1] * 3
    assert all({"mse", "diffusion", "loss", "lr"} <= set(row) for row in result.history)
    assert result.history[0]["lr"] == pytest.approx(2.0)
    assert result.history[4]["lr"] == pytest.approx(1.0)
    row = result.history[2]
    assert row["loss"] == pytest.approx(row["mse"] + 0.05 * row["diffusion"])
    assert [lv["iterations"] for lv in result.levels] == [5, 3]


def test_mask_restricts_the_similarity():
    fixed, moving, true = known_pair((32, 32))
    mask = torch.zeros_like(fixed)
    mask[..., :16, :] = 1.0
    config = EngineConfig(levels=(1,), iterations=(60,), lr=0.5, progress=False)
    result = optimise(fixed, moving, [Objective("mse", "similarity", MeanSquares(), 1.0)], config, fixed_mask=mask)
    # Without a regulariser, voxels outside the mask get no gradient at all and stay at zero.
    assert result.displacement[..., 20:, :].abs().max() == 0
    assert result.displacement[..., :16, :].abs().max() > 0.1


def test_same_seed_gives_the_same_field():
    fixed, moving, _ = known_pair((24, 24, 24))
    config = EngineConfig(levels=(2, 1), iterations=(10, 5), seed=7, progress=False)
    first = optimise(fixed, moving, objectives(), config).displacement
    second = optimise(fixed, moving, objectives(), config).displacement
    assert torch.equal(first, second)


def test_non_finite_loss_stops_with_a_clear_error():
    fixed, moving, _ = known_pair((16, 16))

    def exploding(u):
        return (u * 0).sum() + float("nan")

    objs = objectives() + [Objective("broken", "regularizer", exploding, 1.0)]
    with pytest.raises(DirioError, match="broken loss became nan at level 0 iteration 0"):
        optimise(fixed, moving, objs, EngineConfig(levels=(1,), iterations=(3,), progress=False))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"levels": (4, 2), "iterations": (10,)}, "equal length"),
        ({"optimizer": "lbfgs"}, "unknown optimizer"),
        ({"lr": 0.0}, "learning rate"),
        ({"grid_spacing": (1, 2, 3)}, "grid spacing"),
    ],
)
def test_inconsistent_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs).validate()


@pytest.mark.parametrize("name", ["adam", "amsgrad", "sgd"])
def test_each_optimizer_lowers_the_similarity(name):
    fixed, moving, _ = known_pair((32, 32))
    lr = 0.5 if name != "sgd" else 200.0
    config = EngineConfig(levels=(1,), iterations=(30,), lr=lr, optimizer=name, schedule="constant", smoothing=0,
                          progress=False)
    history = optimise(fixed, moving, objectives(), config).history
    assert history[-1]["mse"] < 0.7 * history[0]["mse"]


def test_the_last_step_of_a_cosine_decay_is_logged_without_a_backward_pass_and_changes_nothing():
    """Its learning rate is 0, so it cannot move the field: the run skips its backward pass and logs
    its loss. The field equals a run whose last rate is tiny but not 0 (a full step)."""
    import numpy as np

    from dirio.api import register

    rng = np.random.default_rng(1)
    fixed = rng.random((14, 16, 12), dtype=np.float32)
    moving = np.roll(fixed, 1, axis=1)
    common = dict(levels=(2, 1), iterations=(3, 4), lr=0.5, progress=False, combine="pcgrad")
    skipped = register(fixed, moving, schedule="cosine", **common)
    stepped = register(fixed, moving, schedule="cosine", schedule_options={"final": 1e-30}, **common)
    np.testing.assert_allclose(skipped.disp, stepped.disp, atol=1e-6)
    last, full = skipped.history[-1], stepped.history[-1]
    assert last["lr"] == 0.0 and full["lr"] > 0.0
    assert last["loss"] == pytest.approx(full["loss"], abs=1e-6)
    assert "conflict_rate" not in last and "conflict_rate" in full
    assert "conflict_rate" in skipped.history[-2]
