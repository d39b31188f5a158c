"""Training a registration network: epochs of the shared :class:`~dirio.optim.step.Step` over a pair sampler.

The loop (:func:`fit`) is the engine's, not an application's: it takes a network transform, the
terms, a sampler of training batches and a validation function, and writes checkpoints and the
loss history into a folder. Whatever reads images, augments them or scores validation pairs lives
above it (:mod:`dirio.methods.training_data`, :mod:`dirio.apps.train`).

What one step does: the epoch's generator (seeded by ``(seed, epoch)``) draws the *global* batch,
identical on every process; each process takes its contiguous share (``batch_size / world``
pairs); the step evaluates the terms on that share, the combination rule writes each objective's
gradient **averaged across processes** (``Step(reduce=average_gradients)``) and the optimiser steps.
Mean losses over equal shares make the averaged gradient the gradient over the whole batch, so N
processes take the steps of one process with the whole batch, for every rule.
``DistributedDataParallel`` is *not* used: the rules take one gradient per objective with
``torch.autograd.grad``, which never fires DDP's backward hooks, and pcgrad / surgery must
project the global gradients, not each rank's (see :mod:`dirio.core.distributed`). Initial
weights are broadcast from rank 0; only rank 0 validates and writes files.

Determinism and resuming: the batches of an epoch depend only on ``(seed, epoch)``; the
checkpoint holds the weights, the optimiser state, the gradient scaler, the combination rule's
generator, the torch RNG states, the epoch and the history. Resuming from the checkpoint of epoch
``e`` therefore continues with bit-for-bit the same losses as an uninterrupted run (same thread
count and device; float reductions are not reordered).

Mixed precision (``amp``): on CUDA the network's forward runs under ``torch.autocast`` (bf16 when
the GPU supports it, else fp16 with a :class:`torch.amp.GradScaler`); its field is cast back to
float32 before the terms, so similarities and regularizers are computed in float32. On the CPU it
is off unless asked for explicitly.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from dirio.core import distributed
from dirio.core.context import LevelContext, RegularizedField
from dirio.errors import DirioError
from dirio.io.atomic import write_text
from dirio.io.checkpoints import save_checkpoint
from dirio.losses.terms import Term
from dirio.optim.adam import Adam
from dirio.optim.combine import make_combine_rule
from dirio.optim.optimizers import make_optimizer
from dirio.optim.schedules import make_schedule
from dirio.optim.step import LossLog, Step
from dirio.transforms.network import NetworkTransform

AMP_CHOICES = ("auto", "off", "bf16", "fp16")
SCHEDULE_UNITS = ("epoch", "step")
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
HISTORY, EPOCHS = "history.csv", "epochs.csv"
# Seeds of the per-epoch generators: (seed * _EPOCH_STRIDE + epoch), far apart for nearby seeds.
_EPOCH_STRIDE = 1_000_003


@dataclass
class TrainConfig:
    """The settings of a training run (everything but the network, the terms and the data).

    Attributes:
        epochs: number of epochs.
        steps_per_epoch: optimiser steps per epoch.
        batch_size: pairs per step over all processes (a multiple of the process count).
        lr: base learning rate.
        optimizer, optimizer_options: a name of :mod:`dirio.optim.optimizers` and its options.
        schedule, schedule_options: a schedule of :mod:`dirio.optim.schedules`.
        schedule_unit: ``"epoch"`` (the factor changes once per epoch) or ``"step"``.
        combine, combine_options: a combination rule of :mod:`dirio.optim.combine`.
        seed: seeds the batches, the augmentation and the rule's random draws.
        amp: ``"auto"`` (bf16/fp16 on CUDA, off on the CPU), ``"off"``, ``"bf16"``, ``"fp16"``.
        monitor: the validation metric choosing ``checkpoint_best.pt``; ``monitor_mode`` ``"max"``
            (e.g. Dice) or ``"min"`` (a loss).
    """

    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 1
    lr: float = 1e-4
    optimizer: str = "adam"
    optimizer_options: dict = field(default_factory=dict)
    schedule: str = "constant"
    schedule_options: dict = field(default_factory=dict)
    schedule_unit: str = "epoch"
    combine: str = "sum"
    combine_options: dict = field(default_factory=dict)
    seed: int = 0
    amp: str = "auto"
    monitor: str = "dice"
    monitor_mode: str = "max"

    def validate(self) -> None:
        """Raise :class:`DirioError` naming the first refused value (as `key`)."""
        for key in ("epochs", "steps_per_epoch", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise DirioError(f"`{key}` must be at least 1, got {getattr(self, key)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise DirioError(f"`lr` must be a positive number, got {self.lr}")
        if self.amp not in AMP_CHOICES:
            raise DirioError(f"`amp` must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if self.schedule_unit not in SCHEDULE_UNITS:
            raise DirioError(f"`schedule_unit` must be epoch or step, got {self.schedule_unit!r}")
        if self.monitor_mode not in ("max", "min"):
            raise DirioError(f"`monitor_mode` must be max or min, got {self.monitor_mode!r}")
        try:
            make_schedule(self.schedule, **self.schedule_options)
            make_combine_rule(self.combine, **self.combine_options)
        except ValueError as error:
            raise DirioError(str(error)) from None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    """A batch of pairs: ``(B, C, *S)`` images and per-pair extras (``(B, ...)`` tensors, e.g. one-hot labels)."""

    fixed: torch.Tensor
    moving: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def shard(self, rank: int, world: int) -> "Batch":
        """The contiguous ``rank``-th of ``world`` equal parts along the batch axis."""
        if world == 1:
            return self
        size = self.fixed.shape[0] // world
        part = slice(rank * size, (rank + 1) * size)
        return Batch(self.fixed[part], self.moving[part], {k: v[part] for k, v in self.extra.items()})

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.fixed.to(device), self.moving.to(device), {k: v.to(device) for k, v in self.extra.items()})


class PairSampler(Protocol):
    """Draws training batches: ``sample(generator, batch_size) -> Batch`` on the CPU.

    Every random choice must come from ``generator`` (a seeded CPU ``torch.Generator``), so that a
    batch is a function of the generator's state alone (resuming and several processes rely on it).
    """

    def sample(self, generator: torch.Generator, batch_size: int) -> Batch: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's batches, seeded by ``(seed, epoch)`` only."""
    return torch.Generator().manual_seed(int(seed) * _EPOCH_STRIDE + int(epoch))


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (``None``: full precision)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


