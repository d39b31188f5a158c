"""The demo: register a known smooth warp of the MNI152 template back to the template.

The MNI152 2009 T1 template and its grey- and white-matter probability maps ship inside the
nilearn package (no download). The demo resamples them to ``resolution`` mm, builds a pair with
a known smooth random deformation (:func:`dirio.testing.synthetic.warped_pair`), registers it with the
``brain-mri`` preset, and reports the tissue Dice, the endpoint error against the known field,
folding and run time, with the figure.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import torch

from dirio.errors import DirioError
from dirio.core.fields import resize_image
from dirio.io.atomic import check_output_folder, check_writable, write_json
from dirio.io.manifest import check_replaceable, earlier_outputs, files_with_checksums, sign_record
from dirio.io.images import save_image
from dirio.io.fields import save_field
from dirio.config.presets import PRESETS
from dirio.config.settings import make_settings
from dirio.losses.by_level import align_to_levels
from dirio.testing.synthetic import endpoint_error, warped_pair

TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
TISSUE_LABELS = {1: "grey matter", 2: "white matter"}


def template_directory() -> Path:
    """Folder of nilearn's packaged data (found without importing nilearn, which is slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DirioError("the demo needs the MNI152 template shipped with nilearn: nilearn is a dependency of dirio: pip install nilearn")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [name for name in TEMPLATE_FILES.values() if not (folder / name).exists()]
    if missing:
        raise DirioError(f"nilearn is installed but lacks {missing[0]} in {folder}")
    return folder


def load_template(resolution: float = 2.0):
    """T1 (float32 in [0, 1]), tissue labels (0 background, 1 GM, 2 WM) and affine at ``resolution`` mm."""
    import nibabel as nib

    folder = template_directory()
    images = {key: nib.load(folder / name) for key, name in TEMPLATE_FILES.items()}
    affine = images["t1"].affine.copy()
    arrays = {key: np.asarray(img.dataobj, dtype=np.float32) for key, img in images.items()}
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shape = tuple(max(int(round(n * s / resolution)), 2) for n, s in zip(arrays["t1"].shape, spacing))
    resampled = {}
    for key, array in arrays.items():
        tensor = torch.from_numpy(array)[None, None]
        resampled[key] = resize_image(tensor, shape)[0, 0].numpy()
    scale = [(n_old - 1) / (n_new - 1) for n_old, n_new in zip(arrays["t1"].shape, shape)]
    affine[:3, :3] = affine[:3, :3] * np.array(scale)[None, :]
    t1 = resampled["t1"] / max(float(resampled["t1"].max()), 1e-6)
    gm, wm = resampled["gm"], resampled["wm"]
    background = np.maximum(0.0, gm.max() - gm - wm)  # probabilities are stored 0..255 or 0..1
    labels = np.argmax(np.stack([background, gm, wm]), axis=0).astype(np.uint8)
    return t1.astype(np.float32), labels, affine


# The demo's known deformation, in mm (the benchmark's deformation at 1 mm: smoothing 14 voxels,
# largest component 8 voxels).
WARP_SMOOTHING_MM = 14.0
WARP_MAX_DISPLACEMENT_MM = 8.0


def demo_pair(resolution: float = 2.0, seed: int = 0):
    """The demo's pair: the template (:func:`load_template`) and the template deformed by the known
    smooth warp. Returns ``(pair, affine)``: a :class:`dirio.testing.synthetic.SyntheticPair`
    (``fixed``, ``moving``, their label maps, ``true_disp`` in voxels of the fixed grid) and the
    4x4 voxel-to-world affine of both images."""
    t1, labels, affine = load_template(resolution)
    pair = warped_pair(t1, labels, sigma=WARP_SMOOTHING_MM / resolution,
                       max_displacement=WARP_MAX_DISPLACEMENT_MM / resolution, seed=seed)
    return pair, affine


