"""LapIRN: the three-level Laplacian-pyramid registration network of Mok & Chung (MICCAI 2020).

Written for dirio from the published architecture, so that the upstream pretrained weights
(repository ``cwmok/LapIRN``) load into it and give the same fields.

Architecture (``w = 4 * start_channel`` feature channels; LeakyReLU slope 0.2, no biases):

* The input pair is padded to a multiple of 8 voxels (constant 0, the background of min-max
  normalised images) and reduced to 1/2 and 1/4 resolution by 3x3x3 average pooling of stride 2
  (padding 1, padded voxels not counted).
* Level 1 (coarsest, 1/4) sees ``(moving, fixed)``. Levels 2 (1/2) and 3 (full) see the moving
  image warped by the upsampled field of the level below, the fixed image, and the upsampled field
  (displacement variant) or velocity (diffeomorphic variant) of the level below, as 3 channels in
  the network's units (below).
* Each level: encoder (conv 3 -> LeakyReLU -> conv 3, ``w`` channels), a stride-2 conv, plus the
  embedding of the level below (levels 2 and 3), five pre-activation residual blocks each followed
  by a LeakyReLU, a stride-2 transposed conv back up (this is the embedding passed on), then the head
  on ``[embedding, encoder features]``: conv 3 (``w``) -> LeakyReLU -> conv 3 (3 channels) -> softsign,
  scaled by ``range_flow`` (0.4 upstream).
* Displacement variant: a level's field is its head output plus the upsampled field of the level
  below. Diffeomorphic variant: the head output plus the upsampled velocity below is a stationary
  velocity, integrated by scaling and squaring (``integration_steps = 7`` squarings) into the level's
  displacement.
* Between levels, fields are upsampled by 2 with trilinear interpolation, ``align_corners=False``
  (:func:`upsample_field`), as upstream does.

Units. The network's own outputs and field inputs are in upstream's units: ``grid_sample``'s
normalised coordinates (the level grid spans -1..1 along each axis) with the components in
reversed order (component 0 belongs to the last axis). dirio converts at the network boundary:
``u_vox[d] = u_net[ndim - 1 - d] * (n_d - 1) / 2`` for a level grid of ``n_d`` voxels along axis ``d``
(:func:`from_network_units`; the factor is taken from :func:`dirio.core.fields.voxel_to_grid_sample`,
the one home of that convention). Everything else (warping, integration, the returned fields) is in
dirio's voxels, axis order ``(i, j, k)``, pull convention ``warped(x) = moving(x + u(x))``.

Inputs are expected min-max normalised to [0, 1] (the weights were trained so: OASIS T1 brains,
160 x 192 x 144, 1 mm, skull-stripped, affinely aligned). Nothing is normalised here; see
:func:`min_max_normalise`. The call order is dirio's ``model(fixed, moving)``; upstream calls its
module as ``model(moving, fixed)``.

Upstream checkpoint key map (:func:`from_upstream_state_dict`): upstream nests its levels
(level 3 holds ``model_lvl2``, which holds ``model_lvl1``); dirio keeps them in a list.

=================================  ==================
upstream key prefix                dirio key prefix
=================================  ==================
``model_lvl2.model_lvl1.<layer>``  ``levels.0.<layer>``
``model_lvl2.<layer>``             ``levels.1.<layer>``
``<layer>``                        ``levels.2.<layer>``
=================================  ==================

with the layer names ``input_encoder_lvl1 -> encoder``, ``down_conv -> down``,
``resblock_group_lvl1 -> residual``, ``up -> up``, ``output_lvl1 -> head`` (inner indices unchanged).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dirio.core.fields import integrate_velocity, voxel_to_grid_sample, warp
from dirio.errors import DirioError
from dirio.transforms.networks.layers import crop, pad_to_multiple

NUM_LEVELS = 3
#: Every input size is padded to a multiple of this: two poolings and one stride-2 conv per level.
SIZE_MULTIPLE = 8
#: Upstream's scale of the softsign head output (``range_flow`` in its test scripts).
RANGE_FLOW = 0.4
#: Upstream's number of squarings for the diffeomorphic variant (``time_step``).
INTEGRATION_STEPS = 7
_LEAKY_SLOPE = 0.2
_RESIDUAL_BLOCKS = 5

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
DEFAULT_BRAIN_WEIGHTS = PRETRAINED_DIR / "LapIRN_disp_fea7.pth"

_UPSTREAM_LEVEL_PREFIXES = (("model_lvl2.model_lvl1.", 0), ("model_lvl2.", 1), ("", 2))
_UPSTREAM_LAYER_NAMES = {
    "input_encoder_lvl1": "encoder",
    "down_conv": "down",
    "resblock_group_lvl1": "residual",
    "up": "up",
    "output_lvl1": "head",
}


# --- units and resampling -----------------------------------------------------------------------


def _network_scale(shape, like: torch.Tensor) -> torch.Tensor:
    """``(1, 3, 1, 1, 1)``: network units per voxel of each network component (reversed axis order),
    i.e. ``2 / (n - 1)`` of the axis it belongs to, read off :func:`voxel_to_grid_sample`."""
    unit = torch.ones(1, len(shape), *([1] * len(shape)), device=like.device, dtype=like.dtype)
    scale = voxel_to_grid_sample(unit, shape) + 1.0  # (1, 1, 1, 1, ndim), reversed order
    return scale.reshape(1, len(shape), *([1] * len(shape)))


def to_network_units(disp: torch.Tensor) -> torch.Tensor:
    """dirio voxels ``(B, 3, *S)`` -> upstream's units (normalised, reversed components) on the same grid."""
    return disp.flip(1) * _network_scale(disp.shape[2:], disp)


