"""Network stages: direct inference, instance optimisation of the weights, neural instance optimisation.

Three stages of the pipeline (:mod:`dirio.methods.stages`) use a pretrained registration network
(by default :func:`dirio.transforms.networks.default_brain_model`, LapIRN trained on OASIS):

* ``network``: direct inference, one forward pass.
* ``network-io``: instance optimisation of every weight on the pair (IO); with ``--combine
  pcgrad`` the gradient-projection variant IO-GP, with ``surgery`` the lambda-free variant.
  Defaults from the gradient-projection IO paper (``papers/gradient-projection-instance-
  optimization.txt``): AMSGrad, learning rate 2e-5, weight decay 1e-3, 50 steps.
* ``nio``: neural instance optimisation (``papers/neural-instance-optimization.txt``): LapIRN level
  by level, coarse to fine; pyramid level ``k`` runs the network's levels ``1..k`` (their fields
  summed as LapIRN does) and optimises their weights. Defaults from the paper: [100, 60, 30]
  iterations, Adam at 1e-4, and the loss ``(1 - lambda) LNCC + lambda diffusion`` with lambda = 0.4,
  i.e. ``0.6 LNCC + 0.4 diffusion``: LNCC with a 7-voxel box window (dirio's ``-mean(cc^2)``, in
  [-1, 0]), diffusion ``sum_a sum_c mean((d u_c / d x_a)^2)`` in voxels of the loss grid
  (:class:`dirio.losses.regularizers.Diffusion`). The two stay separate terms with weights
  ``1 - lambda`` and ``lambda`` (:meth:`NetworkConfig.terms`); IO uses the same loss.

``network+dense`` is the ``network`` stage followed by the dense stage initialised with its field.
``network_refine`` (the ``cpu`` budget's default for IO and NIO) ends any network stage with a few
full-resolution steps on its field that remove its folds (:mod:`dirio.methods.refine`).
All of them are the one engine: a :class:`~dirio.transforms.network.NetworkTransform` (or its
level-wise variant) optimised by :func:`dirio.optim.pyramid.run_pyramid`.

The pretrained weights are restored bit for bit after every pair, however the stage ends (a
result, a non-finite loss, an interrupt): :func:`dirio.transforms.base.restored`. Loaded models
are cached per process (:func:`load_model`), so ``dirio run`` reads the checkpoint once.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from dirio.core.field_checks import field_problem
from dirio.core.fields import field_to_numpy, warp
from dirio.core.profiling import peak_memory_mb, reset_peak_memory
from dirio.errors import DirioError
from dirio.losses.regularizers import make_regularizer
from dirio.losses.similarity import make_similarity
from dirio.losses.terms import InverseConsistencyTerm, RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.network_fit import coarse_fit
from dirio.methods.refine import RefineConfig, refine_field
from dirio.optim.optimizers import OPTIMIZERS
from dirio.optim.pyramid import OptimizerConfig, PyramidConfig, PyramidResult, run_pyramid
from dirio.transforms.affine import affine_displacement, compose_affine_field
from dirio.transforms.base import restored
from dirio.transforms.network import AxisMap, LevelwiseNetworkTransform, NetworkTransform, network_extra
from dirio.transforms.networks.layout import channels_last_3d

logger = logging.getLogger(__name__)

#: The network stages; ``network+dense`` is a method (two stages), not a stage.
NETWORK_STAGES = ("network", "network-io", "nio")
#: ``--method`` values and their stages (an affine stage, when asked for, runs first).
METHODS = {
    "dense": ("dense",),
    "network": ("network",),
    "network-io": ("network-io",),
    "nio": ("nio",),
    "network+dense": ("network", "dense"),
}
#: Regularizers a network stage can use: the field regularizers and GradICON's inverse consistency.
NETWORK_REGULARIZERS = ("diffusion", "bending", "l1", "tv", "gradicon")

#: Levels of the network neural instance optimisation runs level by level (LapIRN's three).
NIO_LEVELS = 3


def _listed(values: Sequence) -> str:
    """``(1, 2)`` -> ``"1,2"``: values as the command line and the files write them."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


