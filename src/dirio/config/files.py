"""Configuration files of ``dirio run``: TOML or YAML with the keys of :mod:`dirio.config.schema`.

A key is an option's key (the ``dirio register`` option without the leading dashes), with ``-`` or
``_`` (``similarity_options`` or ``similarity-options``); its value is what the option takes, either
as text (``levels = "4,2"``) or as a native value (``levels = [4, 2]``, ``similarity_options =
{window = 7}``, ``regularizer = {diffusion = 0.3}``, ``diffeomorphic = true``). Values are parsed
and turned into :class:`dirio.config.settings.Settings` by the schema, as the command line's are
(:func:`dirio.config.schema.settings_from_values`), so a config file and the equivalent flags give
the same settings. Besides those, the run keys ``label_ids``, ``use_masks``, ``resample``,
``tre_order``, ``device`` and ``itk_field`` are accepted. Any other key is an error naming the file
and the key. A relative path in a value (``model``, a ``label_ids`` file) is taken from the config
file's folder, whatever the folder dirio runs in; a ``model`` that does not exist is an error before
any work.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dirio.config.schema import FILE_KEYS, OPTIONS_BY_KEY, OptionError, settings_from_values
from dirio.config.settings import Settings
from dirio.errors import DirioError


@dataclass
class RunConfiguration:
    """Everything a dataset run needs besides the dataset and the output folder.

    Attributes:
        settings: the registration settings (progress bars off: the runner prints one line per pair).
        config_file: the config file's absolute path, or ``None``.
        label_ids: labels scored by Dice/HD95 (``None``: the dataset JSON's ``labels``, else every
            label present).
        use_masks: pass the dataset's masks (masksTr) to the registration as similarity masks.
        resample: resample moving-side inputs onto the fixed grid (else differing grids fail the pair).
        tre_order: interpolation order of the displacement at keypoints (3 = Learn2Reg's cubic).
        device: ``auto``, ``cpu``, ``cuda``; under torchrun each rank takes ``cuda:LOCAL_RANK``.
        itk_field: also write every field as an ITK displacement field.
    """

    settings: Settings
    config_file: str | None = None
    label_ids: list[int] | None = None
    use_masks: bool = True
    resample: bool = False
    tre_order: int = 3
    device: str = "auto"
    itk_field: bool = False

    def run_options(self) -> dict:
        """The run options that change results (hashed with the settings to recognise a run folder)."""
        return {"label_ids": self.label_ids, "use_masks": self.use_masks, "resample": self.resample,
                "tre_order": self.tre_order}


def read_config_file(path: str | Path) -> dict:
    """Parse a ``.toml`` or ``.yaml`` / ``.yml`` file into a dict.

    Raises:
        DirioError: naming the file when it is missing, unreadable, of another suffix, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise DirioError(f"{path}: config file not found")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DirioError(f"{path}: cannot read the config file ({error})") from None
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            content = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise DirioError(f"{path}: not valid TOML ({error})") from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError as error:
            reason = " ".join(str(error).split())
            raise DirioError(f"{path}: not valid YAML ({reason})") from None
        content = {} if content is None else content
    else:
        raise DirioError(f"{path}: config files are TOML (.toml) or YAML (.yaml, .yml), got {suffix or 'no suffix'!r}")
    if not isinstance(content, dict):
        raise DirioError(f"{path}: a config file must hold key = value pairs at its top level")
    return content


# Keys whose value can name a file. One rule for all of them: a relative path in a config file is
# taken from the config file's folder, never from the folder dirio runs in.
FILE_VALUED_KEYS = ("model", "label_ids")


def _names_file(key: str, value: str) -> bool:
    """Whether a text value of a :data:`FILE_VALUED_KEYS` key is a path (``label_ids`` also takes
    ``"2,3,4"``)."""
    return key != "label_ids" or not re.fullmatch(r"[\s\d,+-]*", value)


def _file_value(key: str, value: Any, source: str, base: Path | None) -> Any:
    """A config value parsed by its schema option; a relative file path (``model``, a ``label_ids``
    file) is taken from the config file's folder ``base``."""
    if key in FILE_VALUED_KEYS and isinstance(value, str) and base is not None and _names_file(key, value):
        candidate = Path(value).expanduser()
        if not candidate.is_absolute():
            value = str(base / candidate)
    try:
        return OPTIONS_BY_KEY[key].convert(value)
    except OptionError as error:
        raise DirioError(f"{source}: {error}") from None


def split_config(content: dict, source: str, base: Path | None = None) -> tuple[dict, dict]:
    """Config keys -> (settings options, run options), each ``{key: parsed value}``.

    Raises:
        DirioError: ``"<source>: unknown key 'x'"`` for a key that is not in the schema's file keys,
            ``"<source>: keys 'x_y' and 'x-y' are the same option"`` for both spellings of one key,
            or ``"<source>: key 'x' ..."`` for a value of the wrong kind.
    """
    registration, run = {}, {}
    spelled: dict[str, str] = {}
    for raw_key, value in content.items():
        key = str(raw_key).replace("-", "_")
        if key not in FILE_KEYS:
            known = ", ".join(sorted(FILE_KEYS))
            raise DirioError(f"{source}: unknown key {raw_key!r} (keys are the dirio register options: {known})")
        if key in spelled:
            raise DirioError(f"{source}: keys {spelled[key]!r} and {raw_key!r} are the same option; keep one")
        spelled[key] = str(raw_key)
        target = run if OPTIONS_BY_KEY[key].target == "run" else registration
        target[key] = _file_value(key, value, source, base)
    return registration, run


def run_configuration(config_file: str | Path | None, explicit: dict | None = None,
                      run_values: dict | None = None) -> RunConfiguration:
    """The configuration of a run: the config file, then the explicitly given options.

    Args:
        config_file: TOML / YAML file, or ``None`` (defaults and ``explicit`` only).
        explicit: options given on the command line (schema key -> parsed value, e.g. ``{"lr": 0.3}``,
            ``{"device": "cpu"}``); they override the file's.
        run_values: run options given on the command line (``None`` values are ignored).
    Raises:
        DirioError: one line naming the config file and the key for every problem
            (:class:`dirio.config.schema.OptionError` naming the key without a config file).
    """
    registration: dict = {}
    run: dict = {}
    source = "command line"
    if config_file is not None:
        path = Path(config_file).resolve()
        source = str(path)
        registration, run = split_config(read_config_file(path), source, base=path.parent)
    for key, value in (explicit or {}).items():
        target = run if key in OPTIONS_BY_KEY and OPTIONS_BY_KEY[key].target == "run" else registration
        target[key] = value
    run.update({k: v for k, v in (run_values or {}).items() if v is not None})
    model = registration.get("model")
    if model is not None and not Path(model).expanduser().is_file():  # a usage error, not a failure of every pair
        if config_file is not None and "model" not in (explicit or {}):
            raise DirioError(f"{source}: key 'model': {model}: network checkpoint not found (a relative path is "
                             f"taken from the config file's folder)")
        raise DirioError(f"{model}: network checkpoint not found (`model`)")
    try:
        settings = settings_from_values({**registration, "quiet": True})
    except DirioError as error:
        if config_file is None:
            raise
        raise DirioError(f"{source}: {error}") from None
    return RunConfiguration(
        settings=settings,
        config_file=None if config_file is None else source,
        label_ids=run.get("label_ids"),
        use_masks=run.get("use_masks", True),
        resample=run.get("resample", False),
        tre_order=run.get("tre_order", 3),
        device=run.get("device") or "auto",
        itk_field=bool(run.get("itk_field", False)),
    )
