"""Benchmark: lung validation that does not reuse the 10 tuning landmarks, against the ConvexAdam reference.

The lung presets (``lung-ct``, ``convex-adam``) were tuned on the 10 shared landmarks of the elastix
lung pair (benchmarks/lung_pair.py). Three checks that do not depend on those landmarks alone:

* ``breathing``: known breathing-like warps of the baseline scan (3 seeds). Moving = the baseline
  (HU, inhale-like); fixed = the baseline pulled through ``u_true`` (``fixed(x) = moving(x + u_true(x))``,
  dirio's convention), an exhale-like state:

  - lung motion ``v``: cranio-caudal (voxel axis k, 2.5 mm; k grows toward superior, the lung base /
    diaphragm is at low k) growing from 0 at the apex to ``A`` = 10-20 mm at the base (profile
    ``t ** p``, p in [1, 2]), plus anterior-posterior / lateral expansion (2-7 % about the lung's
    centre, larger toward the base) and a small smooth random part (1-2 mm);
  - body motion ``w``: the same expansion (the chest wall follows the lung's normal motion) and the
    cranio-caudal part only below the lung in each (i, j) column (the abdomen follows the diaphragm);
    the chest wall does not move cranio-caudally, so the lung **slides** along it;
  - ``u_true = v`` where the fixed voxel maps into the baseline lung mask (``M(x + v(x))``), ``w``
    elsewhere: the transition is sharp at the lung boundary;
  - the fixed lung is denser (exhale): +30 to +80 HU inside the fixed lung mask; N(0, 20 HU) noise on
    both images. Masks: the baseline mask (moving) and the fixed lung mask.

  Scored by the endpoint error ``|(u - u_true) * spacing|`` (mm) inside the fixed lung mask: all,
  inferior / superior half of the lung's k extent, within 15 mm of the lung boundary / deeper.
* ``keypoints``: on the same warps, 200 Förstner keypoints of the fixed image inside the (eroded)
  fixed lung mask (structure tensor, ``det / trace``, non-maximum suppression), followed through
  ``u_true``; TRE (mm) at them with ``dirio.evaluation.landmarks.tre`` (cubic, Learn2Reg).
* ``index-crop``, ``world``: the real pair (lung_pair.py's two set-ups). The compared methods and
  every candidate of each choice made on the 10 landmarks (``CHOICES``: lung-ct diffusion weight x
  MIND dilation, its affine stage, the convex-adam iteration variants) are run once; per-landmark
  TRE gives, for all 252 splits of the 10 landmarks into 5 tuning + 5 held-out, the candidate picked
  on the tuning 5 and its held-out TRE (leave-some-out), against the candidate chosen on all 10.

Methods: dirio presets and variants (``--methods``, ``--variant NAME="FLAGS"`` with ``dirio
register`` flags, parsed by the CLI's own option parser) and the ConvexAdam reference (PyPI
``convexAdam``, ``convex_adam_pt`` with its defaults and the lung masks), run by its own interpreter
(``--peer-python`` or ``DIRIO_PEER_PYTHON``; skipped with a reason when absent) in a subprocess
(benchmarks/lung_peer_worker.py) on files in a temporary folder, its field cached per case under
``OUT/cache``. Its field, ``(H, W, D, 3)`` in voxels, is scored as a dirio field; the convention is
checked by its TRE and by the similarity of the moving image warped with dirio (``+u`` vs ``-u``).
Every method is scored with dirio's evaluation code. Times: wall and CPU (user + system, this
process and children, ``resource.getrusage``) of the registration call (the peer: inside the worker,
without interpreter start-up).

    python benchmarks/lung_validation.py --peer-python /tmp/antsenv/bin/python \\
        [--sets breathing,keypoints,index-crop,world] [--seeds 1,2,3] [--methods lung-ct,convex-adam,...] \\
        [--variant NAME="--preset lung-ct --weight 0.3"] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import _common as C
from dirio.api import apply_field, register
from dirio.apps.cli import add_registration_options, settings_from_args
from dirio.config.settings import PRESETS
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian
from dirio.evaluation.landmarks import tre
from dirio.io.images import load_image
from dirio.testing.synthetic import smooth_random_field
from oasis_pair import ncc
from lung_pair import index_crop_inputs, load_lung_data, world_inputs

NAME = "lung_validation"
DATA_DIR = C.DATA / "elastix-lung-ct"
SETS = ("breathing", "keypoints", "index-crop", "world")
PEER = "convexadam-ref"
PEER_WORKER = Path(__file__).resolve().parent / "lung_peer_worker.py"
# convex_adam_pt's defaults (convexAdam 0.2.0), written out so that the record shows them.
PEER_PARAMS = {"mind_r": 1, "mind_d": 2, "lambda_weight": 1.25, "grid_sp": 6, "disp_hw": 4,
               "selected_niter": 80, "selected_smooth": 0, "grid_sp_adam": 2, "ic": True}
# The reference code indexes half-resolution arrays as if every size were even and pools by grid_sp:
# the images are padded at their far ends (edge values; masks with 0) to multiples of 6, the field
# cropped back. The images are clipped to [-1000, 1500] HU (the 2011 scans hold -2048 padding).
PEER_MULTIPLE = 6
CLIP_HU = (-1000.0, 1500.0)
NOISE_HU = 20.0
NEAR_BOUNDARY_MM = 15.0
KEYPOINTS = 200
DEFAULT_METHODS = ("lung-ct", "convex-adam", "convex-adam-fast", "continuous", PEER)

# Choices made on the 10 landmarks (presets.py comments): group -> (the value the preset took, candidates).
_W = ("0.1", "0.3", "0.5", "1.0")
CHOICES = {
    "lung-ct diffusion weight (dilation 1)": (
        "0.5", {w: "--preset lung-ct" + ("" if w == "0.5" else f" --weight {w}") for w in _W}),
    "lung-ct MIND dilation (weight 0.5)": (
        "1", {"1": "--preset lung-ct",
              "2": "--preset lung-ct --similarity-options radius=1,dilation=2"}),
    "lung-ct weight x dilation": (
        "w0.5 d1", {f"w{w} d{d}": "--preset lung-ct" + ("" if w == "0.5" else f" --weight {w}")
                    + ("" if d == 1 else " --similarity-options radius=1,dilation=2") for d in (1, 2) for w in _W}),
    "lung-ct affine stage": (
        "150+30 (x4,x2)", {"150 (x4)": "--preset lung-ct --affine-levels 4 --affine-iterations 150",
                           "150+30 (x4,x2)": "--preset lung-ct",
                           "100+60 (x4,x2)": "--preset lung-ct --affine-iterations 100,60"}),
    "convex-adam iterations": (
        "60+15", {"80 (x2)": "--preset convex-adam-fast --levels 2 --iterations 80",
                  "60+15": "--preset convex-adam-fast",
                  "60+25": "--preset convex-adam-fast --iterations 60,25"}),
}


# ----------------------------------------------------------------------------------------------
# small pure helpers


def canonical(flags: str) -> str:
    """``dirio register`` flags in one canonical spelling, the key of a run (identical flag sets run once)."""
    return shlex.join(shlex.split(flags))


def masked_ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation of two ``(*S)`` images over the voxels of ``mask`` (a diagnostic)."""
    return ncc(a[mask > 0], b[mask > 0])


