"""``dirio train``: train a registration network on image files (a thin layer over :func:`dirio.optim.trainer.fit`).

Files in, a run folder out: ``checkpoint_last.pt`` (every epoch), ``checkpoint_best.pt`` (best
validation Dice, else lowest validation similarity loss), ``history.csv`` (one row per step),
``epochs.csv`` (one row per epoch, validation included), ``train.json`` (the configuration, then the
results) and ``loss_curves.png``. Under ``torchrun`` every process takes its share of each batch
(gloo on the CPU, NCCL on CUDA) and rank 0 writes.

Checkpoints are dirio network checkpoints (:mod:`dirio.io.checkpoints`): architecture and
settings name the network, ``extra["training"]`` holds the training configuration, the options of
this command (``metadata``), the optimiser state, the epoch, the RNG states and the history, so
``--resume`` continues bit for bit and ``dirio register``-side code can build the network from the
file alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from dirio.api import resolve_device
from dirio.config.training import train_values
from dirio.core import distributed
from dirio.core.context import LevelContext
from dirio.core.fields import field_to_numpy
from dirio.errors import DirioError
from dirio.evaluation.jacobian import (
    fraction_nonpositive_from_determinant,
    jacobian_determinant_l2r,
    sdlogj_l2r_from_determinant,
)
from dirio.evaluation.overlap import dice_per_label, mean_dice, warp_labels
from dirio.io.atomic import check_output_folder, check_writable, write_json
from dirio.io.checkpoints import load_checkpoint, load_state_dict_checked
from dirio.losses.regularizers import make_regularizer
from dirio.losses.similarity import make_similarity
from dirio.losses.terms import DiceSupervision, Evaluation, RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.training_data import (
    NO_AUGMENTATION,
    Augmentation,
    ImagePairSampler,
    fixed_pairs,
    image_sources,
    label_ids_of,
    load_training_images,
)
from dirio.optim.trainer import BEST, LAST, Batch, TrainConfig, TrainResult, epoch_label, fit, resume_state
from dirio.transforms.network import NetworkTransform
from dirio.transforms.networks.registry import NETWORKS

# Seconds between two drawings of loss_curves.png during training (it is always drawn after the last epoch).
FIGURE_INTERVAL = 60.0
# The options that must be the same for a run and the run it resumes (besides the architecture).
_SAME_ON_RESUME = ("ndim", "normalise", "pairs", "augment", "label_ids", "similarity", "similarity_options",
                   "regularizer", "supervision", "combine", "combine_options", "steps_per_epoch", "batch_size",
                   "lr", "optimizer", "optimizer_options", "schedule", "schedule_options", "schedule_unit", "seed")


def build_network(values: Mapping[str, Any]) -> torch.nn.Module:
    """The network of ``architecture`` with ``network_options`` (a U-Net gets ``ndim`` unless given)."""
    name = values["architecture"]
    if name not in NETWORKS:
        raise DirioError(f"unknown network `architecture` {name!r}; choose one of {', '.join(NETWORKS.names())}")
    settings = dict(values.get("network_options") or {})
    if name == "unet":
        settings.setdefault("ndim", values["ndim"])
    try:
        return NETWORKS.create(name, **settings)
    except (TypeError, ValueError) as error:
        raise DirioError(f"cannot build the {name} network from `network_options` {settings}: {error}") from None


def build_terms(values: Mapping[str, Any]) -> list[Term]:
    """Similarity, regularizers (default diffusion, weight 1) and optional Dice supervision."""
    try:
        similarity = make_similarity(values["similarity"], **(values.get("similarity_options") or {}))
        terms = [Term(values["similarity"], Role.SIMILARITY, SimilarityTerm(similarity), 1.0)]
        regularizers = values.get("regularizer") or {"diffusion": 1.0}
        for name, weight in regularizers.items():
            terms.append(Term(name, Role.REGULARIZER, RegularizerTerm(make_regularizer(name)),
                              1.0 if weight is None else weight))
    except ValueError as error:
        raise DirioError(str(error)) from None
    if values.get("supervision"):
        terms.append(Term("dice", Role.SUPERVISION, DiceSupervision(), values["supervision"]))
    return terms


def augmentation_of(values: Mapping[str, Any]) -> Augmentation:
    options = values.get("augment") or {}
    if options.get("none"):
        return NO_AUGMENTATION
    try:
        return Augmentation(**options)
    except (TypeError, ValueError) as error:
        raise DirioError(f"`augment`: {error}") from None


def validator(pairs: Sequence[Batch], terms: Sequence[Term], label_ids: Sequence[int] | None,
              device: torch.device) -> Callable[[NetworkTransform], dict[str, float]]:
    """``validate(transform)``: means over ``pairs`` of the similarity loss, Dice (with label maps),
    % det <= 0 and SDlogJ of the predicted fields (Learn2Reg definitions, :mod:`dirio.evaluation`)."""
    similarity = terms[0]

    def validate(transform: NetworkTransform) -> dict[str, float]:
        scores: dict[str, list[float]] = {"similarity": [], "folding_percent": [], "sdlogj": []}
        for pair in pairs:
            batch = pair.to(device)
            shape = tuple(batch.fixed.shape[2:])
            ctx = LevelContext(0, shape, shape, batch.fixed, batch.moving)
            similarity.prepare(ctx)
            field = transform.field(ctx).float()
            scores["similarity"].append(float(similarity.function(Evaluation(ctx, field, transform), similarity.name)))
            disp = field_to_numpy(field[:1])
            det = jacobian_determinant_l2r(disp)
            scores["folding_percent"].append(100.0 * fraction_nonpositive_from_determinant(det))
            scores["sdlogj"].append(sdlogj_l2r_from_determinant(det, None, disp.shape[:-1]))
            if "fixed_label_map" in pair.extra:
                fixed = pair.extra["fixed_label_map"][0, 0].numpy()
                moving = pair.extra["moving_label_map"][0, 0].numpy()
                warped = warp_labels(moving, disp)
                scores.setdefault("dice", []).append(
                    mean_dice(dice_per_label(fixed, warped, label_ids, moving_labels=moving)))
        return {name: float(np.nanmean(v)) for name, v in scores.items() if v}

    return validate


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _check_resumable(checkpoint: Mapping[str, Any], network: torch.nn.Module, values: Mapping[str, Any],
                     path: Path) -> dict:
    """The checkpoint's training state, after checking that it belongs to this configuration."""
    settings = {k: _plain(v) for k, v in network.settings.items()}
    found = {k: _plain(v) for k, v in checkpoint["settings"].items()}
    if checkpoint["architecture"] != network.architecture or found != settings:
        raise DirioError(
            f"{path}: holds a {checkpoint['architecture']} network ({_settings_text(found)}), this run trains "
            f"{network.architecture} ({_settings_text(settings)}); use the same `architecture` and `network_options`, "
            "or another output folder"
        )
    state = resume_state(checkpoint)
    before = state.get("metadata", {}).get("options", {})
    changed = [k for k in _SAME_ON_RESUME if _plain(before.get(k)) != _plain(values.get(k))]
    if changed:
        raise DirioError(f"{path}: was trained with other options ({', '.join(f'`{k}`' for k in changed)}); "
                         "resume with the same options, or use another output folder")
    return state


