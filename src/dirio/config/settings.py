"""Registration settings, composed of sections, and the flat option keys that build them.

A :class:`Settings` object holds every choice of one registration, by section:

* ``preprocessing`` (:class:`Preprocessing`): intensity normalisation;
* ``terms`` (:class:`TermsConfig`): the similarity and the regularizers with their weights;
* ``transform`` (:class:`dirio.transforms.dense.DenseConfig`): the dense transform;
* ``optimization`` (:class:`dirio.optim.pyramid.OptimizerConfig`): optimiser, schedule, rule, stopping;
* ``pyramid`` (:class:`dirio.optim.pyramid.PyramidConfig`): levels and iterations;
* ``network`` (:class:`dirio.methods.network.NetworkConfig`): the network stages (model, axes,
  their optimiser and loss);
* ``stages``: the stage pipeline, names of :data:`dirio.methods.stages.STAGES` in order, with the
  options of the ``affine`` (``affine_family``, ``affine_options``) and ``convex`` stages;
* ``final_smoothing`` (:class:`dirio.methods.final_smoothing.FinalSmoothing`): the dense stage's
  adaptive smoothing of its final field.

Every section field is also a *flat key* (``lr``, ``levels``, ``similarity``...; the names are
unique across sections), which is what presets, the API's keyword overrides, configuration files
and command-line options use. ``affine`` (a family or ``"none"``), ``init`` (``"none"`` or
``"convex"``) and ``method`` (``dense``, ``network``, ``network-io``, ``nio``, ``network+dense``)
are flat keys that edit the stage list.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from dirio.config.presets import PRESETS
from dirio.losses.regularizers import make_regularizer
from dirio.losses.by_level import align_to_levels, check_level_options, make_level_similarity
from dirio.losses.terms import RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.affine import AffineConfig
from dirio.methods.convex import ConvexConfig
from dirio.methods.dense import DenseStage
from dirio.methods.final_smoothing import FinalSmoothing
from dirio.methods.network import METHODS, NETWORK_STAGES, NetworkConfig, NetworkStage
from dirio.methods.stages import STAGES, AffineStage
from dirio.optim.pyramid import OptimizerConfig, PyramidConfig
from dirio.transforms.affine import FAMILIES as AFFINE_FAMILIES
from dirio.transforms.dense import DenseConfig

NORMALISATIONS = ("none", "minmax", "percentile", "clip")
AUTO_MASKS = ("none", "lungs")
MASK_USES = ("restrict", "fill")
AFFINE_CHOICES = ("none",) + AFFINE_FAMILIES
INIT_CHOICES = ("none", "convex")
# The order stages run in, whatever order they are switched on in.
STAGE_ORDER = ("affine", "convex", "network", "network-io", "nio", "dense")
# Stages that may end the pipeline (they set the result).
FINAL_STAGES = ("dense",) + NETWORK_STAGES
# An Adam / AMSGrad learning rate above this many level voxels per step is refused: no registration
# moves hundreds of voxels per step (the presets use 0.5-5). SGD's step is ``lr * gradient`` and the
# gradient's scale depends on the loss (3e4 is a working SGD rate on the brain pairs): no bound.
MAX_LR = 100.0


@dataclass
class Preprocessing:
    """Intensity normalisation applied to both images before registration.

    Attributes:
        normalise: ``"none"``, ``"minmax"``, ``"percentile"`` (clip to the 0.5/99.5 percentiles of
            nonzero voxels, then [0, 1]) or ``"clip"`` (clip to ``clip_range`` then [0, 1]).
        clip_range: the window of ``"clip"`` (e.g. a CT window in HU).
        auto_mask: ``"none"``, or ``"lungs"``: when neither mask is given, both images get an
            automatic lung mask (:func:`dirio.methods.lung_mask.lung_mask`, CT in HU), computed
            on the intensities before normalisation.
        mask_use: how masks act: ``"restrict"``, the similarity counts only inside them;
            ``"fill"``, each image outside its mask takes its nearest inside intensity
            (:func:`dirio.core.mask_fill.fill_outside_mask`, after normalisation) and the
            similarity then counts everywhere (ConvexAdam's use of masks).
    """

    normalise: str = "percentile"
    clip_range: tuple[float, float] | None = None
    auto_mask: str = "none"
    mask_use: str = "restrict"

    def validate(self) -> None:
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {self.normalise!r}; choose one of {', '.join(NORMALISATIONS)}")
        if self.clip_range is not None:
            if len(self.clip_range) != 2 or not float(self.clip_range[0]) < float(self.clip_range[1]):
                raise ValueError(f"`clip_range`: the clip range needs two numbers LO,HI with LO < HI, "
                                 f"got {tuple(self.clip_range)}")
        if self.normalise == "clip" and self.clip_range is None:
            raise ValueError("normalisation 'clip' needs a clip range (low, high)")
        if self.auto_mask not in AUTO_MASKS:
            raise ValueError(f"unknown automatic mask {self.auto_mask!r}; choose one of {', '.join(AUTO_MASKS)}")
        if self.mask_use not in MASK_USES:
            raise ValueError(f"unknown mask use {self.mask_use!r}; choose one of {', '.join(MASK_USES)}")


@dataclass
class TermsConfig:
    """The terms of the dense stage.

    Attributes:
        similarity: name of the similarity term (see :func:`dirio.losses.similarity.make_similarity`).
        similarity_options: its options (e.g. ``{"window": 5}`` for LNCC); an option may be a tuple of one
            value per pyramid level, coarse to fine (``{"window": (5, 5, 9)}``, :mod:`dirio.losses.by_level`).
        features_from: ``"level"``: the similarity's features (MIND descriptors) are computed on each
            level's images; ``"full"``: on the full-resolution images, then resampled onto the level
            (ConvexAdam's Adam stage); ``"pooled"``: on the full-resolution images, averaged over the
            level's blocks (ConvexAdam's own pooling); see :class:`dirio.losses.terms.SimilarityTerm`.
        feature_sampling: how the moving features are read at ``x + u(x)``: ``"exact"``, or
            ``"convexadam"`` (ConvexAdam's quirks, for reproducing it; see
            :class:`dirio.losses.terms.SimilarityTerm`).
        regularizers: ``{name: weight}`` (see :func:`dirio.losses.regularizers.make_regularizer`);
            weights are finite and >= 0.
    """

    similarity: str = "lncc"
    similarity_options: dict[str, Any] = field(default_factory=lambda: {"window": 5})
    features_from: str = "level"
    feature_sampling: str = "exact"
    regularizers: dict[str, float] = field(default_factory=lambda: {"diffusion": 0.3})

    def similarity_object(self):
        """The similarity object; a :class:`dirio.losses.by_level.SimilarityByLevel` when an option gives
        one value per pyramid level (e.g. ``{"window": (5, 5, 9)}``)."""
        return make_level_similarity(self.similarity, self.similarity_options)

    def build(self) -> list[Term]:
        """One similarity term (weight 1), then each regularizer term with its weight."""
        terms = [Term(self.similarity, Role.SIMILARITY, SimilarityTerm(self.similarity_object(), self.features_from,
                                                                    self.feature_sampling), 1.0)]
        for name, weight in self.regularizers.items():
            terms.append(Term(name, Role.REGULARIZER, RegularizerTerm(make_regularizer(name)), _weight(name, weight)))
        return terms


def _weight(name: str, weight: Any) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise ValueError(f"the weight of regularizer {name!r} must be a number, got {weight!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"the weight of regularizer {name!r} must be finite and >= 0, got {weight!r}")
    return value


@dataclass
class Settings:
    """Every choice of one registration, by section (see the module docstring)."""

    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    terms: TermsConfig = field(default_factory=TermsConfig)
    transform: DenseConfig = field(default_factory=DenseConfig)
    optimization: OptimizerConfig = field(default_factory=OptimizerConfig)
    pyramid: PyramidConfig = field(default_factory=PyramidConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    stages: tuple[str, ...] = ("dense",)
    affine_family: str = "affine"
    affine_options: AffineConfig = field(default_factory=AffineConfig)
    convex: ConvexConfig = field(default_factory=ConvexConfig)
    final_smoothing: FinalSmoothing = field(default_factory=FinalSmoothing)
    seed: int = 0
    progress: bool = True

    @property
    def affine(self) -> str:
        """The affine stage's family, or ``"none"`` when the pipeline has no affine stage."""
        return self.affine_family if "affine" in self.stages else "none"

    @property
    def init(self) -> str:
        """``"convex"`` when the pipeline initialises the dense stage by the discrete step, else ``"none"``."""
        return "convex" if "convex" in self.stages else "none"

    @property
    def method(self) -> str:
        """The ``--method`` the stage list amounts to (``dense``, ``network``, ``network+dense``...)."""
        core = tuple(s for s in self.stages if s not in ("affine", "convex"))
        for name, stages in METHODS.items():
            if stages == core:
                return name
        return "+".join(core)

    def network_stage(self, mode: str) -> NetworkStage:
        o = self.optimization
        return NetworkStage(mode=mode, config=self.network, combine=o.combine, combine_options=o.combine_options,
                            early_stop=o.early_stop, early_stop_options=o.early_stop_options,
                            log_every=o.log_every)

    def dense_stage(self) -> DenseStage:
        return DenseStage(transform=self.transform, pyramid=self.pyramid, optimizer=self.optimization,
                          final_smoothing=self.final_smoothing)

    def stage_options(self, name: str) -> Any:
        """The options object of stage ``name``."""
        if name == "affine":
            return AffineStage(family=self.affine_family, config=self.affine_options)
        if name == "convex":
            return self.convex
        if name == "dense":
            return self.dense_stage()
        if name in NETWORK_STAGES:
            return self.network_stage(name)
        raise ValueError(f"no options for stage {name!r}")

    def pipeline(self) -> list[tuple[str, Any]]:
        """``(stage name, options)`` in run order, for :func:`dirio.methods.stages.run_stages`."""
        return [(name, self.stage_options(name)) for name in self.stages]

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason for settings a run would fail on (before any work)."""
        self.preprocessing.validate()
        check_level_options(self.terms.similarity_options, len(self.pyramid.levels))
        self.terms.build()
        for name in self.stages:
            STAGES.get(name)
        if not self.stages or self.stages[-1] not in FINAL_STAGES:
            raise ValueError(f"the stage list must end with the dense stage or a network stage "
                             f"({', '.join(NETWORK_STAGES)}), got {', '.join(self.stages) or 'none'}")
        for name in self.stages:
            if name in NETWORK_STAGES:
                self.network_stage(name).validate()
        if self.affine_family not in AFFINE_FAMILIES:
            raise ValueError(f"unknown affine model {self.affine_family!r}; choose one of {', '.join(AFFINE_CHOICES)}")
        self.dense_stage().validate()
        if self.optimization.optimizer in ("adam", "amsgrad") and self.optimization.lr > MAX_LR:
            raise ValueError(f"learning rate {self.optimization.lr:g} is absurd: with {self.optimization.optimizer} "
                             f"it is a step of about that many voxels of the level grid, and at most {MAX_LR:g} is "
                             f"accepted (the presets use 0.5-5)")
        for name in self.stages:
            if name in ("network-io", "nio"):
                optimizer, lr = self.network.option(name, "optimizer"), float(self.network.option(name, "lr"))
                if optimizer in ("adam", "amsgrad") and lr > MAX_LR:
                    raise ValueError(f"`network_lr` {lr:g} is absurd: with {optimizer} every weight moves by about "
                                     f"that much per step, and at most {MAX_LR:g} is accepted (the defaults are "
                                     f"2e-5 and 1e-4)")
        self.affine_options.validate()
        self.convex.validate()

    def to_dict(self) -> dict:
        """A JSON-ready copy (used in metrics.json and reports)."""
        return dataclasses.asdict(self)


# Sections whose fields are flat keys, and the classes that hold them.
SECTIONS = {
    "preprocessing": Preprocessing,
    "terms": TermsConfig,
    "transform": DenseConfig,
    "optimization": OptimizerConfig,
    "pyramid": PyramidConfig,
    "network": NetworkConfig,
}
# Settings fields holding a nested stage configuration: overrides give them as dicts of field values.
NESTED = {"affine_options": AffineConfig, "convex": ConvexConfig, "final_smoothing": FinalSmoothing}
TOP_LEVEL = ("seed", "progress", "stages", "affine_family")
# The flat keys that edit the stage list.
STAGE_KEYS = ("affine", "init", "method")


def flat_keys() -> dict[str, str]:
    """``{flat key: section}`` for every section field."""
    keys = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            keys[f.name] = section
    return keys


def _with_stage(stages: list[str], name: str, on: bool) -> list[str]:
    present = [s for s in stages if s != name] + ([name] if on else [])
    return sorted(present, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER))


def make_settings(preset: str | None = None, **overrides) -> Settings:
    """Settings from the defaults, then a preset, then explicit overrides.

    ``overrides`` take flat keys (any section field: ``iterations=...``, ``lr=...``,
    ``similarity=...``), ``affine`` (a family or ``"none"``), ``init`` (``"none"`` or
    ``"convex"``), the nested ``affine_options`` / ``convex`` (dicts of their fields), ``seed``,
    ``progress``, ``stages``, or whole sections by name as dicts (``pyramid={"levels": (2, 1)}``).
    ``None`` values are ignored. Raises ``ValueError`` naming an unknown key or a wrong value.
    """
    layers = []
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        layers.append(PRESETS[preset])
    if overrides.get("similarity") is not None and overrides.get("similarity_options") is None:
        # A similarity chosen explicitly does not inherit the options of another one's preset.
        overrides = {**overrides, "similarity_options": {}}
    if (overrides.get("diffeomorphic") or overrides.get("symmetric")) and overrides.get("compose_every") is None:
        # A velocity field (or the symmetric pair of them) chosen explicitly does not inherit a preset's
        # composition of displacement steps; with an explicit compose_every, diffeomorphic folds exp(u).
        overrides = {**overrides, "compose_every": 0}
    layers.append(overrides)
    settings = apply_overrides(Settings(), layers)
    if preset is not None and "combine" in PRESETS[preset] and "dense" not in settings.stages:
        # A preset's combination rule (and its options) was chosen for its dense stage: a method
        # without one (network IO, NIO) keeps the defaults of what is not given explicitly.
        defaults = Settings().optimization
        if overrides.get("combine") is None:
            settings.optimization.combine = defaults.combine
        if overrides.get("combine_options") is None:
            settings.optimization.combine_options = dict(defaults.combine_options)
    if preset is not None and overrides.get("similarity_options") is None and "levels" in PRESETS[preset]:
        # A preset's per-level similarity options follow an override of its levels by shrink factor
        # (dirio.losses.by_level.align_to_levels); options given explicitly must fit as they are.
        settings.terms.similarity_options = align_to_levels(
            settings.terms.similarity_options, PRESETS[preset]["levels"], settings.pyramid.levels)
    return settings


def apply_overrides(base: Settings, layers) -> Settings:
    """A copy of ``base`` with each layer of flat overrides applied in turn (see :func:`make_settings`)."""
    keys = flat_keys()
    sections = {name: dataclasses.asdict(getattr(base, name)) for name in SECTIONS}
    nested = {name: dataclasses.asdict(getattr(base, name)) for name in NESTED}
    top = {name: getattr(base, name) for name in TOP_LEVEL}
    stages = list(base.stages)
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key in SECTIONS and isinstance(value, dict):
                for inner_key, inner_value in value.items():
                    if inner_key not in sections[key]:
                        raise ValueError(f"unknown {key} setting {inner_key!r}")
                    if inner_value is not None:
                        sections[key][inner_key] = inner_value
            elif key in keys:
                sections[keys[key]][key] = value
            elif key in NESTED:
                values = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else dict(value)
                known = {f.name for f in dataclasses.fields(NESTED[key])}
                unknown = sorted(set(values) - known)
                if unknown:
                    raise ValueError(f"unknown {key} setting {unknown[0]!r}; choose from {', '.join(sorted(known))}")
                nested[key].update({k: v for k, v in values.items() if v is not None})
            elif key == "affine":
                if value not in AFFINE_CHOICES:
                    raise ValueError(f"unknown affine model {value!r}; choose one of {', '.join(AFFINE_CHOICES)}")
                stages = _with_stage(stages, "affine", value != "none")
                if value != "none":
                    top["affine_family"] = value
            elif key == "init":
                if value not in INIT_CHOICES:
                    raise ValueError(f"unknown initialisation {value!r}; choose one of {', '.join(INIT_CHOICES)}")
                stages = _with_stage(stages, "convex", value == "convex")
            elif key == "method":
                if value not in METHODS:
                    raise ValueError(f"unknown method {value!r}; choose one of {', '.join(METHODS)}")
                keep = [s for s in stages if s == "affine" or (s == "convex" and value == "dense")]
                stages = keep + list(METHODS[value])
            elif key == "stages":
                stages = list(value)
            elif key in TOP_LEVEL:
                top[key] = value
            else:
                raise ValueError(f"unknown setting {key!r}")
    clip_range = sections["preprocessing"].get("clip_range")
    if clip_range is not None:
        if len(clip_range) != 2 or not float(clip_range[0]) < float(clip_range[1]):
            raise ValueError(f"`clip_range`: the clip range needs two numbers LO,HI with LO < HI, got {tuple(clip_range)}")
        sections["preprocessing"]["clip_range"] = (float(clip_range[0]), float(clip_range[1]))
    built = {name: SECTIONS[name](**values) for name, values in sections.items()}
    built["preprocessing"].validate()
    for name, values in nested.items():
        built[name] = NESTED[name](**values)
        built[name].validate()
    settings = Settings(**built, **{k: v for k, v in top.items() if k != "stages"}, stages=tuple(stages))
    for name in settings.stages:
        STAGES.get(name)
    return settings