#: lambda of NIO's loss ``(1 - lambda) LNCC + lambda diffusion`` (the NIO paper, "Implementation":
#: "lambda is set to 0.4 for both the training and inference phases").
NIO_LAMBDA = 0.4

#: Per-mode defaults of the options left at ``None`` (sources in the module docstring).
MODE_DEFAULTS = {
    "network-io": {"iterations": (50,), "resolution": (1.0,), "lr": 2e-5, "optimizer": "amsgrad",
                   "weight_decay": 1e-3},
    "nio": {"iterations": (100, 60, 30), "resolution": (1.0, 1.0, 1.0), "lr": 1e-4, "optimizer": "adam",
            "weight_decay": 0.0},
}

#: Named budgets (``network_budget``): the per-mode defaults of the options left at ``None``.
#: ``paper``: the papers' schedules (:data:`MODE_DEFAULTS`). ``cpu``: what a 2-core CPU affords in
#: about 3 minutes per full-resolution brain (160 x 192 x 224), from the accuracy-against-time
#: curves of ``benchmarks/network_claims.py`` (benchmarks/RESULTS.md, Issue 21): a step that runs
#: LapIRN's full-resolution level costs about 2 minutes there, a level-1-only step a few seconds, so
#: NIO optimises the coarsest level only (25 steps, the loss on the half-resolution grid), then the
#: full-resolution pass; an IO step always runs the whole network at full resolution, so IO keeps
#: a single step. Both then refine the field for 10 full-resolution steps (``refine``,
#: :mod:`dirio.methods.refine`: about 20 s), which removes most of the folds LapIRN's full-resolution
#: level makes (optimising that level's weights costs about 2 minutes a step there).
#: NIO's ``shifted`` schedule replaces those steps for a pair whose coarsest LapIRN field fits worse
#: than no deformation (:mod:`dirio.methods.network_fit`; images unlike LapIRN's training data):
#: 10 level-1 and 20 level-2 steps at 3e-4 (chosen at half resolution on the inverted contrast and
#: ``oasisA`` among 1e-4, 3e-4, 1e-3 and level 2 alone; at full resolution 0.583 against 0.313 on the
#: inverted contrast, the whole command in 145 s, but 0.002-0.013 lower
#: than level 1 alone on the four pairs LapIRN fits). What this keeps of the full schedule's gain
#: is in docs/how-to/networks.md.
NETWORK_BUDGETS = {
    "paper": MODE_DEFAULTS,
    "cpu": {
        # IO has no affordable schedule for such pairs (a step costs a minute): the check only warns
        "network-io": {**MODE_DEFAULTS["network-io"], "iterations": (1,), "refine": 10, "shifted": {}},
        "nio": {**MODE_DEFAULTS["nio"], "iterations": (25, 0, 0), "levels": (1,), "resolution": (2.0, 2.0, 1.0),
                "refine": 10, "shifted": {"iterations": (10, 20, 0), "levels": (1, 2), "lr": 3e-4}},
    },
}


