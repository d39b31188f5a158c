"""The Python API: register a pair of images in memory.

``register(fixed, moving)`` is what the CLI, the demo and the benchmarks call. It takes numpy
arrays or :class:`dirio.io.images.Image` objects on the same grid and returns the displacement in
the Learn2Reg layout together with the warped image and the optimisation log.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from dirio.errors import DirioError
from dirio.methods.affine import AffineThenDense, affine_displacement, compose_affine_field, register_affine
from dirio.methods.convex import convex_initialisation
from dirio.transforms.dense import make_dense_model
from dirio.core.fields import field_to_numpy, warp
from dirio.io.images import Image, normalise_intensity
from dirio.optim.engine import EngineResult, Objective, optimise
from dirio.losses.regularizers import make_regularizer
from dirio.config.settings import AFFINE_CHOICES, INIT_CHOICES, Settings, make_settings
from dirio.losses.similarity import make_similarity


@dataclass
class RegistrationResult:
    """Output of :func:`register`.

    Attributes:
        disp: ``(*S, ndim)`` float32 displacement in voxels of the fixed grid (Learn2Reg layout,
            ``warped(x) = moving(x + disp(x))``).
        warped: ``S`` float32 moving image (original intensities) warped onto the fixed grid.
        history: per-iteration log (level, iteration, lr, every term, rule diagnostics).
        levels: per-level timings and grids.
        seconds: wall time of the optimisation (every stage), ``peak_memory_mb`` its peak memory.
        settings: the settings used.
        affine_matrix: ``(ndim + 1, ndim + 1)`` float64 voxel matrix of the affine stage (fixed voxel
            -> moving voxel, see :mod:`dirio.methods.affine`), or ``None`` without one.
        stages: one dict per stage run (``"affine"``, ``"convex"``, ``"dense"``): ``seconds``,
            ``peak_memory_mb`` and stage details (cost-volume size, inverse-consistency errors...).
        stage_fields: with ``keep_stages=True``, the ``(*S, ndim)`` field after each stage (the
            composition of everything so far), keyed by stage name; else ``None``.
    """

    disp: np.ndarray
    warped: np.ndarray
    history: list[dict]
    levels: list[dict]
    seconds: float
    peak_memory_mb: float
    settings: Settings
    device: str
    affine_matrix: np.ndarray | None = None
    stages: list[dict] = field(default_factory=list)
    stage_fields: dict[str, np.ndarray] | None = None


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
    from dirio.optim.schedules import make_schedule

    build_objectives(settings)
    engine = settings.engine
    try:
        engine.validate()
        settings.affine_options.validate()
        settings.convex.validate()
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
    init: np.ndarray | str | None = None,
    affine: str | None = None,
    spacing=None,
    keep_stages: bool = False,
    device: str | torch.device = "auto",
    **overrides,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``: optional affine stage, optional discrete initialisation,
    then dense instance optimisation; the result is the composition of the stages.

    Args:
        fixed, moving: arrays (or :class:`Image`) of the same spatial shape ``S`` (2D or 3D).
        settings: complete settings; otherwise built from ``preset`` and ``overrides`` (see
            :func:`dirio.config.settings.make_settings`, e.g. ``iterations=(60, 30)``, ``lr=2.0``).
        fixed_mask, moving_mask: optional ``S`` arrays; nonzero voxels are where the similarity counts.
        init: ``"none"`` or ``"convex"`` (overrides the settings' initialisation), or an initial
            displacement ``(*S, ndim)`` in voxels (after the affine stage when one runs); an array
            replaces the discrete step.
        affine: ``"none"``, ``"translation"``, ``"rigid"``, ``"similarity"`` or ``"affine"``
            (overrides the settings' affine stage).
        spacing: voxel size in mm per axis (rigid and similarity models are rigid in mm); taken
            from ``fixed`` when it is an :class:`Image`, else 1.
        keep_stages: also return the field after each stage (``stage_fields``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    Returns:
        A :class:`RegistrationResult`.
    """
    if isinstance(init, str):
        overrides["init"] = init
        init = None
    if affine is not None:
        overrides["affine"] = affine
    if settings is None:
        try:
            settings = make_settings(preset, **overrides)
        except (ValueError, TypeError) as error:
            raise DirioError(str(error)) from None
    elif preset is not None or set(overrides) - {"init", "affine"}:
        raise ValueError("give either settings or preset/overrides, not both")
    elif overrides:
        # ``init="convex"`` / ``affine=...`` given with complete settings replace those two fields.
        settings = dataclasses.replace(settings, **overrides)
        if settings.affine not in AFFINE_CHOICES or settings.init not in INIT_CHOICES:
            raise DirioError(
                f"affine must be one of {', '.join(AFFINE_CHOICES)} and init one of {', '.join(INIT_CHOICES)}; "
                f"got {settings.affine!r} and {settings.init!r}"
            )
    if spacing is None and isinstance(fixed, Image):
        spacing = fixed.spacing
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
    stages: list[dict] = []
    stage_fields: dict[str, np.ndarray] | None = {} if keep_stages else None
    matrix = None
    if settings.affine != "none":
        matrix, affine_disp = _affine_stage(fixed_tensor, moving_tensor, objectives[0].function, settings, spacing,
                                            masks, stages)
        if stage_fields is not None:
            stage_fields["affine"] = field_to_numpy(affine_disp)
    if init_tensor is None and settings.init == "convex":
        init_tensor = _convex_stage(fixed_tensor, moving_tensor, settings, matrix, masks, stages)
        if stage_fields is not None:
            total = init_tensor if matrix is None else compose_affine_field(torch.from_numpy(matrix), init_tensor)
            stage_fields["convex"] = field_to_numpy(total)
    factory = None
    if matrix is not None:
        factory = _affine_then_dense_factory(settings, torch.from_numpy(matrix), init_tensor, fixed_tensor)
    result: EngineResult = optimise(
        fixed_tensor, moving_tensor, objectives, settings.engine,
        fixed_mask=masks[0], moving_mask=masks[1], init=init_tensor, model_factory=factory,
    )
    stages.append({"stage": "dense", "seconds": result.seconds, "peak_memory_mb": result.peak_memory_mb})
    with torch.no_grad():
        warped = warp(tensor(moving_array), result.displacement)[0, 0].cpu().numpy()
    disp = field_to_numpy(result.displacement)
    if stage_fields is not None:
        stage_fields["dense"] = disp
    return RegistrationResult(
        disp=disp,
        warped=warped,
        history=result.history,
        levels=result.levels,
        seconds=sum(stage["seconds"] for stage in stages),
        peak_memory_mb=max(stage["peak_memory_mb"] for stage in stages),
        settings=settings,
        device=str(device),
        affine_matrix=matrix,
        stages=stages,
        stage_fields=stage_fields,
    )


