"""The stage pipeline: registration as a list of named stages run in order on one pair.

A stage reads and updates a :class:`PairState` (the normalised images, masks, terms, the affine
matrix and the dense stage's initial field found so far) and appends a record of what it did.
The pipeline is data: ``run_stages(state, [("affine", options), ("convex", options), ("dense",
options)])``; each name is looked up in :data:`STAGES`, so a new method is one more registered
function, not an edit of the API.

Stages of dirio (their options objects in brackets):

* ``affine`` (:class:`AffineStage`): affine pre-alignment, :func:`dirio.methods.affine.register_affine`.
* ``convex`` (:class:`~dirio.methods.convex.ConvexConfig`): discrete + coupled convex
  initialisation of the dense stage, on the affinely pre-aligned pair.
* ``dense`` (:class:`DenseStage`): instance optimisation of a dense field (after the affine, when
  one ran), :func:`dirio.methods.dense.register_dense`.
* ``network``, ``network-io``, ``nio`` (:class:`~dirio.methods.network.NetworkStage`): a pretrained
  network's direct inference, instance optimisation of its weights, and neural instance
  optimisation (:mod:`dirio.methods.network`); a dense stage after one starts from its field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dirio.core.field_checks import field_problem
from dirio.core.fields import field_to_numpy, warp
from dirio.core.registry import Registry
from dirio.errors import DirioError
from dirio.losses.by_level import at_level
from dirio.losses.terms import Term
from dirio.methods.affine import AffineConfig, register_affine
from dirio.methods.convex import ConvexConfig, convex_initialisation
from dirio.methods.dense import DenseStage, register_dense
from dirio.methods.final_smoothing import choose_final_smoothing
from dirio.methods.network import NETWORK_STAGES, network_stage
from dirio.optim.pyramid import PyramidResult
from dirio.transforms.affine import AffineThenDense, affine_displacement, compose_affine_field
from dirio.transforms.fixed import FixedDisplacement


@dataclass
class AffineStage:
    """Options of the ``affine`` stage: the family and the stage's optimisation settings."""

    family: str = "affine"
    config: AffineConfig = field(default_factory=AffineConfig)


