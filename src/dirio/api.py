"""The Python API: register a pair of images in memory.

``register(fixed, moving)`` is what the CLI, the demo and the benchmarks call. It takes numpy
arrays or :class:`dirio.io.images.Image` objects on the same grid and returns the displacement in
the Learn2Reg layout together with the warped image and the optimisation log; with
``inverse=True`` also the inverse field (:func:`invert_field`, :mod:`dirio.core.inverse`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dirio.config.settings import Settings, apply_overrides, make_settings
from dirio.core.context import LevelContext
from dirio.core.fields import field_to_numpy, warp
from dirio.core.inverse import invert_displacement, inverse_consistency_summary
from dirio.errors import DirioError
from dirio.io.images import Image
from dirio.core.intensity import normalise_intensity
from dirio.losses.by_level import at_level
from dirio.losses.terms import Term
from dirio.methods.network import NETWORK_STAGES, check_network_stage
from dirio.core.mask_fill import fill_outside_mask
from dirio.methods.lung_mask import lung_mask
from dirio.methods.stages import PairState, run_stages, stage_history

logger = logging.getLogger(__name__)
from dirio.optim.progress import ProgressCallback, observing
from dirio.transforms.base import invert_transform


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
        spacing: the voxel size (mm) used for the inverse consistency, or ``None`` (1 per axis).
        stage_fields: with ``keep_stages=True``, the ``(*S, ndim)`` field after each stage (the
            composition of everything so far), keyed by stage name; else ``None``.
        inverse_disp: with ``inverse=True``, the ``(*S, ndim)`` float32 inverse displacement on the
            moving grid (which is the fixed grid: the images share it), in voxels: a moving-grid
            point ``y`` corresponds to the fixed-grid point ``y + inverse_disp(y)``, and
            ``warped_fixed(y) = fixed(y + inverse_disp(y))`` brings the fixed image into the moving
            space. Exact (the transform's ``inverse_field``: a velocity field's negated velocity)
            when the transform knows it, else iteratively (:func:`invert_field`). ``None`` until asked for
            (:meth:`inverse_field` computes it then).
        inverse: the inverse's record: ``method`` (``exact``, ``newton`` or ``fixed-point``), ``iterations``,
            ``residual_voxels_mean`` / ``_max`` (``|v(y) + u(y + v(y))|``, voxels),
            ``inverse_consistency_mm_mean`` / ``_p95`` / ``_max`` (``|u(x) + v(x + u(x))|``, mm)
            and ``seconds``; ``None`` without an inverse.
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
    inverse_disp: np.ndarray | None = None
    inverse: dict | None = None
    spacing: tuple[float, ...] | None = None

    def inverse_field(self, device: str | torch.device = "cpu") -> np.ndarray:
        """The ``(*S, ndim)`` inverse displacement (see ``inverse_disp``): the one computed by
        ``register(..., inverse=True)``, else the iterative inverse of ``disp`` computed now on
        ``device`` and kept (with its record in ``inverse``)."""
        if self.inverse_disp is None:
            self.inverse_disp, self.inverse = invert_field(self.disp, spacing=self.spacing, device=device)
        return self.inverse_disp


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
    preprocessing = settings.preprocessing
    if preprocessing.normalise == "none":
        return np.asarray(array, dtype=np.float32)
    if preprocessing.normalise == "clip":
        lo, hi = preprocessing.clip_range
        return normalise_intensity(array, "clip", lo=lo, hi=hi)
    return normalise_intensity(array, preprocessing.normalise)


def build_terms(settings: Settings) -> list[Term]:
    """The separately kept terms of the dense stage: the similarity, then each regularizer."""
    try:
        return settings.terms.build()
    except (ValueError, TypeError) as error:
        raise DirioError(str(error)) from None


def check_settings(settings: Settings) -> None:
    """Reject settings a run would fail on, with a one-line :class:`DirioError`, before any work.

    Builds the terms (unknown names or options, weights that are not finite and >= 0), the stage
    list, and validates every section (pyramid, transform, optimiser and schedule, stages).
    """
    try:
        settings.validate()
    except (ValueError, TypeError) as error:
        raise DirioError(str(error)) from None


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
    inverse: bool = False,
    device: str | torch.device = "auto",
    progress_callback: ProgressCallback | None = None,
    **overrides,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` through the settings' stage pipeline (by default: optional
    affine stage, optional discrete initialisation, then dense instance optimisation); the result
    is the composition of the stages.

    ``method="network" | "network-io" | "nio" | "network+dense"`` (a flat override) registers with
    a pretrained network instead (:mod:`dirio.methods.network`); ``model=CHECKPOINT`` chooses it
    (default: the packaged LapIRN OASIS brain model). The network's weights are restored after the
    call, however it ends.

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
        inverse: also compute the inverse field and its residual and inverse consistency
            (``inverse_disp``, ``inverse``; see :class:`RegistrationResult`).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        progress_callback: called with a :class:`dirio.optim.progress.Progress` after every
            optimisation step of every stage (in the calling thread); an exception it raises (e.g.
            :class:`dirio.optim.progress.Cancelled`) stops the run between two steps and propagates,
            nothing is returned and a network's weights are restored. It never changes the result.
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
    elif preset is not None or set(overrides) - {"init", "affine", "method", "model"}:
        raise ValueError("give either settings or preset/overrides, not both")
    elif overrides:
        # ``init="convex"`` / ``affine=...`` / ``method=...`` / ``model=...`` given with complete
        # settings edit its stage list or its network.
        try:
            settings = apply_overrides(settings, [overrides])
        except ValueError as error:
            raise DirioError(str(error)) from None
    if spacing is None and isinstance(fixed, Image):
        spacing = fixed.spacing
    fixed_array, moving_array = _array(fixed), _array(moving)
    if fixed_array.shape != moving_array.shape:
        raise DirioError(f"fixed and moving images differ in shape: {fixed_array.shape} vs {moving_array.shape}")
    if fixed_array.ndim not in (2, 3):
        raise DirioError(f"images must be 2D or 3D, got shape {fixed_array.shape}")
    torch.manual_seed(settings.seed)
    device = resolve_device(device)

    def tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None].to(device)

    records: list[dict] = []
    if fixed_mask is None and moving_mask is None and settings.preprocessing.auto_mask == "lungs":
        fixed_mask, moving_mask = _automatic_lung_masks(fixed_array, moving_array, records)
    fixed_image, moving_image = normalised(fixed_array, settings), normalised(moving_array, settings)
    if settings.preprocessing.mask_use == "fill":  # the masks act on the images, not on the similarity
        if fixed_mask is not None:
            fixed_image = fill_outside_mask(fixed_image, _array(fixed_mask))
        if moving_mask is not None:
            moving_image = fill_outside_mask(moving_image, _array(moving_mask))
        fixed_mask = moving_mask = None
    fixed_tensor, moving_tensor = tensor(fixed_image), tensor(moving_image)
    masks = [None if m is None else tensor(_array(m) != 0) for m in (fixed_mask, moving_mask)]
    init_tensor = None
    if init is not None:
        init_tensor = torch.from_numpy(np.moveaxis(np.asarray(init, dtype=np.float32), -1, 0).copy())[None].to(device)
    check_settings(settings)
    for name, options in settings.pipeline():
        if name in NETWORK_STAGES:  # the network fits the images and the options, before any work
            check_network_stage(options, fixed_array.ndim, device)
    terms = build_terms(settings)
    state = PairState(
        fixed=fixed_tensor, moving=moving_tensor, terms=terms, similarity=at_level(terms[0].function.similarity, 0),
        fixed_mask=masks[0], moving_mask=masks[1], spacing=spacing, seed=settings.seed, progress=settings.progress,
        init=init_tensor, stage_fields={} if keep_stages else None, records=records,
    )
    if any(name in NETWORK_STAGES for name in settings.stages):
        state.network_inputs = (tensor(fixed_array), tensor(moving_array))
    with observing(progress_callback):
        run_stages(state, settings.pipeline())
    result = state.result
    with torch.no_grad():
        warped = warp(tensor(moving_array), result.displacement)[0, 0].cpu().numpy()
    inverse_disp = inverse_record = None
    if inverse:
        inverse_disp, inverse_record = _inverse_of_result(result, state, spacing)
    return RegistrationResult(
        disp=field_to_numpy(result.displacement),
        warped=warped,
        history=stage_history(state),
        levels=result.levels,
        seconds=sum(stage["seconds"] for stage in state.records),
        peak_memory_mb=max(stage["peak_memory_mb"] for stage in state.records),
        settings=settings,
        device=str(device),
        affine_matrix=None if state.matrix is None else state.matrix.numpy(),
        stages=state.records,
        stage_fields=state.stage_fields,
        inverse_disp=inverse_disp,
        inverse=inverse_record,
        spacing=None if spacing is None else tuple(float(h) for h in spacing),
    )


def _inverse_of_result(result, state: PairState, spacing) -> tuple[np.ndarray, dict]:
    """The inverse of the final field on the full grid (exact when the final stage's transform
    knows it, :func:`dirio.transforms.base.invert_transform`) and its record."""
    start = time.perf_counter()
    shape = tuple(state.fixed.shape[2:])
    ctx = LevelContext(level=max(len(result.levels) - 1, 0), shape=shape, full_shape=shape, fixed=state.fixed,
                       moving=state.moving, spacing=None if spacing is None else tuple(float(h) for h in spacing))
    found = invert_transform(result.transform, ctx, result.displacement)
    record = found.summary()
    record.update(inverse_consistency_summary(result.displacement, found.field, spacing))
    record["seconds"] = time.perf_counter() - start
    return field_to_numpy(found.field), record


def _automatic_lung_masks(fixed: np.ndarray, moving: np.ndarray, records: list[dict]):
    """Lung masks of both images (CT in HU); ``(None, None)`` when either has no lung component."""
    start = time.perf_counter()
    fixed_mask, moving_mask = lung_mask(fixed), lung_mask(moving)
    usable = bool(fixed_mask.any() and moving_mask.any())
    record = {"stage": "lung-mask", "seconds": time.perf_counter() - start, "peak_memory_mb": 0.0,
              "fixed_fraction": float(fixed_mask.mean()), "moving_fraction": float(moving_mask.mean()),
              "used": usable}
    if not usable:
        record["warning"] = no_lungs_warning(fixed, moving, fixed_mask.any(), moving_mask.any())
        logger.warning(record["warning"])
    records.append(record)
    return (fixed_mask, moving_mask) if usable else (None, None)


def no_lungs_warning(fixed: np.ndarray, moving: np.ndarray, fixed_found: bool, moving_found: bool) -> str:
    """What to tell the user when the automatic lung mask finds no lungs (and is not used)."""
    which = " and ".join(name for name, found in (("fixed", fixed_found), ("moving", moving_found)) if not found)
    low = min(float(np.min(fixed)), float(np.min(moving)))
    high = max(float(np.max(fixed)), float(np.max(moving)))
    return (f"the automatic lung mask (`auto_mask` lungs) found no lungs in the {which} image, so none is used: it "
            f"needs a chest CT in Hounsfield units (lungs near -900 HU), and the intensities range from {low:g} "
            f"to {high:g}; give the images in HU, pass lung masks (`fixed_mask`, `moving_mask`), or `auto_mask` none")


def _field_tensor(disp: np.ndarray, device) -> torch.Tensor:
    """``(*S, ndim)`` array -> ``(1, ndim, *S)`` float32 tensor on ``device``."""
    return torch.from_numpy(np.moveaxis(np.asarray(disp, dtype=np.float32), -1, 0).copy())[None].to(device)


def invert_field(disp: np.ndarray, *, spacing=None, device="cpu", iterations: int | None = None,
                 tolerance: float | None = None) -> tuple[np.ndarray, dict]:
    """The inverse of a ``(*S, ndim)`` displacement, iteratively (:func:`dirio.core.inverse.invert_displacement`:
    a fixed-point step, then Newton steps).

    Args:
        disp: forward displacement in voxels (Learn2Reg layout; a fixed-grid point ``x``
            corresponds to the moving-grid point ``x + disp(x)``).
        spacing: voxel size (mm) per axis for the inverse consistency (default 1).
        device: where to compute.
        iterations, tolerance: of the iteration (defaults of
            :func:`dirio.core.inverse.invert_displacement`).
    Returns:
        ``(inverse, record)``: the ``(*S, ndim)`` float32 inverse on the moving grid (a moving-grid
        point ``y`` corresponds to the fixed-grid point ``y + inverse(y)``), and the record of
        :class:`RegistrationResult`'s ``inverse``.
    """
    start = time.perf_counter()
    forward = _field_tensor(disp, resolve_device(device))
    options = {key: value for key, value in (("iterations", iterations), ("tolerance", tolerance)) if value is not None}
    found = invert_displacement(forward, **options)
    record = found.summary()
    record.update(inverse_consistency_summary(forward, found.field, spacing))
    record["seconds"] = time.perf_counter() - start
    return field_to_numpy(found.field), record


def apply_field(image: np.ndarray, disp: np.ndarray, labels: bool = False, device="cpu",
                inverse: bool = False) -> np.ndarray:
    """Warp an ``S`` array by a ``(*S, ndim)`` field: trilinear for images, nearest for label maps.

    Label maps keep their integer dtype; images come back as float32. With ``inverse``, ``disp``
    is the forward field of a registration and the image lies on the fixed grid: it is warped by
    the field's iterative inverse (:func:`invert_field`) into the moving space,
    ``out(y) = image(y + inverse(y))``.
    """
    image = np.asarray(image)
    if image.shape != disp.shape[:-1]:
        raise DirioError(f"image shape {image.shape} does not match the field's grid {disp.shape[:-1]}")
    if inverse:
        disp = invert_field(disp, device=device)[0]
    disp_tensor = _field_tensor(disp, device)
    if labels:
        source = torch.from_numpy(image.astype(np.int64))[None, None].to(device)
        return warp(source, disp_tensor, mode="nearest")[0, 0].cpu().numpy().astype(image.dtype)
    source = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    return warp(source, disp_tensor)[0, 0].cpu().numpy()


__all__ = ["register", "apply_field", "invert_field", "check_settings", "RegistrationResult", "resolve_device", "make_settings", "Settings"]
