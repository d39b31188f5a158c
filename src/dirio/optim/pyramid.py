"""The instance-optimisation driver: a coarse-to-fine loop around :class:`dirio.optim.step.Step`.

One pair is registered by minimising, level by level from coarse to fine, separately kept terms
over a transform (:mod:`dirio.transforms`). At each level the images (and masks) are resampled
onto the level grid, the transform's ``start_level`` hook runs (resample, freeze, unfreeze), the
terms prepare their per-level values (features), and the level's iterations call the shared
step with the level's learning-rate schedule. The transform passed in is the transform returned.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from dirio.core.context import LevelContext
from dirio.core.fields import resize_image
from dirio.core.profiling import peak_memory_mb, reset_peak_memory
from dirio.losses.terms import Term
from dirio.optim.combine import make_combine_rule
from dirio.optim.optimizers import OPTIMIZER_REGISTRY, make_optimizer
from dirio.optim.progress import Progress, report
from dirio.optim.schedules import make_schedule
from dirio.optim.step import LossLog, Step
from dirio.optim.stopping import make_stopping_rule
from dirio.transforms.base import Transform, parameter_flags


def level_shape(shape: Sequence[int], factor: float) -> tuple[int, ...]:
    """Image grid of a pyramid level: ``round(n / factor)`` voxels per axis (at least 2)."""
    return tuple(max(int(round(n / factor)), 2) for n in shape)


@dataclass
class PyramidConfig:
    """The resolution pyramid.

    Attributes:
        levels: shrink factors from coarse to fine, e.g. ``(4, 2, 1)``; a level's image grid has
            ``round(n / factor)`` voxels per axis.
        iterations: iterations per level (same length as ``levels``); 0 skips a level's optimisation.
    """

    levels: Sequence[float] = (4, 2)
    iterations: Sequence[int] = (80, 40)

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason when the settings are inconsistent."""
        if len(self.levels) == 0 or len(self.levels) != len(self.iterations):
            raise ValueError(
                f"levels {tuple(self.levels)} and iterations {tuple(self.iterations)} must be non-empty and of equal length"
            )
        if any(not f > 0 for f in self.levels) or any(n < 0 for n in self.iterations):
            raise ValueError("pyramid factors must be positive and iteration counts non-negative")


@dataclass
class OptimizerConfig:
    """Optimiser, schedule, combination rule and stopping of a run.

    Attributes:
        optimizer: ``"adam"``, ``"amsgrad"`` or ``"sgd"``; ``optimizer_options`` its options
            (e.g. ``weight_decay``).
        lr: base learning rate in voxels of the level's image grid per step (a transform's
            parameter group divides it by its ``lr_divisor``).
        schedule: ``"constant"``, ``"cosine"`` or ``"piecewise"``; ``schedule_options`` its options.
            Each level runs its own schedule over its own iteration count.
        combine: gradient combination rule name, ``combine_options`` its options.
        early_stop: ``"none"`` (fixed iteration counts) or ``"plateau"`` (stop a level when the
            first data term stops improving, see :mod:`dirio.optim.stopping`);
            ``early_stop_options`` its options. The level's iteration count stays the upper bound.
        reset_each_level: build a new optimiser (fresh Adam moments) at every level even when
            the transform keeps its parameters; with False the state persists across levels
            whenever the parameters do (``start_level`` returned False).
        log_every: read the loss values (one device synchronisation) every this many steps and
            at the end of each level; ``None``: every step on the CPU (no cost there), every 10
            on CUDA. A non-finite loss and the plateau stop are detected when values are read.
    """

    optimizer: str = "adam"
    optimizer_options: dict = field(default_factory=dict)
    lr: float = 0.5
    schedule: str = "cosine"
    schedule_options: dict = field(default_factory=dict)
    combine: str = "sum"
    combine_options: dict = field(default_factory=dict)
    early_stop: str = "none"
    early_stop_options: dict = field(default_factory=dict)
    reset_each_level: bool = True
    log_every: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason when the settings are inconsistent."""
        OPTIMIZER_REGISTRY.check_options(self.optimizer, {"params": None, "lr": None, **self.optimizer_options})
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"learning rate must be positive and finite, got {self.lr}")
        if self.log_every is not None and (int(self.log_every) != self.log_every or self.log_every < 1):
            raise ValueError(f"log_every must be a positive integer, got {self.log_every!r}")
        # build the rule, the schedule and the stopper once: unknown names, options and values fail here
        try:
            make_combine_rule(self.combine, **self.combine_options)
            make_stopping_rule(self.early_stop, **self.early_stop_options)
        except TypeError as error:
            raise ValueError(f"combination or early-stopping options: {error}") from None
        try:
            make_schedule(self.schedule, **self.schedule_options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"schedule options for schedule {self.schedule!r}: {error}") from None


@dataclass
class PyramidResult:
    """What a run produces.

    Attributes:
        transform: the optimised transform (the object passed in).
        displacement: ``(B, ndim, *S)`` final displacement on the full image grid, in voxels.
        history: one dict per iteration: ``level``, ``iteration``, ``lr``, ``loss`` (weighted
            total), every term's value and the combination rule's diagnostics.
        levels: one dict per level: shape, parameter shapes, iterations (asked and run), seconds
            (in all, of set-up: pyramid images and features, and per iteration of the loop).
        peak_memory_mb: peak resident memory of the process (CPU) or peak allocated CUDA memory.
        seconds: wall time of the optimisation.
    """

    transform: Transform
    displacement: torch.Tensor
    history: list[dict]
    levels: list[dict]
    peak_memory_mb: float
    seconds: float


def _rule_options(config: OptimizerConfig, generator: torch.Generator) -> dict:
    """Options of the combination rule, with the run's seeded generator for rules that draw."""
    options = dict(config.combine_options)
    if config.combine != "sum":
        options.setdefault("generator", generator)
    return options


