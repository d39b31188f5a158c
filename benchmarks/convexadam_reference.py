"""Benchmark: dirio's ``convex-adam`` field against the ConvexAdam reference's, voxel by voxel.

The reference is the PyPI package ``convexAdam`` (0.2.0, ``convex_adam_MIND.convex_adam_pt`` at its
defaults), run by its own interpreter (``--peer-python`` or ``DIRIO_PEER_PYTHON``; a separate virtual
environment, never a dirio dependency) through ``benchmarks/lung_peer_worker.py``. Two cases:

* ``lung``: the elastix lung pair, index set-up of ``lung_pair.py`` (fixed = baseline, moving =
  follow-up cropped to the baseline's shape), clipped to [-1000, 1500] HU, both lung masks
  (``use_mask=True``: the reference fills each image outside its mask);
* ``brain``: the C2FViT OASIS pair on the voxelmorph grid (fixed = A, moving = B), raw intensities,
  no masks (the reference's defaults); scored inside A's brain (``A > 0``).

Both methods get the same arrays: padded at the far end of each axis to a multiple of 6 voxels
(edge values, masks 0), as the reference's cell grid (``grid_sp = 6``) and its half-resolution
fill need; fields are cropped back. Two fields of each method are compared: after the discrete
step (the reference with ``lambda_weight = 0``, which skips its Adam stage; dirio's convex stage)
and the final one. Reported: mean, median and 95th percentile of ``|u_dirio - u_ref|`` (voxels)
inside the lung / brain, the mean motion ``|u_ref|`` there, and the wall and CPU seconds of each
call (back to back, same load); for the final fields also where the difference sits (by depth below
the mask's boundary, by quartile of the fixed image's gradient, its mean per axis).

``--self-check`` also runs the reference on the same pair with both images multiplied by
``1 + 1e-5``: MIND-SSC, and so every step of the method, is invariant to that scaling in exact
arithmetic, so the two reference fields differ only by float rounding amplified by the method. Their
difference (``reference_self``) is the floor below which no reimplementation can be expected to agree
with the reference without reproducing its every float operation in order.

The same script writes the test fixture (``--fixture``): the reference's fields (defaults, no masks) on
the 36^3 synthetic pair of ``dirio.testing.synthetic.textured_pair``, subsampled, in
``tests/data/convexadam_reference_36.npz`` (see tests/test_convexadam_agreement.py).

    python benchmarks/convexadam_reference.py --peer-python /tmp/caenv/bin/python [--cases lung,brain] [--self-check]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np
import torch
from lung_pair import index_crop_inputs, load_lung_data

from dirio.api import register
from dirio.config.settings import make_settings
from dirio.io.images import load_image
from dirio.testing.synthetic import textured_pair

NAME = "convexadam_reference"
PEER_WORKER = Path(__file__).resolve().parent / "lung_peer_worker.py"
CLIP_HU = (-1000.0, 1500.0)
MULTIPLE = 6
BRAIN_DIR = C.DATA / "c2fvit-oasis-brain" / "on-voxelmorph-grid"
# convex_adam_pt's defaults (convexAdam 0.2.0), written out so that the record shows them.
PEER_PARAMS = {"mind_r": 1, "mind_d": 2, "lambda_weight": 1.25, "grid_sp": 6, "disp_hw": 4,
               "selected_niter": 80, "selected_smooth": 0, "grid_sp_adam": 2, "ic": True}


def pad_to(array: np.ndarray, multiple: int, mode: str) -> np.ndarray:
    """Pad ``(*S)`` at the far end of every axis up to a multiple of ``multiple`` (``edge`` or zeros)."""
    pad = [(0, (-n) % multiple) for n in array.shape]
    return np.pad(array, pad, mode="edge") if mode == "edge" else np.pad(array, pad)


def lung_case() -> dict:
    data = load_lung_data()
    inputs = index_crop_inputs(data)
    fixed = np.clip(data["baseline"].data.astype(np.float32), *CLIP_HU)
    moving = np.clip(inputs["moving"].astype(np.float32), *CLIP_HU)
    masks = [(data["baseline_mask"].data > 0).astype(np.uint8), (inputs["moving_mask"] > 0).astype(np.uint8)]
    return {"label": "lung", "fixed": fixed, "moving": moving, "fixed_mask": masks[0], "moving_mask": masks[1],
            "score_mask": masks[0] > 0, "use_mask": True}


def brain_case() -> dict:
    fixed = load_image(C.require(BRAIN_DIR / "image_A.nii.gz", NAME)).data.astype(np.float32)
    moving = load_image(C.require(BRAIN_DIR / "image_B.nii.gz", NAME)).data.astype(np.float32)
    return {"label": "brain", "fixed": fixed, "moving": moving, "fixed_mask": None, "moving_mask": None,
            "score_mask": fixed > 0, "use_mask": False}


CASES = {"lung": lung_case, "brain": brain_case}
# The self-check's scaling of both images (see the module docstring).
SELF_CHECK_SCALE = 1.0 + 1e-5


def padded(case: dict) -> dict:
    out = dict(case)
    out["shape"] = case["fixed"].shape
    for key in ("fixed", "moving"):
        out[key] = pad_to(case[key], MULTIPLE, "edge")
    for key in ("fixed_mask", "moving_mask"):
        if case[key] is not None:
            out[key] = pad_to(case[key], MULTIPLE, "zeros")
    return out


def run_reference(python: str, case: dict, params: dict, threads: int) -> tuple[np.ndarray, dict]:
    """The reference on ``case`` (padded arrays); ``(*S_padded, 3)`` float32 voxels and its timing."""
    import nibabel as nib

    with tempfile.TemporaryDirectory(prefix="convexadam_ref_") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "fixed.npy", case["fixed"])
        np.save(tmp / "moving.npy", case["moving"])
        job = {"fixed": str(tmp / "fixed.npy"), "moving": str(tmp / "moving.npy"), "params": params,
               "threads": threads, "out": str(tmp / "disp.npy")}
        if case["use_mask"]:
            for key in ("fixed_mask", "moving_mask"):
                nib.save(nib.Nifti1Image(case[key], np.eye(4)), tmp / f"{key}.nii.gz")
                job[key] = str(tmp / f"{key}.nii.gz")
        (tmp / "job.json").write_text(json.dumps(job))
        done = subprocess.run([python, str(PEER_WORKER), str(tmp / "job.json")], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"reference failed:\n{done.stderr[-3000:]}")
        timing = json.loads((tmp / "disp.npy.json").read_text())
        return np.load(tmp / "disp.npy").astype(np.float32), timing


def run_dirio(case: dict, preset: str, overrides: dict, keep_stages: bool = True) -> tuple[dict, dict]:
    """dirio's preset on ``case`` (padded arrays); fields ``(*S_padded, 3)`` by stage and the timing."""
    settings = make_settings(preset, progress=False, **overrides)
    wall0, cpu0 = time.perf_counter(), C.cpu_seconds()
    result = register(case["fixed"], case["moving"], settings=settings, fixed_mask=case["fixed_mask"],
                      moving_mask=case["moving_mask"], device="cpu", keep_stages=keep_stages)
    timing = {"wall_s": time.perf_counter() - wall0, "cpu_s": C.cpu_seconds() - cpu0}
    fields = {"final": np.asarray(result.disp, np.float32)}
    if keep_stages and result.stage_fields and "convex" in result.stage_fields:
        fields["convex"] = np.asarray(result.stage_fields["convex"], np.float32)
    return fields, timing


