"""A VoxelMorph-style U-Net that predicts a displacement or a stationary velocity field, in 2D or 3D.

Layout (after Balakrishnan et al., VoxelMorph, IEEE TMI 2019), for ``depth = len(encoder_channels)``:

* input: ``[moving, fixed]`` stacked as 2 channels, padded (constant 0) to a multiple of ``2**depth``;
* encoder: per level a convolution block (3^ndim conv + LeakyReLU 0.2) with ``encoder_channels[l]``
  channels, whose output is kept as a skip connection, then 2x max pooling;
* decoder: per level a convolution block with ``decoder_channels[l]`` channels, 2x nearest
  upsampling and concatenation with the skip of that resolution;
* ``final_channels``: further convolution blocks at full resolution;
* head: a 3^ndim convolution to ``ndim`` channels, initialised with normal weights of standard
  deviation ``init_std`` (1e-5, as VoxelMorph does) and zero bias, so that an untrained network
  predicts a near-zero field.

The head output is a displacement in voxels (``field="displacement"``) or a stationary velocity in
voxels integrated by scaling and squaring (:func:`dirio.core.fields.integrate_velocity`,
``field="velocity"``). The prediction is cropped back to the input grid: no image is resized.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dirio.core.fields import integrate_velocity
from dirio.transforms.networks.layers import crop, pad_to_multiple

_FIELDS = ("displacement", "velocity")
_LEAKY_SLOPE = 0.2


def _conv(ndim: int):
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _channels(name: str, value) -> tuple[int, ...]:
    """Channel counts as a tuple of positive integers (one integer is a list of one).

    Raises:
        ValueError: naming ``name`` for anything else (a checkpoint's settings are user input).
    """
    items = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(items, (list, tuple)) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in items):
        raise ValueError(f"{name} must be positive integers (channel counts), got {value!r}")
    return tuple(items)


class ConvBlock(nn.Module):
    """``LeakyReLU(0.2)(conv 3^ndim, padding 1)``: ``(B, in, *S) -> (B, out, *S)``."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = _conv(ndim)(in_channels, out_channels, 3, padding=1)
        self.activation = nn.LeakyReLU(_LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.conv(x))


class UNet(nn.Module):
    """VoxelMorph-style registration U-Net (module docstring).

    Args:
        ndim: spatial dimensions, 2 or 3.
        encoder_channels: channels of each encoder level; its length is the depth.
        decoder_channels: channels of each decoder level, coarsest first; same length as the encoder.
        final_channels: channels of the full-resolution blocks before the head. (Each channel list:
            positive integers; one integer stands for a list of one.)
        field: ``"displacement"`` or ``"velocity"`` (integrated by scaling and squaring).
        integration_steps: squarings for ``field="velocity"``.
        init_std: standard deviation of the head's initial weights.

    ``forward(fixed, moving) -> (B, ndim, *S)`` displacement in voxels of the fixed grid, axis order,
    ``warped(x) = moving(x + u(x))``. Inputs ``(B, 1, *S)`` of any size, best normalised to [0, 1].
    """

    architecture = "unet"

    def __init__(
        self,
        ndim: int = 3,
        encoder_channels: Sequence[int] = (16, 32, 32, 32),
        decoder_channels: Sequence[int] = (32, 32, 32, 32),
        final_channels: Sequence[int] = (32, 16, 16),
        field: str = "displacement",
        integration_steps: int = 7,
        init_std: float = 1e-5,
    ):
        super().__init__()
        if ndim not in (2, 3):
            raise ValueError(f"ndim must be 2 or 3, got {ndim}")
        if field not in _FIELDS:
            raise ValueError(f"field must be one of {_FIELDS}, got {field!r}")
        encoder_channels, decoder_channels, final_channels = (
            _channels(name, value) for name, value in (("encoder_channels", encoder_channels),
                                                      ("decoder_channels", decoder_channels),
                                                      ("final_channels", final_channels)))
        if not isinstance(integration_steps, int) or isinstance(integration_steps, bool) or integration_steps < 0:
            raise ValueError(f"integration_steps must be an integer >= 0, got {integration_steps!r}")
        if not encoder_channels:
            raise ValueError("encoder_channels must name at least one level")
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(
                f"decoder_channels needs one entry per encoder level ({len(encoder_channels)}), got {len(decoder_channels)}"
            )
        self.ndim = ndim
        self.encoder_channels = tuple(int(c) for c in encoder_channels)
        self.decoder_channels = tuple(int(c) for c in decoder_channels)
        self.final_channels = tuple(int(c) for c in final_channels)
        self.field = field
        self.integration_steps = int(integration_steps)
        self.init_std = float(init_std)
        self.depth = len(self.encoder_channels)

        channels = 2
        self.encoder = nn.ModuleList()
        for width in self.encoder_channels:
            self.encoder.append(ConvBlock(ndim, channels, width))
            channels = width
        self.decoder = nn.ModuleList()
        for width, skip in zip(self.decoder_channels, reversed(self.encoder_channels)):
            self.decoder.append(ConvBlock(ndim, channels, width))
            channels = width + skip
        self.final = nn.ModuleList()
        for width in self.final_channels:
            self.final.append(ConvBlock(ndim, channels, width))
            channels = width
        self.head = _conv(ndim)(channels, ndim, 3, padding=1)
        nn.init.normal_(self.head.weight, mean=0.0, std=self.init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def settings(self) -> dict:
        """Constructor keyword arguments (what a checkpoint stores)."""
        return {
            "ndim": self.ndim,
            "encoder_channels": list(self.encoder_channels),
            "decoder_channels": list(self.decoder_channels),
            "final_channels": list(self.final_channels),
            "field": self.field,
            "integration_steps": self.integration_steps,
            "init_std": self.init_std,
        }

    @property
    def size_multiple(self) -> int:
        """Inputs are padded internally to a multiple of this size along every axis."""
        return 2**self.depth

    def spatial_parameters(self) -> list[nn.Parameter]:
        """Parameters that are spatial fields (none: every parameter is a convolution weight)."""
        return []

    def _check_inputs(self, fixed: torch.Tensor, moving: torch.Tensor) -> None:
        if fixed.dim() != self.ndim + 2 or fixed.shape[1] != 1:
            raise ValueError(f"a {self.ndim}D UNet takes (B, 1, *S) images, got fixed of shape {tuple(fixed.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} differ in shape")

    def head_output(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The head's field on the input grid: the displacement, or the velocity for ``field="velocity"``.

        Returns:
            ``(B, ndim, *S)`` in voxels (velocity: voxels per unit time).
        """
        self._check_inputs(fixed, moving)
        dtype = self.head.weight.dtype
        x, padding = pad_to_multiple(torch.cat([moving, fixed], dim=1).to(dtype), self.size_multiple)
        pool = F.max_pool3d if self.ndim == 3 else F.max_pool2d
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = pool(x, 2)
        for block in self.decoder:
            x = F.interpolate(block(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, skips.pop()], dim=1)
        for block in self.final:
            x = block(x)
        return crop(self.head(x), padding)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """Displacement ``(B, ndim, *S)`` in voxels of the fixed grid (``warped(x) = moving(x + u(x))``).

        For ``field="velocity"`` the velocity is integrated on the input grid (the exponential is
        computed after cropping, so border handling does not depend on the padding).
        """
        out = self.head_output(fixed, moving)
        if self.field == "velocity":
            return integrate_velocity(out, self.integration_steps)
        return out
