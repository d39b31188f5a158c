"""The symmetric diffeomorphic transform (two velocity fields meeting in a middle space,
:mod:`dirio.transforms.symmetric`) and the diffeomorphic folds of the composed displacement."""

import numpy as np
import pytest
import torch

from dirio.config.settings import make_settings
from dirio.core.context import LevelContext
from dirio.core.fields import compose, integrate_velocity, jacobian_determinant, warp
from dirio.losses.mse import MSE
from dirio.losses.regularizers import Diffusion
from dirio.losses.terms import Evaluation, RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.dense import DenseStage, register_dense
from dirio.optim.pyramid import OptimizerConfig, PyramidConfig
from dirio.testing.synthetic import smooth_random_field
from dirio.transforms.base import invert_transform
from dirio.transforms.composed import ComposedDisplacement
from dirio.transforms.dense import DenseConfig, DenseDisplacement, StationaryVelocity
from dirio.transforms.registry import TRANSFORMS
from dirio.transforms.symmetric import SymmetricTransform


def context(shape, level=0, fixed=None, moving=None, **masks):
    fixed = torch.zeros(1, 1, *shape) if fixed is None else fixed
    moving = torch.zeros(1, 1, *shape) if moving is None else moving
    return LevelContext(level=level, shape=tuple(shape), full_shape=tuple(shape), fixed=fixed, moving=moving, **masks)


def started(shape, fixed_velocity, moving_velocity, steps=7):
    """A symmetric transform on ``shape`` with the given half velocities (parameter grid = level grid)."""
    model = SymmetricTransform(StationaryVelocity(steps=steps), StationaryVelocity(steps=steps))
    model.start_level(context(shape))
    with torch.no_grad():
        model.fixed_half.param.copy_(fixed_velocity)
        model.moving_half.param.copy_(moving_velocity)
    return model


