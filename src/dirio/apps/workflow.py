"""Register files on disk: load and check inputs, register, write outputs atomically, score, draw.

This is the layer between the Python API (:mod:`dirio.api`) and the command line: every
``dirio register`` run is one call of :func:`register_files`, and ``dirio run`` over a dataset
can call it per pair.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dirio import __version__
from dirio.api import RegistrationResult, apply_field, check_settings, invert_field, register
from dirio.errors import DirioError
from dirio.core.profiling import StepTimes
from dirio.io.atomic import check_output_folder, check_writable, OutputLock, remove_temporaries, sha256_of, write_json, write_text
from dirio.io.images import (GRID_TOLERANCE_MM, Image, check_same_grid, load_image, resample_to_grid, save_image,
                             voxel_centre_distance_mm)
from dirio.io.fields import load_field_and_affine, save_field
from dirio.io.keypoints import load_keypoints
from dirio.io.manifest import (INCOMPLETE_MARKER, RUN_MANIFEST, check_replaceable, earlier_outputs,
                               replace_earlier_outputs, sign_record)
from dirio.evaluation.evaluate import evaluate_field, regularity_metrics
from dirio.evaluation.overlap import warp_labels
from dirio.methods.final_smoothing import describe_choice
from dirio.config.settings import Settings


logger = logging.getLogger(__name__)

# The smallest grid dirio registers and scores: the Learn2Reg SDlogJ crops 2 voxels at each end
# of every axis (central differences), so an axis needs at least 5 voxels to keep one.
MIN_VOXELS_PER_AXIS = 5
# INCOMPLETE_MARKER (dirio.io.manifest) is written first when the outputs of ``dirio register`` are
# (re)written and deleted after the last one: its presence marks a folder whose set of outputs is
# incomplete or mixed (a run was killed).


def check_grid_size(shape: Sequence[int], what: str) -> None:
    """Require at least :data:`MIN_VOXELS_PER_AXIS` voxels along every axis of ``shape``.

    Raises:
        DirioError: ``"<what> has shape (...); dirio needs at least 5 voxels along every axis"``.
    """
    if min(shape) < MIN_VOXELS_PER_AXIS:
        raise DirioError(
            f"{what} has shape {tuple(int(n) for n in shape)}; dirio needs at least {MIN_VOXELS_PER_AXIS} voxels "
            f"along every axis (the Jacobian metrics crop 2 voxels at each end)"
        )


def check_field_grid(field_path, field_shape: Sequence[int], field_affine: np.ndarray, image: Image,
                     resample: bool = False) -> None:
    """Require a field to be defined on ``image``'s grid: same shape, affines within 1e-4 mm.

    ``resample`` accepts another affine (the field is then taken on ``image``'s grid as it is).

    Raises:
        DirioError: naming the field and the image, with the shape or the affine difference.
    """
    if tuple(field_shape) != image.shape:
        raise DirioError(
            f"{field_path} is defined on a grid of shape {tuple(field_shape)} but {image.name} has shape {image.shape}"
        )
    difference = float(np.abs(np.asarray(field_affine) - image.affine).max())
    if difference > GRID_TOLERANCE_MM and not resample:
        distance = voxel_centre_distance_mm(image.shape, field_affine, image.affine)
        raise DirioError(
            f"{field_path} is defined on another grid than {image.name} (the same voxel's centre differs by up to "
            f"{distance:.4g} mm); pass --resample to use it anyway"
        )


def file_stem(path: str | Path) -> str:
    """File name without directory and without ``.nii.gz`` / ``.nii`` / ``.mha`` / ``.nrrd`` suffix."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@dataclass
class Inputs:
    """Everything read for one pair: images, optional labels, masks and keypoints (fixed grid)."""

    fixed: Image
    moving: Image
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    fixed_mask: Image | None = None
    moving_mask: Image | None = None
    fixed_points: np.ndarray | None = None
    moving_points: np.ndarray | None = None


def output_paths(out_dir: Path, fixed: str | Path, moving: str | Path, with_labels: bool) -> dict[str, Path]:
    """Names of every file ``dirio register`` writes into ``out_dir``."""
    f, m = file_stem(fixed), file_stem(moving)
    paths = {
        "disp": out_dir / f"disp_{f}_{m}.nii.gz",
        "warped": out_dir / f"warped_{m}.nii.gz",
        "metrics": out_dir / "metrics.json",
        "history": out_dir / "history.csv",
        "figure": out_dir / f"report_{f}_{m}.png",
    }
    if with_labels:
        paths["warped_labels"] = out_dir / f"warped_labels_{m}.nii.gz"
    return paths


def check_given_in_pairs(**paths) -> None:
    """Require label maps and keypoint files for both images or for neither.

    ``paths`` are ``fixed_<kind>`` / ``moving_<kind>`` keywords (``None`` when not given).

    Raises:
        DirioError: naming the one file given and the option that is missing.
    """
    kinds = sorted({name.split("_", 1)[1] for name in paths})
    for kind in kinds:
        fixed_path, moving_path = paths.get(f"fixed_{kind}"), paths.get(f"moving_{kind}")
        if (fixed_path is None) != (moving_path is None):
            side, other = ("fixed", "moving") if moving_path is None else ("moving", "fixed")
            raise DirioError(
                f"{fixed_path or moving_path}: {kind} given for the {side} image only; "
                f"pass --{other}-{kind} too (metrics compare the two)"
            )


def load_inputs(
    fixed: str | Path,
    moving: str | Path,
    *,
    fixed_labels=None,
    moving_labels=None,
    fixed_mask=None,
    moving_mask=None,
    fixed_keypoints=None,
    moving_keypoints=None,
    resample: bool = False,
    ndim: int = 3,
) -> Inputs:
    """Read and check every input of a pair; the moving side is resampled to the fixed grid when asked.

    Raises:
        DirioError: naming the file, for unreadable files, wrong dimensionality, NaN/Inf voxels,
            non-integer label maps, grids that differ (without ``resample``), keypoints outside
            the image, or a label map or keypoint file given for one image only.
    """
    check_given_in_pairs(fixed_labels=fixed_labels, moving_labels=moving_labels,
                         fixed_keypoints=fixed_keypoints, moving_keypoints=moving_keypoints)
    side_files = {"fixed_labels": fixed_labels, "moving_labels": moving_labels,
                  "fixed_mask": fixed_mask, "moving_mask": moving_mask}
    with ThreadPoolExecutor(max_workers=2) as pool:
        # The files are read side by side (decompression releases the GIL); each is checked, and
        # its error raised, in the order below, as if read one after the other.
        reading = {"fixed": pool.submit(load_image, fixed, ndim=ndim),
                   "moving": pool.submit(load_image, moving, ndim=ndim)}
        reading.update({attribute: pool.submit(load_image, path, labels=True, ndim=ndim)
                        for attribute, path in side_files.items() if path is not None})
        try:
            inputs = _checked_inputs(reading, str(fixed), str(moving), side_files, resample)
        finally:
            for future in reading.values():
                future.cancel()
    fixed_image = inputs.fixed
    if fixed_keypoints is not None:
        inputs.fixed_points = load_keypoints(fixed_keypoints, shape=fixed_image.shape, ndim=ndim)
        # Moving keypoints are in the moving image's voxel coordinates (the Learn2Reg convention);
        # with resampling they are mapped into the fixed grid through the two affines.
        moving_image = reading["moving"].result()
        inputs.moving_points = load_keypoints(moving_keypoints, shape=moving_image.shape, ndim=ndim)
        if resample:
            inputs.moving_points = map_points(inputs.moving_points, moving_image.affine, fixed_image.affine)
        if len(inputs.fixed_points) != len(inputs.moving_points):
            raise DirioError(
                f"{fixed_keypoints} has {len(inputs.fixed_points)} keypoints but {moving_keypoints} has "
                f"{len(inputs.moving_points)}; they must correspond row by row"
            )
    return inputs


def _checked_inputs(reading: dict, fixed: str, moving: str, side_files: dict, resample: bool) -> Inputs:
    """The pair's images and side maps from :func:`load_inputs`'s reads (futures by attribute name;
    ``fixed`` and ``moving`` the paths as given), checked in order: grid sizes, then every side map on
    the fixed grid (moving-side maps resampled with ``resample``)."""
    fixed_image = reading["fixed"].result()
    check_grid_size(fixed_image.shape, fixed)
    moving_image = reading["moving"].result()
    if not resample:
        check_grid_size(moving_image.shape, moving)

    def on_fixed_grid(image: Image, what: str, labels: bool, moving_side: bool) -> Image:
        """Moving-side files are resampled when asked; everything else must share the fixed grid."""
        if moving_side and resample:
            return resample_to_grid(image, fixed_image, labels=labels)
        check_same_grid(fixed_image, image, what=what)
        return image

    inputs = Inputs(fixed_image, on_fixed_grid(moving_image, "moving", labels=False, moving_side=True))
    for attribute in side_files:
        if attribute in reading:
            image = reading[attribute].result()
            what = attribute.replace("_", " ")
            setattr(inputs, attribute, on_fixed_grid(image, what, labels=True, moving_side=attribute.startswith("moving")))
    return inputs


def check_label_ids_have_maps(label_ids: Sequence[int] | None, fixed_labels, moving_labels) -> None:
    """Label ids score label maps: refuse them without any (they would be silently ignored).

    Raises:
        DirioError: naming `label_ids` and the label-map options.
    """
    if label_ids is not None and fixed_labels is None and moving_labels is None:
        raise DirioError("`label_ids` name labels to score, but no label maps were given: pass `fixed_labels` and "
                         "`moving_labels`, or drop `label_ids`")


def check_label_ids_present(label_ids: Sequence[int] | None, inputs: Inputs) -> None:
    """Refuse label ids that are in neither label map (their Dice would be undefined, NaN).

    Raises:
        DirioError: naming the absent ids, the two files and the labels they hold.
    """
    if label_ids is None or inputs.fixed_labels is None or inputs.moving_labels is None:
        return
    present = set(np.unique(inputs.fixed_labels.data).tolist()) | set(np.unique(inputs.moving_labels.data).tolist())
    absent = [int(label) for label in label_ids if int(label) not in present]
    if absent:
        held = sorted(int(v) for v in present if v != 0)
        shown = ",".join(map(str, held[:20])) + (",..." if len(held) > 20 else "")
        raise DirioError(f"`label_ids` {','.join(map(str, absent))} are in neither {inputs.fixed_labels.name} nor "
                         f"{inputs.moving_labels.name} (their Dice would be undefined); the maps hold labels "
                         f"{shown or 'none but 0'}")


def map_points(points: np.ndarray, from_affine: np.ndarray, to_affine: np.ndarray) -> np.ndarray:
    """Voxel coordinates of one grid -> voxel coordinates of another grid through world space."""
    ndim = points.shape[1]
    homogeneous = np.zeros((len(points), 4))
    homogeneous[:, :ndim] = points
    homogeneous[:, 3] = 1.0
    mapped = homogeneous @ (np.linalg.inv(to_affine) @ from_affine).T
    return mapped[:, :ndim]


def evaluate(inputs: Inputs, disp: np.ndarray, label_ids: Sequence[int] | None = None, tre_order: int = 3,
             regularity: bool = True, hd95: bool = True, warped_labels: np.ndarray | None = None) -> dict:
    """dirio's metrics of a field for the pair (Dice/HD95 with labels, TRE with keypoints, regularity);
    ``regularity``, ``hd95`` and ``warped_labels`` as in :func:`dirio.evaluation.evaluate.evaluate_field`."""
    return evaluate_field(
        disp,
        fixed_labels=None if inputs.fixed_labels is None else inputs.fixed_labels.data,
        moving_labels=None if inputs.moving_labels is None else inputs.moving_labels.data,
        labels=label_ids,
        fixed_points=inputs.fixed_points,
        moving_points=inputs.moving_points,
        spacing=inputs.fixed.spacing,
        tre_order=tre_order,
        regularity=regularity,
        hd95=hd95,
        warped_labels=warped_labels,
    )


def register_inputs(inputs: Inputs, settings: Settings, device="auto", inverse: bool = False,
                    progress_callback=None) -> RegistrationResult:
    """Register loaded inputs (images and masks on the fixed grid) with ``settings`` (and the
    inverse field with ``inverse``); ``progress_callback`` as in :func:`dirio.api.register`."""
    return register(
        inputs.fixed, inputs.moving, settings=settings,
        fixed_mask=None if inputs.fixed_mask is None else inputs.fixed_mask.data,
        moving_mask=None if inputs.moving_mask is None else inputs.moving_mask.data,
        device=device, inverse=inverse, progress_callback=progress_callback,
    )


def inverse_field_paths(out_dir: Path, fixed, moving, itk_field: bool) -> dict[str, Path]:
    """Files of ``--inverse``: ``inverse_disp_<fixed>_<moving>.nii.gz`` (Learn2Reg layout on the moving
    grid) and, with ``itk_field``, ``itk_inverse_disp_<fixed>_<moving>.nii.gz`` (and ``.h5`` with SimpleITK)."""
    stem = f"{file_stem(fixed)}_{file_stem(moving)}"
    paths = {"inverse_disp": out_dir / f"inverse_disp_{stem}.nii.gz"}
    if itk_field:
        paths.update({key.replace("itk_", "itk_inverse_"): path.with_name(path.name.replace("itk_", "itk_inverse_", 1))
                      for key, path in itk_field_paths(out_dir, stem).items()})
    return paths


def check_inverse_grid(fixed: Image, moving: Image) -> None:
    """``--inverse`` writes the inverse on the moving grid, which dirio's field shares with the fixed
    grid: require the moving image to lie on it (not only after ``--resample``).

    Raises:
        DirioError: naming the moving image and the difference.
    """
    try:
        check_same_grid(fixed, moving, hint=None)
    except DirioError as error:
        raise DirioError(f"`inverse` needs the moving image on the fixed grid (the inverse field is written on the "
                         f"moving grid, which is then the same): {error}") from None


def write_inverse_outputs(paths: dict[str, Path], result: RegistrationResult, affine: np.ndarray,
                          overwrite: bool) -> None:
    """Write the inverse field (and its ITK form) named in ``paths``, atomically; nothing without one.

    The moving grid is the fixed grid (same shape and ``affine``), so the inverse carries ``affine``.
    """
    if result.inverse_disp is None or "inverse_disp" not in paths:
        return
    save_field(paths["inverse_disp"], result.inverse_disp, affine, overwrite=overwrite)
    if "itk_inverse_field" in paths:
        from dirio.io.itk_fields import save_itk_field

        for key in ("itk_inverse_field", "itk_inverse_transform"):
            if key in paths:
                save_itk_field(paths[key], result.inverse_disp, affine, overwrite=overwrite)


def figure_notes(result: RegistrationResult) -> list[str]:
    """Lines the registration figure prints under its title: the dense stage's final smoothing and
    the inverse consistency, when there are."""
    notes = [describe_choice(stage["final_smoothing"]) for stage in result.stages if "final_smoothing" in stage]
    if result.inverse is None:
        return notes
    record = result.inverse
    return notes + [f"inverse ({record['method']}): consistency |u(x) + u_inv(x + u(x))| mean "
                    f"{record['inverse_consistency_mm_mean']:.3f} mm, p95 {record['inverse_consistency_mm_p95']:.3f} "
                    f"mm; residual mean {record['residual_voxels_mean']:.2g} voxels"]


def history_csv(history: list[dict]) -> str:
    """The per-iteration log as CSV text (one column per key seen in any row)."""
    columns: list[str] = []
    for row in history:
        columns.extend(key for key in row if key not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def software_versions() -> dict:
    """Versions of dirio, Python and the main libraries (for reproducibility records)."""
    import nibabel
    import scipy
    import torch

    return {
        "dirio": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "nibabel": nibabel.__version__,
    }


def registration_paths(out_dir: Path, fixed, moving, settings: Settings, *, with_labels: bool, figure: bool,
                       itk_field: bool, inverse: bool, ndim: int) -> dict[str, Path]:
    """Every file one registration writes into ``out_dir`` (:func:`output_paths`, the affine stage's,
    ``itk_field``'s and ``inverse``'s), by key; without ``figure`` no PNG.

    Raises:
        DirioError: ``itk_field`` with a 2D registration.
    """
    paths = output_paths(out_dir, fixed, moving, with_labels=with_labels)
    if not figure:
        paths.pop("figure")
    paths.update(affine_output_paths(out_dir, fixed, moving, settings))
    if itk_field:
        if ndim != 3:
            raise DirioError("--itk-field writes 3D fields only (ITK displacement fields of --ndim 2 are not supported)")
        paths.update(itk_field_paths(out_dir, f"{file_stem(fixed)}_{file_stem(moving)}"))
    if inverse:
        paths.update(inverse_field_paths(out_dir, fixed, moving, itk_field))
    return paths


def check_outputs(out_dir: Path, paths: dict[str, Path], overwrite: bool) -> None:
    """Before any work: refuse a folder marked incomplete or holding a run, and outputs that exist
    (unless ``overwrite``), and require a writable folder (:func:`dirio.io.atomic.check_writable`).

    Raises:
        DirioError: naming the folder or the first file in the way.
    """
    check_output_folder(out_dir)  # first: a folder that cannot exist (/proc/x, a name too long) is one line
    if (out_dir / INCOMPLETE_MARKER).is_file() and not overwrite:
        raise DirioError(f"{out_dir} holds an incomplete set of outputs of an interrupted run "
                         f"({INCOMPLETE_MARKER}); pass --overwrite to replace it, or choose another -o")
    if (out_dir / RUN_MANIFEST).is_file() and not overwrite:
        raise DirioError(f"{out_dir} holds a dirio run ({RUN_MANIFEST}); registering a pair into it would mix the two: "
                         f"choose another -o, or pass `overwrite` to replace the run's outputs")
    check_writable(paths.values(), overwrite)
    if overwrite:
        check_replaceable(out_dir, [path.name for path in paths.values()])


@contextmanager
def locked_outputs(out_dir: Path, paths: dict[str, Path], overwrite: bool):
    """Hold the output folder's lock (:class:`dirio.io.atomic.OutputLock`) while a set is written:
    leftovers of a killed run are removed and the checks of :func:`check_outputs` repeated, now that
    no other dirio process writes there."""
    with OutputLock(out_dir):
        remove_temporaries(out_dir)
        check_writable(paths.values(), overwrite)
        if overwrite:
            check_replaceable(out_dir, [path.name for path in paths.values()])
        yield


def score_registration(inputs: Inputs, disp: np.ndarray, label_ids: Sequence[int] | None = None,
                       tre_order: int = 3) -> tuple[dict, dict, np.ndarray | None]:
    """The metrics ``dirio register`` writes: ``(before, after, warped_labels)``.

    ``before`` scores the identity (overlap and TRE only: its regularity is known, no folding and
    SDlogJ 0, and its HD95 costs seconds no one asked for), ``after`` every metric of ``disp``
    (:func:`evaluate`); ``warped_labels`` is the moving label map warped by ``disp`` as the
    Learn2Reg evaluator warps it (:func:`dirio.evaluation.overlap.warp_labels`: nearest neighbour,
    0 beyond the outermost voxel centres; ``S``), so the written map is the one scored; ``None``
    without label maps.
    """
    warped_labels = None
    moving_labels = None if inputs.moving_labels is None else inputs.moving_labels.data
    disp = np.asarray(disp, dtype=np.float64)  # the scoring's dtype, converted once for every use
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The Jacobian metrics (numpy, mostly outside the GIL) run beside the label warp and the
        # overlap scores, which use one core between them.
        regular = pool.submit(regularity_metrics, disp)
        if moving_labels is not None:
            warped_labels = warp_labels(moving_labels, disp)
        # np.zeros: a float64 identity the scoring reads without converting it (and the moving map is its warp).
        before = evaluate(inputs, np.zeros(np.shape(disp)), label_ids, tre_order, regularity=False, hd95=False,
                          warped_labels=moving_labels)
        after = evaluate(inputs, disp, label_ids, tre_order, regularity=False, warped_labels=warped_labels)
        after.update(regular.result())
    return before, after, warped_labels


def write_registration(inputs: Inputs, result: RegistrationResult, out_dir: str | Path, *, fixed: str, moving: str,
                       label_ids: Sequence[int] | None = None, overwrite: bool = False, figure: bool = True,
                       itk_field: bool = False, tre_order: int = 3,
                       scores: tuple[dict, dict, np.ndarray | None] | None = None) -> dict:
    """Write a registration made in memory (:func:`register_inputs`) as ``dirio register`` writes its
    own: the same files, names (from the names ``fixed`` and ``moving``, e.g. viewer layer names),
    checks, folder lock and atomic rules (:func:`register_files`). ``scores``: the values of
    :func:`score_registration` when already computed. Returns the ``metrics.json`` record.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = registration_paths(out_dir, fixed, moving, result.settings, with_labels=inputs.moving_labels is not None,
                               figure=figure, itk_field=itk_field, inverse=result.inverse_disp is not None,
                               ndim=inputs.fixed.ndim)
    check_outputs(out_dir, paths, overwrite)
    with locked_outputs(out_dir, paths, overwrite):
        return write_outputs(inputs, result, out_dir, paths, start, StepTimes(), settings=result.settings,
                             fixed=fixed, moving=moving, label_ids=label_ids, overwrite=overwrite, figure=figure,
                             tre_order=tre_order, scores=scores)


def register_files(
    fixed: str | Path,
    moving: str | Path,
    out_dir: str | Path,
    *,
    settings: Settings,
    fixed_labels=None,
    moving_labels=None,
    fixed_mask=None,
    moving_mask=None,
    fixed_keypoints=None,
    moving_keypoints=None,
    label_ids: Sequence[int] | None = None,
    resample: bool = False,
    overwrite: bool = False,
    figure: bool = True,
    device: str = "auto",
    ndim: int = 3,
    tre_order: int = 3,
    itk_field: bool = False,
    inverse: bool = False,
) -> dict:
    """Register two image files and write every output into ``out_dir``.

    Writes ``disp_<fixed>_<moving>.nii.gz`` (Learn2Reg layout ``(*S, ndim)``, fixed affine), the
    warped moving image, the warped moving labels (when given), ``metrics.json`` (metrics before
    and after, timings, peak memory, settings, versions, the SHA-256 of every output), ``history.csv``
    (every term at every iteration) and a PNG figure; with ``itk_field`` also the field as an ITK
    displacement field (:func:`itk_field_paths`). With ``inverse`` also the inverse field
    ``inverse_disp_<fixed>_<moving>.nii.gz`` (:func:`inverse_field_paths`; and its ITK form with
    ``itk_field``) and its record (residual, inverse consistency) as ``metrics.json``'s ``inverse``.

    Before any work: outputs that exist are refused unless ``overwrite``, ``out_dir`` must be a
    writable folder, the settings are checked (:func:`dirio.api.check_settings`), and the
    folder is locked (:class:`dirio.io.atomic.OutputLock`: a second run into it fails at once);
    ``.tmp-*`` leftovers of a killed run are deleted. Every file is written atomically; while the
    set is being written the marker ``dirio-incomplete.json`` exists and ``metrics.json`` (the
    manifest) is written last, so a run killed while replacing a set leaves the marker, never an
    unmarked mix. Returns the metrics dict written to ``metrics.json``.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = registration_paths(out_dir, fixed, moving, settings, with_labels=moving_labels is not None,
                               figure=figure, itk_field=itk_field, inverse=inverse, ndim=ndim)
    check_outputs(out_dir, paths, overwrite)
    check_settings(settings)
    check_label_ids_have_maps(label_ids, fixed_labels, moving_labels)
    with locked_outputs(out_dir, paths, overwrite):
        return _register_locked(fixed, moving, out_dir, paths, start, settings=settings,
                                fixed_labels=fixed_labels, moving_labels=moving_labels, fixed_mask=fixed_mask,
                                moving_mask=moving_mask, fixed_keypoints=fixed_keypoints,
                                moving_keypoints=moving_keypoints, label_ids=label_ids, resample=resample,
                                overwrite=overwrite, figure=figure, device=device, ndim=ndim, tre_order=tre_order,
                                inverse=inverse)


def _register_locked(fixed, moving, out_dir: Path, paths: dict[str, Path], start: float, *, settings: Settings,
                     fixed_labels, moving_labels, fixed_mask, moving_mask, fixed_keypoints, moving_keypoints,
                     label_ids, resample: bool, overwrite: bool, figure: bool, device, ndim: int,
                     tre_order: int, inverse: bool = False) -> dict:
    """:func:`register_files` once the output folder is locked and checked."""
    times = StepTimes()
    with times("load"):
        inputs = load_inputs(
            fixed, moving,
            fixed_labels=fixed_labels, moving_labels=moving_labels,
            fixed_mask=fixed_mask, moving_mask=moving_mask,
            fixed_keypoints=fixed_keypoints, moving_keypoints=moving_keypoints,
            resample=resample, ndim=ndim,
        )
        if inverse and resample:
            check_inverse_grid(inputs.fixed, load_image(moving, ndim=ndim))
        check_label_ids_present(label_ids, inputs)
    with times("register"):
        result = register_inputs(inputs, settings, device, inverse=inverse)
    return write_outputs(inputs, result, out_dir, paths, start, times, settings=settings, fixed=fixed, moving=moving,
                         label_ids=label_ids, overwrite=overwrite, figure=figure, tre_order=tre_order)


def write_outputs(inputs: Inputs, result: RegistrationResult, out_dir: Path, paths: dict[str, Path], start: float,
                  times: StepTimes, *, settings: Settings, fixed, moving, label_ids, overwrite: bool, figure: bool,
                  tre_order: int, scores: tuple[dict, dict, np.ndarray | None] | None = None) -> dict:
    """Score a registration and write every file of ``paths`` into the locked, checked ``out_dir``;
    return the ``metrics.json`` record. ``scores``: :func:`score_registration`'s, when already computed."""
    # Everything that can fail on the inputs (warping, scoring) runs before the first file is
    # written, so that an error leaves no output behind.
    with times("evaluate"):
        before, after, warped_labels = scores or score_registration(inputs, result.disp, label_ids, tre_order)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine = inputs.fixed.affine
    marker = out_dir / INCOMPLETE_MARKER
    names = [path.name for path in paths.values()]
    earlier = {}
    if overwrite:  # the earlier set: named in the marker, so that an interrupted replacement can be finished
        earlier = {name: digest for name, digest in earlier_outputs(out_dir).items() if name != INCOMPLETE_MARKER}
        check_replaceable(out_dir, names, earlier)
    write_json(marker, sign_record({
        "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "writing": {key: path.name for key, path in paths.items()}, "earlier": earlier,
        "note": "dirio register was writing this set of outputs; if this file remains, the run was interrupted "
                "and the files may mix two runs: run again with --overwrite"}), overwrite=True)
    replaced = None
    if overwrite:
        # The earlier set's files that are unchanged go, its manifest (metrics.json) with them, so that
        # the folder holds one consistent set; files dirio did not write, or that changed, stay.
        replaced = replace_earlier_outputs(out_dir, names, owned=earlier, spare=[INCOMPLETE_MARKER])
    # The field's gzip compression (~2 s for a 160x192x224 field) runs in a second thread while
    # this one writes the other files and draws the figure (zlib releases the GIL).
    with times("write"), ThreadPoolExecutor(max_workers=1) as pool:
        field_written = pool.submit(save_field, paths["disp"], result.disp, affine, overwrite=overwrite)
        if "itk_field" in paths:
            from dirio.io.itk_fields import save_itk_field

            for key in ("itk_field", "itk_transform"):
                if key in paths:
                    save_itk_field(paths[key], result.disp, affine, overwrite=overwrite)
        write_inverse_outputs(paths, result, affine, overwrite)
        save_image(paths["warped"], result.warped, affine, overwrite=overwrite)
        if warped_labels is not None:
            save_image(paths["warped_labels"], warped_labels, affine, overwrite=overwrite)
        affine_record_written = write_affine_outputs(paths, result, affine, overwrite)
        write_text(paths["history"], history_csv(result.history), overwrite=overwrite)
        if figure:
            from dirio.viz.figures import registration_figure

            label_pair = None
            if inputs.fixed_labels is not None and warped_labels is not None:
                label_pair = (inputs.fixed_labels.data, warped_labels)
            registration_figure(
                paths["figure"], inputs.fixed.data, inputs.moving.data, result.warped, result.disp,
                history=result.history, title=f"{file_stem(moving)} -> {file_stem(fixed)}",
                overwrite=overwrite, labels=label_pair, notes=figure_notes(result),
            )
        field_written.result()
    record = {
        "fixed": str(fixed),
        "moving": str(moving),
        "before": before,
        "after": after,
        "optimisation_seconds": result.seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "levels": result.levels,
        "stages": result.stages,
        "affine": affine_record_written,
        **({"inverse": result.inverse} if result.inverse is not None else {}),
        "device": result.device,
        "settings": settings.to_dict(),
        "versions": software_versions(),
        "outputs": {key: str(path) for key, path in paths.items()},
    }
    if replaced is not None:
        record["overwrite"] = {"removed": replaced.removed, "kept_foreign": replaced.foreign,
                               "kept_changed": replaced.changed}
    with times("checksums"):
        record["sha256"] = {key: sha256_of(path) for key, path in paths.items() if key != "metrics"}
    record["step_seconds"] = times.seconds
    record["total_seconds"] = time.perf_counter() - start
    record = sign_record(record)  # metrics.json is the set's manifest (dirio.io.manifest)
    write_json(paths["metrics"], record, overwrite=overwrite)
    marker.unlink(missing_ok=True)
    return record


def simpleitk_available() -> bool:
    """Whether the optional SimpleITK package can be imported (the ``itk`` extra)."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


def itk_field_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """Files of ``--itk-field``: ``itk_disp_<stem>.nii.gz`` (NIfTI vector intent, LPS mm) and, with
    SimpleITK installed, ``itk_disp_<stem>.h5`` (an ITK ``DisplacementFieldTransform`` file)."""
    paths = {"itk_field": out_dir / f"itk_disp_{stem}.nii.gz"}
    if simpleitk_available():
        paths["itk_transform"] = out_dir / f"itk_disp_{stem}.h5"
    return paths


def affine_output_paths(out_dir: Path, fixed, moving, settings: Settings) -> dict[str, Path]:
    """Files of the affine stage: ``affine_<fixed>_<moving>.json`` (voxel and world matrices) and,
    when SimpleITK is installed, ``affine_<fixed>_<moving>.tfm`` (ITK transform, LPS); none without
    an affine stage."""
    if settings.affine == "none":
        return {}
    stem = f"affine_{file_stem(fixed)}_{file_stem(moving)}"
    paths = {"affine_json": out_dir / f"{stem}.json"}
    if simpleitk_available():
        paths["affine_tfm"] = out_dir / f"{stem}.tfm"
    return paths


def write_affine_outputs(paths: dict[str, Path], result: RegistrationResult, fixed_affine: np.ndarray,
                         overwrite: bool) -> dict | None:
    """Write the affine matrix files named in ``paths`` (atomically); return the JSON record or None."""
    if result.affine_matrix is None or "affine_json" not in paths:
        return None
    from dirio.io.atomic import atomic_output
    from dirio.methods.affine import affine_record, write_itk_transform

    record = affine_record(result.affine_matrix, fixed_affine, result.settings.affine)
    write_json(paths["affine_json"], record, overwrite=overwrite)
    if "affine_tfm" in paths:
        with atomic_output(paths["affine_tfm"], overwrite=overwrite) as tmp:
            write_itk_transform(tmp, result.affine_matrix, fixed_affine)
    return record


#: At most this many distinct integer values make an image look like a label map (an integer MR or
#: CT image has thousands; brain atlases have up to a few hundred labels).
LABEL_MAP_MAX_VALUES = 256


def looks_like_label_map(data: np.ndarray) -> bool:
    """Whether an image holds only integers >= 0, 2 to :data:`LABEL_MAP_MAX_VALUES` distinct ones, as a
    label map does."""
    if data.size == 0 or float(data.min()) < 0 or not np.array_equal(data, np.round(data)):
        return False
    return 2 <= len(np.unique(data)) <= LABEL_MAP_MAX_VALUES


def warp_file(image: str | Path, field_path: str | Path, output: str | Path, *, labels: bool = False,
              overwrite: bool = False, ndim: int = 3, resample: bool = False, inverse: bool = False) -> dict | None:
    """Apply a Learn2Reg displacement file to an image or label map and write the result atomically.

    The image must lie on the field's grid (shape, and affine within 1e-4 mm); with ``resample``
    an image on another grid is first resampled onto the field's grid through the two affines
    (as ``dirio register --resample`` does with the moving image). The output has the field's grid.
    With ``inverse`` the image lies on the fixed grid and is warped into the moving space by the
    field's iterative inverse (:func:`dirio.api.invert_field`; the moving grid is the field's
    grid); returns the inverse's record then (residual), else ``None``.
    """
    check_writable([output], overwrite)
    source = load_image(image, labels=labels, ndim=ndim)
    disp, field_affine = load_field_and_affine(field_path, ndim=ndim)
    if resample:
        grid = Image(np.zeros(disp.shape[:-1], dtype=np.float32), field_affine, str(field_path))
        source = resample_to_grid(source, grid, labels=labels)
    check_field_grid(field_path, disp.shape[:-1], field_affine, source)
    if not labels and looks_like_label_map(source.data):
        logger.warning(f"{image} looks like a label map ({len(np.unique(source.data))} integer values): it is "
                       f"warped by linear interpolation, which mixes labels into fractional values; pass `labels` "
                       f"for nearest-neighbour warping")
    record = None
    if inverse:
        disp, record = invert_field(disp, spacing=source.spacing)
    warped = apply_field(source.data, disp, labels=labels)
    save_image(output, warped, field_affine, overwrite=overwrite)
    return record


def evaluate_files(field_path: str | Path, fixed: str | Path, *, fixed_labels=None, moving_labels=None,
                   fixed_keypoints=None, moving_keypoints=None, label_ids=None, ndim: int = 3,
                   tre_order: int = 3, resample: bool = False) -> dict:
    """Score an existing displacement file for a pair (the fixed image gives the grid and spacing).

    The field must be on the fixed grid (shape, and affine within 1e-4 mm); ``resample`` accepts a
    field whose affine differs (taken on the fixed grid as it is) and resamples the moving labels
    and keypoints onto the fixed grid, as ``dirio register --resample``.
    """
    check_label_ids_have_maps(label_ids, fixed_labels, moving_labels)
    inputs = load_inputs(fixed, fixed, fixed_labels=fixed_labels, moving_labels=moving_labels,
                         fixed_keypoints=fixed_keypoints, moving_keypoints=moving_keypoints, ndim=ndim,
                         resample=resample)
    check_label_ids_present(label_ids, inputs)
    disp, field_affine = load_field_and_affine(field_path, ndim=ndim)
    check_field_grid(field_path, disp.shape[:-1], field_affine, inputs.fixed, resample=resample)
    return evaluate(inputs, disp, label_ids, tre_order)


def convert_file(source: str | Path, output: str | Path, *, to: str | None = None, overwrite: bool = False) -> str:
    """Convert a displacement field between the Learn2Reg layout and an ITK displacement field.

    Learn2Reg -> ITK: ``source`` is a ``disp_*.nii.gz`` (voxels of the fixed grid, fixed affine);
    ``output`` a ``.nii.gz`` (vector intent), ``.mha`` or ``.h5`` in physical LPS mm
    (:mod:`dirio.io.itk_fields`). ITK -> Learn2Reg: ``source`` is an ITK field (``.nii.gz`` of
    vector intent, ``.mha``, ``.h5``), ``output`` a ``.nii.gz`` Learn2Reg field on the same grid.
    ``to`` (``"itk"`` or ``"learn2reg"``) is the output kind; by default the other kind than the
    source's. Returns the kind written.

    Raises:
        DirioError: unreadable source, an output that exists (without ``overwrite``), a suffix
            that does not fit the kind, or a grid with shear (ITK cannot store it).
    """
    from dirio.io.itk_fields import is_itk_field_name, itk_field_to_learn2reg, itk_geometry, save_itk_field

    source, output = Path(source), Path(output)
    check_writable([output], overwrite)
    if to not in (None, "itk", "learn2reg"):
        raise DirioError(f"--to must be itk or learn2reg, got {to!r}")
    source_kind = _field_kind(source)
    to = to or ("learn2reg" if source_kind == "itk" else "itk")
    if source_kind == to:
        raise DirioError(f"{source} is already a {to} field; nothing to convert")
    if to == "itk":
        if not is_itk_field_name(output):
            raise DirioError(f"{output}: an ITK displacement field is written as .nii.gz, .nii, .mha or .h5")
        disp, affine = load_field_and_affine(source)
        itk_geometry(affine, source)  # a sheared grid is the input's problem: named by the input
        save_itk_field(output, disp, affine, overwrite=overwrite)
    else:
        disp, affine = itk_field_to_learn2reg(source)
        save_field(output, disp, affine, overwrite=overwrite)
    return to


def _field_kind(path: Path) -> str:
    """``"itk"`` for ``.mha`` / ``.h5`` and NIfTI files of vector intent in the ``(*S, 1, 3)`` layout, else ``"learn2reg"``."""
    from dirio.io.itk_fields import is_itk_nifti_header

    name = path.name.lower()
    if name.endswith((".mha", ".h5")):
        return "itk"
    if not path.is_file():
        raise DirioError(f"{path}: no such file")
    if name.endswith((".nii", ".nii.gz")):
        import nibabel

        try:
            header = nibabel.load(str(path)).header
        except Exception:  # noqa: BLE001 - the reader of the chosen kind reports the problem
            return "learn2reg"
        return "itk" if is_itk_nifti_header(header) else "learn2reg"
    raise DirioError(f"{path}: a displacement field is a .nii.gz, .nii, .mha or .h5 file")