class _Autocast(torch.nn.Module):
    """A network transform whose forward pass runs under ``torch.autocast``; the field comes out float32."""

    def __init__(self, transform: NetworkTransform, dtype: torch.dtype):
        super().__init__()
        self.inner = transform
        self.dtype = dtype

    def parameter_groups(self):
        return self.inner.parameter_groups()

    def spatial_parameters(self):
        return self.inner.spatial_parameters()

    def field(self, ctx: LevelContext) -> torch.Tensor:
        with torch.autocast(ctx.device.type, dtype=self.dtype):
            out = self.inner.field(ctx)
        return out.float()

    def regularized(self, ctx: LevelContext, field: torch.Tensor) -> RegularizedField:
        return self.inner.regularized(ctx, field)


class _ScaledTerm:
    """A term function multiplied by the gradient scaler's current scale (fp16 training).

    Every objective is scaled by the same factor, so the rules' projections (ratios of inner
    products) and sums are unchanged; the optimiser sees the unscaled gradient."""

    def __init__(self, function, scaler: torch.amp.GradScaler):
        self.function = function
        self.scaler = scaler

    def prepare(self, ctx, name):
        prepare = getattr(self.function, "prepare", None)
        if prepare is not None:
            prepare(ctx, name)

    def __call__(self, evaluation, name):
        return self.function(evaluation, name) * self.scaler.get_scale()


class _ScaledOptimizer:
    """``step()`` through the gradient scaler (unscale, skip on inf/NaN, update the scale)."""

    def __init__(self, optimizer: Adam | torch.optim.Optimizer, scaler: torch.amp.GradScaler):
        self.optimizer = optimizer
        self.scaler = scaler

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()


@dataclass
class TrainResult:
    """What :func:`fit` returns: per-step rows, per-epoch rows, the best monitored value and its epoch."""

    history: list[dict]
    epochs: list[dict]
    best_value: float | None
    best_epoch: int | None
    seconds: float


def _plain_optimizer_state(state: Mapping[str, Any]) -> dict:
    """``optimizer.state_dict()`` with string keys (``weights_only`` files and dirio's plain checks)."""
    return {"state": {str(k): v for k, v in state["state"].items()}, "param_groups": state["param_groups"]}


def _optimizer_state(plain: Mapping[str, Any]) -> dict:
    return {"state": {int(k): v for k, v in plain["state"].items()}, "param_groups": plain["param_groups"]}