def from_network_units(field: torch.Tensor) -> torch.Tensor:
    """Upstream's units ``(B, 3, *S)`` -> dirio voxels of the same grid, axis order ``(i, j, k)``."""
    return (field / _network_scale(field.shape[2:], field)).flip(1)


def upsample_field(disp: torch.Tensor) -> torch.Tensor:
    """Double the grid of a voxel field as LapIRN does between levels.

    Trilinear interpolation with ``align_corners=False`` (upstream's ``nn.Upsample(scale_factor=2)``)
    keeps the field's values in normalised units; in voxels, component ``d`` is multiplied by
    ``(2 n_d - 1) / (n_d - 1)``.

    Args:
        disp: ``(B, 3, *S)`` in voxels of its grid.
    Returns:
        ``(B, 3, *2S)`` in voxels of the doubled grid.
    """
    shape = disp.shape[2:]
    up = F.interpolate(disp, scale_factor=2, mode="trilinear", align_corners=False)
    factors = torch.tensor([(2 * n - 1) / max(n - 1, 1) for n in shape], device=disp.device, dtype=disp.dtype)
    return up * factors.view(1, len(shape), *([1] * len(shape)))


def _downsample(image: torch.Tensor) -> torch.Tensor:
    """Upstream's image pyramid step: 3x3x3 average, stride 2, padding 1 not counted."""
    return F.avg_pool3d(image, kernel_size=3, stride=2, padding=1, count_include_pad=False)


def min_max_normalise(image: torch.Tensor) -> torch.Tensor:
    """Rescale each image of a batch ``(B, C, *S)`` to [0, 1] by its own min and max (LapIRN's input range)."""
    flat = image.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (image.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (image.dim() - 1)))
    return (image - low) / (high - low).clamp_min(torch.finfo(image.dtype).tiny)


# --- modules ------------------------------------------------------------------------------------


class PreActResidualBlock(nn.Module):
    """``x + conv(lrelu(conv(lrelu(x))))`` with two 3x3x3 convs of ``channels`` channels, no bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x, _LEAKY_SLOPE))
        return x + self.conv2(F.leaky_relu(h, _LEAKY_SLOPE))


class _Head(nn.Module):
    """The head applied to ``[embedding, features]`` (a callable for checkpointing; no parameters of its own)."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([embedding, features], dim=1))


