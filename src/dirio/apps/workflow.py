"""Register files on disk: load and check inputs, register, write outputs atomically, score, draw.

This is the layer between the Python API (:mod:`dirio.api`) and the command line: every
``dirio register`` run is one call of :func:`register_files`, and ``dirio run`` over a dataset
can call it per pair.
"""

from __future__ import annotations

import csv
import io
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dirio import __version__
from dirio.api import RegistrationResult, apply_field, register
from dirio.errors import DirioError
from dirio.io.atomic import check_writable, write_json, write_text
from dirio.io.images import Image, check_same_grid, load_field, load_image, load_keypoints, resample_to_grid, save_field, save_image
from dirio.evaluation.metrics import evaluate_field
from dirio.config.settings import Settings


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
    fixed_image = load_image(fixed, ndim=ndim)
    moving_image = load_image(moving, ndim=ndim)

    def on_fixed_grid(image: Image, what: str, labels: bool, moving_side: bool) -> Image:
        """Moving-side files are resampled when asked; everything else must share the fixed grid."""
        if moving_side and resample:
            return resample_to_grid(image, fixed_image, labels=labels)
        check_same_grid(fixed_image, image, what=what)
        return image

    inputs = Inputs(fixed_image, on_fixed_grid(moving_image, "moving", labels=False, moving_side=True))
    for attribute, path in (
        ("fixed_labels", fixed_labels),
        ("moving_labels", moving_labels),
        ("fixed_mask", fixed_mask),
        ("moving_mask", moving_mask),
    ):
        if path is not None:
            image = load_image(path, labels=True, ndim=ndim)
            what = attribute.replace("_", " ")
            setattr(inputs, attribute, on_fixed_grid(image, what, labels=True, moving_side=attribute.startswith("moving")))
    if fixed_keypoints is not None:
        inputs.fixed_points = load_keypoints(fixed_keypoints, shape=fixed_image.shape, ndim=ndim)
        # Moving keypoints are in the moving image's voxel coordinates (the Learn2Reg convention);
        # with resampling they are mapped into the fixed grid through the two affines.
        inputs.moving_points = load_keypoints(moving_keypoints, shape=moving_image.shape, ndim=ndim)
        if resample:
            inputs.moving_points = map_points(inputs.moving_points, moving_image.affine, fixed_image.affine)
        if len(inputs.fixed_points) != len(inputs.moving_points):
            raise DirioError(
                f"{fixed_keypoints} has {len(inputs.fixed_points)} keypoints but {moving_keypoints} has "
                f"{len(inputs.moving_points)}; they must correspond row by row"
            )
    return inputs


def map_points(points: np.ndarray, from_affine: np.ndarray, to_affine: np.ndarray) -> np.ndarray:
    """Voxel coordinates of one grid -> voxel coordinates of another grid through world space."""
    ndim = points.shape[1]
    homogeneous = np.zeros((len(points), 4))
    homogeneous[:, :ndim] = points
    homogeneous[:, 3] = 1.0
    mapped = homogeneous @ (np.linalg.inv(to_affine) @ from_affine).T
    return mapped[:, :ndim]