@dataclass
class NetworkConfig:
    """Settings of the network stages (a section of :class:`dirio.config.settings.Settings`).

    Attributes:
        model: checkpoint of the network (:func:`dirio.transforms.networks.build_network`, or a
            uniGradICON / GradICON weights file with ``network_architecture``); ``None``: the
            packaged LapIRN OASIS brain model.
        network_architecture: required for upstream LapIRN files (``lapirn-disp`` / ``lapirn-diff``)
            and for the ICON adapters (``unigradicon``, ``gradicon``); else a check.
        network_axes: :class:`~dirio.transforms.network.AxisMap` from the image grid to the
            network's training axis order (``identity``, ``voxelmorph-grid`` or e.g. ``0,-2,1``).
        network_iterations: optimisation steps per level (IO: one level, NIO: one per LapIRN level);
            ``None``: the budget's default for the mode (:data:`NETWORK_BUDGETS`).
        network_levels: network levels whose weights are optimised (LapIRN: 1..3); ``None``: all.
            With NIO, ``(1, 2)`` optimises at 1/4 and 1/2 resolution only and leaves the
            full-resolution level at its pretrained weights.
        network_resolution: shrink factor of the grid the loss is evaluated on, per level (the network
            always sees the full-resolution images; the final field is always full resolution).
        network_lr, network_optimizer, network_weight_decay: the optimiser (``None``: mode default).
        network_similarity, network_similarity_options: the similarity (LNCC, window 7: NIO's).
        network_regularizer: one of :data:`NETWORK_REGULARIZERS` (``gradicon``: inverse consistency).
        network_lambda: the loss is ``(1 - lambda) similarity + lambda regularizer`` (NIO's form;
            default :data:`NIO_LAMBDA`: ``0.6 LNCC + 0.4 diffusion``).
        network_checkpointing: gradient checkpointing (networks with ``gradient_checkpointing``).
        network_mixed_precision: bfloat16 autocast of the network on CUDA (ignored on the CPU).
        network_normalise: min-max normalise each image to [0, 1] before the network (LapIRN's input).
        network_budget: which defaults fill the options left at ``None`` (iterations, levels,
            resolution, optimiser, refinement): ``paper`` (the papers' schedules) or ``cpu``
            (:data:`NETWORK_BUDGETS`).
        network_refine: full-resolution steps that refine the stage's field and remove its folds
            (:mod:`dirio.methods.refine`); ``None``: the budget's default (``paper``: 0, ``cpu``: 10
            for ``network-io`` and ``nio``), 0 for direct inference unless given.
    """

    model: str | None = None
    network_architecture: str | None = None
    network_axes: str = "identity"
    network_iterations: tuple[int, ...] | None = None
    network_levels: tuple[int, ...] | None = None
    network_resolution: tuple[float, ...] | None = None
    network_lr: float | None = None
    network_optimizer: str | None = None
    network_weight_decay: float | None = None
    network_similarity: str = "lncc"
    network_similarity_options: dict = field(default_factory=lambda: {"window": 7})
    network_regularizer: str = "diffusion"
    network_lambda: float = NIO_LAMBDA
    network_checkpointing: bool = False
    network_mixed_precision: bool = False
    network_normalise: bool = True
    network_budget: str = "paper"
    network_refine: int | None = None

    def option(self, mode: str, name: str) -> Any:
        """The effective value of ``network_<name>`` for ``mode`` (the budget's default when ``None``)."""
        value = getattr(self, f"network_{name}")
        defaults = NETWORK_BUDGETS.get(self.network_budget, MODE_DEFAULTS)
        return defaults.get(mode, {}).get(name) if value is None else value

    def terms(self) -> list[Term]:
        """``(1 - lambda) similarity`` and ``lambda regularizer`` as separately kept terms, in that order.

        With the defaults: ``lncc`` (window 7) weighted 0.6 and ``diffusion`` weighted 0.4, NIO's loss.
        """
        lam = float(self.network_lambda)
        similarity = make_similarity(self.network_similarity, **self.network_similarity_options)
        if self.network_regularizer == "gradicon":
            function = InverseConsistencyTerm()
        else:
            function = RegularizerTerm(make_regularizer(self.network_regularizer))
        return [Term(self.network_similarity, Role.SIMILARITY, SimilarityTerm(similarity), 1.0 - lam),
                Term(self.network_regularizer, Role.REGULARIZER, function, lam)]

    def validate(self, mode: str | None = None) -> None:
        """Raise ``ValueError`` with a one-line reason for settings a network stage would fail on
        (each option named as `key`, which the command line writes as its flag)."""
        AxisMap.parse(self.network_axes)
        if self.network_budget not in NETWORK_BUDGETS:
            raise ValueError(f"unknown `network_budget` {self.network_budget!r}; choose one of "
                             f"{', '.join(NETWORK_BUDGETS)}")
        if not 0.0 <= float(self.network_lambda) < 1.0:
            raise ValueError(f"`network_lambda` must be in [0, 1), got {self.network_lambda}")
        if self.network_iterations is not None and any(int(n) < 0 for n in self.network_iterations):
            raise ValueError(f"`network_iterations` must be >= 0, got {_listed(self.network_iterations)}")
        if self.network_resolution is not None and not all(
                0 < float(f) < math.inf for f in self.network_resolution):
            raise ValueError(f"`network_resolution` must be positive shrink factors, got "
                             f"{_listed(self.network_resolution)}")
        if self.network_lr is not None and not 0 < float(self.network_lr) < math.inf:
            raise ValueError(f"`network_lr` must be positive and finite, got {self.network_lr:g}")
        if self.network_weight_decay is not None and not 0 <= float(self.network_weight_decay) < math.inf:
            raise ValueError(f"`network_weight_decay` must be >= 0 and finite, got {self.network_weight_decay:g}")
        if mode == "nio" and self.network_levels is not None and any(
                int(k) > NIO_LEVELS for k in self.network_levels):
            raise ValueError(f"`network_levels` of nio are LapIRN levels 1 to {NIO_LEVELS}, got "
                             f"{_listed(self.network_levels)}")
        if self.network_refine is not None and int(self.network_refine) < 0:
            raise ValueError(f"`network_refine` must be >= 0 steps, got {self.network_refine}")
        if self.network_regularizer not in NETWORK_REGULARIZERS:
            raise ValueError(f"unknown network regularizer {self.network_regularizer!r}; "
                             f"choose one of {', '.join(NETWORK_REGULARIZERS)}")
        if self.network_optimizer is not None and self.network_optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown network optimizer {self.network_optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.network_levels is not None and (not self.network_levels or any(int(k) < 1 for k in self.network_levels)):
            raise ValueError(f"`network_levels` are network levels 1, 2, ... (1 = coarsest), got "
                             f"{_listed(self.network_levels)}")
        self.terms()
        if mode in MODE_DEFAULTS:
            if mode == "nio" and len(self.option(mode, "iterations")) != NIO_LEVELS:
                raise ValueError(f"`network_iterations` of nio: one count per LapIRN level ({NIO_LEVELS}), got "
                                 f"{_listed(self.option(mode, 'iterations'))}")
            self.pyramid(mode).validate()
            self.optimizer(mode).validate()

    def shifted_schedule(self, mode: str) -> dict | None:
        """The budget's schedule for a pair its network does not fit (:mod:`dirio.methods.network_fit`),
        as ``{option: value}`` without the ``network_`` prefix; ``None`` when the budget has none for
        ``mode`` or the schedule was given (``network_iterations`` or ``network_levels`` set); ``{}``
        when the budget checks the pair but has no other schedule (IO: a warning only)."""
        if self.network_iterations is not None or self.network_levels is not None:
            return None
        return NETWORK_BUDGETS.get(self.network_budget, {}).get(mode, {}).get("shifted")

    def with_schedule(self, schedule: dict) -> NetworkConfig:
        """A copy whose options left at ``None`` take ``schedule``'s values (given options win)."""
        return replace(self, **{f"network_{name}": value for name, value in schedule.items()
                                if getattr(self, f"network_{name}") is None})

    def refine(self, mode: str) -> RefineConfig:
        """The refinement after stage ``mode`` (``iterations`` 0: none)."""
        return RefineConfig(iterations=int(self.option(mode, "refine") or 0))

    def pyramid(self, mode: str) -> PyramidConfig:
        iterations = tuple(int(n) for n in self.option(mode, "iterations"))
        resolution = self.option(mode, "resolution")
        if resolution is None:
            resolution = (1.0,) * len(iterations)
        elif len(resolution) == 1:
            resolution = tuple(resolution) * len(iterations)
        return PyramidConfig(levels=tuple(float(f) for f in resolution), iterations=iterations)

    def optimizer(self, mode: str, combine: str = "sum", combine_options: dict | None = None,
                  early_stop: str = "none", early_stop_options: dict | None = None,
                  log_every: int | None = None) -> OptimizerConfig:
        return OptimizerConfig(
            optimizer=self.option(mode, "optimizer"), lr=float(self.option(mode, "lr")),
            optimizer_options={"weight_decay": float(self.option(mode, "weight_decay"))},
            schedule="constant", combine=combine, combine_options=dict(combine_options or {}),
            early_stop=early_stop, early_stop_options=dict(early_stop_options or {}),
            reset_each_level=True, log_every=log_every,
        )


@dataclass
class NetworkStage:
    """Options of one network stage: its mode, the network section and the shared optimisation rule."""

    mode: str = "network"
    config: NetworkConfig = field(default_factory=NetworkConfig)
    combine: str = "sum"
    combine_options: dict = field(default_factory=dict)
    early_stop: str = "none"
    early_stop_options: dict = field(default_factory=dict)
    log_every: int | None = None

    def validate(self) -> None:
        if self.mode not in NETWORK_STAGES:
            raise ValueError(f"unknown network stage {self.mode!r}; choose one of {', '.join(NETWORK_STAGES)}")
        self.config.validate(self.mode)
        if self.mode in MODE_DEFAULTS:
            self.optimizer_config().validate()

    def optimizer_config(self) -> OptimizerConfig:
        return self.config.optimizer(self.mode, self.combine, self.combine_options, self.early_stop,
                                     self.early_stop_options, self.log_every)


# --- the model, loaded once per process ----------------------------------------------------------

_MODEL_CACHE: dict[tuple, torch.nn.Module] = {}
_CACHE_SIZE = 2


def load_model(config: NetworkConfig, device: torch.device) -> torch.nn.Module:
    """The network of ``config`` on ``device``, loaded once per process and then reused.

    The cached module is the one every pair fine-tunes; the stages restore its weights after each
    pair (:func:`dirio.transforms.base.restored`), so the next pair starts from the checkpoint.
    On the CPU the 3D convolution weights of dirio's own networks (LapIRN, the U-Net; not the ICON
    adapters' third-party code) are stored channels-last
    (:func:`dirio.transforms.networks.layout.channels_last_3d`: about a quarter less time per step).

    Raises:
        DirioError: one line naming a missing or unreadable checkpoint.
    """
    from dirio.transforms.networks.registry import build_network, default_brain_model

    if config.model is None:
        key: tuple = ("default", str(device))
    else:
        path = Path(config.model).expanduser()
        if not path.is_file():
            raise DirioError(f"{path}: network checkpoint not found (--model)")
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, config.network_architecture, str(device))
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    third_party = False
    if config.model is None:
        model = default_brain_model(device)
    else:
        from dirio.transforms.networks.icon import ICON_ARCHITECTURES, build_icon_network

        third_party = config.network_architecture in ICON_ARCHITECTURES
        if third_party:
            model = build_icon_network(config.network_architecture, path, device=device)
        else:
            model = build_network(path, architecture=config.network_architecture, device=device)
    if torch.device(device).type == "cpu" and not third_party:
        # oneDNN's faster kernels (dirio.transforms.networks.layout); dirio's own networks only:
        # code that reshapes activations with .view() may not accept another memory layout.
        channels_last_3d(model)
    while len(_MODEL_CACHE) >= _CACHE_SIZE:
        _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
    _MODEL_CACHE[key] = model
    return model