def level_context(fixed, moving, level: int, factor: float, *, fixed_mask=None, moving_mask=None,
                  spacing: Sequence[float] | None = None, extra: dict | None = None) -> LevelContext:
    """The context of pyramid level ``level`` (shrink ``factor``) of a pair on the full grid.

    Images are resampled with anti-aliasing (:func:`dirio.core.fields.resize_image`), masks without;
    the full-grid images are kept as ``full_fixed`` / ``full_moving`` (references, not copies).
    ``spacing`` (mm per voxel of the full grid) is scaled by the level's voxel-size ratio.
    """
    full_shape = tuple(fixed.shape[2:])
    shape = level_shape(full_shape, factor)
    level_spacing = None
    if spacing is not None:
        level_spacing = tuple(float(h) * (n - 1) / max(m - 1, 1) for h, n, m in zip(spacing, full_shape, shape))
    return LevelContext(
        level=level,
        shape=shape,
        full_shape=full_shape,
        fixed=resize_image(fixed, shape),
        moving=resize_image(moving, shape),
        fixed_mask=None if fixed_mask is None else resize_image(fixed_mask, shape, antialias=False),
        moving_mask=None if moving_mask is None else resize_image(moving_mask, shape, antialias=False),
        spacing=level_spacing,
        factor=float(factor),
        full_fixed=fixed,
        full_moving=moving,
        extra=dict(extra or {}),
    )