def percent_folding(disp: np.ndarray) -> float:
    """% of voxels with det(J) <= 0 (dirio's Learn2Reg-cropped count); ``disp`` ``(*S, 3)`` voxels."""
    return 100.0 * fraction_nonpositive_jacobian(disp)


# ----------------------------------------------------------------------------------------------
# breathing-like known warps


def breathing_case(image: np.ndarray, mask: np.ndarray, spacing, seed: int) -> dict:
    """A known breathing-like warp of the baseline (see the module docstring).

    Args:
        image: ``(I, J, K)`` baseline HU; ``mask``: its lung mask (nonzero = lung); ``spacing``: mm per axis
            (axis k cranio-caudal, growing toward superior).
    Returns:
        ``fixed``, ``moving`` (float32 HU), ``fixed_mask``, ``moving_mask`` (uint8), ``true``
        ``(I, J, K, 3)`` float32 voxels, ``spacing`` and the drawn ``params``.
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing, dtype=np.float64)
    shape = image.shape
    params = {"base_amplitude_mm": float(rng.uniform(10.0, 20.0)), "profile_power": float(rng.uniform(1.0, 2.0)),
              "expansion_lr": float(rng.uniform(0.02, 0.05)), "expansion_ap": float(rng.uniform(0.03, 0.07)),
              "random_mm": float(rng.uniform(1.0, 2.0)), "density_hu": float(rng.uniform(30.0, 80.0))}
    lung = mask > 0
    ks = np.nonzero(lung.any(axis=(0, 1)))[0]
    k_base, k_apex = int(ks.min()), int(ks.max())
    ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    t = np.clip((k_apex - kk) / (k_apex - k_base), 0.0, 1.0)  # 0 at the apex, 1 at the base and below
    si = np.zeros(shape + (3,), np.float32)
    si[..., 2] = -params["base_amplitude_mm"] * t ** params["profile_power"] / spacing[2]  # toward the base
    centre = np.array(ndimage.center_of_mass(lung))
    grow = 0.5 + 0.5 * t
    expansion = np.zeros(shape + (3,), np.float32)
    expansion[..., 0] = params["expansion_lr"] * (ii - centre[0]) * grow
    expansion[..., 1] = params["expansion_ap"] * (jj - centre[1]) * grow
    random_vox = params["random_mm"] / spacing.min()
    random = smooth_random_field(shape, sigma=10.0, max_displacement=random_vox, seed=seed + 1000)[0]
    random = random.permute(1, 2, 3, 0).numpy()
    lung_motion = si + expansion + random
    inside = apply_field(lung.astype(np.uint8), lung_motion, labels=True) > 0  # the fixed (exhale) lung
    # below the fixed lung in each (i, j) column the abdomen follows the diaphragm; elsewhere no SI motion
    has_lung = inside.any(axis=2)
    lowest = np.where(has_lung, np.argmax(inside, axis=2), -1)
    below = (kk < lowest[..., None]).astype(np.float32)
    body_motion = expansion + below[..., None] * si
    true = np.where(inside[..., None], lung_motion, body_motion).astype(np.float32)
    noise = np.random.default_rng(seed + 100)
    moving = image.astype(np.float32)
    fixed = apply_field(moving, true) + params["density_hu"] * inside
    return {
        "fixed": (fixed + noise.normal(0, NOISE_HU, shape)).astype(np.float32),
        "moving": (moving + noise.normal(0, NOISE_HU, shape)).astype(np.float32),
        "fixed_mask": inside.astype(np.uint8), "moving_mask": lung.astype(np.uint8),
        "true": true, "spacing": spacing, "params": params, "k_base": k_base, "k_apex": k_apex,
    }


def lung_regions(fixed_mask: np.ndarray, spacing) -> dict:
    """Boolean ``(*S)`` masks of the fixed lung: all, inferior / superior half of its k extent,
    within ``NEAR_BOUNDARY_MM`` of the lung boundary (``near``) or deeper (``deep``)."""
    lung = fixed_mask > 0
    ks = np.nonzero(lung.any(axis=(0, 1)))[0]
    k_mid = 0.5 * (ks.min() + ks.max())
    kk = np.arange(lung.shape[2])[None, None, :]
    depth = ndimage.distance_transform_edt(lung, sampling=spacing)
    return {"all": lung, "inferior": lung & (kk < k_mid), "superior": lung & (kk >= k_mid),
            "near": lung & (depth < NEAR_BOUNDARY_MM), "deep": lung & (depth >= NEAR_BOUNDARY_MM)}


def endpoint_error_mm(disp: np.ndarray, true: np.ndarray, spacing) -> np.ndarray:
    """``(*S)`` endpoint error in mm of a ``(*S, 3)`` voxel field against the true one."""
    return np.linalg.norm((disp - true) * np.asarray(spacing), axis=-1)


def forstner_keypoints(image: np.ndarray, mask: np.ndarray, spacing, count: int = KEYPOINTS,
                       sigma_mm: float = 1.5, rho_mm: float = 3.0, nms_mm: float = 8.0) -> np.ndarray:
    """Förstner corners of a CT image inside a mask.

    Gradients by Gaussian derivatives (``sigma_mm``), structure tensor smoothed by ``rho_mm``,
    strength ``det(T) / trace(T)``, local maxima over a ``nms_mm`` box inside ``mask`` eroded by 2
    voxels, the ``count`` strongest kept.

    Args:
        image: ``(*S)`` HU (clipped to [-1000, 200] here); ``mask``: ``(*S)`` nonzero = allowed.
    Returns:
        ``(N, 3)`` float64 voxel coordinates (i, j, k), strongest first.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    img = np.clip(image, -1000.0, 200.0).astype(np.float32)
    sig = sigma_mm / spacing
    grads = []
    for axis in range(3):
        order = [0, 0, 0]
        order[axis] = 1
        grads.append(ndimage.gaussian_filter(img, sig, order=order) / spacing[axis])
    rho = rho_mm / spacing
    t = {}
    for a in range(3):
        for b in range(a, 3):
            t[a, b] = ndimage.gaussian_filter(grads[a] * grads[b], rho)
    det = (t[0, 0] * (t[1, 1] * t[2, 2] - t[1, 2] ** 2) - t[0, 1] * (t[0, 1] * t[2, 2] - t[1, 2] * t[0, 2])
           + t[0, 2] * (t[0, 1] * t[1, 2] - t[1, 1] * t[0, 2]))
    strength = det / (t[0, 0] + t[1, 1] + t[2, 2] + 1e-6)
    size = [max(3, int(round(nms_mm / s)) | 1) for s in spacing]
    allowed = ndimage.binary_erosion(mask > 0, iterations=2)
    peaks = (strength == ndimage.maximum_filter(strength, size=size)) & allowed & (strength > 0)
    coords = np.argwhere(peaks)
    order = np.argsort(-strength[peaks], kind="stable")[:count]
    return coords[order].astype(np.float64)


