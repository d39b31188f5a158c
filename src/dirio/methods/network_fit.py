"""Does a pretrained multi-level network fit a pair? The check behind the ``cpu`` budget's NIO schedule.

LapIRN's coarsest level carries a pair's large-scale alignment. When the field it predicts matches
the images *worse than no deformation at all*, by the stage's own similarity on the half-resolution
grid, the network has not learned images like these (an inverted contrast, another
modality). Its weights then have to move further than for a pair it fits, so the ``cpu`` budget
also optimises LapIRN's level 2 (its ``shifted`` schedule,
:data:`dirio.methods.network.NETWORK_BUDGETS`); IO under that budget only warns (one IO step will
not register such a pair: 0.090 on the inverted pair, as direct inference).

The test has no threshold to tune: the network's coarsest field against the identity. Measured at
full resolution (160 x 192 x 224, NIO's LNCC loss, window 7, lower is better, on the half-resolution
loss grid; benchmarks/RESULTS.md, Issue 21, seventh session), no deformation / level-1 field:
``oasisA`` -0.172 / -0.237, its reverse -0.172 / -0.244, gamma 0.5 -0.180 / -0.227, gamma 2
-0.152 / -0.202, the synthetic warp -0.339 / -0.396, OASIS A -> B -0.293 / -0.424; the inverted
contrast -0.147 / **-0.051** (LapIRN's direct Dice there 0.090, against 0.590 before registration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dirio.losses.terms import Evaluation, Term
from dirio.optim.pyramid import level_context
from dirio.transforms.network import LevelwiseNetworkTransform, network_extra


@dataclass(frozen=True)
class CoarseFit:
    """The similarity loss (lower is better) of a pair unregistered and warped by the network's
    coarsest field, on the loss grid of the first level.

    Attributes:
        identity: the loss of the pair as given (no deformation).
        network: the loss of the moving image pulled by the coarsest network level's field.
    """

    identity: float
    network: float

    @property
    def fits(self) -> bool:
        """The network's coarsest field aligns the pair better than no deformation."""
        return self.network < self.identity

    def record(self) -> dict:
        return {"identity": self.identity, "network": self.network, "fits": self.fits}


#: Shrink factor of the grid the check compares on: half resolution (the NIO ``cpu`` budget's first
#: loss grid, where the separation above was measured), whatever the stage's own grids.
CHECK_FACTOR = 2.0


def coarse_fit(transform: LevelwiseNetworkTransform, similarity: Term, fixed: torch.Tensor, moving: torch.Tensor,
               factor: float = CHECK_FACTOR, *, network_inputs: tuple | None = None,
               fixed_mask: torch.Tensor | None = None, moving_mask: torch.Tensor | None = None) -> CoarseFit:
    """How well the network's coarsest level fits ``moving`` to ``fixed``, against no deformation.

    Args:
        transform: the stage's level-wise transform (its first scheduled network level is run once,
            without gradients; no weight changes).
        similarity: the stage's similarity term (evaluated as the engine evaluates it, masks included).
        fixed, moving: ``(1, 1, *S)`` images the terms see; ``network_inputs`` what the network sees
            instead, when the stage gives it its own (see :func:`dirio.methods.network.register_network`).
        factor: shrink factor of the grid the losses are computed on (default :data:`CHECK_FACTOR`).
    Returns:
        The two losses (Python floats).
    """
    ctx = level_context(fixed, moving, 0, factor, fixed_mask=fixed_mask, moving_mask=moving_mask,
                        extra=network_extra(*(network_inputs or (fixed, moving))))
    similarity.function.prepare(ctx, similarity.name)
    with torch.no_grad():
        field = transform.field(ctx)
        values = [float(similarity.function(Evaluation(ctx, disp, transform), similarity.name))
                  for disp in (torch.zeros_like(field), field)]
    return CoarseFit(identity=values[0], network=values[1])