@dataclass
class PairState:
    """One pair on its way through the stages.

    Attributes:
        fixed, moving: ``(1, C, *S)`` normalised images on the same grid.
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` masks.
        terms: the dense stage's terms; ``similarity`` the similarity object the affine stage uses (the
            dense stage's at its coarsest level when its options vary by level).
        spacing: voxel size in mm (rigid is rigid in mm), or ``None``.
        seed, progress: the run's seed and whether to show progress bars.
        matrix: ``(ndim + 1, ndim + 1)`` float64 voxel matrix found by the affine stage, or ``None``.
        init: ``(1, ndim, *S)`` initial field of the dense stage (after the affine), or ``None``.
        result: the dense stage's :class:`~dirio.optim.pyramid.PyramidResult`.
        records: one dict per stage run (``stage``, ``seconds``, ``peak_memory_mb``, details).
        stage_fields: when not ``None``, the ``(*S, ndim)`` field after each stage (everything so
            far composed), by stage name.
        network_inputs: ``(fixed, moving)`` ``(1, 1, *S)`` images with their original intensities,
            for networks trained on min-max normalised images (:mod:`dirio.methods.network`).
        results: ``(stage name, result)`` of every stage that produced a field by optimisation or
            inference (network stages, dense), in order: their histories make the run's log.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    terms: Sequence[Term]
    similarity: Any
    fixed_mask: torch.Tensor | None = None
    moving_mask: torch.Tensor | None = None
    spacing: Sequence[float] | None = None
    seed: int = 0
    progress: bool = True
    matrix: torch.Tensor | None = None
    init: torch.Tensor | None = None
    result: PyramidResult | None = None
    records: list[dict] = field(default_factory=list)
    stage_fields: dict | None = None
    results: list = field(default_factory=list)
    network_inputs: tuple | None = None


def affine_stage(state: PairState, options: AffineStage) -> None:
    """Affine pre-alignment; sets ``state.matrix``."""
    result = register_affine(
        state.fixed, state.moving, state.similarity, options.family, options.config, spacing=state.spacing,
        fixed_mask=state.fixed_mask, moving_mask=state.moving_mask, seed=state.seed, progress=state.progress,
    )
    state.records.append({"stage": "affine", "family": options.family, "seconds": result.seconds,
                          "peak_memory_mb": result.peak_memory_mb, "levels": result.levels})
    state.matrix = torch.from_numpy(result.matrix)
    if state.stage_fields is not None:
        state.stage_fields["affine"] = field_to_numpy(result.displacement)


def convex_stage(state: PairState, options: ConvexConfig) -> None:
    """Discrete + coupled convex step on the (affinely pre-aligned) pair; sets ``state.init``.

    Skipped when the dense stage already has an initial field (given by the caller).
    """
    if state.init is not None:
        return
    fixed, moving, moving_mask = state.fixed, state.moving, state.moving_mask
    if state.matrix is not None:
        # The discrete search starts from the affine: the moving image (and mask) are pre-aligned.
        affine_disp = affine_displacement(state.matrix.to(fixed.device), fixed.shape[2:])
        moving = warp(moving, affine_disp)
        if moving_mask is not None:
            moving_mask = warp(moving_mask, affine_disp, padding="zeros")
    result = convex_initialisation(fixed, moving, options, fixed_mask=state.fixed_mask, moving_mask=moving_mask)
    state.records.append({
        "stage": "convex", "seconds": result.seconds, "peak_memory_mb": result.peak_memory_mb,
        "cost_volume_mb": result.cost_volume_mb, "cost_volume_cached": result.cached, "slabs": result.slabs,
        "consistency_error_cells": None if result.consistency_error is None else list(result.consistency_error),
    })
    state.init = result.displacement
    if state.stage_fields is not None:
        total = state.init if state.matrix is None else compose_affine_field(state.matrix, state.init)
        state.stage_fields["convex"] = field_to_numpy(total)


def dense_stage(state: PairState, options: DenseStage) -> None:
    """Dense instance optimisation (a residual after the affine when one ran); sets ``state.result``."""
    result = register_dense(
        state.fixed, state.moving, state.terms, options, init=state.init, matrix=state.matrix,
        fixed_mask=state.fixed_mask, moving_mask=state.moving_mask, spacing=state.spacing, seed=state.seed,
        progress=state.progress,
    )
    problem = field_problem(result.displacement)
    if problem is not None:
        o = options.optimizer
        raise DirioError(f"the dense stage's field is unusable: {problem}; the optimisation diverged: lower "
                         f"`lr` ({o.optimizer}, {o.lr:g}); no field was written")
    record = {"stage": "dense", "seconds": result.seconds, "peak_memory_mb": result.peak_memory_mb}
    if options.final_smoothing.mode != "off":
        result, smoothing = _smooth_final_field(state, options, result)
        record["final_smoothing"] = smoothing
        record["seconds"] += smoothing["seconds"]
    state.records.append(record)
    state.result = result
    state.results.append(("dense", result))
    if state.stage_fields is not None:
        state.stage_fields["dense"] = field_to_numpy(result.displacement)


def _smooth_final_field(state: PairState, options: DenseStage, result: PyramidResult) -> tuple[PyramidResult, dict]:
    """The dense result with its field smoothed or kept, as the stage's final smoothing decides
    (:func:`dirio.methods.final_smoothing.choose_final_smoothing`), and the choice's record.

    The probe uses the last pyramid level's similarity on the full grid, and a moving mask pulled
    back by the unsmoothed field, so that both losses count the same voxels. A smoothed field's
    transform is a plain displacement: its inverse is iterative."""
    similarity = at_level(state.terms[0].function.similarity, len(options.pyramid.levels) - 1)
    mask = state.fixed_mask
    if state.moving_mask is not None:
        with torch.no_grad():
            moved = warp(state.moving_mask.float(), result.displacement, padding="zeros")
        mask = moved if mask is None else mask * moved
    residual = recompose = None
    if isinstance(result.transform, AffineThenDense):  # smooth the residual, keep the affine
        shape = tuple(state.fixed.shape[2:])
        residual = result.transform.dense.displacement(shape).detach()
        matrix = result.transform.matrix

        def recompose(field):
            return compose_affine_field(matrix, field)
    choice = choose_final_smoothing(state.fixed, state.moving, result.displacement.detach(), similarity,
                                    options.final_smoothing, mask=mask, residual=residual, recompose=recompose)
    transform = FixedDisplacement(choice.displacement) if choice.smoothed else result.transform
    return (dataclasses.replace(result, transform=transform, displacement=choice.displacement),
            choice.record(options.final_smoothing))


STAGES: Registry[Callable[[PairState, Any], None]] = Registry("stage")
STAGES.register("affine", affine_stage)
STAGES.register("convex", convex_stage)
STAGES.register("dense", dense_stage)
for _name in NETWORK_STAGES:
    STAGES.register(_name, network_stage)


def stage_history(state: PairState) -> list[dict]:
    """The run's per-iteration log: the final result's history, or, when several stages optimised
    (``network+dense``), every stage's rows in order, each with its ``stage`` name."""
    if len(state.results) <= 1:
        return [] if state.result is None else state.result.history
    rows: list[dict] = []
    for name, result in state.results:
        rows.extend(row if "stage" in row else {"stage": name, **row} for row in result.history)
    return rows


def run_stages(state: PairState, stages: Sequence[tuple[str, Any]]) -> PairState:
    """Run ``(name, options)`` stages in order on ``state``; return it."""
    for name, options in stages:
        STAGES.get(name)(state, options)
    return state