def blobs(shape, seed):
    """A smooth 2D test image in [0, 1]: a sum of Gaussian blobs of random centre and width."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    image = np.zeros(shape)
    for _ in range(14):
        centre = rng.uniform(0.15, 0.85, len(shape)) * np.array(shape)
        width = rng.uniform(2.5, 6.0)
        image += rng.uniform(0.3, 1.0) * np.exp(-((grid - centre) ** 2).sum(-1) / (2 * width ** 2))
    return torch.from_numpy((image / image.max()).astype(np.float32))[None, None]


def textured(shape, seed):
    """A textured test image in [0, 1]: white noise smoothed by a Gaussian of sigma 2 voxels (a
    gradient almost everywhere, so that a known warp is observable everywhere)."""
    from scipy.ndimage import gaussian_filter

    image = gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 2.0)
    return torch.from_numpy(((image - image.min()) / (image.max() - image.min())).astype(np.float32))[None, None]


def known_warp(shape, image_seed, sigma, max_displacement, field_seed):
    """``(fixed, moving, true)``: a :func:`textured` moving image and, as fixed, that image pulled
    through ``true``, a diffeomorphism (a smooth random velocity integrated in 7 squarings)."""
    moving = textured(shape, image_seed)
    true = integrate_velocity(smooth_random_field(shape, sigma=sigma, max_displacement=max_displacement,
                                                  seed=field_seed), 7)
    return warp(moving, true), moving, true


def register_symmetric(fixed, moving, iterations=(60, 40), weight=0.05, compose_every=0):
    stage = DenseStage(transform=DenseConfig(symmetric=True, smoothing=1, integration_steps=6,
                                             compose_every=compose_every),
                       pyramid=PyramidConfig(levels=(2, 1), iterations=iterations),
                       optimizer=OptimizerConfig(lr=0.3))
    terms = [Term("mse", Role.SIMILARITY, SimilarityTerm(MSE()), 1.0),
             Term("diffusion", Role.REGULARIZER, RegularizerTerm(Diffusion()), weight)]
    return register_dense(fixed, moving, terms, stage, progress=False)


def interior(field, margin=4):
    return field[(...,) + tuple(slice(margin, -margin) for _ in field.shape[2:])]


def test_forward_and_inverse_compose_to_identity():
    shape = (20, 22, 24)
    model = started(shape, smooth_random_field(shape, sigma=4.0, max_displacement=2.5, seed=1),
                    smooth_random_field(shape, sigma=4.0, max_displacement=2.5, seed=2))
    ctx = context(shape)
    with torch.no_grad():
        forward, inverse = model.field(ctx), model.inverse_field(ctx)
        # inverse(forward(x)) = x  <=>  u + w∘(id + u) = 0, and forward(inverse(y)) = y the other way
        there_and_back = compose(inverse, forward)
        back_and_there = compose(forward, inverse)
    assert float(forward.abs().max()) > 2.0  # a real deformation, not the identity
    assert float(interior(there_and_back).norm(dim=1).mean()) < 0.02
    assert float(interior(back_and_there).norm(dim=1).mean()) < 0.02
    # part A's hook: the inverse is the exact one, not a numerical inversion
    assert invert_transform(model, ctx).method == "exact"


def test_the_forward_map_is_the_moving_half_after_the_inverse_of_the_fixed_half():
    shape = (16, 18)
    v_f = smooth_random_field(shape, sigma=3.0, max_displacement=1.5, seed=3)
    v_m = smooth_random_field(shape, sigma=3.0, max_displacement=1.5, seed=4)
    model = started(shape, v_f, v_m)
    with torch.no_grad():
        expected = compose(integrate_velocity(v_m, 7), integrate_velocity(-v_f, 7))
        assert torch.allclose(model.field(context(shape)), expected, atol=1e-6)
        # v_f = 0: the forward map is the moving half alone; v_m = 0: the inverse of the fixed half
        only_moving = started(shape, torch.zeros_like(v_f), v_m)
        assert torch.allclose(only_moving.field(context(shape)), integrate_velocity(v_m, 7), atol=1e-6)
        only_fixed = started(shape, v_f, torch.zeros_like(v_m))
        assert torch.allclose(only_fixed.field(context(shape)), integrate_velocity(-v_f, 7), atol=1e-6)


def test_the_similarity_is_computed_between_the_two_half_warped_images():
    shape = (16, 18)
    fixed, moving = blobs(shape, 0), blobs(shape, 1)
    v_f = smooth_random_field(shape, sigma=3.0, max_displacement=1.5, seed=5)
    v_m = smooth_random_field(shape, sigma=3.0, max_displacement=1.5, seed=6)
    model = started(shape, v_f, v_m)
    mask = (torch.arange(shape[0]) < 10).float().view(1, 1, -1, 1).expand(1, 1, *shape).contiguous()
    ctx = context(shape, fixed=fixed, moving=moving, fixed_mask=mask)
    term = SimilarityTerm(MSE())
    term.prepare(ctx, "mse")
    with torch.no_grad():
        value = term(Evaluation(ctx, None, model), "mse")
        d_f, d_m = integrate_velocity(v_f, 7), integrate_velocity(v_m, 7)
        middle_mask = warp(mask, d_f, padding="zeros")
        expected = MSE()(warp(fixed, d_f), warp(moving, d_m), middle_mask)
        # not the same as comparing fixed with moving pulled by the full forward field
        full = MSE()(fixed, warp(moving, model.field(ctx)), mask)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    assert abs(float(value) - float(full)) > 1e-4


def test_recovers_a_known_smooth_warp():
    shape = (64, 64)
    fixed, moving, true = known_warp(shape, 7, sigma=8.0, max_displacement=4.0, field_seed=8)
    result = register_symmetric(fixed, moving, weight=0.01)
    inside = (slice(None), slice(None), slice(6, -6), slice(6, -6))
    before = float(true[inside].norm(dim=1).mean())
    error = float((result.displacement - true)[inside].norm(dim=1).mean())
    assert before > 1.2
    assert error < 0.12 * before, (error, before)  # 0.086 of 1.36 voxels when written
    assert float(jacobian_determinant(result.displacement).min()) > 0


@pytest.mark.parametrize("compose_every", [0, 2])
def test_registering_b_to_a_gives_the_inverse_of_registering_a_to_b(compose_every):
    shape = (48, 48)
    a = textured(shape, 9)
    b = warp(a, integrate_velocity(smooth_random_field(shape, sigma=7.0, max_displacement=2.5, seed=10), 7))
    ab = register_symmetric(b, a, iterations=(30, 20), compose_every=compose_every)  # fixed b, moving a
    ba = register_symmetric(a, b, iterations=(30, 20), compose_every=compose_every)
    ctx = context(shape)
    with torch.no_grad():
        # the roles of the halves swap: forward of (b, a) is the inverse of (a, b), up to float rounding
        assert torch.allclose(ba.transform.fixed_half.displacement(shape),
                              ab.transform.moving_half.displacement(shape), atol=1e-4)
        assert torch.allclose(ba.displacement, ab.transform.inverse_field(ctx), atol=1e-4)
        assert float(ba.displacement.abs().max()) > 1.5  # both registered something
        # and the two results are inverse maps of each other
        assert float(interior(compose(ba.displacement, ab.displacement)).norm(dim=1).mean()) < 0.06


def test_large_deformation_stays_one_to_one():
    shape = (64, 64)
    fixed, moving, true = known_warp(shape, 11, sigma=6.0, max_displacement=6.0, field_seed=12)
    result = register_symmetric(fixed, moving, weight=0.01)
    with torch.no_grad():
        assert float(jacobian_determinant(result.displacement).min()) > 0
        assert float(jacobian_determinant(result.transform.inverse_field(context(shape))).min()) > 0


def test_settings_build_the_symmetric_transform():
    settings = make_settings("brain-mri", symmetric=True, integration_steps=5)
    assert settings.transform.compose_every == 0  # the preset's composition is not inherited
    model = settings.transform.build()
    assert isinstance(model, SymmetricTransform) and model.moving_half.steps == 5
    assert isinstance(model.moving_half, StationaryVelocity)
    assert TRANSFORMS.get("symmetric") is SymmetricTransform
    composed = make_settings("brain-mri", symmetric=True, compose_every=3, integration_steps=4).transform.build()
    assert isinstance(composed.fixed_half, ComposedDisplacement)
    assert composed.fixed_half.fold_steps == 4 and composed.fixed_half.track_inverse
    with pytest.raises(ValueError, match="integration_steps"):
        DenseConfig(symmetric=True, compose_every=2, integration_steps=0).validate(2)
    # an initial forward displacement is split between the halves: v_m = u0 / 2, v_f = -u0 / 2
    init = torch.full((1, 2, 8, 8), 1.0)
    half = DenseConfig(symmetric=True).build(init=init)
    half.start_level(context((8, 8)))
    assert torch.allclose(half.field(context((8, 8))), init, atol=1e-5)  # a translation: exact


def test_regularizers_see_both_halves():
    shape = (10, 12)
    v_f = smooth_random_field(shape, sigma=2.0, max_displacement=1.0, seed=13)
    model = started(shape, v_f, torch.zeros_like(v_f))
    regularized = model.regularized(context(shape))
    assert regularized.field.shape == (2, 2, *shape)
    energy = Diffusion()(regularized.field, regularized.spacing)
    assert float(energy) == pytest.approx(0.5 * float(Diffusion()(v_f, (1.0, 1.0))), rel=1e-5)


def folding_increment(shape):
    """``(1, 2, *shape)``: a smooth increment whose ``id + u`` folds (``du_0/dx_0`` reaches -2)."""
    x = torch.arange(shape[0], dtype=torch.float32).view(-1, 1).expand(*shape)
    u0 = 2.0 * shape[0] / (2 * np.pi) * torch.cos(2 * np.pi * x / shape[0])
    return torch.stack([u0, torch.zeros(shape)])[None]


@pytest.mark.parametrize("fold_steps, folds", [(0, True), (7, False)])
def test_diffeomorphic_folds_keep_the_composed_field_one_to_one(fold_steps, folds):
    shape = (40, 12)
    model = ComposedDisplacement(DenseDisplacement(), 1, fold_steps=fold_steps)
    model.start_level(context(shape))
    increment = folding_increment(shape)
    assert float(jacobian_determinant(increment).min()) < 0  # id + u itself folds
    with torch.no_grad():
        model.increment.param.copy_(increment)
    model.after_step(context(shape))  # one fold
    det = jacobian_determinant(model.accumulated)
    assert (float(det.min()) <= 0) == folds
    if not folds:
        assert torch.allclose(model.accumulated, integrate_velocity(increment, 7), atol=1e-6)


def test_diffeomorphic_composed_settings():
    settings = make_settings("brain-mri", diffeomorphic=True, compose_every=3, integration_steps=4)
    model = settings.transform.build()
    assert isinstance(model, ComposedDisplacement) and model.fold_steps == 4
    assert make_settings("brain-mri").transform.build().fold_steps == 0
    with pytest.raises(ValueError, match="fold_steps"):
        ComposedDisplacement(DenseDisplacement(), 1, fold_steps=-1)


def test_symmetric_composed_halves_track_their_inverses():
    shape = (40, 40)
    fixed, moving, true = known_warp(shape, 14, sigma=7.0, max_displacement=4.0, field_seed=15)
    result = register_symmetric(fixed, moving, iterations=(30, 20), weight=0.01, compose_every=2)
    model, ctx = result.transform, context(shape)
    with torch.no_grad():
        inside = (slice(None), slice(None), slice(5, -5), slice(5, -5))
        before = float(true[inside].norm(dim=1).mean())
        assert float((result.displacement - true)[inside].norm(dim=1).mean()) < 0.2 * before
        assert float(jacobian_determinant(result.displacement).min()) > 0
        # each half's inverse inverts it: |w(y) + d(y + w(y))| (what the fixed-point refinement solves) to
        # 1e-4 voxel when written; the other way round, |d(x) + w(x + d(x))|, to the interpolation error
        # of this rough 40 x 40 field (0.057 voxel when written); the full maps alike (0.043)
        for half in model.halves:
            forward, inverse = half.displacement(shape), half.inverse_displacement(shape)
            assert float(interior(compose(forward, inverse)).norm(dim=1).mean()) < 0.005
            assert float(interior(compose(inverse, forward)).norm(dim=1).mean()) < 0.08
        assert float(interior(compose(model.inverse_field(ctx), result.displacement)).norm(dim=1).mean()) < 0.06


def test_a_tracked_inverse_of_two_folds_is_the_reversed_composition_of_the_negated_steps():
    shape = (16, 18)
    first = smooth_random_field(shape, sigma=3.0, max_displacement=1.0, seed=16)
    second = smooth_random_field(shape, sigma=3.0, max_displacement=1.0, seed=17)
    model = ComposedDisplacement(DenseDisplacement(), 1, fold_steps=5, track_inverse=True)
    model.start_level(context(shape))
    for step in (first, second):
        with torch.no_grad():
            model.increment.param.copy_(step)
        model.after_step(context(shape))
    # phi = exp(first) ∘ exp(second) (pull order), phi^{-1} = exp(-second) ∘ exp(-first)
    expected = compose(integrate_velocity(-second, 5), integrate_velocity(-first, 5))
    assert torch.allclose(model.inverse_accumulated, expected, atol=1e-5)
    with pytest.raises(ValueError, match="fold_steps"):
        ComposedDisplacement(DenseDisplacement(), 1, track_inverse=True)