def model_name(config: NetworkConfig) -> str:
    """The network of ``config`` as messages name it: the checkpoint file, or the packaged model."""
    return str(config.model) if config.model is not None else "the packaged LapIRN brain model"


def check_model_fits(model: torch.nn.Module, options: NetworkStage, ndim: int) -> None:
    """Refuse a network that cannot run the stage on ``ndim``-D images, before any work.

    Checks the network's dimensionality (its ``ndim`` attribute, when it has one) against the
    images', that ``nio`` and ``network_levels`` have a multi-level network, and that the levels named
    exist.

    Raises:
        DirioError: one line naming the network and the option or the mismatch.
    """
    name = model_name(options.config)
    network_ndim = getattr(model, "ndim", None)
    if network_ndim is not None and int(network_ndim) != int(ndim):
        raise DirioError(f"{name} is a {network_ndim}D network but the images are {ndim}D: give a {ndim}D network "
                         f"(`model`) or {network_ndim}D images (`ndim`)")
    levels = options.config.option(options.mode, "levels")
    multi_level = hasattr(model, "level_parameters")
    if options.mode == "nio" and not multi_level:
        raise DirioError(f"nio optimises a multi-level network level by level (LapIRN); {name} "
                         f"({type(model).__name__}) has no levels: use --method network-io")
    if options.mode in ("network-io", "nio") and levels is not None:
        if not multi_level:
            raise DirioError(f"`network_levels` needs a multi-level network (LapIRN); {name} "
                             f"({type(model).__name__}) has none")
        count = int(getattr(model, "num_levels", NIO_LEVELS))
        if any(int(k) > count for k in levels):
            raise DirioError(f"`network_levels` {_listed(levels)}: {name} has levels 1 to {count}")


