"""Registration settings and the named presets.

A :class:`Settings` object holds every choice of one registration: intensity normalisation,
the similarity term, the regularisers and their weights, and the engine configuration. Presets
are named sets of overrides over the defaults; explicit options (CLI flags, API keywords)
override a preset.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .optim.engine import EngineConfig

NORMALISATIONS = ("none", "minmax", "percentile", "clip")


@dataclass
class Settings:
    """Every choice of one registration.

    Attributes:
        normalise: intensity normalisation applied to both images before registration:
            ``"none"``, ``"minmax"``, ``"percentile"`` (clip to the 0.5/99.5 percentiles of
            nonzero voxels, then [0, 1]) or ``"clip"`` (clip to ``clip_range`` then [0, 1]).
        clip_range: the window of ``"clip"`` (e.g. a CT window in HU).
        similarity: name of the similarity term (see :func:`dirio.similarity.make_similarity`).
        similarity_options: its options (e.g. ``{"window": 5}`` for LNCC).
        regularizers: ``{name: weight}`` (see :func:`dirio.regularizers.make_regularizer`).
        engine: optimisation settings (pyramid, iterations, optimiser, schedule, ...).
    """

    normalise: str = "percentile"
    clip_range: tuple[float, float] | None = None
    similarity: str = "lncc"
    similarity_options: dict[str, Any] = field(default_factory=lambda: {"window": 5})
    regularizers: dict[str, float] = field(default_factory=lambda: {"diffusion": 0.3})
    engine: EngineConfig = field(default_factory=EngineConfig)

    def to_dict(self) -> dict:
        """A JSON-ready copy (used in metrics.json and reports)."""
        return dataclasses.asdict(self)


# Each preset documents where its defaults come from. Values were chosen on synthetic warps of
# the voxelmorph brain and on brain-vs-mirrored-brain pairs (not on any evaluation pair); see
# README "Presets" and benchmarks/RESULTS.md.
PRESETS: dict[str, dict[str, Any]] = {
    "brain-mri": {
        # Skull-stripped T1 in [0, 1]: robust percentile scaling only removes outliers.
        "normalise": "percentile",
        # LNCC is the standard mono-modal brain similarity (VoxelMorph uses a 9^3 window at full
        # resolution; 5^3 at half resolution covers about the same 9-10 mm).
        "similarity": "lncc",
        "similarity_options": {"window": 5},
        # Weight chosen on synthetic warps and the brain-vs-mirror pair (benchmarks/RESULTS.md):
        # 0.1 starts to fold on the mirror pair, 1.0 loses about 0.02 Dice on both.
        "regularizers": {"diffusion": 0.3},
        # Quarter then half resolution: full-resolution iterations cost ~10x more on a CPU and
        # the half-resolution field, upsampled, already reaches sub-voxel accuracy.
        # lr 0.5 level voxels per step with the [1, 2, 3, 2, 1] / 9 parameter smoothing and a
        # cosine decay per level: lr 1.0 or no smoothing gave rough fields (see RESULTS.md).
        "engine": {"levels": (4, 2), "iterations": (80, 40), "lr": 0.5, "schedule": "cosine", "smoothing": 2},
    },
    "lung-ct": {
        # Lung CT in HU: air is -1000; the elastix pair has padding down to -2048 outside the scan.
        "normalise": "clip",
        "clip_range": (-1000.0, 1500.0),
        # ConvexAdam's lung defaults: MIND-SSC with radius 1, dilation 2, MSE between descriptors.
        "similarity": "mind",
        "similarity_options": {"radius": 1, "dilation": 2},
        "regularizers": {"diffusion": 1.0},
        # The continuous-optimisation paper: Adam with the constant -> cosine -> linear schedule.
        "engine": {"levels": (4, 2), "iterations": (100, 60), "lr": 1.0, "schedule": "piecewise"},
    },
}


def make_settings(preset: str | None = None, **overrides) -> Settings:
    """Settings from the defaults, then a preset, then explicit overrides.

    ``overrides`` take :class:`Settings` field names; :class:`EngineConfig` fields may be given
    directly (``iterations=...``, ``lr=...``) or inside ``engine={...}``. ``None`` values are ignored.
    """
    values: dict[str, Any] = {}
    engine_values: dict[str, Any] = {}
    layers = []
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        layers.append(PRESETS[preset])
    if overrides.get("similarity") is not None and overrides.get("similarity_options") is None:
        # A similarity chosen explicitly does not inherit the options of another one's preset.
        overrides = {**overrides, "similarity_options": {}}
    layers.append(overrides)
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    settings_fields = {f.name for f in dataclasses.fields(Settings)}
    for layer in layers:
        for key, value in layer.items():
            if value is None:
                continue
            if key == "engine":
                engine_values.update({k: v for k, v in value.items() if v is not None})
            elif key in engine_fields:
                engine_values[key] = value
            elif key in settings_fields:
                values[key] = value
            else:
                raise ValueError(f"unknown setting {key!r}")
    if values.get("normalise", "percentile") not in NORMALISATIONS:
        raise ValueError(f"unknown normalisation {values['normalise']!r}; choose one of {', '.join(NORMALISATIONS)}")
    clip_range = values.get("clip_range")
    if clip_range is not None:
        if len(clip_range) != 2 or not float(clip_range[0]) < float(clip_range[1]):
            raise ValueError(f"clip range (--clip-range) needs two numbers LO,HI with LO < HI, got {tuple(clip_range)}")
        values["clip_range"] = (float(clip_range[0]), float(clip_range[1]))
    if values.get("normalise") == "clip" and clip_range is None:
        raise ValueError("normalisation 'clip' needs a clip range (low, high)")
    return Settings(**values, engine=EngineConfig(**engine_values))