def run_pyramid(
    transform: Transform,
    terms: Sequence[Term],
    fixed: torch.Tensor,
    moving: torch.Tensor,
    pyramid: PyramidConfig,
    config: OptimizerConfig,
    *,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    spacing: Sequence[float] | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "registering",
    extra: dict | None = None,
) -> PyramidResult:
    """Register ``moving`` to ``fixed`` by instance optimisation of ``transform``, coarse to fine.

    Args:
        transform: what is optimised (any :class:`~dirio.transforms.base.Transform`); returned.
        terms: the separately kept objectives (:class:`~dirio.losses.terms.Term`).
        fixed, moving: ``(B, C, *S)`` float images on the same grid (2D or 3D).
        pyramid: levels and iterations; ``config``: optimiser, schedule, rule, stopping.
        fixed_mask, moving_mask: optional ``(B, 1, *S)`` masks in [0, 1] restricting the similarity.
        spacing: voxel size of the full grid in mm (for the contexts; terms may use it).
        seed: seeds the run's generator (every random choice of a rule goes through it).
        progress: show a progress bar on stderr. The observer of :mod:`dirio.optim.progress`, when one
            is set, gets a report after every iteration (and may stop the run by raising).
        extra: entries of every level context's ``extra`` (e.g. the full-resolution images a
            network sees at every level, :func:`dirio.transforms.network.network_extra`).
    Returns:
        A :class:`PyramidResult`; its displacement is in voxels of the full grid.
    Raises:
        DirioError: when a loss becomes NaN or infinite.
    """
    pyramid.validate()
    config.validate()
    device = fixed.device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    step = Step(terms, make_combine_rule(config.combine, **_rule_options(config, generator)))
    stopper = make_stopping_rule(config.early_stop, **config.early_stop_options)
    schedule = make_schedule(config.schedule, **config.schedule_options)
    log_every = config.log_every or (10 if device.type == "cuda" else 1)
    reset_peak_memory(device)
    log = LossLog(step, lambda row: f"level {row['level']} iteration {row['iteration']}")
    bar = tqdm(total=sum(pyramid.iterations), desc=description, unit="it", leave=False, dynamic_ncols=True,
               disable=not progress)
    level_stats: list[dict] = []
    optimizer = None
    start = time.perf_counter()
    try:
        for level_index, (factor, iterations) in enumerate(zip(pyramid.levels, pyramid.iterations)):
            level_start = time.perf_counter()
            ctx = level_context(fixed, moving, level_index, factor, fixed_mask=fixed_mask, moving_mask=moving_mask,
                                spacing=spacing, extra=extra)
            changed = transform.start_level(ctx)
            step.prepare(ctx)
            if optimizer is None or changed or config.reset_each_level:
                groups = transform.parameter_groups()
                for group in groups:
                    group["lr"] = config.lr / group["lr_divisor"]
                optimizer = make_optimizer(config.optimizer, groups, config.lr, **config.optimizer_options)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            spatial = parameter_flags(params, transform.spatial_parameters())
            if stopper is not None:
                stopper.start_level()
            ran = 0  # iterations run at this level (fewer than ``iterations`` after an early stop)
            loop_start = time.perf_counter()
            for iteration in range(iterations):
                lr = config.lr * schedule(iteration, iterations)
                for group in optimizer.param_groups:
                    group["lr"] = lr / group["lr_divisor"]
                meta = {"level": level_index, "iteration": iteration, "lr": lr}
                read = (iteration + 1) % log_every == 0 or iteration == iterations - 1
                check = (lambda losses, meta=meta: log.check_finite(meta, losses)) if read else None
                if lr == 0.0 and level_index == len(pyramid.levels) - 1 and iteration == iterations - 1:
                    # The run's last step cannot move the parameters (a cosine decay ends at 0) and no
                    # step follows: its loss is logged without the backward pass (same field, no
                    # rule diagnostics in that row).
                    losses, diagnostics = step.evaluate(transform, ctx), {}
                    check(losses)
                else:
                    losses, diagnostics = step(transform, ctx, optimizer, params, spatial, check=check)
                transform.after_step(ctx)
                log.add(meta, losses, diagnostics)
                bar.update(1)
                ran = iteration + 1
                report(Progress(description, level_index, len(pyramid.levels), ran, iterations,
                                sum(pyramid.iterations[:level_index]) + ran, sum(pyramid.iterations)))
                if not read:
                    continue
                rows = log.flush()
                bar.set_postfix_str(f"level {level_index} loss {rows[-1]['loss']:.4f}", refresh=False)
                if stopper is not None and step.monitored is not None and any(
                    stopper.update(row[step.monitored]) for row in rows
                ):
                    bar.update(iterations - ran)
                    break
            seconds = time.perf_counter() - level_start
            loop_seconds = time.perf_counter() - loop_start
            level_stats.append({
                "level": level_index,
                "factor": factor,
                "shape": list(ctx.shape),
                "grid": _parameter_grid(transform, ctx),
                "iterations": iterations,
                "iterations_run": ran,
                "seconds": seconds,
                "setup_seconds": seconds - loop_seconds,
                "seconds_per_iteration": loop_seconds / ran if ran else 0.0,
            })
    finally:
        bar.close()
    final = LevelContext(level=len(pyramid.levels) - 1, shape=tuple(fixed.shape[2:]), full_shape=tuple(fixed.shape[2:]),
                         fixed=fixed, moving=moving, fixed_mask=fixed_mask, moving_mask=moving_mask,
                         spacing=None if spacing is None else tuple(float(h) for h in spacing),
                         extra=dict(extra or {}))  # e.g. the network's own inputs: the final field sees them too
    with torch.no_grad():
        disp = transform.field(final).detach()
    return PyramidResult(
        transform=transform,
        displacement=disp,
        history=log.rows,
        levels=level_stats,
        peak_memory_mb=peak_memory_mb(device),
        seconds=time.perf_counter() - start,
    )


def _parameter_grid(transform: Transform, ctx: LevelContext) -> list[int]:
    """The spatial shape of the transform's (first) spatial parameter, else the level grid."""
    spatial = transform.spatial_parameters()
    if spatial:
        return list(spatial[0].shape[2:])
    return list(ctx.shape)