def check_network_stage(options: NetworkStage, ndim: int, device: torch.device) -> torch.nn.Module:
    """Load the network of a stage (cached, :func:`load_model`) and check it fits ``ndim``-D images
    (:func:`check_model_fits`): the preflight of a registration, before any work on the pair."""
    model = load_model(options.config, device)
    check_model_fits(model, options, ndim)
    return model


def clear_model_cache() -> None:
    """Forget every cached network (the next pair reloads its checkpoint)."""
    _MODEL_CACHE.clear()


# --- running a stage -----------------------------------------------------------------------------


def make_transform(model: torch.nn.Module, options: NetworkStage) -> NetworkTransform:
    """The transform a stage optimises: the whole network, or LapIRN level by level (``nio``)."""
    config = options.config
    if options.mode == "nio":
        if not hasattr(model, "level_parameters"):
            raise DirioError(f"nio optimises a multi-level network level by level (LapIRN); "
                             f"{type(model).__name__} has no level_parameters(k): use --method network-io")
        chosen = config.option(options.mode, "levels")
        return _levelwise_transform(model, config, tuple(chosen) if chosen is not None else None)
    return NetworkTransform(model, **_transform_options(config))


def _transform_options(config: NetworkConfig) -> dict:
    """The network transform's options from the settings (axis map, input normalisation, autocast)."""
    return {"axes": config.network_axes, "normalise": config.network_normalise,
            "mixed_precision": config.network_mixed_precision}