class LapIRNLevel(nn.Module):
    """The layers of one pyramid level (module docstring): inputs -> (head output, embedding).

    ``gradient_checkpointing``: recompute the layers' activations in the backward pass (set through
    :attr:`LapIRN.gradient_checkpointing`).
    """

    gradient_checkpointing = False

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv3d(in_channels, width, 3, padding=1, bias=False),
            nn.LeakyReLU(_LEAKY_SLOPE),
            nn.Conv3d(width, width, 3, padding=1, bias=False),
        )
        self.down = nn.Conv3d(width, width, 3, stride=2, padding=1, bias=False)
        blocks: list[nn.Module] = []
        for _ in range(_RESIDUAL_BLOCKS):
            blocks += [PreActResidualBlock(width), nn.LeakyReLU(_LEAKY_SLOPE)]
        self.residual = nn.Sequential(*blocks)
        self.up = nn.ConvTranspose3d(width, width, 2, stride=2, bias=False)
        self.head = nn.Sequential(
            nn.Conv3d(2 * width, width, 3, padding=1, bias=False),
            nn.LeakyReLU(_LEAKY_SLOPE),
            nn.Conv3d(width, 3, 3, padding=1, bias=False),
            nn.Softsign(),
        )

    def forward(self, inputs: torch.Tensor, coarser: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``inputs (B, C, *S)``, ``coarser`` the embedding of the level below ``(B, w, *S/2)``.
        Returns: head output ``(B, 3, *S)`` in (-1, 1), network units before ``range_flow``; the
        embedding ``(B, w, *S)`` for the next level."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._forward_checkpointed(inputs, coarser)
        features = self.encoder(inputs)
        hidden = self.down(features)
        if coarser is not None:
            hidden = hidden + coarser
        embedding = self.up(self.residual(hidden))
        return self.head(torch.cat([embedding, features], dim=1)), embedding

    def _forward_checkpointed(self, inputs: torch.Tensor, coarser: torch.Tensor | None):
        """:meth:`forward` keeping only the outputs of the encoder, each residual block, the up-sampling
        and the head for the backward pass; everything inside them is recomputed there."""

        def run(module, *args):
            return checkpoint(module, *args, use_reentrant=False)

        features = run(self.encoder, inputs)
        hidden = run(self.down, features)
        if coarser is not None:
            hidden = hidden + coarser
        for block in self.residual:
            hidden = run(block, hidden)
        embedding = run(self.up, hidden)
        return run(_Head(self.head), embedding, features), embedding


@dataclass
class LevelField:
    """What one LapIRN level produced, on its own (padded) grid.

    Attributes:
        level: 1 (coarsest, 1/4 resolution) to 3 (full resolution).
        displacement: ``(B, 3, *S_level)`` in voxels of the level grid, dirio axis order.
        velocity: ``(B, 3, *S_level)`` stationary velocity in voxels (diffeomorphic variant), else None.
        padding: the ``(before, after)`` voxels added to each axis of the full-resolution input.
    """

    level: int
    displacement: torch.Tensor
    velocity: torch.Tensor | None
    padding: list[tuple[int, int]]


class LapIRN(nn.Module):
    """LapIRN (module docstring): ``forward(fixed, moving) -> (B, 3, *S)`` displacement in voxels.

    Args:
        diffeomorphic: predict stationary velocities integrated by scaling and squaring (upstream's
            "diff" model) instead of displacements ("disp").
        start_channel: width parameter; each level has ``4 * start_channel`` channels (7 upstream).
        range_flow: scale of the softsign head output, in network units (0.4 upstream).
        integration_steps: squarings of the diffeomorphic variant (7 upstream).

    Levels are numbered 1 (coarsest) to 3 and can be run, frozen and optimised one at a time
    (:meth:`forward` with ``levels``, :meth:`level_parameters`, :meth:`freeze_levels`), as neural
    instance optimisation does. No parameter is a spatial field (:meth:`spatial_parameters`).
    """

    num_levels = NUM_LEVELS
    size_multiple = SIZE_MULTIPLE
    #: spatial dimensions of the images it takes (3D only)
    ndim = 3

    def __init__(
        self,
        diffeomorphic: bool = False,
        start_channel: int = 7,
        range_flow: float = RANGE_FLOW,
        integration_steps: int = INTEGRATION_STEPS,
    ):
        super().__init__()
        if not isinstance(start_channel, int) or isinstance(start_channel, bool) or start_channel < 1:
            raise ValueError(f"start_channel must be an integer >= 1, got {start_channel!r}")
        if not (isinstance(range_flow, (int, float)) and not isinstance(range_flow, bool)
                and 0 < range_flow < float("inf")):
            raise ValueError(f"range_flow must be a positive number, got {range_flow!r}")
        if not isinstance(integration_steps, int) or isinstance(integration_steps, bool) or integration_steps < 0:
            raise ValueError(f"integration_steps must be an integer >= 0, got {integration_steps!r}")
        self.diffeomorphic = bool(diffeomorphic)
        self.start_channel = int(start_channel)
        self.range_flow = float(range_flow)
        self.integration_steps = int(integration_steps)
        width = 4 * self.start_channel
        self.levels = nn.ModuleList([LapIRNLevel(2, width)] + [LapIRNLevel(5, width) for _ in range(NUM_LEVELS - 1)])

    @property
    def architecture(self) -> str:
        """Registry name: ``"lapirn-diff"`` or ``"lapirn-disp"``."""
        return "lapirn-diff" if self.diffeomorphic else "lapirn-disp"

    @property
    def settings(self) -> dict:
        """Constructor keyword arguments of :attr:`architecture` (what a checkpoint stores)."""
        settings = {"start_channel": self.start_channel, "range_flow": self.range_flow}
        if self.diffeomorphic:
            settings["integration_steps"] = self.integration_steps
        return settings

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute activations in the backward pass (``torch.utils.checkpoint``): a smaller peak
        memory for about one more forward pass of time. Off by default; not saved in checkpoints."""
        return all(level.gradient_checkpointing for level in self.levels)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        for level in self.levels:
            level.gradient_checkpointing = bool(value)

    # --- parameters per level

    def _check_level(self, level: int) -> int:
        if not isinstance(level, int) or not 1 <= level <= NUM_LEVELS:
            raise ValueError(f"LapIRN levels are 1 (coarsest) to {NUM_LEVELS}, got {level!r}")
        return level

    def level_parameters(self, level: int) -> list[nn.Parameter]:
        """The parameters of level ``level`` (1 = coarsest, 3 = full resolution)."""
        return list(self.levels[self._check_level(level) - 1].parameters())

    def freeze_levels(self, *levels: int) -> None:
        """Stop gradients to the parameters of ``levels`` (all levels when none is given)."""
        self._set_trainable(levels, False)

    def unfreeze_levels(self, *levels: int) -> None:
        """Let gradients flow to the parameters of ``levels`` again (all levels when none is given)."""
        self._set_trainable(levels, True)

    def _set_trainable(self, levels: Iterable[int], trainable: bool) -> None:
        for level in tuple(levels) or range(1, NUM_LEVELS + 1):
            for parameter in self.level_parameters(level):
                parameter.requires_grad_(trainable)

    def spatial_parameters(self) -> list[nn.Parameter]:
        """Parameters that are spatial fields (none: every parameter is a convolution weight)."""
        return []

    # --- forward

    def _check_inputs(self, fixed: torch.Tensor, moving: torch.Tensor) -> None:
        if fixed.dim() != 5 or fixed.shape[1] != 1:
            raise ValueError(f"LapIRN takes (B, 1, D, H, W) images, got fixed of shape {tuple(fixed.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} differ in shape")

    def forward_levels(self, fixed: torch.Tensor, moving: torch.Tensor, levels: int = NUM_LEVELS) -> list[LevelField]:
        """Run levels ``1..levels`` and return each one's field on its own grid.

        Args:
            fixed, moving: ``(B, 1, D, H, W)`` images min-max normalised to [0, 1], same grid.
            levels: how many levels to run, from the coarsest (1 to 3).
        Returns:
            One :class:`LevelField` per level run, coarsest first; fields are on the padded level
            grids (full-resolution input padded to a multiple of 8, then halved per level). Bring one
            to the input grid with :meth:`to_input_grid`.
        """
        self._check_inputs(fixed, moving)
        self._check_level(levels)
        dtype = self.levels[0].down.weight.dtype
        fixed_padded, padding = pad_to_multiple(fixed.to(dtype), SIZE_MULTIPLE)
        moving_padded, _ = pad_to_multiple(moving.to(dtype), SIZE_MULTIPLE)
        fixed_pyramid, moving_pyramid = [fixed_padded], [moving_padded]
        for _ in range(NUM_LEVELS - 1):
            fixed_pyramid.insert(0, _downsample(fixed_pyramid[0]))
            moving_pyramid.insert(0, _downsample(moving_pyramid[0]))

        outputs: list[LevelField] = []
        disp = velocity = embedding = None
        for index in range(levels):
            fixed_l, moving_l = fixed_pyramid[index], moving_pyramid[index]
            if index == 0:
                inputs = torch.cat([moving_l, fixed_l], dim=1)
                carried = None
            else:
                disp_up = upsample_field(disp)
                carried = upsample_field(velocity) if self.diffeomorphic else disp_up
                warped = warp(moving_l, disp_up, mode="linear", padding="border")
                inputs = torch.cat([warped, fixed_l, to_network_units(carried)], dim=1)
            head, embedding = self.levels[index](inputs, embedding)
            step = from_network_units(head * self.range_flow)
            field = step if carried is None else step + carried
            if self.diffeomorphic:
                velocity = field
                disp = integrate_velocity(velocity, self.integration_steps)
            else:
                disp = field
            outputs.append(LevelField(index + 1, disp, velocity, padding))
        return outputs

    def to_input_grid(self, output: LevelField) -> torch.Tensor:
        """A level's displacement on the full-resolution input grid, in its voxels.

        Upsampled by 2 per level (:func:`upsample_field`, as LapIRN passes fields between levels)
        up to the padded full-resolution grid, then the padding is cropped away.
        """
        disp = output.displacement
        for _ in range(NUM_LEVELS - output.level):
            disp = upsample_field(disp)
        return crop(disp, output.padding)

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor, levels: int = NUM_LEVELS) -> torch.Tensor:
        """Displacement ``u`` with ``warped(x) = moving(x + u(x))``.

        Args:
            fixed, moving: ``(B, 1, D, H, W)`` images min-max normalised to [0, 1], same grid, any size
                (padded internally to a multiple of 8; the field is cropped back).
            levels: run levels ``1..levels`` only (1 to 3); the field of the last level run is
                upsampled to the input grid (:meth:`to_input_grid`).
        Returns:
            ``(B, 3, D, H, W)`` float32 in voxels of the fixed grid, axis order ``(i, j, k)``.
        """
        return self.to_input_grid(self.forward_levels(fixed, moving, levels)[-1])


# --- upstream weights ---------------------------------------------------------------------------


def from_upstream_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[OrderedDict, dict]:
    """Rename an upstream LapIRN state_dict to dirio's keys (table in the module docstring).

    Returns:
        The renamed state_dict (keys upstream's mapping does not cover are kept as they are, so that
        loading reports them as unexpected) and the settings read from the weights
        (``{"start_channel": ...}``).
    """
    renamed: OrderedDict = OrderedDict()
    for key, value in state_dict.items():
        new_key = key
        for prefix, index in _UPSTREAM_LEVEL_PREFIXES:
            if key.startswith(prefix):
                layer, _, rest = key[len(prefix):].partition(".")
                if layer in _UPSTREAM_LAYER_NAMES and rest:
                    new_key = f"levels.{index}.{_UPSTREAM_LAYER_NAMES[layer]}.{rest}"
                break
        renamed[new_key] = value
    first = state_dict.get("input_encoder_lvl1.0.weight")
    settings = {"start_channel": int(first.shape[0]) // 4} if isinstance(first, torch.Tensor) else {}
    return renamed, settings
