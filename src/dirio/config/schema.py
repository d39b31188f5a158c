"""The one schema of dirio's registration and run options, for the command line and configuration files.

Each :class:`Option` names a *key* (the configuration-file key and the command-line ``dest``:
``similarity_options`` is ``--similarity-options`` on the command line), the pure function that
parses its value, its choices, help text and default, and where it goes:

* ``target="settings"``: into :class:`dirio.config.settings.Settings`, through
  :func:`settings_from_values`. Most options set the flat key of
  :func:`dirio.config.settings.make_settings` of their own name; a few are combined:
  ``regularizer`` + ``weight`` -> ``regularizers``, ``grid_spacing`` (one value or one per level),
  ``affine_levels`` / ``affine_iterations`` / ``affine_lr`` -> ``affine_options``, ``convex_*``
  -> ``convex``, ``final_smoothing`` + ``final_smoothing_options`` -> ``final_smoothing``, ``quiet`` ->
  ``progress``.
* ``target="run"``: options of a run that are no settings (``device``, ``itk_field``,
  ``label_ids``, ``use_masks``, ``resample``, ``tre_order``).

A parser takes either command-line text or a native TOML / YAML value and returns the same value
for both: ``"4,2"`` and ``[4, 2]`` give ``(4, 2)``, ``"window=7"`` and ``{window = 7}`` give
``{"window": 7}``. Parsers raise ``ValueError`` with the reason; :meth:`Option.convert` turns it
into an :class:`OptionError` naming the key. Nothing here knows of argparse or flags: the command
line (:mod:`dirio.apps.cli`) builds its options from :data:`OPTIONS` and words errors with flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from dirio.config.presets import PRESETS
from dirio.errors import DirioError

if TYPE_CHECKING:
    from dirio.config.settings import Settings


class OptionError(DirioError):
    """A value of option ``key`` that its parser or its choices refuse.

    ``str()`` names the key (``key 'levels' expects integers, got [2.5]``); :meth:`describe` words
    the same reason for another name (the command line names the flag).
    """

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(self.describe(f"key {key!r}"))

    def describe(self, name: str) -> str:
        """The message with ``name`` for the option: ``"<name> expects ..."`` or ``"<name>: <reason>"``."""
        return f"{name} {self.reason}" if self.reason.startswith("expects ") else f"{name}: {self.reason}"


# --- parsers: command-line text or a native TOML / YAML value -> the option's value --------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(value: Any) -> int:
    """``"3"`` or ``3`` -> ``3``."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if not _is_number(value) or value != int(value):
        raise ValueError(f"expects an integer, got {value!r}")
    return int(value)


def number(value: Any) -> float:
    """``"0.5"`` or ``0.5`` -> ``0.5``."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if not _is_number(value):
        raise ValueError(f"expects a number, got {value!r}")
    return float(value)


def integers(value: Any) -> tuple[int, ...]:
    """``"4,2"``, ``[4, 2]`` or ``4`` -> ``(4, 2)`` / ``(4,)``."""
    if isinstance(value, str):
        try:
            return tuple(int(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"expected comma-separated integers, got {value!r}") from None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(_is_number(v) for v in items):
        raise ValueError(f"expects a number or a list of numbers, got {value!r}")
    if any(v != int(v) for v in items):
        raise ValueError(f"expects integers, got {value!r}")
    return tuple(int(v) for v in items)


def numbers(value: Any) -> tuple[float, ...]:
    """``"2,1"``, ``[2, 1]`` or ``2`` -> ``(2.0, 1.0)`` / ``(2.0,)``."""
    if isinstance(value, str):
        try:
            return tuple(float(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise ValueError(f"expected comma-separated numbers, got {value!r}") from None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(_is_number(v) for v in items):
        raise ValueError(f"expects a number or a list of numbers, got {value!r}")
    return tuple(float(v) for v in items)


def _scalar(text: str) -> Any:
    if "/" in text:  # one value per pyramid level, coarse to fine (`window=5/5/9`); a path stays text
        parts = [_scalar(part.strip()) for part in text.split("/")]
        if all(_is_number(part) for part in parts):
            return tuple(parts)
        return text
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def key_values(value: Any) -> dict:
    """``"window=7,kernel=gaussian"`` or a table -> ``{"window": 7, "kernel": "gaussian"}`` (numbers
    and true/false parsed in text)."""
    if isinstance(value, str):
        result = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            if "=" not in item:
                raise ValueError(f"expected key=value pairs, got {item!r}")
            key, text = item.split("=", 1)
            result[key.strip()] = _scalar(text.strip())
        return result
    if not isinstance(value, Mapping):
        raise ValueError(f"expects a table / mapping of option = value, got {value!r}")
    return dict(value)


def regularizer_weights(value: Any) -> dict[str, float | None]:
    """``"diffusion,bending=0.5"``, ``["diffusion"]`` or ``{diffusion = 0.3}`` -> ``{name: weight or
    None}`` (``None``: the ``weight`` option's, else 1)."""
    if isinstance(value, str):
        result = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, _, weight = item.partition("=")
            try:
                result[name.strip()] = float(weight) if weight else None
            except ValueError:
                raise ValueError(f"regularizer weight must be a number, got {item!r}") from None
        return result
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return {name: None for name in value}
    if isinstance(value, Mapping) and all(v is None or _is_number(v) for v in value.values()):
        return {str(name): None if weight is None else float(weight) for name, weight in value.items()}
    raise ValueError(f"expects a table of name = weight, a list of names, or NAME[=W],... text, got {value!r}")


def text(value: Any) -> str:
    """A string as it is."""
    if not isinstance(value, str):
        raise ValueError(f"expects text, got {value!r}")
    return value


def true_false_text(value: Any) -> str:
    """``"true"`` / ``"false"``, also from a boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return text(value)


def switch(value: Any) -> bool:
    """``true`` / ``false`` (or that text)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"expects true or false, got {value!r}")


