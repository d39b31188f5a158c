"""A registration network as a transform: the field is the network's prediction for the images.

The network contract (any ``torch.nn.Module``): ``network(fixed, moving) -> (B, ndim, *S)``
displacement in voxels of the input grid, Learn2Reg convention (``warped(x) = moving(x + u(x))``),
for ``(B, C, *S)`` fixed and moving images. The weights are the parameters; none is a spatial
field (the ``block`` scope treats each tensor as one unit); the regularizers act on the predicted
field. Used for training and for instance optimisation of the weights on one pair.

Optional parts of the contract, used when present:

* ``network(fixed, moving, levels=k)`` and ``network.level_parameters(k)`` (LapIRN): the field of
  the first ``k`` pyramid levels, for neural instance optimisation (:class:`LevelwiseNetworkTransform`).
* ``network.gradient_checkpointing`` (a settable bool): recompute activations in the backward pass
  instead of keeping them (``torch.utils.checkpoint``).

Resolution. The network always sees the full-resolution images of the pair: the engine's contexts
of coarser levels carry them in ``ctx.extra["network_fixed"]`` / ``ctx.extra["network_moving"]``
(:func:`network_extra`), and the predicted field is resampled onto the level grid
(:func:`dirio.core.fields.resize_field`) where the terms are evaluated. A coarser level therefore
makes the *loss* cheaper, never the network's input smaller (the user's image is never resized).

Orientation. A network trained on images in one voxel axis order (LapIRN: OASIS 160 x 192 x 144,
axial slices in axes 0, 1) is given images of another order through an :class:`AxisMap`: the images
are permuted and flipped into the network's order and the field is mapped back, so the result is
always on the user's grid.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import torch

from dirio.core.context import LevelContext, RegularizedField
from dirio.core.fields import resize_field
from dirio.transforms.base import TransformModule

#: The keys of ``ctx.extra`` holding the full-resolution images a network sees at every level.
NETWORK_FIXED = "network_fixed"
NETWORK_MOVING = "network_moving"

#: Named axis maps. ``voxelmorph-grid``: brains on the 160 x 192 x 224 VoxelMorph / neurite-OASIS
#: grid (voxel axes left, inferior, anterior) -> LapIRN's OASIS training order (160 x 224 x 192 after
#: the map); chosen by direct-inference Dice (benchmarks/network_io.py, docs/how-to/networks.md).
AXIS_NAMES = {"identity": "0,1,2", "voxelmorph-grid": "0,2,-1"}


def network_extra(fixed: torch.Tensor, moving: torch.Tensor) -> dict:
    """``ctx.extra`` entries giving a network the full-resolution images at every pyramid level."""
    return {NETWORK_FIXED: fixed, NETWORK_MOVING: moving}


@dataclass(frozen=True)
class AxisMap:
    """Which axis of the user's grid each network axis is, and whether it is reversed.

    ``AxisMap.parse("0,-2,1")``: network axis 0 is user axis 0, network axis 1 is user axis 2
    reversed, network axis 2 is user axis 1. Images go in with :meth:`to_network`; a field
    ``(B, ndim, *S_net)`` in network voxels comes back with :meth:`from_network` as a field on the
    user's grid in the user's voxels and component order.
    """

    axes: tuple[int, ...]
    flips: tuple[bool, ...]

    @classmethod
    def parse(cls, spec: str | Sequence[int] | None, ndim: int = 3) -> "AxisMap":
        """From ``"identity"``, ``"voxelmorph-grid"`` or ``"A,B,C"`` (each a user axis, ``-`` = reversed).

        Raises ``ValueError`` naming the spec unless it is a permutation of ``0..ndim-1``.
        """
        if spec is None:
            spec = "identity"
        if isinstance(spec, str):
            text = AXIS_NAMES.get(spec.strip(), spec)
            items = [item.strip() for item in text.split(",") if item.strip()]
        else:
            items = [str(item) for item in spec]
        try:
            axes = tuple(abs(int(item)) for item in items)
        except ValueError:
            raise ValueError(f"network axes {spec!r}: expected {' or '.join(AXIS_NAMES)} or a permutation "
                             f"such as 0,-2,1 (a minus reverses the axis)") from None
        flips = tuple(item.startswith("-") for item in items)
        if sorted(axes) != list(range(ndim)):
            raise ValueError(f"network axes {spec!r}: need a permutation of 0..{ndim - 1}, e.g. 0,-2,1")
        return cls(axes, flips)

    @property
    def is_identity(self) -> bool:
        return self.axes == tuple(range(len(self.axes))) and not any(self.flips)

    def to_network(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` on the user's grid -> the network's axis order."""
        out = image.permute(0, 1, *(2 + a for a in self.axes))
        flipped = [2 + a for a, f in enumerate(self.flips) if f]
        return out.flip(flipped) if flipped else out

    def from_network(self, disp: torch.Tensor) -> torch.Tensor:
        """``(B, ndim, *S_net)`` displacement in network voxels -> ``(B, ndim, *S)`` on the user's grid."""
        ndim = len(self.axes)
        flipped = [2 + a for a, f in enumerate(self.flips) if f]
        if flipped:
            sign = torch.tensor([-1.0 if f else 1.0 for f in self.flips], device=disp.device, dtype=disp.dtype)
            disp = disp.flip(flipped) * sign.view(1, ndim, *([1] * ndim))
        inverse = [self.axes.index(d) for d in range(ndim)]
        return disp.permute(0, 1, *(2 + a for a in inverse))[:, inverse]