def _levelwise_transform(model: torch.nn.Module, config: NetworkConfig,
                         optimised: Sequence[int] | None = None) -> LevelwiseNetworkTransform:
    """LapIRN level by level (every level scheduled), optimising ``optimised`` (``None``: all)."""
    levels = tuple(range(1, int(getattr(model, "num_levels", 3)) + 1))
    return LevelwiseNetworkTransform(model, schedule=levels, optimised=optimised or levels,
                                     **_transform_options(config))


def _freeze_for_io(model: torch.nn.Module, levels: Sequence[int] | None) -> None:
    """IO with ``network_levels``: only those levels' weights are optimised (LapIRN)."""
    if levels is None:
        return
    if not hasattr(model, "level_parameters"):
        raise DirioError(f"network_levels needs a multi-level network (LapIRN); {type(model).__name__} has none")
    model.requires_grad_(False)
    for level in levels:
        for parameter in model.level_parameters(int(level)):
            parameter.requires_grad_(True)


def register_network(fixed: torch.Tensor, moving: torch.Tensor, options: NetworkStage, *,
                     model: torch.nn.Module | None = None, network_inputs: tuple | None = None,
                     fixed_mask: torch.Tensor | None = None,
                     moving_mask: torch.Tensor | None = None, spacing: Sequence[float] | None = None,
                     seed: int = 0, progress: bool = True) -> PyramidResult:
    """Register ``moving`` to ``fixed`` with a network stage; the network's weights are unchanged after.

    Args:
        fixed, moving: ``(1, 1, *S)`` images on the same grid (normalised by the settings; the
            transform min-max normalises them for the network when ``network_normalise``).
        options: the stage; ``model`` the network (default: :func:`load_model`).
        network_inputs: ``(fixed, moving)`` the network sees instead of ``fixed``, ``moving`` (the
            terms always use those): the original intensities, which the transform min-max
            normalises as LapIRN was trained (the ``percentile`` preprocessing roughly doubles brain
            intensities, and LapIRN's direct-inference Dice on the OASIS -> VoxelMorph pair drops
            from 0.82 to 0.70 when fed it).
    Returns:
        The engine's result: ``displacement`` ``(1, ndim, *S)`` on the full grid, the per-iteration
        history (empty for direct inference), per-level timings and the peak memory.
    """
    options.validate()
    if model is None:
        model = load_model(options.config, fixed.device)
    check_model_fits(model, options, fixed.dim() - 2)
    config = options.config
    transform = make_transform(model, options)
    flags = [p.requires_grad for p in model.parameters()]
    had_checkpointing = getattr(model, "gradient_checkpointing", None)
    if config.network_checkpointing:
        if had_checkpointing is None:
            raise DirioError(f"{type(model).__name__} does not support gradient checkpointing "
                             "(no gradient_checkpointing attribute)")
        model.gradient_checkpointing = True
    if config.network_mixed_precision and fixed.device.type != "cuda":
        logger.warning("network_mixed_precision applies on CUDA only; the network runs in float32 on %s",
                       fixed.device.type)
    was_training = model.training
    try:
        with restored(transform):
            if options.mode == "network":
                return _direct(transform, *(network_inputs or (fixed, moving)))
            if options.mode == "network-io":
                _freeze_for_io(model, config.option(options.mode, "levels"))
            model.eval()  # LapIRN and the U-Net have no batch statistics; keep any dropout off
            return run_pyramid(
                transform, config.terms(), fixed, moving, config.pyramid(options.mode), options.optimizer_config(),
                fixed_mask=fixed_mask, moving_mask=moving_mask, spacing=spacing, seed=seed, progress=progress,
                description=options.mode, extra=network_extra(*(network_inputs or (fixed, moving))),
            )
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        if had_checkpointing is not None:
            model.gradient_checkpointing = had_checkpointing
        model.train(was_training)


