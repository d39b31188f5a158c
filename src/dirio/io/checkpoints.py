"""Network checkpoints: dirio's own file format, and loading weights with a one-line error on mismatch.

A dirio network checkpoint is a :func:`torch.save` file holding one dict::

    {
        "format": "dirio-network",     # fixed
        "version": 1,                  # CHECKPOINT_VERSION
        "architecture": "lapirn-disp", # a name in dirio.transforms.networks.NETWORKS
        "settings": {...},             # the constructor keyword arguments of that architecture
        "state_dict": {...},           # module.state_dict(), tensors on the CPU
        "extra": {...},                # free metadata (training data, provenance, losses...)
    }

Every value is a plain type (str, int, float, bool, None, list, tuple, dict) or a tensor, so the
file loads with ``torch.load(path, weights_only=True)``: reading a checkpoint never runs code from
the file. Files are written atomically (:mod:`dirio.io.atomic`).

:func:`build_network` also reads the plain ``state_dict`` files of the upstream LapIRN repository
(``cwmok/LapIRN``), recognised by their keys; which field they predict (displacement or velocity)
is not in the file, so an architecture hint is needed for them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from dirio.errors import DirioError
from dirio.io.atomic import atomic_output

PathLike = str | os.PathLike

CHECKPOINT_FORMAT = "dirio-network"
CHECKPOINT_VERSION = 1
_LISTED_KEYS = 3  # how many key names an error message shows before "(+N more)"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_KEYS])
    return shown + (f" (+{len(names) - _LISTED_KEYS} more)" if len(names) > _LISTED_KEYS else "")


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, Any]) -> str | None:
    """Describe how ``found`` differs from ``expected`` (a module's ``state_dict()``), or ``None`` when it fits.

    Returns:
        A short text naming a few missing keys, unexpected keys and keys whose shapes differ, each
        list followed by the count of the others, e.g. ``"missing keys a, b, c (+45 more);
        unexpected keys d"``.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} {tuple(found[k].shape)} in the file, {tuple(v.shape)} in the network"
        for k, v in expected.items()
        if k in found and (not isinstance(found[k], torch.Tensor) or tuple(found[k].shape) != tuple(v.shape))
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {_listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listed(unexpected)}")
    if shapes:
        parts.append(f"shape mismatch {_listed(shapes)}")
    return "; ".join(parts) or None


def load_state_dict_checked(module: nn.Module, state_dict: Mapping[str, Any], source: str, what: str,
                            load: bool = True) -> None:
    """Load ``state_dict`` into ``module`` (strict), or raise a one-line :class:`DirioError`.

    Args:
        module: the network.
        state_dict: the weights.
        source: where they come from, for the message (usually the file name).
        what: the network, for the message (e.g. ``"lapirn-disp (start_channel=7)"``).
        load: ``False`` checks only (keys, shapes, finite values), e.g. against a module on the meta device.
    Raises:
        DirioError: ``"<source>: weights do not fit <what>: missing keys ...; unexpected keys ...;
            shape mismatch ..."``, or ``"<source>: non-finite weights (NaN or Inf) in ..."``.
    """
    problem = state_dict_mismatch(module.state_dict(), state_dict)
    if problem:
        raise DirioError(f"{source}: weights do not fit {what}: {problem}")
    problem = non_finite_weights(state_dict)
    if problem:
        raise DirioError(f"{source}: {problem}; the checkpoint is damaged or was saved from a diverged training")
    if load:
        module.load_state_dict(state_dict, strict=True)


def non_finite_weights(state_dict: Mapping[str, Any]) -> str | None:
    """Name the floating-point tensors of ``state_dict`` holding NaN or Inf values, or ``None``.

    Returns:
        e.g. ``"non-finite weights (NaN or Inf) in 24 of 126 tensors: levels.0.encoder.0.weight, ...
        (+21 more)"``.
    """
    tensors = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if not bad:
        return None
    return f"non-finite weights (NaN or Inf) in {len(bad)} of {len(tensors)} tensors: {_listed(bad)}"


def _check_plain(value: Any, where: str, tensors: bool) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return
    if isinstance(value, torch.Tensor):
        if tensors:
            return
        raise TypeError(f"{where} is a tensor; settings must be plain values")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]", tensors)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}")
            _check_plain(item, f"{where}[{key!r}]", tensors)
        return
    raise TypeError(f"{where} is a {type(value).__name__}; only str, int, float, bool, None, list, tuple, dict allowed")