def label_ids(value: Any) -> list[int]:
    """Label ids: a list of integers, comma-separated integers, or a file: ``.npz`` (first array),
    ``.txt`` / ``.csv`` of integers."""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"expects a list of integers or a file, got {value!r}")
        return [int(v) for v in value]
    if not isinstance(value, str):
        raise ValueError(f"expects a list of integers or a file, got {value!r}")
    path = Path(value)
    if path.exists():
        import numpy as np

        try:
            if path.suffix == ".npz":
                with np.load(path) as archive:
                    values = archive[archive.files[0]]
            else:
                values = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None)
        except Exception as error:  # noqa: BLE001 - any parse failure is a user error here
            raise ValueError(f"cannot read label ids from {value}: {error}") from None
        return [int(v) for v in np.ravel(values)]
    if path.suffix.lower() in (".npz", ".txt", ".csv") or os.sep in value or "/" in value:
        raise ValueError(f"label ids file {value} does not exist")
    return list(integers(value))


# --- the options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of the schema (see the module docstring).

    Attributes:
        key: configuration-file key and command-line ``dest``.
        parse: text or native value -> value; raises ``ValueError`` with the reason.
        help: one line; ``{other_key}`` stands for another option (the command line writes its flag).
        group: title of the command line's argument group (``None``: each command adds it itself).
        choices: the accepted values, or ``None``.
        metavar: the value's placeholder in the command line's help.
        default: the value when not given (``None``: the preset's or the settings' default).
        target: ``"settings"`` or ``"run"``.
        in_files: accepted as a configuration-file key.
    """

    key: str
    parse: Callable[[Any], Any]
    help: str | None = None
    group: str | None = None
    choices: tuple | None = None
    metavar: str | None = None
    default: Any = None
    target: str = "settings"
    in_files: bool = True

    @property
    def is_switch(self) -> bool:
        """An on/off option (a flag without a value on the command line)."""
        return self.parse is switch

    def convert(self, value: Any) -> Any:
        """``value`` parsed and checked against the choices.

        Raises:
            OptionError: naming the key, with the parser's reason.
        """
        try:
            converted = self.parse(value)
        except ValueError as error:
            raise OptionError(self.key, str(error)) from None
        if self.choices is not None and converted not in self.choices:
            raise OptionError(self.key, f"{converted!r} is not one of {', '.join(map(str, self.choices))}")
        return converted

    def help_text(self, name: Callable[[str], str] = str) -> str | None:
        """The help with each ``{key}`` written as ``name(key)``."""
        if self.help is None:
            return None
        return self.help.format_map({option.key: name(option.key) for option in OPTIONS})


METHOD = "method"
OPTIMISATION = "optimisation"
STAGES = "stages before the dense optimisation"
OUTPUTS = "extra outputs"
NETWORK = "network stages"

OPTIONS: tuple[Option, ...] = (
    # method
    Option("preset", text, "named defaults (documentation: Concepts, Presets)", METHOD, choices=tuple(PRESETS)),
    Option("similarity", text, None, METHOD, choices=("lncc", "ncc", "mse", "mind", "nmi")),
    Option("similarity_options", key_values, "e.g. window=7,kernel=gaussian (LNCC) or radius=1,dilation=2 (MIND); "
           "a value per pyramid level, coarse to fine, as window=5/5/9",
           METHOD, metavar="K=V,..."),
    Option("features_from", text, "compute the similarity's features (MIND) on each level's images, or on the "
           "full-resolution images and resample them to the level (full) or average them over the level's blocks "
           "(pooled, ConvexAdam's)", METHOD, choices=("level", "full", "pooled")),
    Option("feature_sampling", text, "how the moving features are read at x + u(x): exact, or with ConvexAdam's "
           "two quirks (scaled by n/(n-1), zero beyond the grid), to reproduce its field", METHOD,
           choices=("exact", "convexadam")),
    Option("regularizer", regularizer_weights, "diffusion, l1, tv, bending or folding (a hinge on det J), each with an optional weight",
           METHOD, metavar="NAME[=W],..."),
    Option("weight", number, "weight of the regularizer(s) given without one", METHOD),
    Option("normalise", text, None, METHOD, choices=("none", "minmax", "percentile", "clip")),
    Option("clip_range", numbers, "window of {normalise} clip", METHOD, metavar="LO,HI"),
    Option("auto_mask", text, "lungs: an automatic lung mask (CT in HU) when no mask is given; none: no mask "
           "(lung-ct default: lungs)", METHOD, choices=("none", "lungs")),
    Option("mask_use", text, "restrict: the similarity counts only inside the masks; fill: each image outside its "
           "mask takes the nearest inside intensity (ConvexAdam's way; convex-adam default)", METHOD,
           choices=("restrict", "fill")),
    # optimisation
    Option("levels", integers, "pyramid shrink factors, coarse to fine", OPTIMISATION, metavar="F,..."),
    Option("iterations", integers, "iterations per level", OPTIMISATION, metavar="N,..."),
    Option("grid_spacing", numbers, "parameter grid spacing in voxels of each level (one value or one per level)",
           OPTIMISATION, metavar="S[,...]"),
    Option("smoothing", integer, "passes of a 3-voxel box filter over the field's parameters (0: none)",
           OPTIMISATION, metavar="N"),
    Option("smoothing_border", text, "border of that box filter: inside (average over the grid) or zeros "
           "(zero padding, ConvexAdam's)", OPTIMISATION, choices=("inside", "zeros")),
    Option("regularize", text, "what the regularizers see: the parameters, or the smoothed field they form "
           "(ConvexAdam's)", OPTIMISATION, choices=("parameters", "smoothed")),
    Option("grid_alignment", text, "geometry of the field's resampling between grids: corners (align_corners=True) "
           "or centres (align_corners=False, ConvexAdam's)", OPTIMISATION, choices=("corners", "centres")),
    Option("compose_every", integers, "compose the field from increments folded in every N steps, one value or one "
           "per level (0: one additive field; 0 at a level: fold at its end)", OPTIMISATION, metavar="N[,...]"),
    Option("lr", number, "learning rate, voxels of the level grid per step", OPTIMISATION),
    Option("optimizer", text, None, OPTIMISATION, choices=("adam", "amsgrad", "sgd")),
    Option("schedule", text, None, OPTIMISATION, choices=("constant", "cosine", "piecewise")),
    Option("schedule_options", key_values, "e.g. constant_until=0.26,cosine_until=0.67 for piecewise",
           OPTIMISATION, metavar="K=V,..."),
    Option("diffeomorphic", switch, "optimise a stationary velocity field (scaling and squaring); with "
           "{compose_every}: fold each increment as a velocity, exp(u)", OPTIMISATION),
    Option("symmetric", switch, "symmetric diffeomorphic: two velocity fields (with {compose_every}: two composed "
           "fields) deform both images toward a middle space; the field and its inverse are composed from the halves",
           OPTIMISATION),
    Option("integration_steps", integer, "squarings of the scaling and squaring (velocity fields, diffeomorphic "
           "folds)", OPTIMISATION, metavar="N"),
    Option("combine", text, "how similarity and regularizer gradients are combined (default sum)", OPTIMISATION,
           choices=("sum", "pcgrad", "surgery")),
    Option("combine_options", key_values,
           "e.g. scope=block,block_size=8 (pcgrad, surgery); project=random|similarity|regularizer|all "
           "(pcgrad); diagnose=true (sum)", OPTIMISATION, metavar="K=V,..."),
    Option("early_stop", text, "stop a level when the similarity plateaus (default none: fixed iteration counts)",
           OPTIMISATION, choices=("none", "plateau")),
    Option("early_stop_options", key_values, "e.g. window=10,tolerance=0.01,min_iterations=20 for plateau",
           OPTIMISATION, metavar="K=V,..."),
    Option("final_smoothing", text, "smooth the dense stage's final field by a Gaussian: auto (when smoothing it "
           "raises the similarity loss by at most a tolerance: the images do not need its finest detail), always, "
           "or off (brain-mri default: auto)", OPTIMISATION, choices=("off", "auto", "always")),
    Option("final_smoothing_options", key_values, "sigma=1.5 (voxels), probe_sigma=1.5, tolerance=0.02 (rise of the "
           "similarity loss)", OPTIMISATION, metavar="K=V,..."),
    Option("seed", integer, None, OPTIMISATION),
    Option("device", text, "auto (CUDA when present), cpu, cuda, cuda:N", OPTIMISATION, default="auto",
           target="run"),
    # stages
    Option("affine", text, "pre-alignment model (default: the preset's, else none); the written field is the "
           "composition, the matrix is written as affine_*.json (and .tfm with SimpleITK)", STAGES,
           choices=("none", "translation", "rigid", "similarity", "affine")),
    Option("affine_levels", integers, "pyramid of the affine stage", STAGES, metavar="F,..."),
    Option("affine_iterations", integers, "iterations per affine level", STAGES, metavar="N,..."),
    Option("affine_lr", number, "Adam step of the affine stage, voxels per iteration", STAGES),
    Option("init", text, "initial field of the dense stage: none, or convex (discrete + coupled convex step)",
           STAGES, choices=("none", "convex")),
    Option("convex_spacing", integer, "cell size of the discrete step, voxels", STAGES, metavar="G"),
    Option("convex_radius", integer, "search radius of the discrete step in cells (displacements up to R*G voxels)",
           STAGES, metavar="R"),
    Option("convex_coupling", numbers, "increasing coupling weights of the convex step", STAGES, metavar="W,..."),
    Option("convex_symmetric", true_false_text, "also solve moving->fixed and make the two fields inverse "
           "consistent", STAGES, choices=("true", "false")),
    Option("convex_memory", number, "largest cost volume kept in memory; larger ones are recomputed slab by slab",
           STAGES, metavar="MB"),
    Option("convex_borders", text, "beyond the cell grid: convexadam (zero features, smoothing over zero padding, the "
           "reference's symmetrisation; the default) or replicate (edge values, inside averages)", STAGES,
           choices=("convexadam", "replicate")),
    # network stages
    Option("method", text, "how the field is found: dense (the default: optimise a field), network (one forward "
           "pass of a pretrained network), the network's weights tuned on the pair (all at once, or LapIRN level "
           "by level: nio), or the network's field refined by the dense stage (documentation: Networks)", NETWORK,
           choices=("dense", "network", "network-io", "nio", "network+dense")),
    Option("model", text, "network checkpoint (a dirio checkpoint, an upstream LapIRN file, or ICON weights: documentation, Networks); "
           "default: the packaged LapIRN OASIS brain model", NETWORK, metavar="CHECKPOINT"),
    Option("network_architecture", text, "architecture of an upstream LapIRN file or of ICON weights (documentation: Networks)",
           NETWORK, metavar="NAME"),
    Option("network_axes", text, "image axes in the network's training order: identity (default), or e.g. "
           "0,2,-1 (documentation, Networks: brains on the VoxelMorph grid with the LapIRN OASIS model)", NETWORK, metavar="AXES"),
    Option("network_iterations", integers, "steps per level (default 50 when all weights are tuned, 100,60,30 "
           "for nio)", NETWORK, metavar="N,..."),
    Option("network_levels", integers, "network levels whose weights are optimised (LapIRN 1 to 3; default all)",
           NETWORK, metavar="K,..."),
    Option("network_resolution", numbers, "shrink factor of the loss grid per level (default 1: full resolution; "
           "the final field is always full resolution)", NETWORK, metavar="F[,...]"),
    Option("network_lr", number, "learning rate of the weights (default 2e-5, nio 1e-4)", NETWORK),
    Option("network_optimizer", text, "default amsgrad, nio adam", NETWORK, choices=("adam", "amsgrad", "sgd")),
    Option("network_weight_decay", number, "default 1e-3, nio 0", NETWORK),
    Option("network_similarity", text, "similarity of the network stages (default lncc, window 7)", NETWORK,
           choices=("lncc", "ncc", "mse", "mind", "nmi")),
    Option("network_similarity_options", key_values, "e.g. window=7", NETWORK, metavar="K=V,..."),
    Option("network_regularizer", text, "regularizer of the network stages (gradicon: inverse consistency)",
           NETWORK, choices=("diffusion", "bending", "l1", "tv", "gradicon")),
    Option("network_lambda", number, "the network loss is (1 - lambda) similarity + lambda regularizer "
           "(default 0.4: 0.6 LNCC + 0.4 diffusion, the NIO paper's loss)", NETWORK),
    Option("network_budget", text, "defaults of the network options not given: paper (the papers' schedules: "
           "nio 100,60,30 steps on every level, IO 50 steps) or cpu (about 3 minutes per brain on a CPU: "
           "nio optimises LapIRN's coarsest level only, 25 steps on a half resolution loss grid, or levels 1 and 2 "
           "(10 and 20 steps at 3e-4) when LapIRN's coarsest field fits the pair worse than no deformation; "
           "IO 1 step, with a warning on such pairs; both then refine the field for 10 steps)", NETWORK, choices=("paper", "cpu")),
    Option("network_refine", integer, "full-resolution steps that refine the network's field and remove its "
           "folds (LNCC, diffusion and a folding penalty on the field itself; default 0; 10 with the cpu network "
           "budget)", NETWORK, metavar="N"),
    Option("network_checkpointing", switch, "gradient checkpointing: less memory, about one more forward pass",
           NETWORK),
    Option("network_mixed_precision", switch, "bfloat16 autocast of the network on CUDA", NETWORK),
    # extra outputs
    Option("itk_field", switch, "also write the field as an ITK displacement field (LPS mm): .nii.gz with the "
           "vector intent, and .h5 with SimpleITK (for ANTs, SimpleITK, ITK-SNAP, 3D Slicer)", OUTPUTS,
           target="run"),
    # options every command adds itself (own help, short flags, command-line spelling)
    Option("quiet", switch, "no progress output", in_files=False),
    Option("label_ids", label_ids, "labels scored by Dice/HD95: 2,3,4 or a .npz/.txt file", target="run"),
    Option("use_masks", switch, "pass the dataset's masks to the registration as similarity masks", target="run"),
    Option("resample", switch, "resample moving-side inputs onto the fixed grid", target="run"),
    Option("tre_order", integer, "interpolation of u at keypoints", choices=(1, 3), target="run"),
    Option("inverse", switch, "also write the inverse field inverse_disp_<fixed>_<moving>.nii.gz on the moving grid "
           "(= the fixed grid; with {itk_field} its ITK form too) and the inverse consistency into metrics.json",
           target="run", in_files=False),
)
OPTIONS_BY_KEY: dict[str, Option] = {option.key: option for option in OPTIONS}
# The options shared by every command that registers, in the order of their groups.
REGISTRATION_OPTIONS: tuple[Option, ...] = tuple(option for option in OPTIONS if option.group is not None)
# The keys of a configuration file.
FILE_KEYS: tuple[str, ...] = tuple(option.key for option in OPTIONS if option.in_files)

_AFFINE = {"affine_levels": "levels", "affine_iterations": "iterations", "affine_lr": "lr"}
_CONVEX = {"convex_spacing": "grid_spacing", "convex_radius": "radius", "convex_coupling": "coupling",
           "convex_symmetric": "symmetric", "convex_memory": "memory_mb", "convex_borders": "borders"}
# Options of target "settings" that do not set the flat key of their own name.
_COMBINED = {"preset", "regularizer", "weight", "grid_spacing", "compose_every", "quiet", "final_smoothing",
             "final_smoothing_options", *_AFFINE, *_CONVEX}


def option(key: str) -> Option:
    """The option of ``key``; ``KeyError`` for another."""
    return OPTIONS_BY_KEY[key]


def parse_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """Every value of ``{key: text or native value}`` parsed by its option (``None`` values kept).

    Raises:
        OptionError: naming the first unknown key or refused value.
    """
    parsed = {}
    for key, value in values.items():
        if key not in OPTIONS_BY_KEY:
            raise OptionError(key, f"unknown option; choose from {', '.join(sorted(OPTIONS_BY_KEY))}")
        parsed[key] = None if value is None else OPTIONS_BY_KEY[key].convert(value)
    return parsed


def settings_overrides(values: Mapping[str, Any], preset: str | None = None) -> dict[str, Any]:
    """Parsed option values -> the flat overrides of :func:`dirio.config.settings.make_settings`.

    ``regularizer`` names regularizers with optional weights; those without take ``weight`` (else
    1). ``weight`` alone weights every regularizer of the preset (else diffusion). One
    ``grid_spacing`` or ``compose_every`` value applies to every level. ``quiet`` turns progress bars off. Options
    of target ``"run"`` are left out.
    """
    preset = values.get("preset") or preset
    weight = values.get("weight")
    regularizers = values.get("regularizer")
    if regularizers is not None:
        default = 1.0 if weight is None else weight
        regularizers = {name: (default if w is None else w) for name, w in regularizers.items()}
    elif weight is not None:
        base = PRESETS.get(preset, {}).get("regularizers", {"diffusion": 1.0})
        regularizers = {name: weight for name in base}
    grid_spacing = values.get("grid_spacing")
    if grid_spacing is not None and len(grid_spacing) == 1:
        grid_spacing = grid_spacing[0]
    compose_every = values.get("compose_every")
    if compose_every is not None and len(compose_every) == 1:
        compose_every = compose_every[0]
    symmetric = values.get("convex_symmetric")
    convex = {name: values.get(key) for key, name in _CONVEX.items()}
    convex["symmetric"] = None if symmetric is None else symmetric == "true"
    overrides = {
        key: value for key, value in values.items()
        if key not in _COMBINED and OPTIONS_BY_KEY[key].target == "settings"
    }
    overrides.update(
        regularizers=regularizers,
        grid_spacing=grid_spacing,
        compose_every=compose_every,
        affine_options={name: values.get(key) for key, name in _AFFINE.items()},
        convex=convex,
        final_smoothing={**(values.get("final_smoothing_options") or {}), "mode": values.get("final_smoothing")},
    )
    if values.get("quiet") is not None:
        overrides["progress"] = not values["quiet"]
    return overrides


def settings_from_values(values: Mapping[str, Any], preset: str | None = None) -> Settings:
    """:class:`Settings` from option values (text or native, by key) over the defaults and the preset.

    ``preset`` applies when ``values`` has no ``preset`` key. Options of target ``"run"`` are
    accepted and left out; ``None`` values count as not given.

    Raises:
        OptionError: a refused value, naming its key.
        DirioError: settings a run would fail on (unknown similarity options, inconsistent levels, a
            clip range with LO >= HI...), with the one-line reason (an option named as `key`).
    """
    from dirio.config.settings import make_settings  # torch and the engine: only when settings are built

    parsed = parse_values(values)
    preset = parsed.get("preset") or preset
    try:
        settings = make_settings(preset, **settings_overrides(parsed, preset))
        settings.validate()
    except (ValueError, TypeError) as error:
        raise DirioError(str(error)) from None
    _refuse_unused_network_options(parsed, settings)
    return settings


def _refuse_unused_network_options(parsed: Mapping[str, Any], settings: Settings) -> None:
    """Network options given for a method without a network stage would be silently ignored: refuse them."""
    from dirio.methods.network import NETWORK_STAGES

    if any(name in NETWORK_STAGES for name in settings.stages):
        return
    given = [option.key for option in OPTIONS if option.group == NETWORK and option.key != "method"
             and parsed.get(option.key) is not None]
    if given:
        keys = ", ".join(f"`{key}`" for key in given)
        raise DirioError(f"{keys} {'applies' if len(given) == 1 else 'apply'} to the network methods only "
                         f"(network, network-io, nio, network+dense) but the method is {settings.method}: drop "
                         f"{'it' if len(given) == 1 else 'them'} or choose a network `method`")