def _direct(transform: NetworkTransform, fixed: torch.Tensor, moving: torch.Tensor) -> PyramidResult:
    """One forward pass on the full grid (no gradients)."""
    reset_peak_memory(fixed.device)
    start = time.perf_counter()
    with torch.no_grad():
        disp = transform.predict(fixed, moving).detach()
    seconds = time.perf_counter() - start
    level = {"level": 0, "factor": 1.0, "shape": list(fixed.shape[2:]), "grid": list(fixed.shape[2:]),
             "iterations": 0, "iterations_run": 0, "seconds": seconds, "setup_seconds": seconds,
             "seconds_per_iteration": 0.0}
    return PyramidResult(transform=transform, displacement=disp, history=[], levels=[level],
                         peak_memory_mb=peak_memory_mb(fixed.device), seconds=seconds)


def _unusable_field(options: NetworkStage, problem: str) -> str:
    """The message of a stage whose field is not finite or exploded (:mod:`dirio.core.field_checks`),
    naming the cause: the network's weights (inference) or the learning rate (the weights tuned)."""
    name = model_name(options.config)
    if options.mode == "network":
        return (f"the network of {name} predicted an unusable field: {problem}; its weights are probably damaged "
                f"(or it was not trained on images like these); no field was written")
    config = options.config
    return (f"the {options.mode} field is unusable after tuning the weights of {name}: {problem}; the optimisation "
            f"diverged: lower `network_lr` ({config.option(options.mode, 'optimizer')}, "
            f"{float(config.option(options.mode, 'lr')):g}); no field was written")


def network_stage(state, options: NetworkStage) -> None:
    """A network stage of the pipeline (on the affinely pre-aligned pair when an affine stage ran).

    Sets ``state.result`` (the composite field) and ``state.init`` (the network's field, the dense
    stage's starting point when one follows).
    """
    fixed, moving, moving_mask = state.fixed, state.moving, state.moving_mask
    inputs = None
    if options.config.network_normalise and getattr(state, "network_inputs", None) is not None:
        inputs = state.network_inputs
    if state.matrix is not None:
        affine_disp = affine_displacement(state.matrix.to(fixed.device), fixed.shape[2:])
        moving = warp(moving, affine_disp)
        if moving_mask is not None:
            moving_mask = warp(moving_mask, affine_disp, padding="zeros")
        if inputs is not None:
            inputs = (inputs[0], warp(inputs[1], affine_disp))
    options, schedule = _schedule_for_pair(options, fixed, moving, inputs, state.fixed_mask, moving_mask)
    result = register_network(fixed, moving, options, network_inputs=inputs, fixed_mask=state.fixed_mask,
                              moving_mask=moving_mask, spacing=state.spacing, seed=state.seed,
                              progress=state.progress)
    problem = field_problem(result.displacement)
    if problem is not None:
        raise DirioError(_unusable_field(options, problem))
    residual = result.displacement
    if state.matrix is not None:
        result.displacement = compose_affine_field(state.matrix.to(fixed.device), residual)
    _keep_stage(state, options.mode, result, {"iterations": sum(level["iterations_run"] for level in result.levels),
                                              "levels": result.levels, **schedule})
    state.init = residual
    refine = options.config.refine(options.mode)
    if refine.iterations > 0:
        _refine_stage_field(state, options.mode, refine)