def follow_points(points: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Moving-image positions ``p + u_true(p)`` of ``(N, 3)`` fixed voxel points (trilinear)."""
    sampled = np.stack([ndimage.map_coordinates(true[..., d], points.T, order=1) for d in range(3)], axis=1)
    return points + sampled


# ----------------------------------------------------------------------------------------------
# running the methods


class Methods:
    """The compared methods: names -> ``dirio register`` flags, or the peer."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.flags: dict[str, str] = {}
        for name in args.methods:
            if name == PEER:
                continue
            if name not in PRESETS:
                sys.exit(f"{NAME}: unknown method {name!r} (a dirio preset, {PEER}, or a --variant name)")
            self.flags[name] = f"--preset {name}"
        for spec in args.variant:
            name, _, flags = spec.partition("=")
            if not name or not flags:
                sys.exit(f"{NAME}: --variant expects NAME=FLAGS, got {spec!r}")
            self.flags[name.strip()] = flags.strip()
        self.peer_python, self.peer_reason = None, None
        if PEER in args.methods:
            if args.quick:
                self.peer_reason = "skipped in --quick"
            elif not args.peer_python:
                self.peer_reason = "no interpreter (--peer-python or DIRIO_PEER_PYTHON)"
            elif not Path(args.peer_python).exists():
                self.peer_reason = f"interpreter {args.peer_python} not found"
            else:
                self.peer_python = args.peer_python
        if self.peer_reason:
            print(f"[{NAME}] {PEER} skipped: {self.peer_reason}", file=sys.stderr)

    @property
    def names(self) -> list[str]:
        return list(self.flags) + ([PEER] if self.peer_python else [])


def settings_for(flags: str, quick: bool):
    """:class:`Settings` from ``dirio register`` flags (the CLI's own parser); ``quick``: 3 iterations per level."""
    parser = argparse.ArgumentParser(prog=f"{NAME} variant", add_help=False)
    add_registration_options(parser)
    parser.add_argument("--quiet", action="store_true")
    tokens = shlex.split(flags) + ["--quiet"]
    settings = settings_from_args(parser.parse_args(tokens))
    if quick:
        tokens += ["--iterations", ",".join(["3"] * len(settings.pyramid.levels))]
        if "affine" in settings.stages:
            tokens += ["--affine-iterations", ",".join(["3"] * len(settings.affine_options.levels))]
        settings = settings_from_args(parser.parse_args(tokens))
    return settings


def run_dirio(flags: str, case: dict, args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """Register ``case['moving']`` to ``case['fixed']`` with the masks; field ``(*S, 3)`` voxels and timing."""
    settings = settings_for(flags, args.quick)
    wall0, cpu0 = time.perf_counter(), C.cpu_seconds()
    result = register(case["fixed"], case["moving"], settings=settings, fixed_mask=case["fixed_mask"],
                      moving_mask=case["moving_mask"], spacing=tuple(float(s) for s in case["spacing"]),
                      device=args.device)
    timing = {"wall_s": time.perf_counter() - wall0, "cpu_s": C.cpu_seconds() - cpu0, "cached": False}
    return np.asarray(result.disp, dtype=np.float32), timing


def _pad_to(array: np.ndarray, multiple: int, mode: str) -> np.ndarray:
    """Pad ``(*S)`` at the far end of every axis up to a multiple of ``multiple``."""
    pad = [(0, (-n) % multiple) for n in array.shape]
    return np.pad(array, pad, mode=mode) if mode == "edge" else np.pad(array, pad, mode="constant")


def run_peer(python: str, case: dict, args: argparse.Namespace) -> tuple[np.ndarray, dict]:
    """The ConvexAdam reference on one case (cached by a hash of its inputs); field ``(*S, 3)`` voxels."""
    import nibabel as nib

    shape = case["fixed"].shape
    fixed = _pad_to(np.clip(case["fixed"], *CLIP_HU).astype(np.float32), PEER_MULTIPLE, "edge")
    moving = _pad_to(np.clip(case["moving"], *CLIP_HU).astype(np.float32), PEER_MULTIPLE, "edge")
    masks = [_pad_to((case[k] > 0).astype(np.uint8), PEER_MULTIPLE, "constant") for k in ("fixed_mask", "moving_mask")]
    digest = hashlib.sha1()
    for array in (fixed, moving, *masks):
        digest.update(np.ascontiguousarray(array).tobytes())
    digest.update(json.dumps([PEER_PARAMS, PEER_MULTIPLE, CLIP_HU, torch.get_num_threads()], sort_keys=True).encode())
    cache = Path(args.cache) / f"peer_{digest.hexdigest()[:16]}.npz"
    if cache.exists() and not args.no_cache:
        with np.load(cache) as stored:
            timing = json.loads(str(stored["timing"]))
            timing["cached"] = True
            return stored["disp"].astype(np.float32), timing
    with tempfile.TemporaryDirectory(prefix="lung_peer_") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "fixed.npy", fixed)
        np.save(tmp / "moving.npy", moving)
        for name, mask in zip(("fixed_mask", "moving_mask"), masks):
            nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp / f"{name}.nii.gz")
        job = {"fixed": str(tmp / "fixed.npy"), "moving": str(tmp / "moving.npy"),
               "fixed_mask": str(tmp / "fixed_mask.nii.gz"), "moving_mask": str(tmp / "moving_mask.nii.gz"),
               "params": PEER_PARAMS, "threads": torch.get_num_threads(), "out": str(tmp / "disp.npy")}
        (tmp / "job.json").write_text(json.dumps(job))
        wall0, cpu0 = time.perf_counter(), C.cpu_seconds()
        done = subprocess.run([python, str(PEER_WORKER), str(tmp / "job.json")], capture_output=True, text=True)
        process = {"process_wall_s": time.perf_counter() - wall0, "process_cpu_s": C.cpu_seconds() - cpu0}
        if done.returncode != 0:
            raise RuntimeError(f"{PEER} failed:\n{done.stderr[-3000:]}")
        disp = np.load(tmp / "disp.npy")
        timing = {**json.loads((tmp / "disp.npy.json").read_text()), **process, "cached": False}
    disp = np.ascontiguousarray(disp[: shape[0], : shape[1], : shape[2]], dtype=np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(cache, disp=disp, timing=json.dumps(timing))
    return disp, timing


def run_method(methods: Methods, name: str, flags: str | None, case: dict, args) -> tuple[np.ndarray, dict]:
    """One registration of ``case`` by a dirio flag set or the peer, with a progress line."""
    load = os.getloadavg()[0]
    if flags is None:
        disp, timing = run_peer(methods.peer_python, case, args)
    else:
        disp, timing = run_dirio(flags, case, args)
    timing.setdefault("load_1min_before", load)
    print(f"[{NAME}] {case['label']} {name}: {timing['wall_s']:.1f} s wall, {timing['cpu_s']:.1f} s CPU"
          + (" (cached)" if timing.get("cached") else ""), file=sys.stderr, flush=True)
    return disp, timing


def similarity_check(case: dict, disp: np.ndarray) -> dict:
    """NCC (inside the fixed lung mask, clipped HU) of fixed vs moving warped by ``0``, ``+u`` and ``-u``."""
    fixed = np.clip(case["fixed"], *CLIP_HU)
    moving = np.clip(case["moving"], *CLIP_HU).astype(np.float32)
    return {"ncc_identity": masked_ncc(fixed, moving, case["fixed_mask"]),
            "ncc_after": masked_ncc(fixed, apply_field(moving, disp), case["fixed_mask"]),
            "ncc_negated": masked_ncc(fixed, apply_field(moving, -disp), case["fixed_mask"])}


# ----------------------------------------------------------------------------------------------
# the sets


def score_breathing(case: dict, disp: np.ndarray) -> dict:
    """Endpoint errors (mm) by region and keypoint TRE (mm) of one field on one breathing case."""
    error = endpoint_error_mm(disp, case["true"], case["spacing"])
    record = {f"epe_{region}_mm": float(error[m].mean()) for region, m in case["regions"].items()}
    record["epe_median_mm"] = float(np.median(error[case["regions"]["all"]]))
    record["epe_p95_mm"] = float(np.percentile(error[case["regions"]["all"]], 95))
    per_point = tre(case["points"], case["moving_points"], disp, case["spacing"])
    record["kp_tre_mm"] = per_point.tolist()
    record["kp_tre_mean_mm"] = float(per_point.mean())
    record["kp_tre_median_mm"] = float(np.median(per_point))
    record["kp_tre_p95_mm"] = float(np.percentile(per_point, 95))
    for region, m in case["point_regions"].items():
        record[f"kp_tre_{region}_mm"] = float(per_point[m].mean()) if m.any() else float("nan")
    return record


def breathing_set(methods: Methods, args) -> list[dict]:
    """Every method on every seed's known warp; one record per (seed, method), ``before`` included."""
    image = load_image(C.require(DATA_DIR / "baseline.nii.gz", NAME))
    mask = load_image(C.require(DATA_DIR / "baseline_mask.nii.gz", NAME), labels=True)
    records = []
    for seed in args.seeds:
        case = breathing_case(np.asarray(image.data), np.asarray(mask.data), image.spacing, seed)
        case["label"] = f"breathing seed {seed}"
        case["regions"] = lung_regions(case["fixed_mask"], case["spacing"])
        case["points"] = forstner_keypoints(case["fixed"], case["fixed_mask"], case["spacing"])
        case["moving_points"] = follow_points(case["points"], case["true"])
        idx = tuple(np.rint(case["points"]).astype(int).T)
        case["point_regions"] = {r: case["regions"][r][idx] for r in ("inferior", "superior", "near", "deep")}
        base = {"seed": seed, "params": case["params"], "keypoints": len(case["points"]),
                "true_max_mm": float(np.linalg.norm(case["true"] * case["spacing"], axis=-1)[case["regions"]["all"]].max())}
        records.append({**base, "method": "before", **score_breathing(case, np.zeros_like(case["true"])),
                        **similarity_check(case, np.zeros_like(case["true"]))})
        records[-1].update(percent_nonpositive_jacobian=0.0)
        for name in methods.names:
            disp, timing = run_method(methods, name, methods.flags.get(name), case, args)
            records.append({**base, "method": name, "flags": methods.flags.get(name, "reference"),
                            **score_breathing(case, disp), **similarity_check(case, disp),
                            "percent_nonpositive_jacobian": percent_folding(disp), **timing})
        del case
    return records


def pair_case(data: dict, setup: str) -> dict:
    """The real pair in one set-up (lung_pair.py): fixed baseline, moving follow-up on its grid, masks, landmarks."""
    inputs = index_crop_inputs(data) if setup == "index-crop" else world_inputs(data)
    return {"label": setup, "fixed": np.asarray(data["baseline"].data, dtype=np.float32),
            "moving": np.asarray(inputs["moving"], dtype=np.float32),
            "fixed_mask": np.asarray(data["baseline_mask"].data), "moving_mask": np.asarray(inputs["moving_mask"]),
            "spacing": np.asarray(data["baseline"].spacing, dtype=np.float64),
            "fixed_points": data["baseline_points"], "moving_points": inputs["moving_points"]}


def pair_set(methods: Methods, setup: str, data: dict, args) -> dict:
    """Methods and every candidate of ``CHOICES`` on one set-up of the real pair (each flag set run once)."""
    case = pair_case(data, setup)
    runs: dict[str, dict] = {}  # canonical flags (or PEER) -> record
    wanted = [(name, methods.flags.get(name)) for name in methods.names]
    if args.choices:
        wanted += [(f"{group}: {cand}", flags) for group, (_, cands) in CHOICES.items() for cand, flags in cands.items()]
    names_of: dict[str, list[str]] = {}
    zero = np.zeros(case["fixed"].shape + (3,), np.float32)
    before = tre(case["fixed_points"], case["moving_points"], zero, case["spacing"])
    for name, flags in wanted:
        key = PEER if flags is None else canonical(flags)
        names_of.setdefault(key, []).append(name)
        if key in runs:
            continue
        disp, timing = run_method(methods, name, flags, case, args)
        per_point = tre(case["fixed_points"], case["moving_points"], disp, case["spacing"])
        runs[key] = {"flags": flags or "reference", "tre_mm": per_point.tolist(), "tre_mean_mm": float(per_point.mean()),
                     "tre_median_mm": float(np.median(per_point)), "percent_nonpositive_jacobian": percent_folding(disp),
                     **similarity_check(case, disp), **timing}
    return {"setup": setup, "tre_before_mm": before.tolist(), "tre_before_mean_mm": float(before.mean()),
            "runs": runs, "names": names_of,
            "methods": {name: (PEER if flags is None else canonical(flags)) for name, flags in wanted}}


def leave_some_out(per_point: dict[str, list[float]], held: int = 5) -> dict:
    """Pick the best candidate (mean TRE) on the tuning landmarks of every split, score it on the rest.

    Args:
        per_point: candidate -> ``(N,)`` TRE per landmark (mm); every split of the N landmarks into
            ``N - held`` tuning and ``held`` held-out ones is used (252 for 10 and 5).
    Returns:
        ``picked`` (candidate -> fraction of splits), ``held_out_of_picks_mm`` (mean over splits of
        the pick's held-out mean TRE), ``tuning_of_picks_mm``, ``all10_choice`` (argmin over all N),
        ``held_out_of_all10_mm`` (its held-out TRE on the same splits), ``splits``.
    """
    names = list(per_point)
    table = np.array([per_point[n] for n in names])  # (candidates, N)
    n = table.shape[1]
    all_choice = int(np.argmin(table.mean(axis=1)))
    counts = np.zeros(len(names))
    held_pick, tune_pick, held_all = [], [], []
    for tune in itertools.combinations(range(n), n - held):
        rest = [i for i in range(n) if i not in tune]
        pick = int(np.argmin(table[:, tune].mean(axis=1)))
        counts[pick] += 1
        held_pick.append(table[pick, rest].mean())
        tune_pick.append(table[pick, list(tune)].mean())
        held_all.append(table[all_choice, rest].mean())
    splits = len(held_pick)
    return {"candidates": names, "picked": {nm: float(c / splits) for nm, c in zip(names, counts)},
            "held_out_of_picks_mm": float(np.mean(held_pick)), "tuning_of_picks_mm": float(np.mean(tune_pick)),
            "all10_choice": names[all_choice], "held_out_of_all10_mm": float(np.mean(held_all)), "splits": splits}


# ----------------------------------------------------------------------------------------------
# tables


def _mean_over_seeds(records: list[dict], method: str, key: str) -> float:
    values = [r[key] for r in records if r["method"] == method and key in r]
    return float(np.mean(values)) if values else float("nan")


def breathing_tables(records: list[dict], sets: set[str]) -> list[str]:
    methods = list(dict.fromkeys(r["method"] for r in records))
    seeds = list(dict.fromkeys(r["seed"] for r in records))
    tables = []
    time_cols = lambda m: [C.fmt(_mean_over_seeds(records, m, "wall_s"), 1), C.fmt(_mean_over_seeds(records, m, "cpu_s"), 1)]
    if "breathing" in sets:
        header = ["method", "EPE mean mm", "median", "p95", "inferior", "superior", f"near <{NEAR_BOUNDARY_MM:g}mm",
                  "deep", "% det<=0", "NCC after", "wall s", "CPU s"]
        rows = [[m] + [C.fmt(_mean_over_seeds(records, m, k), 2) for k in
                       ("epe_all_mm", "epe_median_mm", "epe_p95_mm", "epe_inferior_mm", "epe_superior_mm",
                        "epe_near_mm", "epe_deep_mm")]
                + [C.fmt(_mean_over_seeds(records, m, "percent_nonpositive_jacobian"), 4),
                   C.fmt(_mean_over_seeds(records, m, "ncc_after"), 3)] + time_cols(m) for m in methods]
        tables.append(f"Set 1, breathing-like known warps: endpoint error in the fixed lung (mean over seeds "
                      f"{', '.join(map(str, seeds))}):\n\n" + C.markdown_table(header, rows))
        header = ["seed", "method", "EPE mean", "inferior", "superior", "near", "deep", "% det<=0"]
        rows = [[r["seed"], r["method"]] + [C.fmt(r[k], 2) for k in ("epe_all_mm", "epe_inferior_mm", "epe_superior_mm",
                                                                     "epe_near_mm", "epe_deep_mm")]
                + [C.fmt(r["percent_nonpositive_jacobian"], 4)] for r in records]
        tables.append("Set 1 per seed (mm):\n\n" + C.markdown_table(header, rows))
    if "keypoints" in sets:
        header = ["method", "TRE mean mm", "median", "p95", "inferior", "superior", "near", "deep", "wall s", "CPU s"]
        rows = [[m] + [C.fmt(_mean_over_seeds(records, m, k), 2) for k in
                       ("kp_tre_mean_mm", "kp_tre_median_mm", "kp_tre_p95_mm", "kp_tre_inferior_mm", "kp_tre_superior_mm",
                        "kp_tre_near_mm", "kp_tre_deep_mm")] + time_cols(m) for m in methods]
        counts = ", ".join(str(r["keypoints"]) for r in records if r["method"] == "before")
        tables.append(f"Set 2, Förstner keypoints followed through the known warps (points per seed: {counts}; "
                      "mean over seeds):\n\n" + C.markdown_table(header, rows))
    return tables


def pair_tables(result: dict) -> list[str]:
    setup, runs = result["setup"], result["runs"]
    header = ["method / candidate", "flags", "TRE mean mm", "median", "% det<=0", "NCC after", "wall s", "CPU s"]
    rows = [["before", "-", C.fmt(result["tre_before_mean_mm"], 2), C.fmt(float(np.median(result["tre_before_mm"])), 2),
             "-", "-", "-", "-"]]
    for key, run in runs.items():
        rows.append([" / ".join(result["names"][key]), f"`{run['flags']}`", C.fmt(run["tre_mean_mm"], 2),
                     C.fmt(run["tre_median_mm"], 2), C.fmt(run["percent_nonpositive_jacobian"], 4),
                     C.fmt(run["ncc_after"], 3), C.fmt(run["wall_s"], 1), C.fmt(run["cpu_s"], 1)])
    tables = [f"Set 3, real pair ({setup}), 10 landmarks:\n\n" + C.markdown_table(header, rows)]
    header = ["choice", "candidate", "TRE all 10", "picked on 5 (% of splits)", "preset's value", "all-10 argmin"]
    rows, summary = [], []
    for group, lso in result["leave_some_out"].items():
        preset_value = CHOICES[group][0]
        for cand in lso["candidates"]:
            key = result["methods"][f"{group}: {cand}"]
            rows.append([group, cand, C.fmt(runs[key]["tre_mean_mm"], 3), C.fmt(100 * lso["picked"][cand], 1),
                         "yes" if cand == preset_value else "", "yes" if cand == lso["all10_choice"] else ""])
        summary.append([group, str(lso["splits"]), C.fmt(lso["tuning_of_picks_mm"], 3), C.fmt(lso["held_out_of_picks_mm"], 3),
                        lso["all10_choice"], C.fmt(lso["held_out_of_all10_mm"], 3), preset_value,
                        C.fmt(lso["held_out_of_preset_mm"], 3)])
    if not rows:
        return tables
    tables.append(f"Set 3 leave-some-out ({setup}), candidates:\n\n" + C.markdown_table(header, rows))
    header = ["choice", "splits", "pick: tuning-5 TRE", "pick: held-out-5 TRE", "all-10 choice",
              "its held-out-5 TRE", "preset's value", "its held-out-5 TRE"]
    tables.append(f"Set 3 leave-some-out ({setup}), 5 tuning + 5 held-out landmarks (means over splits, mm):\n\n"
                  + C.markdown_table(header, summary))
    return tables


def target_table(breathing: list[dict], pairs: list[dict], methods: list[str]) -> str:
    """Per set: each method's score (lower is better) and whether lung-ct / convex-adam beat the peer within 20 s."""
    sets = []
    if breathing:
        sets += [("breathing EPE", lambda m: (_mean_over_seeds(breathing, m, "epe_all_mm"), _mean_over_seeds(breathing, m, "wall_s"))),
                 ("keypoint TRE", lambda m: (_mean_over_seeds(breathing, m, "kp_tre_mean_mm"), _mean_over_seeds(breathing, m, "wall_s")))]
    for result in pairs:
        def score(m, result=result):
            run = result["runs"].get(result["methods"].get(m, ""), None)
            return (run["tre_mean_mm"], run["wall_s"]) if run else (float("nan"), float("nan"))
        sets.append((f"{result['setup']} TRE (10)", score))
    header = ["set"] + methods + ["lung-ct ok", "convex-adam ok"]
    rows = []
    for label, score in sets:
        values = {m: score(m) for m in methods}
        ref = values.get(PEER, (float("nan"), 0))[0]
        verdict = []
        for m in ("lung-ct", "convex-adam"):
            if m not in values or not np.isfinite(ref):
                verdict.append("-")
                continue
            err, wall = values[m]
            verdict.append("yes" if err <= ref and wall <= 20.0 else f"no ({'error' if err > ref else ''}"
                           f"{' ' if err > ref and wall > 20 else ''}{'time' if wall > 20 else ''})")
        rows.append([label] + [f"{C.fmt(values[m][0], 2)} ({C.fmt(values[m][1], 1)} s)" for m in methods] + verdict)
    return "Target (mean mm, mean wall s; ok = error <= reference and wall <= 20 s):\n\n" + C.markdown_table(header, rows)


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    names = lambda text: tuple(v.strip() for v in text.split(",") if v.strip())
    parser.add_argument("--sets", type=names, default=SETS, help=f"comma-separated, of {', '.join(SETS)} (default all)")
    default_methods = tuple(m for m in DEFAULT_METHODS if m == PEER or m in PRESETS)
    parser.add_argument("--methods", type=names, default=default_methods,
                        help=f"dirio presets and/or {PEER} (default {','.join(default_methods)})")
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="FLAGS"',
                        help='an extra method given by dirio register flags, e.g. w03="--preset lung-ct --weight 0.3"')
    parser.add_argument("--no-choices", dest="choices", action="store_false",
                        help="index-crop / world: only the methods, not the candidates of CHOICES (no leave-some-out)")
    parser.add_argument("--seeds", type=C.int_list, default=(1, 2, 3), help="seeds of the breathing warps (default 1,2,3)")
    parser.add_argument("--peer-python", default=os.environ.get("DIRIO_PEER_PYTHON"),
                        help="interpreter with convexAdam installed (default $DIRIO_PEER_PYTHON)")
    parser.add_argument("--cache", type=Path, default=C.OUT_ROOT / NAME / "cache",
                        help=f"folder of the cached peer fields (default benchmarks/out/{NAME}/cache)")
    parser.add_argument("--no-cache", action="store_true", help="rerun the peer even when its field is cached")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {C.QUICK_ITERATIONS} iterations per level, one seed, no peer (NOT results)")
    parser.add_argument("--out", type=Path, default=C.OUT_ROOT / NAME, help=f"output folder (default benchmarks/out/{NAME})")
    args = parser.parse_args(argv)
    sets = set(args.sets)
    if sets - set(SETS):
        parser.error(f"unknown set {sorted(sets - set(SETS))[0]!r}; choose from {', '.join(SETS)}")
    if args.quick:
        args.seeds = args.seeds[:1]
    methods = Methods(args)
    print(f"[{NAME}] methods: {', '.join(methods.names)}; torch threads {torch.get_num_threads()}", file=sys.stderr)

    breathing, pairs, tables = [], [], []
    if sets & {"breathing", "keypoints"}:
        breathing = breathing_set(methods, args)
        tables += breathing_tables(breathing, sets)
    setups = [s for s in ("index-crop", "world") if s in sets]
    if setups:
        data = load_lung_data()
        for setup in setups:
            result = pair_set(methods, setup, data, args)
            result["leave_some_out"] = {}
            for group, (preset_value, cands) in (CHOICES.items() if args.choices else ()):
                per_point = {c: result["runs"][result["methods"][f"{group}: {c}"]]["tre_mm"] for c in cands}
                lso = leave_some_out(per_point)
                table = np.array(per_point[preset_value])
                lso["held_out_of_preset_mm"] = float(np.mean(
                    [table[[i for i in range(10) if i not in t]].mean() for t in itertools.combinations(range(10), 5)]))
                result["leave_some_out"][group] = lso
            pairs.append(result)
            tables += pair_tables(result)
    if PEER in methods.names:
        tables.insert(0, target_table(breathing, pairs, methods.names))

    peer_checks = []
    for result in pairs:
        run = result["runs"].get(PEER)
        if run:
            peer_checks.append(f"{result['setup']}: TRE {run['tre_mean_mm']:.2f} mm (before {result['tre_before_mean_mm']:.2f}); "
                               f"NCC in the lung {run['ncc_identity']:.3f} unwarped, {run['ncc_after']:.3f} with +u, "
                               f"{run['ncc_negated']:.3f} with -u")
    for r in breathing:
        if r["method"] == PEER:
            peer_checks.append(f"breathing seed {r['seed']}: EPE {r['epe_all_mm']:.2f} mm; NCC {r['ncc_identity']:.3f} unwarped, "
                               f"{r['ncc_after']:.3f} with +u, {r['ncc_negated']:.3f} with -u")
    notes = [
        f"Breathing warps: moving = baseline HU, fixed = baseline pulled through u_true (fixed(x) = moving(x + u_true(x))); "
        f"SI motion toward the base (k axis, 2.5 mm, base at low k) 10-20 mm at the base, AP/LR expansion 2-7 %, 1-2 mm "
        f"smooth random part, sliding at the chest wall (no SI motion outside the lung except below it), +30..80 HU in "
        f"the fixed lung, N(0, {NOISE_HU:g} HU) noise. Drawn parameters per seed are in results.json.",
        "EPE: |(u - u_true) * spacing| (mm) inside the fixed lung mask; inferior/superior = halves of its k extent; "
        f"near = within {NEAR_BOUNDARY_MM:g} mm of the lung boundary (Euclidean distance in mm).",
        f"Keypoints: Förstner det/trace on the fixed image ([-1000, 200] HU, sigma 1.5 mm, rho 3 mm), 8 mm NMS box, "
        f"inside the fixed lung mask eroded by 2 voxels, {KEYPOINTS} strongest; TRE with dirio.evaluation.landmarks.tre (cubic).",
        "Real pair: lung_pair.py's set-ups (index-crop; world), baseline and follow-up lung masks; TRE over the 10 landmarks. "
        "Leave-some-out: all 252 splits into 5 tuning + 5 held-out landmarks; the pick minimises the tuning mean TRE.",
        f"{PEER}: convexAdam.convex_adam_MIND.convex_adam_pt {json.dumps(PEER_PARAMS)}, use_mask=True with the same masks, "
        f"CPU float32, images clipped to {CLIP_HU} HU and padded at the far ends to multiples of {PEER_MULTIPLE} "
        "(edge values; masks 0), field cropped back; times measured inside the worker (no interpreter start-up)."
        + (f" Not run: {methods.peer_reason}." if methods.peer_reason else ""),
        ("Peer field convention check: " + "; ".join(peer_checks)) if peer_checks else "",
        f"Times: wall and CPU (user+system of this process and children, getrusage) of one registration call; "
        f"torch threads {torch.get_num_threads()} on {os.cpu_count()} CPUs; other jobs share the machine, so wall "
        "times are noisy, CPU times less so.",
    ]
    C.finish(NAME, "Lung validation: known breathing warps, detector keypoints, leave-some-out, ConvexAdam reference",
             args, {"device": args.device, "sets": sorted(sets), "methods": {m: methods.flags.get(m, "reference")
                                                                             for m in methods.names},
                    "peer_params": PEER_PARAMS, "breathing": breathing, "pairs": pairs}, tables, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
