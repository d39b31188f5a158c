"""Similarity features computed on the full-resolution images and resampled to a coarser level
(``features_from="full"``, ConvexAdam's Adam stage) against those of the level's own images."""

import pytest
import torch

from dirio.config.settings import make_settings
from dirio.core.context import LevelContext
from dirio.core.fields import resize_image
from dirio.core.filters import gaussian_smooth
from dirio.losses.mind import MINDSSC, mind_ssc
from dirio.losses.terms import SimilarityTerm
from dirio.optim.pyramid import level_context


def textured(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return gaussian_smooth(torch.rand(1, 1, *shape, generator=generator), 1.0)


@pytest.fixture(scope="module")
def half_level():
    fixed, moving = textured((20, 22, 24), 0), textured((20, 22, 24), 1)
    return fixed, moving, level_context(fixed, moving, 0, 2.0)


def test_full_resolution_features_are_the_full_grid_descriptors_resampled_to_the_level(half_level):
    fixed, moving, ctx = half_level
    SimilarityTerm(MINDSSC(radius=1, dilation=2), features_from="full").prepare(ctx, "mind")
    fixed_features, moving_features = ctx.cache["mind"]
    assert fixed_features.shape == (1, 12, *ctx.shape)
    torch.testing.assert_close(fixed_features, resize_image(mind_ssc(fixed, 1, 2), ctx.shape))
    torch.testing.assert_close(moving_features, resize_image(mind_ssc(moving, 1, 2), ctx.shape))
    # a dilation of 2 full-grid voxels is not a dilation of 2 level voxels: the two differ
    level_features = mind_ssc(ctx.fixed, 1, 2)
    assert float((fixed_features - level_features).abs().mean()) > 0.05


def test_level_features_are_computed_on_the_level_images(half_level):
    _, _, ctx = half_level
    ctx.cache.clear()
    SimilarityTerm(MINDSSC(radius=1, dilation=2)).prepare(ctx, "mind")
    torch.testing.assert_close(ctx.cache["mind"][0], mind_ssc(ctx.fixed, 1, 2))
    torch.testing.assert_close(ctx.cache["mind"][1], mind_ssc(ctx.moving, 1, 2))


def test_full_features_without_full_grid_images_use_the_level_images():
    """A training batch has no full-grid images: the term falls back to the level's own."""
    image = textured((10, 10, 10), 2)
    ctx = LevelContext(level=0, shape=(10, 10, 10), full_shape=(10, 10, 10), fixed=image, moving=image)
    SimilarityTerm(MINDSSC(radius=1, dilation=2), features_from="full").prepare(ctx, "mind")
    torch.testing.assert_close(ctx.cache["mind"][0], mind_ssc(image, 1, 2))


def test_an_unknown_feature_resolution_is_refused_in_one_line():
    with pytest.raises(ValueError, match="features_from must be one of level, full, pooled, got 'half'"):
        make_settings(features_from="half").validate()