def difference(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> dict:
    """Statistics of ``|a - b|`` (voxels) over ``mask`` for ``(*S, 3)`` fields."""
    d = np.linalg.norm(a - b, axis=-1)[mask]
    return {"mean": float(d.mean()), "median": float(np.median(d)), "p95": float(np.percentile(d, 95)),
            "max": float(d.max())}


def where_it_differs(a: np.ndarray, b: np.ndarray, mask: np.ndarray, image: np.ndarray) -> dict:
    """Where ``|a - b|`` sits inside ``mask``: by depth (voxels from the mask's boundary), by quartile
    of the image's gradient magnitude (Gaussian sigma 1 voxel), and the mean of ``a - b`` per axis."""
    from scipy import ndimage

    d = np.linalg.norm(a - b, axis=-1)
    depth = ndimage.distance_transform_edt(mask)
    gradient = np.linalg.norm(np.stack(np.gradient(ndimage.gaussian_filter(image.astype(np.float64), 1.0))), axis=0)
    out = {"by_depth": {}, "by_gradient_quartile": [], "mean_difference_per_axis": (a - b)[mask].mean(0).tolist(),
           "mean_length": [float(np.linalg.norm(a, axis=-1)[mask].mean()), float(np.linalg.norm(b, axis=-1)[mask].mean())]}
    for low, high in ((0, 3), (3, 6), (6, 12), (12, np.inf)):
        inside = mask & (depth > low) & (depth <= high)
        out["by_depth"][f"{low}-{high}"] = float(d[inside].mean()) if inside.any() else None
    edges = [-np.inf, *np.quantile(gradient[mask], [0.25, 0.5, 0.75]), np.inf]
    for low, high in zip(edges[:-1], edges[1:]):
        inside = mask & (gradient > low) & (gradient <= high)
        out["by_gradient_quartile"].append(float(d[inside].mean()) if inside.any() else None)
    return out


def crop(field: np.ndarray, shape) -> np.ndarray:
    return np.ascontiguousarray(field[tuple(slice(0, n) for n in shape)])


FIXTURE = C.REPO / "tests" / "data" / "convexadam_reference_36.npz"
# The fields are stored at every FIXTURE_STEP-th voxel in float16 (a few KB); the pair is
# regenerated by dirio.testing.synthetic.textured_pair.
FIXTURE_STEP = 3


def write_fixture(python: str, threads: int) -> None:
    """Run the reference at its defaults on :func:`dirio.testing.synthetic.textured_pair` and store
    its discrete step's field (``lambda_weight = 0``) and its final field (voxels, ``(*S, 3)``,
    subsampled, float16)."""
    fixed, moving, _ = textured_pair()
    case = {"fixed": fixed.astype(np.float32), "moving": moving.astype(np.float32), "use_mask": False}
    convex, _ = run_reference(python, case, {**PEER_PARAMS, "lambda_weight": 0.0}, threads)
    final, _ = run_reference(python, case, PEER_PARAMS, threads)
    sub = (slice(None, None, FIXTURE_STEP),) * 3
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(FIXTURE, convex=convex[sub].astype(np.float16), final=final[sub].astype(np.float16),
                        step=FIXTURE_STEP, params=json.dumps(PEER_PARAMS), convexAdam="0.2.0")
    print(f"[{NAME}] wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=lambda t: tuple(v for v in t.split(",") if v), default=tuple(CASES))
    parser.add_argument("--peer-python", default=os.environ.get("DIRIO_PEER_PYTHON"))
    parser.add_argument("--preset", default="convex-adam")
    parser.add_argument("--override", default="{}", help="JSON dict of dirio overrides")
    parser.add_argument("--cache", type=Path, default=C.OUT_ROOT / NAME / "cache")
    parser.add_argument("--out", type=Path, default=C.OUT_ROOT / NAME)
    parser.add_argument("--fixture", action="store_true", help=f"write the test fixture {FIXTURE.name} and stop")
    parser.add_argument("--self-check", action="store_true",
                        help=f"also run the reference on both images scaled by {SELF_CHECK_SCALE} (its float-rounding floor)")
    parser.add_argument("--no-dirio", dest="dirio", action="store_false", help="only the reference runs")
    args = parser.parse_args(argv)
    if not args.peer_python or not Path(args.peer_python).exists():
        sys.exit(f"{NAME}: the reference needs its interpreter (--peer-python or DIRIO_PEER_PYTHON)")
    overrides = json.loads(args.override)
    threads = torch.get_num_threads()
    if args.fixture:
        write_fixture(args.peer_python, threads)
        return 0
    records = []
    for label in args.cases:
        case = padded(CASES[label]())
        ref = {}
        timing_ref = {}
        runs = [("convex", case, {**PEER_PARAMS, "lambda_weight": 0.0}), ("final", case, PEER_PARAMS)]
        if args.self_check:
            scaled = {**case, "fixed": case["fixed"] * np.float32(SELF_CHECK_SCALE),
                      "moving": case["moving"] * np.float32(SELF_CHECK_SCALE)}
            runs += [("convex_scaled", scaled, {**PEER_PARAMS, "lambda_weight": 0.0}), ("final_scaled", scaled, PEER_PARAMS)]
        for stage, inputs, params in runs:
            path = args.cache / f"{label}_{stage}.npz"
            if path.exists():
                with np.load(path) as stored:
                    ref[stage] = stored["disp"]
                    timing_ref[stage] = json.loads(str(stored["timing"]))
                continue
            ref[stage], timing_ref[stage] = run_reference(args.peer_python, inputs, params, threads)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, disp=ref[stage], timing=json.dumps(timing_ref[stage]))
        mask = case["score_mask"]
        record = {"case": label, "shape": list(case["shape"]), "padded": list(case["fixed"].shape),
                  "reference_timing": timing_ref,
                  "motion_ref_mean": float(np.linalg.norm(crop(ref["final"], case["shape"]), axis=-1)[mask].mean())}
        if args.self_check:
            record["reference_self"] = {stage: difference(crop(ref[f"{stage}_scaled"], case["shape"]),
                                                          crop(ref[stage], case["shape"]), mask)
                                        for stage in ("convex", "final")}
        if args.dirio:
            mine, record["dirio_timing"] = run_dirio(case, args.preset, overrides)
            for stage in ("convex", "final"):
                if stage in mine:
                    record[stage] = difference(crop(mine[stage], case["shape"]), crop(ref[stage], case["shape"]), mask)
            record["final_where"] = where_it_differs(crop(mine["final"], case["shape"]), crop(ref["final"], case["shape"]),
                                                     mask, crop(case["fixed"], case["shape"]))
        records.append(record)
        print(json.dumps(record), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