def _settings_text(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def _init_distributed(device_name: str) -> tuple[torch.device, bool]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; the rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    if world > 1 and device_name in ("auto", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = resolve_device(device_name)
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    return device, started


def _loss_curve(path: Path, history: list[dict], epochs: list[dict]) -> None:
    from dirio.viz.figures import loss_curve_figure

    rows = [{"level": r["epoch"], "iteration": r["step"], **{k: v for k, v in r.items()
                                                              if k not in ("epoch", "step")}} for r in history]
    ends = {e["epoch"]: e for e in epochs}
    for i, row in enumerate(rows):  # validation values on each epoch's last step (NaN elsewhere)
        if i + 1 == len(rows) or rows[i + 1]["level"] != row["level"]:
            row.update({k: v for k, v in ends.get(row["level"], {}).items() if k.startswith("val_")})
    loss_curve_figure(path, rows, overwrite=True)


def train_files(
    images: Sequence[str],
    output: str | Path,
    options: Mapping[str, Any] | None = None,
    *,
    labels: Sequence[str] | None = None,
    val_images: Sequence[str] | None = None,
    val_labels: Sequence[str] | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Train a network on image files and write the run folder (module docstring).

    Args:
        images: files, globs or one Learn2Reg dataset JSON (:func:`dirio.methods.training_data.image_sources`).
        output: the run folder.
        options: values of :data:`dirio.config.training.TRAIN_OPTIONS` by key (text or native).
        labels: label maps of ``images`` (files or globs, same order), for supervision and validation.
        val_images, val_labels: validation images (else ``val_count`` images held out from the end).
        overwrite: start again in a folder that holds a run.
        quiet: no progress bar.
        log: receives one line per epoch (rank 0).
    Returns:
        The ``train.json`` record.
    Raises:
        DirioError: any user error, one line, before training starts.
    """
    values = train_values(options or {})
    output = Path(output)
    device, started = _init_distributed(values["device"])
    try:
        return _train(images, output, values, labels, val_images, val_labels, overwrite, quiet, log, device)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _train(images, output, values, labels, val_images, val_labels, overwrite, quiet, log, device) -> dict:
    rank = distributed.rank()
    if values["threads"] is not None:
        torch.set_num_threads(values["threads"])
    # first, before anything looks into it: a folder that cannot be made (/proc/x, a name too long) is one
    # line; rank 0 probes it by writing (the others only check the names, so that they do not race)
    check_output_folder(output, probe=rank == 0)
    last = output / LAST
    if last.exists() and not values["resume"] and not overwrite:
        raise DirioError(f"{output} already holds a training run ({LAST}); pass `resume` to continue it or "
                         "`overwrite` to start again")
    if rank == 0:
        check_writable([output / "train.json"], overwrite=True)
    ndim = values["ndim"]
    train_set = load_training_images(image_sources(images, labels), ndim=ndim, normalise=values["normalise"])
    if val_images:
        val_set = load_training_images(image_sources(val_images, val_labels), ndim=ndim, normalise=values["normalise"])
    elif values["val_count"]:
        if values["val_count"] >= len(train_set):
            raise DirioError(f"`val_count` {values['val_count']} leaves no training image of {len(train_set)}")
        train_set, val_set = train_set[:-values["val_count"]], train_set[-values["val_count"]:]
    else:
        val_set = []
    atlas = None
    if values["pairs"] == "atlas":
        if not values["atlas"]:
            raise DirioError("`pairs` atlas needs the `atlas` image")
        atlas = load_training_images([(values["atlas"], values["atlas_labels"])], ndim=ndim,
                                     normalise=values["normalise"])[0]
    labelled = [*train_set, *val_set, *([atlas] if atlas else [])]
    label_ids = values["label_ids"] or label_ids_of(labelled) or None
    supervision = bool(values["supervision"])
    augmentation = augmentation_of(values)
    sampler = ImagePairSampler(train_set, values["pairs"], atlas, augmentation, label_ids, supervision=supervision)
    torch.manual_seed(values["seed"])  # the network's initial weights (rank 0's are broadcast)
    network = build_network(values)
    terms = build_terms(values)
    validate, monitor, mode = None, "loss", "min"
    if val_set:
        with_labels = all(i.labels is not None for i in [*val_set, *([atlas] if atlas else [])])
        val_mode = values["pairs"] if (values["pairs"] != "random" or len(val_set) > 1) else "self"
        val_sampler = ImagePairSampler(val_set, val_mode, atlas, augmentation, label_ids, label_maps=with_labels)
        pairs = fixed_pairs(val_sampler, values["val_pairs"], values["seed"] + 1)
        validate = validator(pairs, terms, label_ids, device)
        monitor, mode = ("dice", "max") if with_labels else ("similarity", "min")
    config = TrainConfig(
        epochs=values["epochs"], steps_per_epoch=values["steps_per_epoch"], batch_size=values["batch_size"],
        lr=values["lr"], optimizer=values["optimizer"], optimizer_options=values["optimizer_options"] or {},
        schedule=values["schedule"], schedule_options=values["schedule_options"] or {},
        schedule_unit=values["schedule_unit"], combine=values["combine"],
        combine_options=values["combine_options"] or {}, seed=values["seed"], amp=values["amp"],
        monitor=monitor, monitor_mode=mode,
    )
    config.validate()
    options = {k: _plain(v) for k, v in values.items()}
    metadata = {"options": options, "train_images": [i.name for i in train_set],
                "val_images": [i.name for i in val_set], "label_ids": _plain(label_ids)}
    transform = NetworkTransform(network)
    resume = None
    if values["resume"] and last.exists():
        checkpoint = load_checkpoint(last)
        resume = _check_resumable(checkpoint, network, options, last)
        load_state_dict_checked(network, checkpoint["state_dict"], str(last), network.architecture)
    record = {"command": "dirio train", "options": options, "metadata": metadata, "config": config.to_dict(),
              "network": {"architecture": network.architecture, "settings": _plain(network.settings),
                          "parameters": sum(p.numel() for p in network.parameters())},
              "world_size": distributed.world_size(), "device": str(device), "torch": torch.__version__,
              "resumed_from_epoch": None if resume is None else int(resume["epoch"])}
    if rank == 0:
        write_json(output / "train.json", record, overwrite=True)

    drawn = [0.0]

    def on_epoch(history, epochs):
        # the figure costs about a second: drawn at most every FIGURE_INTERVAL seconds, and at the end
        if epochs[-1]["epoch"] + 1 == config.epochs or time.perf_counter() - drawn[0] > FIGURE_INTERVAL:
            _loss_curve(output / "loss_curves.png", history, epochs)
            drawn[0] = time.perf_counter()
        if log is not None:
            row = epochs[-1]
            shown = [f"loss {row['loss']:.4f}"] + [f"{k[4:]} {v:.4f}" for k, v in row.items() if k.startswith("val_")]
            log(f"{epoch_label(row['epoch'], config.epochs)}: " + ", ".join(shown) +
                f" ({row['seconds']:.1f} s, {row['pairs_per_second']:.1f} pairs/s)")

    started = time.perf_counter()
    result: TrainResult = fit(transform, terms, sampler, config, output, validate=validate, device=device,
                              metadata=metadata, resume=resume, on_epoch=on_epoch, progress=not quiet)
    record.update({"seconds": time.perf_counter() - started, "best_epoch": result.best_epoch,
                   "best_" + monitor: result.best_value, "epochs": result.epochs,
                   "outputs": {"last": str(output / LAST), "best": str(output / BEST)}})
    if rank == 0:
        write_json(output / "train.json", record, overwrite=True)
    return record
