"""Refinement of a network's field: a short full-resolution dense optimisation that removes its folds.

A pretrained network's field (LapIRN's, after direct inference, IO or NIO) folds where its
full-resolution level overshoots: 0.3-0.4 % of the voxels of a 160 x 192 x 224 brain have
``det(I + du/dx) <= 0``. Optimising that level's weights removes them only slowly, and a step costs
about 2 minutes on a 2-core CPU (benchmarks/RESULTS.md, Issue 21). Refinement optimises the field
itself instead, starting from the network's, for a few full-resolution steps of about 1-2 s each:

* the displacement is one additive field (not composed: a composition ``u_prev(x + v(x)) + v(x)``
  keeps every fold of ``u_prev``, since ``det`` of a composition is the product of the dets) with no
  parameter smoothing (smoothing the parameters would blur the network's field at the first step);
* the loss is LNCC + diffusion (as the ``brain-mri`` preset at full resolution) plus the
  :class:`~dirio.losses.regularizers.Folding` hinge, which is 0 wherever the map keeps at least a
  tenth of the local volume, so it acts at the folds only. It sums the central and every corner
  determinant (``stencils="corners"``): with the central, forward and backward ones only, the
  unsmoothed field grew oscillations that fold the mixed corners (about 1 % of the voxels of the
  synthetic brain pair, 0.09-0.16 % non-diffeomorphic volume) while no voxel had ``det <= 0``;
* Adam with a small, decaying step (:data:`REFINE_LR` voxels per step), because the field starts
  close to the answer.

``network_refine`` (iterations; :class:`dirio.methods.network.NetworkConfig`) switches it on after
any network stage; the ``cpu`` network budget uses it for ``network-io`` and ``nio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dirio.losses.regularizers import make_regularizer
from dirio.losses.similarity import make_similarity
from dirio.losses.terms import RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.dense import DenseStage, register_dense
from dirio.optim.pyramid import OptimizerConfig, PyramidConfig, PyramidResult
from dirio.transforms.dense import DenseConfig

#: Adam's step of the refinement in voxels (cosine decay over its iterations).
REFINE_LR = 0.1
#: LNCC window of the refinement (the ``brain-mri`` preset's full-resolution window).
REFINE_WINDOW = 9
#: Weights of the refinement's regularizers.
REFINE_DIFFUSION = 0.1
REFINE_FOLDING = 10.0


@dataclass
class RefineConfig:
    """Options of the refinement.

    Attributes:
        iterations: full-resolution Adam steps (0: no refinement).
        folding: weight of the folding hinge; ``diffusion`` the weight of the diffusion energy.
        window: LNCC window in voxels; ``lr`` Adam's initial step in voxels.
    """

    iterations: int = 0
    folding: float = REFINE_FOLDING
    diffusion: float = REFINE_DIFFUSION
    window: int = REFINE_WINDOW
    lr: float = REFINE_LR

    def validate(self) -> None:
        if int(self.iterations) < 0:
            raise ValueError(f"`network_refine` must be >= 0 iterations, got {self.iterations}")
        if not float(self.folding) >= 0:
            raise ValueError(f"the refinement's folding weight must be >= 0, got {self.folding}")

    def terms(self) -> list[Term]:
        """LNCC (weight 1), diffusion and the folding hinge, as separately kept terms."""
        return [
            Term("lncc", Role.SIMILARITY, SimilarityTerm(make_similarity("lncc", window=int(self.window))), 1.0),
            Term("diffusion", Role.REGULARIZER, RegularizerTerm(make_regularizer("diffusion")), float(self.diffusion)),
            Term("folding", Role.REGULARIZER, RegularizerTerm(make_regularizer("folding", stencils="corners")),
                 float(self.folding)),
        ]

    def stage(self) -> DenseStage:
        """The dense stage that runs it: one full-resolution level, an additive unsmoothed field."""
        return DenseStage(
            transform=DenseConfig(smoothing=0, compose_every=0),
            pyramid=PyramidConfig(levels=(1.0,), iterations=(int(self.iterations),)),
            optimizer=OptimizerConfig(optimizer="adam", lr=float(self.lr), schedule="cosine"),
        )


def refine_field(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    field: torch.Tensor,
    config: RefineConfig,
    *,
    matrix: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PyramidResult:
    """Refine ``field`` (the network's) on ``fixed`` <- ``moving``.

    Args:
        fixed, moving: ``(1, C, *S)`` images on one grid (the moving one before any affine).
        field: ``(1, ndim, *S)`` starting displacement in voxels (the residual after ``matrix``).
        matrix: the affine found before the network, applied first, or ``None``.
    Returns:
        The dense engine's result; ``displacement`` is the refined composite field ``(1, ndim, *S)``.
    """
    config.validate()
    # the engine optimises its initial field in place: start from a copy, the caller keeps its field
    return register_dense(fixed, moving, config.terms(), config.stage(), init=field.detach().clone(), matrix=matrix,
                          fixed_mask=fixed_mask, moving_mask=moving_mask, spacing=spacing, seed=seed,
                          progress=progress)
