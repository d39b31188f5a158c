"""A registration network as a transform: the field is the network's prediction for the images.

The network contract (any ``torch.nn.Module``): ``network(fixed, moving) -> (B, ndim, *S)``
displacement in voxels of the input grid, Learn2Reg convention (``warped(x) = moving(x + u(x))``),
for ``(B, C, *S)`` fixed and moving images. The weights are the parameters; none is a spatial
field (the ``block`` scope treats each tensor as one unit); the regularizers act on the predicted
field. Used for training and for instance optimisation of the weights on one pair.
"""

from __future__ import annotations

import torch

from dirio.core.context import LevelContext, RegularizedField
from dirio.transforms.base import TransformModule


class NetworkTransform(TransformModule):
    """Wraps a network meeting the contract above.

    Args:
        network: the module; its ``requires_grad`` flags decide what is optimised (frozen parts
            are left out of the optimiser groups).
    """

    kind = "network"

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def field(self, ctx: LevelContext) -> torch.Tensor:
        return self.network(ctx.fixed, ctx.moving)

    def regularized(self, ctx: LevelContext, field: torch.Tensor) -> RegularizedField:
        """The predicted field, in voxels of the level grid (unit spacing)."""
        return RegularizedField(field, (1.0,) * (field.dim() - 2))