def evaluate(inputs: Inputs, disp: np.ndarray, label_ids: Sequence[int] | None = None, tre_order: int = 3,
             regularity: bool = True, hd95: bool = True) -> dict:
    """dirio's metrics of a field for the pair (Dice/HD95 with labels, TRE with keypoints, regularity);
    ``regularity`` and ``hd95`` as in :func:`dirio.evaluation.metrics.evaluate_field`."""
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
    )


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
) -> dict:
    """Register two image files and write every output into ``out_dir``.

    Writes ``disp_<fixed>_<moving>.nii.gz`` (Learn2Reg layout ``(*S, ndim)``, fixed affine), the
    warped moving image, the warped moving labels (when given), ``metrics.json`` (metrics before
    and after, timings, peak memory, settings, versions), ``history.csv`` (every term at every
    iteration) and a PNG figure. Nothing existing is replaced unless ``overwrite``; every file is
    written atomically. Returns the metrics dict written to ``metrics.json``.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    paths = output_paths(out_dir, fixed, moving, with_labels=moving_labels is not None)
    if not figure:
        paths.pop("figure")
    paths.update(affine_output_paths(out_dir, fixed, moving, settings))
    check_writable(paths.values(), overwrite)
    inputs = load_inputs(
        fixed, moving,
        fixed_labels=fixed_labels, moving_labels=moving_labels,
        fixed_mask=fixed_mask, moving_mask=moving_mask,
        fixed_keypoints=fixed_keypoints, moving_keypoints=moving_keypoints,
        resample=resample, ndim=ndim,
    )
    result: RegistrationResult = register(
        inputs.fixed, inputs.moving, settings=settings,
        fixed_mask=None if inputs.fixed_mask is None else inputs.fixed_mask.data,
        moving_mask=None if inputs.moving_mask is None else inputs.moving_mask.data,
        device=device,
    )
    # Everything that can fail on the inputs (warping, scoring) runs before the first file is
    # written, so that an error leaves no output behind.
    warped_labels = None
    if inputs.moving_labels is not None:
        warped_labels = apply_field(inputs.moving_labels.data, result.disp, labels=True)
    # The identity's regularity metrics are known (no folding, SDlogJ 0): only overlap and TRE.
    before = evaluate(inputs, np.zeros_like(result.disp), label_ids, tre_order, regularity=False)
    after = evaluate(inputs, result.disp, label_ids, tre_order)
    out_dir.mkdir(parents=True, exist_ok=True)
    affine = inputs.fixed.affine
    save_field(paths["disp"], result.disp, affine, overwrite=overwrite)
    save_image(paths["warped"], result.warped, affine, overwrite=overwrite)
    if warped_labels is not None:
        save_image(paths["warped_labels"], warped_labels, affine, overwrite=overwrite)
    affine_record_written = write_affine_outputs(paths, result, affine, overwrite)
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
        "device": result.device,
        "settings": settings.to_dict(),
        "versions": software_versions(),
    }
    write_text(paths["history"], history_csv(result.history), overwrite=overwrite)
    if figure:
        from dirio.viz.figures import registration_figure

        label_pair = None
        if inputs.fixed_labels is not None and warped_labels is not None:
            label_pair = (inputs.fixed_labels.data, warped_labels)
        registration_figure(
            paths["figure"], inputs.fixed.data, inputs.moving.data, result.warped, result.disp,
            history=result.history, title=f"{file_stem(moving)} -> {file_stem(fixed)}",
            overwrite=overwrite, labels=label_pair,
        )
    record["total_seconds"] = time.perf_counter() - start
    record["outputs"] = {key: str(path) for key, path in paths.items()}
    write_json(paths["metrics"], record, overwrite=overwrite)
    return record


def affine_output_paths(out_dir: Path, fixed, moving, settings: Settings) -> dict[str, Path]:
    """Files of the affine stage: ``affine_<fixed>_<moving>.json`` (voxel and world matrices) and,
    when SimpleITK is installed, ``affine_<fixed>_<moving>.tfm`` (ITK transform, LPS); none without
    an affine stage."""
    if settings.affine == "none":
        return {}
    stem = f"affine_{file_stem(fixed)}_{file_stem(moving)}"
    paths = {"affine_json": out_dir / f"{stem}.json"}
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return paths
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


def warp_file(image: str | Path, field_path: str | Path, output: str | Path, *, labels: bool = False,
              overwrite: bool = False, ndim: int = 3) -> None:
    """Apply a Learn2Reg displacement file to an image or label map and write the result atomically."""
    check_writable([output], overwrite)
    source = load_image(image, labels=labels, ndim=ndim)
    disp = load_field(field_path, ndim=ndim)
    if disp.shape[:-1] != source.shape:
        raise DirioError(
            f"{field_path} is defined on a grid of shape {disp.shape[:-1]} but {image} has shape {source.shape}"
        )
    warped = apply_field(source.data, disp, labels=labels)
    save_image(output, warped, source.affine, overwrite=overwrite)


def evaluate_files(field_path: str | Path, fixed: str | Path, *, fixed_labels=None, moving_labels=None,
                   fixed_keypoints=None, moving_keypoints=None, label_ids=None, ndim: int = 3,
                   tre_order: int = 3) -> dict:
    """Score an existing displacement file for a pair (the fixed image gives the grid and spacing)."""
    inputs = load_inputs(fixed, fixed, fixed_labels=fixed_labels, moving_labels=moving_labels,
                         fixed_keypoints=fixed_keypoints, moving_keypoints=moving_keypoints, ndim=ndim)
    disp = load_field(field_path, ndim=ndim)
    if disp.shape[:-1] != inputs.fixed.shape:
        raise DirioError(
            f"{field_path} is defined on a grid of shape {disp.shape[:-1]} but {fixed} has shape {inputs.fixed.shape}"
        )
    return evaluate(inputs, disp, label_ids, tre_order)