def rng_states(rule) -> dict:
    """Every state a resumed run needs besides weights and optimiser: torch's CPU (and CUDA) generators,
    the rule's generator and its running conflict count (``conflict_rate`` of the log)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    generator = getattr(rule, "generator", None)
    if generator is not None:
        states["rule"] = generator.get_state()
    log = getattr(rule, "_log", None)  # the running conflict rate of the diagnostics
    if log is not None:
        states["conflicts"] = [int(log.steps), float(log.conflicts)]
    return states


def set_rng_states(states: Mapping[str, Any], rule) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))
    generator = getattr(rule, "generator", None)
    if generator is not None and "rule" in states:
        generator.set_state(states["rule"])
    log = getattr(rule, "_log", None)
    if log is not None and "conflicts" in states:
        log.steps, log.conflicts = int(states["conflicts"][0]), float(states["conflicts"][1])


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue(), overwrite=True)


def fit(
    transform: NetworkTransform,
    terms: Sequence[Term],
    sampler: PairSampler,
    config: TrainConfig,
    output: str | Path | None = None,
    *,
    validate: Callable[[NetworkTransform], dict[str, float]] | None = None,
    device: str | torch.device = "cpu",
    metadata: Mapping[str, Any] | None = None,
    resume: Mapping[str, Any] | None = None,
    on_epoch: Callable[[list[dict], list[dict]], None] | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train ``transform``'s network; return the history (module docstring for the loop).

    Args:
        transform: a :class:`NetworkTransform` (its network has ``architecture`` and ``settings``).
        terms: the objectives (similarity, regularizers, supervision), weights included.
        sampler: draws training batches (:class:`PairSampler`).
        config: the run's :class:`TrainConfig`.
        output: folder for ``checkpoint_last.pt`` (every epoch), ``checkpoint_best.pt`` (best
            ``config.monitor``), ``history.csv`` (one row per step) and ``epochs.csv`` (one row
            per epoch); ``None`` writes nothing. Only rank 0 writes.
        validate: ``validate(transform) -> {metric: value}`` after every epoch, on rank 0, with
            the network in eval mode and no gradient; ``None``: the epoch's mean training loss is
            the monitor (``"loss"``, minimised).
        device: where the network and the batches go.
        metadata: plain values stored in each checkpoint's ``extra["training"]["metadata"]``
            (the application's configuration: data, terms, augmentation).
        resume: the ``extra["training"]`` of a checkpoint written by this function, with its
            weights already loaded into ``transform``; training continues after its epoch.
        on_epoch: ``on_epoch(history, epochs)`` after each epoch (and its files), on rank 0, e.g. a figure.
        progress: a tqdm bar per epoch (rank 0).
    Raises:
        DirioError: a non-finite loss, naming the term, epoch and step (on the CPU before the step
            that would spread it; on CUDA, where losses are read once per epoch, at the epoch's
            end), or an invalid config.
    """
    config.validate()
    device = torch.device(device)
    rank, world = distributed.rank(), distributed.world_size()
    if config.batch_size % world:
        raise DirioError(f"`batch_size` {config.batch_size} is not a multiple of the {world} processes")
    output = Path(output) if output is not None else None
    writes = output is not None and rank == 0

    transform.to(device)
    distributed.broadcast_parameters(transform)
    rule = make_combine_rule(config.combine, generator=torch.Generator().manual_seed(config.seed),
                             **config.combine_options)
    dtype = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 else None
    if scaler is not None:
        terms = [Term(t.name, t.role, _ScaledTerm(t.function, scaler), t.weight) for t in terms]
    step = Step(terms, rule, reduce=distributed.average_gradients)
    engine = _Autocast(transform, dtype) if dtype is not None else transform
    groups = transform.parameter_groups()
    for group in groups:
        group["lr"] = config.lr / group.get("lr_divisor", 1.0)
    optimizer = make_optimizer(config.optimizer, groups, config.lr, **config.optimizer_options)
    stepper = _ScaledOptimizer(optimizer, scaler) if scaler is not None else optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    schedule = make_schedule(config.schedule, **config.schedule_options)

    history: list[dict] = []
    epochs: list[dict] = []
    best_value, best_epoch, start_epoch = None, None, 0
    if resume is not None:
        optimizer.load_state_dict(_optimizer_state(resume["optimizer"]))
        if scaler is not None and resume.get("scaler"):
            scaler.load_state_dict(resume["scaler"])
        set_rng_states(resume["rng"], rule)
        history, epochs = list(resume["history"]), list(resume["epochs"])
        best_value, best_epoch = resume.get("best_value"), resume.get("best_epoch")
        start_epoch = int(resume["epoch"]) + 1

    log = LossLog(step, lambda meta: f"epoch {meta['epoch']} step {meta['step']}")
    started = time.perf_counter()
    total_steps = config.epochs * config.steps_per_epoch
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        generator = epoch_generator(config.seed, epoch)
        transform.train()
        bar = _progress(progress and rank == 0, config.steps_per_epoch, epoch, config.epochs)
        for index in range(config.steps_per_epoch):
            global_step = epoch * config.steps_per_epoch + index
            factor = schedule(epoch, config.epochs) if config.schedule_unit == "epoch" else \
                schedule(global_step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = config.lr * factor / group.get("lr_divisor", 1.0)
            batch = sampler.sample(generator, config.batch_size).shard(rank, world).to(device)
            shape = tuple(batch.fixed.shape[2:])
            ctx = LevelContext(level=0, shape=shape, full_shape=shape, fixed=batch.fixed, moving=batch.moving,
                               extra=dict(batch.extra))
            step.prepare(ctx)
            meta = {"epoch": epoch, "step": global_step, "lr": config.lr * factor}
            losses, diagnostics = step(engine, ctx, stepper, params,
                                       check=lambda values, meta=meta: log.check_finite(meta, values)
                                       if device.type == "cpu" else None)
            if scaler is not None:
                losses = {k: v / scaler.get_scale() for k, v in losses.items()}
            log.add(meta, losses, diagnostics)
            if bar is not None:
                bar.update(1)
        rows = log.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}")
            bar.close()
        history.extend(rows)
        train_seconds = time.perf_counter() - epoch_start
        summary = {"epoch": epoch, "steps": config.steps_per_epoch, "lr": rows[-1]["lr"],
                   **{k: sum(r[k] for r in rows) / len(rows) for k in ["loss", *step.weights]},
                   "seconds": train_seconds,
                   "pairs_per_second": config.steps_per_epoch * config.batch_size / train_seconds}
        if rank == 0:
            metrics = _validated(transform, validate) if validate is not None else {}
            summary.update({f"val_{k}": v for k, v in metrics.items()})
            value = metrics.get(config.monitor) if validate is not None else summary["loss"]
            improved = value is not None and math.isfinite(value) and (
                best_value is None or (value > best_value if config.monitor_mode == "max" else value < best_value))
            if improved:
                best_value, best_epoch = float(value), epoch
            epochs.append(summary)
            if writes:
                state = {
                    "config": config.to_dict(), "metadata": dict(metadata or {}), "epoch": epoch,
                    "global_step": (epoch + 1) * config.steps_per_epoch,
                    "optimizer": _plain_optimizer_state(optimizer.state_dict()),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "rng": rng_states(rule), "history": history, "epochs": epochs,
                    "best_value": best_value, "best_epoch": best_epoch, "world_size": world,
                }
                output.mkdir(parents=True, exist_ok=True)
                _write_csv(output / HISTORY, history)
                _write_csv(output / EPOCHS, epochs)
                if improved:
                    save_checkpoint(output / BEST, transform.network, extra={"training": state}, overwrite=True)
                save_checkpoint(output / LAST, transform.network, extra={"training": state}, overwrite=True)
            if on_epoch is not None:
                on_epoch(history, epochs)
        else:
            epochs.append(summary)
        if distributed.is_distributed():
            torch.distributed.barrier()
    transform.eval()
    return TrainResult(history, epochs, best_value, best_epoch, time.perf_counter() - started)


def _validated(transform: NetworkTransform, validate) -> dict[str, float]:
    transform.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in validate(transform).items()}
    finally:
        transform.train()


def _progress(enabled: bool, total: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=epoch_label(epoch, epochs), leave=False, dynamic_ncols=True)


def epoch_label(epoch: int, epochs: int) -> str:
    """``"epoch 3 of 0-9"``: epochs are counted from 0 everywhere (terminal, ``epochs.csv``,
    ``history.csv``, ``train.json``'s ``best_epoch``, checkpoints)."""
    return f"epoch {int(epoch)} of 0-{int(epochs) - 1}"


def resume_state(checkpoint: Mapping[str, Any]) -> dict:
    """The training state (``extra["training"]``) of a checkpoint read by :func:`dirio.io.checkpoints.load_checkpoint`.

    Raises:
        DirioError: a network checkpoint written by something else than :func:`fit`.
    """
    state = checkpoint.get("extra", {}).get("training")
    needed = ("config", "epoch", "optimizer", "rng", "history", "epochs")
    if not isinstance(state, Mapping) or any(k not in state for k in needed):
        raise DirioError("the checkpoint holds network weights but no training state; it cannot be resumed")
    return dict(state)