def run_demo(out_dir="demo-out", *, overwrite=False, device="auto", quiet=False, resolution=2.0, seed=0) -> dict:
    """Build the synthetic pair, register it, write inputs, outputs and ``demo.json``; print a summary."""
    from dirio.apps.workflow import register_files

    start = time.perf_counter()
    out = Path(out_dir)
    inputs = out / "inputs"
    files = {
        "fixed": inputs / "fixed.nii.gz",
        "moving": inputs / "moving.nii.gz",
        "fixed_labels": inputs / "fixed_tissue.nii.gz",
        "moving_labels": inputs / "moving_tissue.nii.gz",
        "true_disp": inputs / "true_disp.nii.gz",
    }
    check_output_folder(out)
    check_writable([*files.values(), out / "demo.json"], overwrite)
    if overwrite:  # only what an earlier demo wrote (demo.json is its manifest: dirio.io.manifest)
        check_replaceable(out, [path.relative_to(out).as_posix() for path in [*files.values(), out / "demo.json"]],
                          earlier_outputs(out, kinds=("demo",)))
    pair, affine = demo_pair(resolution, seed)
    save_image(files["fixed"], pair.fixed, affine, overwrite=overwrite)
    save_image(files["moving"], pair.moving, affine, overwrite=overwrite)
    save_image(files["fixed_labels"], pair.fixed_labels, affine, overwrite=overwrite)
    save_image(files["moving_labels"], pair.moving_labels, affine, overwrite=overwrite)
    save_field(files["true_disp"], pair.true_disp, affine, overwrite=overwrite)

    # The brain-mri preset's pyramid is meant for 1 mm images; its first two levels have 4 and 2 mm
    # voxels. Keep those physical resolutions (and their iterations and similarity windows) at the
    # demo's voxel size.
    finest = max(1, int(round(2.0 / resolution)))
    preset = PRESETS["brain-mri"]
    iterations = tuple(preset["iterations"][:2])
    similarity_options = align_to_levels(preset["similarity_options"], preset["levels"], preset["levels"][:2])
    settings = make_settings("brain-mri", levels=(2 * finest, finest), iterations=iterations,
                             similarity_options=similarity_options, progress=not quiet)
    record = register_files(
        files["fixed"], files["moving"], out, settings=settings,
        fixed_labels=files["fixed_labels"], moving_labels=files["moving_labels"],
        overwrite=overwrite, device=device,
    )
    import nibabel as nib

    disp = np.asarray(nib.load(record["outputs"]["disp"]).dataobj, dtype=np.float32)
    brain = pair.fixed_labels > 0
    summary = {
        "resolution_mm": resolution,
        "shape": list(pair.fixed.shape),
        "dice_before": record["before"]["dice_mean"],
        "dice_after": record["after"]["dice_mean"],
        "dice_per_tissue_after": {TISSUE_LABELS[int(k)]: v for k, v in record["after"]["dice_per_label"].items()},
        "endpoint_error_before_mm": endpoint_error(np.zeros_like(disp), pair.true_disp, brain) * resolution,
        "endpoint_error_after_mm": endpoint_error(disp, pair.true_disp, brain) * resolution,
        "percent_nonpositive_jacobian": record["after"]["percent_nonpositive_jacobian"],
        "optimisation_seconds": record["optimisation_seconds"],
        "total_seconds": time.perf_counter() - start,
        "figure": record["outputs"]["figure"],
    }
    summary["files"] = files_with_checksums(out, [path.relative_to(out).as_posix() for path in files.values()])
    write_json(out / "demo.json", sign_record(summary), overwrite=overwrite)
    if not quiet:
        print(
            f"demo: MNI152 at {resolution:g} mm {tuple(pair.fixed.shape)}, known smooth warp\n"
            f"  tissue Dice      {summary['dice_before']:.3f} -> {summary['dice_after']:.3f}\n"
            f"  endpoint error   {summary['endpoint_error_before_mm']:.2f} -> {summary['endpoint_error_after_mm']:.2f} mm (inside the brain)\n"
            f"  folding          {summary['percent_nonpositive_jacobian']:.4f}% voxels with det <= 0\n"
            f"  time             {summary['optimisation_seconds']:.1f} s optimisation, {summary['total_seconds']:.1f} s in all\n"
            f"  figure           {summary['figure']}"
        )
    return summary
