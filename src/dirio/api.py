"""The Python API: register a pair of images in memory.

``register(fixed, moving)`` is what the CLI, the demo and the benchmarks call. It takes numpy
arrays or :class:`dirio.image.Image` objects on the same grid and returns the displacement in
the Learn2Reg layout together with the warped image and the optimisation log.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import DirioError
from .field import field_to_numpy, warp
from .image import Image, normalise_intensity
from .optim.engine import EngineResult, Objective, optimise
from .regularizers import make_regularizer
from .settings import Settings, make_settings
from .similarity import make_similarity


@dataclass
class RegistrationResult:
    """Output of :func:`register`.

    Attributes:
        disp: ``(*S, ndim)`` float32 displacement in voxels of the fixed grid (Learn2Reg layout,
            ``warped(x) = moving(x + disp(x))``).
        warped: ``S`` float32 moving image (original intensities) warped onto the fixed grid.
        history: per-iteration log (level, iteration, lr, every term, rule diagnostics).
        levels: per-level timings and grids.
        seconds: wall time of the optimisation, ``peak_memory_mb`` its peak memory.
        settings: the settings used.
    """

    disp: np.ndarray
    warped: np.ndarray
    history: list[dict]
    levels: list[dict]
    seconds: float
    peak_memory_mb: float
    settings: Settings
    device: str


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else the CPU; anything else is passed to torch."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise DirioError(f"unknown device {device!r}: {error}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DirioError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return resolved


def _array(image) -> np.ndarray:
    return image.data if isinstance(image, Image) else np.asarray(image)


def normalised(array: np.ndarray, settings: Settings) -> np.ndarray:
    """Apply the settings' intensity normalisation (float32 out)."""
    if settings.normalise == "none":
        return np.asarray(array, dtype=np.float32)
    if settings.normalise == "clip":
        lo, hi = settings.clip_range
        return normalise_intensity(array, "clip", lo=lo, hi=hi)
    return normalise_intensity(array, settings.normalise)


def build_objectives(settings: Settings) -> list[Objective]:
    """The separately kept objectives of the settings: one similarity, then each regulariser."""
    try:
        similarity = make_similarity(settings.similarity, **settings.similarity_options)
        objectives = [Objective(settings.similarity, "similarity", similarity, 1.0)]
        for name, weight in settings.regularizers.items():
            objectives.append(Objective(name, "regularizer", make_regularizer(name), float(weight)))
    except (ValueError, TypeError) as error:
        raise DirioError(str(error)) from None
    return objectives


def check_settings(settings: Settings) -> None:
    """Reject settings a run would fail on, with a one-line :class:`DirioError`, before any work.

    Builds the similarity and the regularisers (unknown names or options), validates the engine
    configuration and builds the learning-rate schedule (unknown or inconsistent options).
    """
    from .optim.schedules import make_schedule

    build_objectives(settings)
    engine = settings.engine
    try:
        engine.validate()
    except ValueError as error:
        raise DirioError(str(error)) from None
    try:
        make_schedule(engine.schedule, **engine.schedule_options)
    except (ValueError, TypeError) as error:
        raise DirioError(f"schedule options for schedule {engine.schedule!r}: {error}") from None


def register(
    fixed,
    moving,
    *,
    settings: Settings | None = None,
    preset: str | None = None,
    fixed_mask=None,
    moving_mask=None,
    init: np.ndarray | None = None,
    device: str | torch.device = "auto",
    **overrides,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` by dense instance optimisation.

    Args:
        fixed, moving: arrays (or :class:`Image`) of the same spatial shape ``S`` (2D or 3D).
        settings: complete settings; otherwise built from ``preset`` and ``overrides`` (see
            :func:`dirio.settings.make_settings`, e.g. ``iterations=(60, 30)``, ``lr=2.0``).
        fixed_mask, moving_mask: optional ``S`` arrays; nonzero voxels are where the similarity counts.
        init: optional initial displacement ``(*S, ndim)`` in voxels.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    Returns:
        A :class:`RegistrationResult`.
    """
    if settings is None:
        try:
            settings = make_settings(preset, **overrides)
        except (ValueError, TypeError) as error:
            raise DirioError(str(error)) from None
    elif preset is not None or overrides:
        raise ValueError("give either settings or preset/overrides, not both")
    fixed_array, moving_array = _array(fixed), _array(moving)
    if fixed_array.shape != moving_array.shape:
        raise DirioError(f"fixed and moving images differ in shape: {fixed_array.shape} vs {moving_array.shape}")
    if fixed_array.ndim not in (2, 3):
        raise DirioError(f"images must be 2D or 3D, got shape {fixed_array.shape}")
    torch.manual_seed(settings.engine.seed)
    device = resolve_device(device)

    def tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)

    fixed_tensor = tensor(normalised(fixed_array, settings))
    moving_tensor = tensor(normalised(moving_array, settings))
    masks = [None if m is None else tensor(_array(m) != 0) for m in (fixed_mask, moving_mask)]
    init_tensor = None
    if init is not None:
        init_tensor = torch.from_numpy(np.moveaxis(np.asarray(init, dtype=np.float32), -1, 0).copy())[None].to(device)
    check_settings(settings)
    objectives = build_objectives(settings)
    result: EngineResult = optimise(
        fixed_tensor, moving_tensor, objectives, settings.engine,
        fixed_mask=masks[0], moving_mask=masks[1], init=init_tensor,
    )
    with torch.no_grad():
        warped = warp(tensor(moving_array), result.displacement)[0, 0].cpu().numpy()
    return RegistrationResult(
        disp=field_to_numpy(result.displacement),
        warped=warped,
        history=result.history,
        levels=result.levels,
        seconds=result.seconds,
        peak_memory_mb=result.peak_memory_mb,
        settings=settings,
        device=str(device),
    )


def apply_field(image: np.ndarray, disp: np.ndarray, labels: bool = False, device="cpu") -> np.ndarray:
    """Warp an ``S`` array by a ``(*S, ndim)`` field: trilinear for images, nearest for label maps.

    Label maps keep their integer dtype; images come back as float32.
    """
    image = np.asarray(image)
    if image.shape != disp.shape[:-1]:
        raise DirioError(f"image shape {image.shape} does not match the field's grid {disp.shape[:-1]}")
    disp_tensor = torch.from_numpy(np.moveaxis(np.asarray(disp, dtype=np.float32), -1, 0).copy())[None].to(device)
    if labels:
        source = torch.from_numpy(image.astype(np.int64))[None, None].to(device)
        return warp(source, disp_tensor, mode="nearest")[0, 0].cpu().numpy().astype(image.dtype)
    source = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    return warp(source, disp_tensor)[0, 0].cpu().numpy()


__all__ = ["register", "apply_field", "check_settings", "RegistrationResult", "resolve_device", "make_settings", "Settings"]
