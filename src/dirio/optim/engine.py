"""The instance-optimisation engine: transformation model x objectives x combination rule x
optimiser x schedule x resolution pyramid, with a per-iteration log of every term.

One pair is registered by minimising, level by level from coarse to fine, the separately kept
objectives (one similarity term and any number of regularisers) with a gradient-based optimiser.
The engine never sums the objectives itself: a :mod:`dirio.optim.combine` rule turns them into
gradients.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from dirio.errors import DirioError
from dirio.core.fields import identity_grid, resize_field, resize_image, sample
from dirio.transforms.dense import grid_shape, make_dense_model
from dirio.optim.combine import make_combine_rule
from dirio.optim.schedules import make_schedule
from dirio.optim.stopping import STOPPING_RULES, make_stopping_rule

OPTIMIZERS = ("adam", "amsgrad", "sgd")


@dataclass
class EngineConfig:
    """Settings of one optimisation run.

    Attributes:
        levels: pyramid shrink factors from coarse to fine, e.g. ``(4, 2, 1)``; a level's image
            grid has ``round(n / factor)`` voxels per axis.
        iterations: iterations per level (same length as ``levels``); 0 skips a level's optimisation.
        grid_spacing: parameter-grid spacing in voxels of each level's image grid (a number for
            every level or one per level); 1 optimises a field at the level's resolution.
        lr: base learning rate in voxels of the level's image grid per step.
        optimizer: ``"adam"``, ``"amsgrad"`` or ``"sgd"``.
        schedule: ``"constant"``, ``"cosine"`` or ``"piecewise"``; ``schedule_options`` are its options.
        diffeomorphic: optimise a stationary velocity field integrated by scaling and squaring
            with ``integration_steps`` squarings.
        smoothing: passes of a 3-voxel box filter applied to the parameters to form the field
            (see :func:`dirio.transforms.dense.smooth_parameters`); 0 uses the parameters as they are.
        combine: gradient combination rule name, ``combine_options`` its options.
        early_stop: ``"none"`` (fixed iteration counts) or ``"plateau"`` (stop a level when the
            similarity stops improving, see :mod:`dirio.optim.stopping`); ``early_stop_options``
            its options. The level's iteration count stays the upper bound.
        seed: seeds the run's generator (every random choice of a rule goes through it).
        progress: show a progress bar on stderr.
    """

    levels: Sequence[int] = (4, 2)
    iterations: Sequence[int] = (80, 40)
    grid_spacing: float | Sequence[float] = 1.0
    lr: float = 0.5
    optimizer: str = "adam"
    schedule: str = "cosine"
    schedule_options: dict = field(default_factory=dict)
    diffeomorphic: bool = False
    integration_steps: int = 7
    smoothing: int = 2
    combine: str = "sum"
    combine_options: dict = field(default_factory=dict)
    early_stop: str = "none"
    early_stop_options: dict = field(default_factory=dict)
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason when the settings are inconsistent."""
        if len(self.levels) == 0 or len(self.levels) != len(self.iterations):
            raise ValueError(
                f"levels {tuple(self.levels)} and iterations {tuple(self.iterations)} must be non-empty and of equal length"
            )
        if any(f <= 0 for f in self.levels) or any(n < 0 for n in self.iterations):
            raise ValueError("pyramid factors must be positive and iteration counts non-negative")
        spacings = self.spacings()
        if len(spacings) != len(self.levels) or any(s <= 0 for s in spacings):
            raise ValueError(f"grid spacing must be positive, one value or one per level; got {self.grid_spacing}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be positive, got {self.lr}")
        if self.early_stop not in STOPPING_RULES:
            raise ValueError(f"unknown early stopping rule {self.early_stop!r}; choose one of {', '.join(STOPPING_RULES)}")
        # build the rule and the stopper once: unknown names, options and values fail here
        try:
            make_combine_rule(self.combine, **self.combine_options)
            make_stopping_rule(self.early_stop, **self.early_stop_options)
        except TypeError as error:
            raise ValueError(f"combination or early-stopping options: {error}") from None

    def spacings(self) -> list[float]:
        if isinstance(self.grid_spacing, (int, float)):
            return [float(self.grid_spacing)] * len(self.levels)
        return [float(s) for s in self.grid_spacing]


