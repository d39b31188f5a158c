"""Greedy composition of optimiser steps (``compose_every``, :mod:`dirio.transforms.composed`)."""

import numpy as np
import pytest
import torch

from dirio.core.context import LevelContext
from dirio.transforms.composed import ComposedDisplacement
from dirio.transforms.dense import DenseConfig, DenseDisplacement


def smooth_field(shape, scale, seed):
    """A smooth ``(1, 3, *shape)`` field: a few low-frequency sines of amplitude ``scale``."""
    generator = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, np.pi, n) for n in shape], indexing="ij")
    field = np.stack([scale * np.sin(grids[0] * generator.uniform(0.5, 1.5) + generator.uniform(0, 3))
                      * np.cos(grids[1] * generator.uniform(0.5, 1.5)) for _ in range(3)])
    return torch.from_numpy(field.astype(np.float32))[None]


def composed(compose_every, shape=None):
    """A composed transform over a plain increment, started on ``shape`` when given."""
    model = ComposedDisplacement(DenseDisplacement(), compose_every)
    if shape is not None:
        model.start_level(context(shape))
    return model


def context(shape, level=0):
    image = torch.zeros(1, 1, *shape)
    return LevelContext(level=level, shape=tuple(shape), full_shape=tuple(shape), fixed=image, moving=image)


def test_between_folds_the_field_is_the_sum_and_a_fold_composes():
    shape = (12, 13, 14)
    model = composed(2, shape)
    accumulated = smooth_field(shape, 1.5, seed=0)
    model.accumulated = accumulated.clone()
    shift = torch.tensor([2.0, -1.0, 1.0]).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        model.increment.param.copy_(shift.expand(1, 3, *shape))
    assert torch.allclose(model.displacement(shape), accumulated + shift)

    model.fold(shape)
    # a whole-voxel translation t first, then b: the composite is t + b(x + t), b shifted by t
    expected = shift + accumulated[:, :, 2:, :-1, 1:]
    assert torch.allclose(model.accumulated[:, :, :-2, 1:, :-1], expected, atol=1e-5)
    assert float(model.increment.param.detach().abs().max()) == 0.0
    assert model.steps_since_fold == 0


def test_after_step_folds_every_n_steps():
    shape = (6, 7, 8)
    model = composed(3, shape)
    ctx = context(shape)
    for step in range(1, 8):
        with torch.no_grad():
            model.increment.param.add_(0.1)
        model.after_step(ctx)
        assert model.steps_since_fold == step % 3
    # 7 steps of +0.1 each: six folded (two translations of 0.3), one still in the increment
    assert torch.allclose(model.accumulated, torch.full_like(model.accumulated, 0.6), atol=1e-5)
    assert torch.allclose(model.increment.param, torch.full_like(model.increment.param, 0.1))


def test_per_level_counts_and_zero_folds_only_at_the_level_end():
    model = composed((2, 0), (6, 7, 8))
    assert model.every_of_level(0) == 2 and model.every_of_level(1) == 0
    model.start_level(context((6, 7, 8), level=1))
    for _ in range(5):
        with torch.no_grad():
            model.increment.param.add_(0.1)
        model.after_step(context((6, 7, 8), level=1))
    assert float(model.accumulated.abs().max()) == 0.0  # nothing folded within the level
    assert torch.allclose(model.field(context((6, 7, 8), level=1)), torch.full((1, 3, 6, 7, 8), 0.5))
    with pytest.raises(ValueError, match="compose_every"):
        composed((0, 0))
    with pytest.raises(ValueError, match="compose_every"):
        DenseConfig(compose_every=(2, 2)).validate(3)


def test_a_level_change_folds_the_increment_and_resamples_the_accumulated_field():
    model = composed(10, (6, 7, 8))
    with torch.no_grad():
        model.increment.param.fill_(1.0)
    model.start_level(context((11, 13, 15), level=1))
    assert tuple(model.increment.param.shape[2:]) == (11, 13, 15) and float(model.increment.param.detach().abs().max()) == 0.0
    # a translation of one coarse voxel is two fine voxels (align_corners: (n_fine - 1) / (n_coarse - 1))
    assert torch.allclose(model.accumulated, torch.full_like(model.accumulated, 2.0), atol=1e-5)


def test_the_regularizers_see_the_total_field():
    shape = (6, 7, 8)
    model = composed(2, shape)
    model.accumulated = smooth_field(shape, 1.0, seed=1)
    with torch.no_grad():
        model.increment.param.copy_(smooth_field(shape, 0.5, seed=2))
    regularized = model.regularized(context(shape))
    assert torch.allclose(regularized.field, model.increment.param + model.accumulated)
    regularized.field.square().sum().backward()
    assert model.increment.param.grad is not None


def test_settings_refuse_bad_counts():
    # diffeomorphic + compose_every folds each increment as a velocity (tests/test_symmetric.py)
    assert DenseConfig(diffeomorphic=True, compose_every=2).build().fold_steps == 7
    with pytest.raises(ValueError, match="compose_every"):
        DenseConfig(compose_every=-1).validate(1)
    with pytest.raises(ValueError, match="compose_every"):
        composed(0)
    assert isinstance(DenseConfig(compose_every=3).build(), ComposedDisplacement)


def test_an_initial_field_becomes_the_accumulated_field():
    init = smooth_field((8, 8, 8), 1.0, seed=3)
    model = DenseConfig(compose_every=2).build(init=init)
    model.start_level(context((8, 8, 8)))
    assert torch.allclose(model.field(context((8, 8, 8))), init)
