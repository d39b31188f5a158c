"""VoxelMorph-style U-Net: shapes in 2D and 3D, near-identity start, diffeomorphic velocity variant,
gradients, internal padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dirio.core.fields import compose, integrate_velocity, jacobian_determinant, warp
from dirio.core.filters import gaussian_smooth
from dirio.transforms.networks.unet import UNet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(encoder_channels=(4, 8), decoder_channels=(8, 8), final_channels=(8,))


def _pair(shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two smooth random images in [0, 1] of spatial shape ``shape``."""
    generator = torch.Generator().manual_seed(seed)
    images = gaussian_smooth(torch.rand(2, 1, *shape, generator=generator), 1.5)
    images = (images - images.min()) / (images.max() - images.min())
    return images[:1], images[1:]


@pytest.mark.parametrize("ndim, shape", [(2, (13, 18)), (3, (9, 12, 7))])
@pytest.mark.parametrize("field", ["displacement", "velocity"])
def test_any_size_gives_a_field_of_the_input_shape(ndim, shape, field):
    """(B, 1, *S) inputs of sizes that are not multiples of 2**depth give a (B, ndim, *S) field."""
    torch.manual_seed(0)
    model = UNet(ndim=ndim, field=field, **TINY)
    fixed, moving = _pair(shape)
    fixed, moving = fixed.repeat(2, *([1] * (ndim + 1))), moving.repeat(2, *([1] * (ndim + 1)))
    assert model(fixed, moving).shape == (2, ndim, *shape)
    assert model.size_multiple == 4


def test_untrained_network_predicts_a_near_zero_field():
    """The head starts with weights ~ N(0, 1e-5) and zero bias: the field is ~0 (near identity)."""
    torch.manual_seed(0)
    fixed, moving = _pair((16, 16, 16))
    disp = UNet(ndim=3, **TINY)(fixed, moving)
    assert disp.abs().max() < 1e-3


def test_padding_matches_a_manually_padded_run():
    """The field of a 13x18 image is the crop of the field of the image zero-padded by hand to 16x20."""
    torch.manual_seed(0)
    model = UNet(ndim=2, init_std=0.1, **TINY)
    fixed, moving = _pair((13, 18))
    pads = (1, 1, 1, 2)  # F.pad order: last axis first; before = total // 2
    with torch.no_grad():
        disp = model(fixed, moving)
        padded = model(F.pad(fixed, pads), F.pad(moving, pads))
    torch.testing.assert_close(disp, padded[:, :, 1:14, 1:19], rtol=0, atol=1e-6)


def test_velocity_variant_is_invertible_with_positive_jacobian():
    """With a smooth velocity of several voxels, exp(v) has a positive Jacobian determinant and
    exp(-v) inverts it to a small fraction of a voxel."""
    torch.manual_seed(0)
    model = UNet(ndim=2, field="velocity", **TINY)
    with torch.no_grad():
        fixed, moving = _pair((32, 32))
        raw = model.head_output(fixed, moving)
        # Scale the head so the velocity reaches 4 voxels; smooth so the field is "smooth" by construction.
        model.head.weight.mul_(4.0 / raw.abs().max())
        velocity = gaussian_smooth(model.head_output(fixed, moving), 2.0)
        disp = integrate_velocity(velocity, model.integration_steps)
        inverse = integrate_velocity(-velocity, model.integration_steps)
    assert velocity.abs().max() > 1.5
    assert jacobian_determinant(disp).min() > 0
    residual = compose(disp, inverse)[:, :, 4:-4, 4:-4]  # away from the border padding
    assert residual.abs().max() < 0.1
    # The network's own forward is this integration of its head output.
    with torch.no_grad():
        torch.testing.assert_close(
            model(fixed, moving), integrate_velocity(model.head_output(fixed, moving), model.integration_steps)
        )


@pytest.mark.parametrize("field", ["displacement", "velocity"])
def test_gradient_of_an_image_loss_reaches_every_layer(field):
    """An MSE between the warped moving and the fixed image sends gradients to the head and the
    first encoder layer; no parameter is a spatial field."""
    torch.manual_seed(0)
    model = UNet(ndim=3, field=field, init_std=1e-2, **TINY)
    fixed, moving = _pair((8, 8, 8))
    loss = (warp(moving, model(fixed, moving)) - fixed).square().mean()
    loss.backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert model.encoder[0].conv.weight.grad.abs().sum() > 0
    assert model.spatial_parameters() == []


def test_bad_settings_and_inputs_are_refused():
    """ndim, field and decoder length are checked, and so are the input shapes."""
    with pytest.raises(ValueError, match="ndim"):
        UNet(ndim=4)
    with pytest.raises(ValueError, match="field"):
        UNet(field="affine")
    with pytest.raises(ValueError, match="decoder_channels"):
        UNet(encoder_channels=(4, 8), decoder_channels=(8,))
    model = UNet(ndim=2, **TINY)
    with pytest.raises(ValueError, match="differ in shape"):
        model(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