@dataclass
class Objective:
    """One separately kept term: ``kind`` is ``"similarity"`` or ``"regularizer"``."""

    name: str
    kind: str
    function: Callable
    weight: float


@dataclass
class EngineResult:
    """What a run produces.

    Attributes:
        displacement: ``(1, ndim, *S)`` final displacement on the full image grid, in voxels.
        history: one dict per iteration: ``level``, ``iteration``, ``lr``, every term's value and
            the combination rule's diagnostics.
        levels: one dict per level: shape, parameter grid, iterations (asked and run), seconds
            (in all, of set-up: pyramid images and features, and per iteration of the loop).
        peak_memory_mb: peak resident memory of the process (CPU) or peak allocated CUDA memory.
        seconds: wall time of the optimisation.
    """

    displacement: torch.Tensor
    history: list[dict]
    levels: list[dict]
    peak_memory_mb: float
    seconds: float


def level_shape(shape: Sequence[int], factor: float) -> tuple[int, ...]:
    """Image grid of a pyramid level: ``round(n / factor)`` voxels per axis (at least 2)."""
    return grid_shape(shape, factor)


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """Adam, AMSGrad (Adam with the AMSGrad maximum) or plain SGD over ``params``."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "amsgrad":
        return torch.optim.Adam(params, lr=lr, amsgrad=True)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement (CUDA statistics, or Linux's per-process VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM).
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated (CUDA devices), else the peak resident set size of the process
    since :func:`reset_peak_memory` (Linux VmHWM; elsewhere the all-time ``ru_maxrss``), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _combined_mask(fixed_mask, moving_mask, disp_coords) -> torch.Tensor | None:
    """Fixed mask times the moving mask pulled into fixed space (either may be absent)."""
    mask = fixed_mask
    if moving_mask is not None:
        warped = sample(moving_mask, disp_coords, mode="linear", padding="zeros")
        mask = warped if mask is None else mask * warped
    return mask


def optimise(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    objectives: Sequence[Objective],
    config: EngineConfig,
    *,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    model_factory: Callable | None = None,
) -> EngineResult:
    """Register ``moving`` to ``fixed`` by instance optimisation of a dense field.

    Args:
        fixed, moving: ``(1, C, *S)`` float images on the same grid (2D or 3D).
        objectives: exactly one ``similarity`` (an object with ``features(image)`` and
            ``__call__(fixed_features, warped_features, mask)``, see :mod:`dirio.losses.similarity`) and
            any number of ``regularizer`` objectives (``__call__(disp, spacing)``).
        config: the run's settings.
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` masks in [0, 1] restricting the similarity.
        init: optional ``(1, ndim, *S)`` initial displacement (voxels of the full grid).
        model_factory: optional ``factory(param_shape) -> model`` replacing the dense model (e.g.
            :class:`dirio.methods.affine.AffineTransform`); called once with the first level's
            parameter grid. A model has ``param``, ``displacement(shape)``, ``regularised()`` and
            ``resample(param_shape)``; ``init`` is then the factory's business.
    Returns:
        An :class:`EngineResult`; its displacement is in voxels of the full grid.
    Raises:
        DirioError: when a loss becomes NaN or infinite.
    """
    config.validate()
    similarity = [o for o in objectives if o.kind == "similarity"]
    regularizers = [o for o in objectives if o.kind == "regularizer"]
    if len(similarity) != 1:
        raise ValueError(f"exactly one similarity objective is needed, got {len(similarity)}")
    similarity = similarity[0]
    weights = {o.name: float(o.weight) for o in objectives}

    device = fixed.device
    full_shape = tuple(fixed.shape[2:])
    ndim = len(full_shape)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    rule = make_combine_rule(config.combine, **_rule_options(config, generator))
    stopper = make_stopping_rule(config.early_stop, **config.early_stop_options)
    schedule = make_schedule(config.schedule, **config.schedule_options)
    reset_peak_memory(device)

    total_iterations = sum(config.iterations)
    bar = _progress_bar(total_iterations, config.progress)
    history: list[dict] = []
    level_stats: list[dict] = []
    model = None
    start = time.perf_counter()
    for level_index, (factor, iterations, spacing) in enumerate(
        zip(config.levels, config.iterations, config.spacings())
    ):
        level_start = time.perf_counter()
        shape = level_shape(full_shape, factor)
        param_shape = grid_shape(shape, spacing)
        if model is None and model_factory is not None:
            model = model_factory(param_shape)
        elif model is None:
            model = make_dense_model(
                config.diffeomorphic, param_shape, init=init, device=device,
                steps=config.integration_steps, smoothing=config.smoothing,
            )
        else:
            model.resample(param_shape)
        fixed_level = resize_image(fixed, shape)
        moving_level = resize_image(moving, shape)
        fixed_features = similarity.function.features(fixed_level)
        moving_features = similarity.function.features(moving_level)
        fixed_mask_level = None if fixed_mask is None else resize_image(fixed_mask, shape, antialias=False)
        moving_mask_level = None if moving_mask is None else resize_image(moving_mask, shape, antialias=False)
        identity = identity_grid(shape, device=device).unsqueeze(0)
        optimizer = make_optimizer(config.optimizer, [model.param], config.lr / spacing)
        if stopper is not None:
            stopper.start_level()
        ran = 0  # iterations run at this level (fewer than ``iterations`` after an early stop)
        loop_start = time.perf_counter()

        for iteration in range(iterations):
            lr = config.lr * schedule(iteration, iterations)
            for group in optimizer.param_groups:
                group["lr"] = lr / spacing
            coords = identity + model.displacement(shape)
            warped_features = sample(moving_features, coords)
            mask = _combined_mask(fixed_mask_level, moving_mask_level, coords)
            losses = {similarity.name: similarity.function(fixed_features, warped_features, mask)}
            regularised = model.regularised()
            for reg in regularizers:
                losses[reg.name] = reg.function(regularised)
            diagnostics = rule.backward(losses, weights, [model.param])
            values = {name: float(loss.detach()) for name, loss in losses.items()}
            total = sum(weights[name] * value for name, value in values.items())
            bad = [name for name, value in values.items() if not math.isfinite(value)]
            if bad:
                bar.close()
                raise DirioError(
                    f"the {bad[0]} loss became {values[bad[0]]} at level {level_index} iteration {iteration}; "
                    "lower the learning rate or check the inputs for constant or empty images"
                )
            optimizer.step()
            history.append(
                {"level": level_index, "iteration": iteration, "lr": lr, "loss": total, **values, **diagnostics}
            )
            bar.update(1)
            bar.set_postfix_str(f"level {level_index} loss {total:.4f}", refresh=False)
            ran = iteration + 1
            if stopper is not None and stopper.update(values[similarity.name]):
                bar.update(iterations - ran)
                break
        seconds = time.perf_counter() - level_start
        loop_seconds = time.perf_counter() - loop_start
        level_stats.append(
            {
                "level": level_index,
                "factor": factor,
                "shape": list(shape),
                "grid": list(param_shape),
                "iterations": iterations,
                "iterations_run": ran,
                "seconds": seconds,
                "setup_seconds": seconds - loop_seconds,
                "seconds_per_iteration": loop_seconds / ran if ran else 0.0,
            }
        )
    bar.close()
    with torch.no_grad():
        disp = model.displacement(full_shape).detach()
    return EngineResult(
        displacement=disp,
        history=history,
        levels=level_stats,
        peak_memory_mb=peak_memory_mb(device),
        seconds=time.perf_counter() - start,
    )


def _rule_options(config: EngineConfig, generator: torch.Generator) -> dict:
    """Options of the combination rule, with the run's seeded generator for rules that draw."""
    options = dict(config.combine_options)
    if config.combine != "sum":
        options.setdefault("generator", generator)
    return options


class _NoBar:
    def update(self, n):
        pass

    def set_postfix_str(self, s, refresh=True):
        pass

    def close(self):
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="registering", unit="it", leave=False, dynamic_ncols=True)