class NetworkTransform(TransformModule):
    """Wraps a network meeting the contract above.

    Args:
        network: the module; its ``requires_grad`` flags decide what is optimised (frozen parts
            are left out of the optimiser groups).
        axes: an :class:`AxisMap` (or its spec) from the user's grid to the network's axis order.
        normalise: min-max normalise each image to [0, 1] before the network (LapIRN's input range).
        mixed_precision: run the network under ``torch.autocast`` in bfloat16 on CUDA (the field,
            the terms and the optimiser stay float32); ignored on the CPU.
    """

    kind = "network"

    def __init__(self, network: torch.nn.Module, axes: AxisMap | str | None = None, normalise: bool = False,
                 mixed_precision: bool = False):
        super().__init__()
        self.network = network
        self.axes = axes if isinstance(axes, AxisMap) else AxisMap.parse(axes) if axes is not None else None
        self.normalise = bool(normalise)
        self.mixed_precision = bool(mixed_precision)

    def forward_options(self, ctx: LevelContext) -> dict:
        """Keyword arguments of the network call at this context (none; see the level-wise subclass)."""
        return {}

    def predict(self, fixed: torch.Tensor, moving: torch.Tensor, **options) -> torch.Tensor:
        """The network's field for full-resolution ``(B, C, *S)`` images, on their grid, float32 voxels."""
        if self.normalise:
            from dirio.transforms.networks.lapirn import min_max_normalise

            fixed, moving = min_max_normalise(fixed), min_max_normalise(moving)
        mapped = self.axes is not None and not self.axes.is_identity
        if mapped:
            fixed, moving = self.axes.to_network(fixed), self.axes.to_network(moving)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                    if self.mixed_precision and fixed.device.type == "cuda" else nullcontext())
        with autocast:
            disp = self.network(fixed, moving, **options)
        disp = disp.float()
        return self.axes.from_network(disp) if mapped else disp

    def field(self, ctx: LevelContext) -> torch.Tensor:
        return self._level_field(ctx, swapped=False)

    def reverse_field(self, ctx: LevelContext) -> torch.Tensor:
        """The field of the swapped pair (moving registered to fixed), on the level grid: what
        GradICON's inverse-consistency term (:class:`dirio.losses.terms.InverseConsistencyTerm`) composes."""
        return self._level_field(ctx, swapped=True)

    def _level_field(self, ctx: LevelContext, swapped: bool) -> torch.Tensor:
        """The network's field for the context's images (the network's own inputs when the stage
        gave them), resized to the level grid."""
        fixed = ctx.extra.get(NETWORK_FIXED, ctx.fixed)
        moving = ctx.extra.get(NETWORK_MOVING, ctx.moving)
        if swapped:
            fixed, moving = moving, fixed
        disp = self.predict(fixed, moving, **self.forward_options(ctx))
        if tuple(disp.shape[2:]) != tuple(ctx.shape):
            disp = resize_field(disp, ctx.shape)
        return disp

    def regularized(self, ctx: LevelContext, field: torch.Tensor) -> RegularizedField:
        """The predicted field, in voxels of the level grid (unit spacing)."""
        return RegularizedField(field, (1.0,) * (field.dim() - 2))


class LevelwiseNetworkTransform(NetworkTransform):
    """Neural instance optimisation of a multi-level network (LapIRN), coarse to fine.

    Pyramid level ``i`` of the engine runs network levels ``1..schedule[i]`` (``forward(...,
    levels=k)``: the levels' fields summed as LapIRN does, upsampled to the input grid) and
    optimises the parameters of the levels run that are in ``optimised``; the others are frozen.
    The final full-resolution field (the engine's last context) runs ``schedule[-1]`` levels.

    Args:
        network: a module with ``forward(fixed, moving, levels=k)``, ``level_parameters(k)``.
        schedule: network level per engine pyramid level, e.g. ``(1, 2, 3)`` (NIO).
        optimised: the network levels whose weights may change, e.g. ``(1, 2)`` to leave the
            full-resolution level at its pretrained weights.
    """

    kind = "network-levels"

    def __init__(self, network: torch.nn.Module, schedule: Sequence[int] = (1, 2, 3),
                 optimised: Sequence[int] = (1, 2, 3), **options):
        super().__init__(network, **options)
        if not hasattr(network, "level_parameters"):
            raise ValueError(f"{type(network).__name__} has no level_parameters(k): level-wise optimisation "
                             "needs a multi-level network such as LapIRN")
        self.schedule = tuple(int(k) for k in schedule)
        self.optimised = tuple(int(k) for k in optimised)
        self.num_levels = int(getattr(network, "num_levels", max(self.schedule)))

    def forward_options(self, ctx: LevelContext) -> dict:
        return {"levels": self.schedule[min(ctx.level, len(self.schedule) - 1)]}

    def trainable_levels(self, level: int) -> list[int]:
        """Network levels optimised at engine level ``level``."""
        running = self.schedule[min(level, len(self.schedule) - 1)]
        return [k for k in range(1, running + 1) if k in self.optimised]

    def start_level(self, ctx: LevelContext) -> bool:
        """Unfreeze the network levels optimised at this level, freeze the rest; the groups change."""
        trainable = set(self.trainable_levels(ctx.level))
        for k in range(1, self.num_levels + 1):
            for parameter in self.network.level_parameters(k):
                parameter.requires_grad_(k in trainable)
        return True

    def parameter_groups(self) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        # a level with nothing to optimise (zero iterations) still gets a valid, never-stepped optimiser
        return [{"params": params or list(self.parameters()), "lr_divisor": 1.0}]