def _affine_stage(fixed, moving, similarity, settings: Settings, spacing, masks, stages: list[dict]):
    """Run the affine stage; append its record to ``stages``; return (voxel matrix, displacement)."""
    result = register_affine(
        fixed, moving, similarity, settings.affine, settings.affine_options, spacing=spacing,
        fixed_mask=masks[0], moving_mask=masks[1], seed=settings.engine.seed, progress=settings.engine.progress,
    )
    stages.append({"stage": "affine", "family": settings.affine, "seconds": result.seconds,
                   "peak_memory_mb": result.peak_memory_mb, "levels": result.levels})
    return result.matrix, result.displacement


def _convex_stage(fixed, moving, settings: Settings, matrix, masks, stages: list[dict]) -> torch.Tensor:
    """Run the discrete + coupled convex step on the (affine pre-aligned) pair; return its full-grid field."""
    moving_mask = masks[1]
    if matrix is not None:
        # The discrete search starts from the affine: the moving image (and mask) are pre-aligned.
        affine_disp = affine_displacement(torch.from_numpy(matrix).to(fixed.device), fixed.shape[2:])
        moving = warp(moving, affine_disp)
        if moving_mask is not None:
            moving_mask = warp(moving_mask, affine_disp, padding="zeros")
    result = convex_initialisation(fixed, moving, settings.convex, fixed_mask=masks[0], moving_mask=moving_mask)
    stages.append({
        "stage": "convex", "seconds": result.seconds, "peak_memory_mb": result.peak_memory_mb,
        "cost_volume_mb": result.cost_volume_mb, "cost_volume_cached": result.cached, "slabs": result.slabs,
        "consistency_error_cells": None if result.consistency_error is None else list(result.consistency_error),
    })
    return result.displacement


def _affine_then_dense_factory(settings: Settings, matrix: torch.Tensor, init, fixed):
    """Engine model factory: the dense model of the settings as a residual after the fixed affine."""
    engine = settings.engine
    full_shape = tuple(fixed.shape[2:])

    def factory(param_shape):
        dense = make_dense_model(engine.diffeomorphic, param_shape, init=init, device=fixed.device,
                                 steps=engine.integration_steps, smoothing=engine.smoothing)
        return AffineThenDense(dense, matrix.to(fixed.device), full_shape)

    return factory


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