def save_checkpoint(
    path: PathLike,
    module: nn.Module,
    architecture: str | None = None,
    settings: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``module`` as a dirio network checkpoint (format in the module docstring), atomically.

    Args:
        path: the file (``.pt`` by convention).
        module: the network; its ``state_dict()`` is stored on the CPU.
        architecture: registry name; default ``module.architecture`` (dirio's networks have one).
        settings: constructor keyword arguments; default ``module.settings``.
        extra: free metadata (plain values and tensors).
        overwrite: allow replacing an existing file.
    Raises:
        DirioError: when ``path`` exists and ``overwrite`` is false.
        ValueError: when architecture or settings are missing or not plain values.
    """
    architecture = architecture if architecture is not None else getattr(module, "architecture", None)
    settings = settings if settings is not None else getattr(module, "settings", None)
    if not isinstance(architecture, str):
        raise ValueError("save_checkpoint needs an architecture name (the module has no .architecture)")
    if settings is None:
        raise ValueError("save_checkpoint needs the constructor settings (the module has no .settings)")
    try:
        _check_plain(dict(settings), "settings", tensors=False)
        _check_plain(dict(extra or {}), "extra", tensors=True)
    except TypeError as exc:
        raise ValueError(f"cannot save checkpoint {path}: {exc}") from None
    state = OrderedDict((k, v.detach().cpu().clone()) for k, v in module.state_dict().items())
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": architecture,
        "settings": dict(settings),
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    with atomic_output(path, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)


def _read(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a one-line error naming the file."""
    if not path.exists():
        raise DirioError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise DirioError(f"{path}: is a directory; expected a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or holds objects other than weights
        text = str(exc)
        if "Unsupported global" in text:
            reason = "it holds Python objects other than tensors and plain values, which dirio does not unpickle"
        elif "central directory" in text or "zip archive" in text:
            reason = "a damaged or truncated file"
        else:
            reason = "not a file written by torch.save"
        raise DirioError(f"{path}: not a readable weights-only PyTorch checkpoint ({reason})") from None


def _check_entries(content: Mapping[str, Any], path: Path) -> None:
    """Refuse a dirio checkpoint whose entries have the wrong types (a damaged or forged file)."""
    problems = []
    if not isinstance(content["architecture"], str):
        problems.append(f"architecture is a {type(content['architecture']).__name__}, not a name")
    settings = content["settings"]
    if not isinstance(settings, Mapping) or not all(isinstance(k, str) for k in settings):
        problems.append("settings are not a table of named values")
    state = content["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        problems.append("state_dict is not a table of named tensors")
    if not isinstance(content.get("extra") or {}, Mapping):
        problems.append("extra is not a table")
    if problems:
        raise DirioError(f"{path}: a damaged dirio checkpoint: {'; '.join(problems)}")


def load_checkpoint(path: PathLike, architecture: str | None = None, convert_plain=None) -> dict:
    """Read a network checkpoint into the dict of the dirio format (module docstring).

    Args:
        path: a dirio checkpoint, or an upstream LapIRN ``state_dict`` file.
        architecture: needed for upstream LapIRN files only (``"lapirn-disp"`` or
            ``"lapirn-diff"``: the file does not say which field its network predicts); for a dirio
            checkpoint it is checked against the file's architecture when given.
        convert_plain: ``convert_plain(state_dict, architecture, path) -> dict | None`` turns a
            plain state_dict of a known foreign layout into the dirio dict (``None``: unknown);
            :func:`dirio.transforms.networks.registry.build_network` passes the upstream LapIRN
            converter. The io layer knows no network architecture.
    Returns:
        ``{"format", "version", "architecture", "settings", "state_dict", "extra"}``. For an
        upstream file the state_dict is renamed to dirio's keys, settings hold the
        ``start_channel`` read from the weights, and ``extra["source"]`` says where it came from.
    Raises:
        DirioError: one line naming the file: missing, unreadable, not a network checkpoint, a newer
            format version, or an architecture other than ``architecture``.
    """
    path = Path(path)
    content = _read(path)
    if not isinstance(content, Mapping):
        raise DirioError(f"{path}: holds a {type(content).__name__}, not a network checkpoint")
    if content.get("format") == CHECKPOINT_FORMAT:
        version = content.get("version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise DirioError(f"{path}: checkpoint format version {version!r} is newer than this dirio reads ({CHECKPOINT_VERSION})")
        missing = [k for k in ("architecture", "settings", "state_dict") if k not in content]
        if missing:
            raise DirioError(f"{path}: dirio checkpoint without {', '.join(missing)}")
        _check_entries(content, path)
        if architecture is not None and content["architecture"] != architecture:
            raise DirioError(f"{path}: holds architecture {content['architecture']!r}, expected {architecture!r}")
        return {
            "format": CHECKPOINT_FORMAT,
            "version": version,
            "architecture": content["architecture"],
            "settings": dict(content["settings"]),
            "state_dict": content["state_dict"],
            "extra": dict(content.get("extra") or {}),
        }
    if content and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in content.items()):
        converted = None if convert_plain is None else convert_plain(content, architecture, path)
        if converted is not None:
            return converted
        raise DirioError(
            f"{path}: a plain state_dict of unknown layout ({_listed(list(content))}); "
            "dirio reads its own checkpoints and upstream LapIRN weights"
        )
    raise DirioError(f"{path}: not a dirio network checkpoint (no 'format': '{CHECKPOINT_FORMAT}' entry)")
