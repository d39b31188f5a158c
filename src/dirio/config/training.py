"""The options of ``dirio train``: one list (:data:`TRAIN_OPTIONS`) of :class:`~dirio.config.schema.Option`,
the same pattern as the registration options of :mod:`dirio.config.schema`.

The command line (:mod:`dirio.apps.cli`) builds its flags from this list; :func:`train_values`
parses ``{key: text or native value}`` into the values :mod:`dirio.apps.train` consumes, defaults
filled in. The image and label file lists are positional / multi-valued arguments of the command
line and are not part of this list.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from dirio.config.schema import (
    Option,
    OptionError,
    integer,
    key_values,
    label_ids,
    number,
    regularizer_weights,
    switch,
    text,
)

DATA = "training data"
NETWORK = "network"
OBJECTIVE = "objective"
TRAINING = "training"


def network_options(value: Any) -> dict:
    """``"encoder_channels=8/16/16,field=velocity"`` or a table -> settings of the architecture;
    ``a/b/c`` is a list (of numbers when they parse)."""
    options = key_values(value)
    for key, item in options.items():
        if isinstance(item, str) and "/" in item:
            parts = [p for p in item.split("/") if p]
            try:
                options[key] = [int(p) for p in parts]
            except ValueError:
                options[key] = parts
    return options


def augment_options(value: Any) -> dict:
    """``"none"`` (no augmentation) or ``K=V,...`` of :class:`dirio.methods.training_data.Augmentation`."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return {"none": True}
    return key_values(value)


TRAIN_OPTIONS: tuple[Option, ...] = (
    # data
    Option("ndim", integer, "spatial dimensions of the images", DATA, choices=(2, 3), default=3),
    Option("normalise", text, "intensity normalisation to [0, 1] of every image", DATA,
           choices=("none", "minmax", "percentile"), default="percentile"),
    Option("pairs", text, "random: two different images; atlas: the atlas is fixed; self: two augmentations "
           "of one image (a synthetic deformation)", DATA, choices=("random", "atlas", "self"), default="random"),
    Option("atlas", text, "fixed image of --pairs atlas", DATA, metavar="FILE"),
    Option("atlas_labels", text, "label map of the atlas", DATA, metavar="FILE"),
    Option("val_count", integer, "without --val-images: hold out the last N images for validation", DATA,
           default=0, metavar="N"),
    Option("val_pairs", integer, "validation pairs drawn once (seeded) from the validation images", DATA,
           default=16, metavar="N"),
    Option("augment", augment_options, "none, or rotation=10,scale=0.1,shear=0,translation=0.05,elastic=0,"
           "elastic_spacing=8,intensity=0.1,gamma=0.2,noise=0.01 (the defaults; documentation: Training)", DATA, metavar="K=V,..."),
    Option("label_ids", label_ids, "labels of Dice supervision and validation (default: all present)", DATA),
    # network
    Option("architecture", text, "network architecture (dirio.transforms.networks.NETWORKS)", NETWORK,
           default="unet"),
    Option("network_options", network_options, "constructor settings, lists as a/b/c, e.g. "
           "encoder_channels=16/32/32,decoder_channels=32/32/32,final_channels=16", NETWORK, metavar="K=V,..."),
    # objective
    Option("similarity", text, None, OBJECTIVE, choices=("lncc", "ncc", "mind", "mse", "nmi"), default="lncc"),
    Option("similarity_options", key_values, "e.g. window=9 (LNCC) or radius=1,dilation=2 (MIND)", OBJECTIVE,
           metavar="K=V,..."),
    Option("regularizer", regularizer_weights, "diffusion, l1, tv, bending or folding, each with a weight (default diffusion=1)",
           OBJECTIVE, metavar="NAME[=W],..."),
    Option("supervision", number, "weight of the soft Dice loss of the label maps (0: none; needs labels)",
           OBJECTIVE, default=0.0, metavar="W"),
    Option("combine", text, "how the gradients of the terms are combined", OBJECTIVE,
           choices=("sum", "pcgrad", "surgery"), default="sum"),
    Option("combine_options", key_values, "e.g. scope=tensor (surgery's default), project=random (pcgrad)",
           OBJECTIVE, metavar="K=V,..."),
    # training
    Option("epochs", integer, None, TRAINING, default=10, metavar="N"),
    Option("steps_per_epoch", integer, None, TRAINING, default=100, metavar="N"),
    Option("batch_size", integer, "pairs per step over all processes (a multiple of the process count)", TRAINING,
           default=1, metavar="N"),
    Option("lr", number, None, TRAINING, default=1e-4),
    Option("optimizer", text, None, TRAINING, choices=("adam", "amsgrad", "sgd"), default="adam"),
    Option("optimizer_options", key_values, "e.g. weight_decay=1e-5", TRAINING, metavar="K=V,..."),
    Option("schedule", text, None, TRAINING, choices=("constant", "cosine", "piecewise"), default="constant"),
    Option("schedule_options", key_values, "e.g. final=0.1 (cosine)", TRAINING, metavar="K=V,..."),
    Option("schedule_unit", text, "the schedule runs over epochs or over steps", TRAINING,
           choices=("epoch", "step"), default="epoch"),
    Option("seed", integer, None, TRAINING, default=0),
    Option("amp", text, "mixed precision: auto = bf16 (else fp16 with loss scaling) on CUDA, off on the CPU",
           TRAINING, choices=("auto", "off", "bf16", "fp16"), default="auto"),
    Option("device", text, "auto (CUDA when present), cpu, cuda, cuda:N", TRAINING, default="auto"),
    Option("threads", integer, "CPU threads per process (torch.set_num_threads)", TRAINING, metavar="N"),
    Option("resume", switch, "continue the run in the output folder from checkpoint_last.pt", TRAINING,
           default=False),
)
TRAIN_OPTIONS_BY_KEY = {option.key: option for option in TRAIN_OPTIONS}


def train_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Parsed values of every train option, defaults for those not given (``None`` counts as not given).

    Raises:
        OptionError: an unknown key or a refused value, naming the key.
    """
    parsed = {}
    for key, value in values.items():
        if key not in TRAIN_OPTIONS_BY_KEY:
            raise OptionError(key, f"unknown option; choose from {', '.join(sorted(TRAIN_OPTIONS_BY_KEY))}")
        if value is not None:
            parsed[key] = TRAIN_OPTIONS_BY_KEY[key].convert(value)
    for option in TRAIN_OPTIONS:
        parsed.setdefault(option.key, option.default)
    for key in ("epochs", "steps_per_epoch", "batch_size", "val_pairs"):
        if parsed[key] < 1:
            raise OptionError(key, f"must be at least 1, got {parsed[key]}")
    if parsed["val_count"] < 0:
        raise OptionError("val_count", f"must be >= 0, got {parsed['val_count']}")
    if parsed["threads"] is not None and parsed["threads"] < 1:
        raise OptionError("threads", f"must be at least 1, got {parsed['threads']}")
    from dirio.config.settings import MAX_LR  # registration's bound; torch only when values are parsed

    if not 0 < parsed["lr"] < math.inf:
        raise OptionError("lr", f"must be positive and finite, got {parsed['lr']:g}")
    if parsed["optimizer"] in ("adam", "amsgrad") and parsed["lr"] > MAX_LR:
        raise OptionError("lr", f"{parsed['lr']:g} is absurd: with {parsed['optimizer']} every weight moves by about "
                                f"that much per step, and at most {MAX_LR:g} is accepted (the default is 1e-4)")
    return parsed