def _schedule_for_pair(options: NetworkStage, fixed, moving, inputs, fixed_mask, moving_mask) -> tuple[NetworkStage, dict]:
    """The stage's options for this pair, and what the stage's record says about the choice.

    A budget with a ``shifted`` entry (``cpu``) checks first whether a multi-level network's coarsest
    field fits the pair better than no deformation (:func:`dirio.methods.network_fit.coarse_fit`).
    When it does not, a warning says so and the shifted schedule (NIO's; IO has none) fills the
    options the user left out.
    """
    shifted = options.config.shifted_schedule(options.mode)
    if shifted is None:
        return options, {}
    options.validate()
    model = load_model(options.config, fixed.device)
    check_model_fits(model, options, fixed.dim() - 2)
    if not hasattr(model, "level_parameters"):  # no coarsest level to test (a U-Net, an ICON adapter)
        return options, {}
    fit = coarse_fit(_levelwise_transform(model, options.config), options.config.terms()[0], fixed, moving,
                     network_inputs=inputs, fixed_mask=fixed_mask, moving_mask=moving_mask)
    if fit.fits:
        return options, {"schedule": "budget", "coarse_fit": fit.record()}
    config = options.config.with_schedule(shifted)
    found = (f"the coarsest field of {model_name(config)} fits these images worse than no deformation "
             f"({config.network_similarity} {fit.network:.3f} against {fit.identity:.3f}): they are unlike its "
             f"training images")
    if not shifted:
        logger.warning("%s; %s under the %s budget has no schedule for such pairs (a few steps will not register "
                       "them): --method nio --network-budget %s adapts its schedule, the dense method does not "
                       "use the network", found, options.mode, config.network_budget, config.network_budget)
        return options, {"schedule": "budget", "coarse_fit": fit.record()}
    logger.warning("%s; %s optimises network levels %s for %s steps at learning rate %g (the %s budget's "
                   "schedule for such pairs)", found, options.mode, _listed(config.option(options.mode, "levels")),
                   _listed(config.option(options.mode, "iterations")), float(config.option(options.mode, "lr")),
                   config.network_budget)
    return replace(options, config=config), {"schedule": "shifted", "coarse_fit": fit.record()}


def _refine_stage_field(state, mode: str, refine: RefineConfig) -> None:
    """Refine the network stage's field in ``state`` (:mod:`dirio.methods.refine`); sets
    ``state.result``, ``state.init`` (the residual after any affine) and records the run as ``refine``."""
    refined = refine_field(state.fixed, state.moving, state.init, refine, matrix=state.matrix,
                           fixed_mask=state.fixed_mask, moving_mask=state.moving_mask, spacing=state.spacing,
                           seed=state.seed, progress=state.progress)
    problem = field_problem(refined.displacement)
    if problem is not None:
        raise DirioError(f"the refinement of the {mode} field is unusable: {problem}; run without it "
                         f"(`network_refine` 0); no field was written")
    _keep_stage(state, "refine", refined, {"iterations": refine.iterations})
    # the engine returns the composite field; a dense stage after this one starts from the residual
    state.init = (refined.displacement if state.matrix is None else
                  refined.transform.dense.displacement(tuple(state.fixed.shape[2:])).detach())


def _keep_stage(state, name: str, result, record: dict) -> None:
    """Make ``result`` the pipeline's current result as stage ``name``: its history rows tagged with the
    stage, its record (time, memory and ``record``) in ``state.records``, its field in
    ``state.stage_fields`` when kept, and the result in ``state.results`` when the caller collects them."""
    result.history = [{"stage": name, **row} for row in result.history]
    state.records.append({"stage": name, "seconds": result.seconds, "peak_memory_mb": result.peak_memory_mb, **record})
    results = getattr(state, "results", None)
    if results is not None:
        results.append((name, result))
    if state.stage_fields is not None:
        state.stage_fields[name] = field_to_numpy(result.displacement)
    state.result = result
