"""The dense stage: instance optimisation of a displacement (or velocity) field over a pyramid,
optionally as a residual after a fixed affine (``u_total = u + a(x + u)``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from dirio.losses.terms import Term
from dirio.methods.final_smoothing import FinalSmoothing
from dirio.optim.pyramid import OptimizerConfig, PyramidConfig, PyramidResult, run_pyramid
from dirio.transforms.affine import AffineThenDense
from dirio.transforms.dense import DenseConfig


@dataclass
class DenseStage:
    """Options of the dense stage: the transform, the pyramid, the optimiser and the final smoothing
    of its field (:mod:`dirio.methods.final_smoothing`)."""

    transform: DenseConfig = field(default_factory=DenseConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    final_smoothing: FinalSmoothing = field(default_factory=FinalSmoothing)

    def validate(self) -> None:
        self.pyramid.validate()
        self.transform.validate(len(self.pyramid.levels))
        self.optimizer.validate()
        self.final_smoothing.validate()


def register_dense(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    terms: Sequence[Term],
    options: DenseStage,
    *,
    init: torch.Tensor | None = None,
    matrix: torch.Tensor | None = None,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> PyramidResult:
    """Dense instance optimisation of ``moving`` to ``fixed``.

    Args:
        fixed, moving: ``(1, C, *S)`` normalised images on the same grid.
        terms: similarity, regularizer and supervision terms.
        options: the stage's settings.
        init: optional ``(1, ndim, *S)`` initial displacement (voxels of the full grid; of the
            residual when ``matrix`` is given).
        matrix: optional full-grid voxel matrix of a fixed affine applied first.
    Returns:
        The engine's result; ``displacement`` is the composite field on the full grid.
    """
    options.validate()
    transform = options.transform.build(init=init, device=fixed.device)
    if matrix is not None:
        transform = AffineThenDense(transform, matrix.to(fixed.device), tuple(fixed.shape[2:]))
    return run_pyramid(transform, terms, fixed, moving, options.pyramid, options.optimizer, fixed_mask=fixed_mask,
                       moving_mask=moving_mask, spacing=spacing, seed=seed, progress=progress)
