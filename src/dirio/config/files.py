"""Configuration files of ``dirio run``: TOML or YAML with the keys of the ``dirio register`` options.

A key is an option name without the leading dashes, with ``-`` or ``_`` (``similarity_options`` or
``similarity-options``); its value is what the option takes, either as the command-line text
(``levels = "4,2"``) or as a native value (``levels = [4, 2]``, ``similarity_options = {window = 7}``,
``regularizer = {diffusion = 0.3}``, ``diffeomorphic = true``). The options are turned into
:class:`dirio.config.settings.Settings` by the same code as the command line
(:func:`dirio.apps.cli.settings_from_options`), so a config file and the equivalent flags give the same
settings. Besides those, the run keys ``label_ids``, ``use_masks``, ``resample``, ``tre_order`` and
``device`` are accepted. Any other key is an error naming the file and the key.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dirio.errors import DirioError
from dirio.config.settings import Settings

RUN_KEYS = ("label_ids", "use_masks", "resample", "tre_order")


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
    """

    settings: Settings
    config_file: str | None = None
    label_ids: list[int] | None = None
    use_masks: bool = True
    resample: bool = False
    tre_order: int = 3
    device: str = "auto"

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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _option_value(action: argparse.Action, key: str, value: Any, source: str) -> Any:
    """A config value converted to what the option's argparse action would give."""
    from dirio.apps import cli

    def fail(expected: str) -> DirioError:
        return DirioError(f"{source}: key {key!r} expects {expected}, got {value!r}")

    kind = action.type
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise fail("true or false")
        return value if value else None
    if isinstance(value, str) and kind is not None:
        try:
            converted = kind(value)
        except (argparse.ArgumentTypeError, ValueError) as error:
            raise DirioError(f"{source}: key {key!r}: {error}") from None
    elif kind in (cli._int_list, cli._float_list):
        items = value if isinstance(value, list) else [value]
        if not all(_is_number(v) for v in items):
            raise fail("a number or a list of numbers")
        converted = tuple(int(v) if kind is cli._int_list else float(v) for v in items)
        if kind is cli._int_list and any(v != int(v) for v in items):
            raise fail("integers")
    elif kind is cli._key_values:
        if not isinstance(value, dict):
            raise fail("a table / mapping of option = value")
        converted = dict(value)
    elif kind is cli._regularizers:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            converted = {name: None for name in value}
        elif isinstance(value, dict) and all(v is None or _is_number(v) for v in value.values()):
            converted = {name: None if weight is None else float(weight) for name, weight in value.items()}
        else:
            raise fail("a table of name = weight, a list of names, or NAME[=W],... text")
    elif kind in (int, float):
        if not _is_number(value) or (kind is int and value != int(value)):
            raise fail("an integer" if kind is int else "a number")
        converted = kind(value)
    elif action.dest == "convex_symmetric" and isinstance(value, bool):
        converted = "true" if value else "false"
    elif isinstance(value, str):
        converted = value
    else:
        raise fail("text")
    if action.choices is not None and converted not in action.choices:
        raise DirioError(f"{source}: key {key!r}: {converted!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def _run_value(key: str, value: Any, source: str, base: Path | None) -> Any:
    from dirio.apps import cli

    if key == "label_ids":
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [int(v) for v in value]
        if isinstance(value, str):
            candidate = Path(value)
            if base is not None and not candidate.is_absolute() and (base / candidate).exists():
                value = str(base / candidate)
            try:
                return cli._label_ids(value)
            except argparse.ArgumentTypeError as error:
                raise DirioError(f"{source}: key 'label_ids': {error}") from None
        raise DirioError(f"{source}: key 'label_ids' expects a list of integers or a file, got {value!r}")
    if key in ("use_masks", "resample"):
        if not isinstance(value, bool):
            raise DirioError(f"{source}: key {key!r} expects true or false, got {value!r}")
        return value
    if key == "tre_order":
        if value not in (1, 3) or isinstance(value, bool):
            raise DirioError(f"{source}: key 'tre_order' expects 1 or 3, got {value!r}")
        return int(value)
    raise AssertionError(key)


def split_config(content: dict, source: str, base: Path | None = None) -> tuple[dict, dict]:
    """Config keys -> (registration options by ``dest``, run options).

    Raises:
        DirioError: ``"<source>: unknown key 'x'"`` for a key that is neither a ``dirio register``
            option nor a run key, or a value of the wrong kind.
    """
    from dirio.apps.cli import registration_actions

    actions = {action.dest: action for action in registration_actions() if action.dest != "help"}
    registration, run = {}, {}
    for raw_key, value in content.items():
        key = str(raw_key).replace("-", "_")
        if key in RUN_KEYS:
            run[key] = _run_value(key, value, source, base)
        elif key in actions:
            converted = _option_value(actions[key], str(raw_key), value, source)
            if converted is not None:
                registration[key] = converted
        else:
            known = ", ".join(sorted(set(actions) | set(RUN_KEYS)))
            raise DirioError(f"{source}: unknown key {raw_key!r} (keys are the dirio register options: {known})")
    return registration, run


def run_configuration(config_file: str | Path | None, explicit: dict | None = None,
                      run_values: dict | None = None) -> RunConfiguration:
    """The configuration of a run: the config file, then the explicitly given command-line options.

    Args:
        config_file: TOML / YAML file, or ``None`` (defaults and ``explicit`` only).
        explicit: registration options given on the command line (``dest`` -> parsed value); they
            override the file's.
        run_values: run options given on the command line (``None`` values are ignored).
    Raises:
        DirioError: one line naming the config file and the key for every problem.
    """
    from dirio.apps.cli import settings_from_options

    registration: dict = {}
    run: dict = {}
    source = "command line"
    if config_file is not None:
        path = Path(config_file).resolve()
        source = str(path)
        registration, run = split_config(read_config_file(path), source, base=path.parent)
    registration.update(explicit or {})
    run.update({k: v for k, v in (run_values or {}).items() if v is not None})
    device = registration.pop("device", None) or "auto"
    try:
        settings = settings_from_options(registration, quiet=True)
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
        device=device,
    )
