"""The network architectures by name, and building a network from a checkpoint.

:data:`NETWORKS` maps an architecture name (what a checkpoint's ``architecture`` says) to a factory
taking the checkpoint's ``settings``; :func:`build_network` reads a checkpoint (:mod:`dirio.io.checkpoints`,
or an upstream LapIRN ``state_dict`` file) and loads its weights into the architecture;
:func:`default_brain_model` is the packaged pretrained brain model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from dirio.core.registry import Registry
from dirio.errors import DirioError
from dirio.io.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_VERSION, PathLike, load_checkpoint, load_state_dict_checked
from dirio.transforms.networks.lapirn import (
    DEFAULT_BRAIN_WEIGHTS,
    INTEGRATION_STEPS,
    RANGE_FLOW,
    LapIRN,
    from_upstream_state_dict,
)
from dirio.transforms.networks.unet import UNet

#: Architecture name -> factory taking the checkpoint's ``settings``.
NETWORKS: Registry = Registry("network architecture")


@NETWORKS.register("lapirn-disp")
def lapirn_disp(start_channel: int = 7, range_flow: float = RANGE_FLOW) -> LapIRN:
    """LapIRN predicting displacements (upstream ``LapIRN_disp``)."""
    return LapIRN(diffeomorphic=False, start_channel=start_channel, range_flow=range_flow)


@NETWORKS.register("lapirn-diff")
def lapirn_diff(
    start_channel: int = 7, range_flow: float = RANGE_FLOW, integration_steps: int = INTEGRATION_STEPS
) -> LapIRN:
    """LapIRN predicting stationary velocities integrated by scaling and squaring (upstream ``LapIRN_diff``)."""
    return LapIRN(diffeomorphic=True, start_channel=start_channel, range_flow=range_flow, integration_steps=integration_steps)


NETWORKS.register("unet", UNet)


def is_upstream_lapirn(state_dict: Mapping[str, Any]) -> bool:
    """Whether a plain state_dict has the key layout of upstream LapIRN (``cwmok/LapIRN``) checkpoints."""
    return "output_lvl1.0.weight" in state_dict and any(k.startswith("model_lvl2.model_lvl1.") for k in state_dict)


def upstream_lapirn_checkpoint(state_dict: Mapping[str, Any], architecture: str | None, path: Path) -> dict | None:
    """The dirio checkpoint dict of an upstream LapIRN ``state_dict`` file, ``None`` for another layout."""
    if not is_upstream_lapirn(state_dict):
        return None
    if architecture not in ("lapirn-disp", "lapirn-diff"):
        raise DirioError(
            f"{path}: an upstream LapIRN state_dict; say which field its network predicts with "
            f"`network_architecture` lapirn-disp or lapirn-diff (got {architecture!r})"
        )
    renamed, settings = from_upstream_state_dict(state_dict)
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "architecture": architecture,
        "settings": settings,
        "state_dict": renamed,
        "extra": {"source": f"upstream LapIRN state_dict {Path(path).name}"},
    }


def build_network(
    checkpoint: PathLike | Mapping[str, Any], architecture: str | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Build the network a checkpoint describes and load its weights.

    Args:
        checkpoint: a path (dirio checkpoint or upstream LapIRN file, see :func:`load_checkpoint`)
            or a dict already returned by :func:`load_checkpoint`.
        architecture: required for upstream LapIRN files, else an optional check.
        device: where to put the network.
    Returns:
        The network in eval mode (``module.train()`` to fine-tune it), on ``device``.
    Raises:
        DirioError: one line naming the file and the problem: unknown architecture, settings the
            architecture does not take, or weights that do not fit (missing / unexpected keys,
            shapes).
    """
    if isinstance(checkpoint, Mapping):
        source = str(checkpoint.get("extra", {}).get("source", "checkpoint"))
        content = dict(checkpoint)
        if architecture is not None and content.get("architecture") != architecture:
            raise DirioError(f"{source}: holds architecture {content.get('architecture')!r}, expected {architecture!r}")
    else:
        source = str(checkpoint)
        content = load_checkpoint(checkpoint, architecture, convert_plain=upstream_lapirn_checkpoint)
        if str(content["extra"].get("source", "")).startswith("upstream"):
            source += " (upstream LapIRN layout; keys named as in dirio)"
    name = content["architecture"]
    if name not in NETWORKS:
        raise DirioError(f"{source}: unknown network architecture {name!r}; known: {', '.join(NETWORKS.names())}")
    what = f"{name} ({', '.join(f'{k}={v}' for k, v in content['settings'].items())})"
    # First on the meta device (shapes without memory): settings that do not fit the weights, e.g. a
    # damaged file claiming a million channels, are refused before anything is allocated.
    shapes = _create(name, content["settings"], source, device="meta")
    load_state_dict_checked(shapes, content["state_dict"], source, what, load=False)
    module = _create(name, content["settings"], source)
    load_state_dict_checked(module, content["state_dict"], source, what)
    return module.to(device).eval()


def _create(name: str, settings: Mapping[str, Any], source: str, device: str | None = None) -> nn.Module:
    """The architecture ``name`` built from a checkpoint's settings (on ``device`` when given).

    Raises:
        DirioError: naming ``source`` for settings the architecture refuses (torch's refusals included,
            e.g. a negative channel count).
    """
    try:
        if device is None:
            return NETWORKS.create(name, **settings)
        with torch.device(device):
            return NETWORKS.create(name, **settings)
    except (TypeError, ValueError, RuntimeError, OverflowError, MemoryError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DirioError(f"{source}: cannot build {name} from its settings: {reason}") from None


def default_brain_model(device: str | torch.device = "cpu") -> LapIRN:
    """The pretrained LapIRN displacement model shipped with dirio (upstream ``LapIRN_disp_fea7.pth``).

    Trained by Mok & Chung on OASIS T1 brains (160 x 192 x 144, 1 mm, skull-stripped, affinely
    aligned, min-max normalised to [0, 1]); MIT licence, see ``pretrained/README.md``.

    Returns:
        The network in eval mode on ``device``.
    Raises:
        DirioError: when the packaged weights file is missing (a broken installation).
    """
    if not DEFAULT_BRAIN_WEIGHTS.is_file():
        raise DirioError(
            f"{DEFAULT_BRAIN_WEIGHTS}: the packaged LapIRN brain weights are missing; reinstall dirio "
            "(they are package data of dirio.transforms.networks)"
        )
    return build_network(DEFAULT_BRAIN_WEIGHTS, architecture="lapirn-disp", device=device)
