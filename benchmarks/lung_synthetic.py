"""Benchmark: the lung CT baseline against a known large warp of itself (validation of the lung presets).

The lung presets were tuned on the 10 landmarks of the elastix pair; this pair was not used for
tuning. Moving = the baseline scan (HU); fixed = the baseline pulled through a known field
``u_true = t + s(x)``: a constant shift ``t`` (``--shift``, voxels, ~12 mm by default) plus a smooth
random field ``s`` (Gaussian-smoothed noise, sigma 10 voxels, largest component ``--max-disp``
voxels), so that ``fixed(x) = moving(x + u_true(x))`` and ``u_true`` is the answer. Gaussian noise
of 20 HU is added to both images. Masks: the baseline lung mask (moving) and its warp (fixed).

Reported per method: mean endpoint error inside the fixed lung mask in mm (before: ``|u_true|``),
its 95th percentile, % det(J) <= 0, SDlogJ and the time of ``register()``.

    python benchmarks/lung_synthetic.py [--seeds 1,2] [--methods lung-ct,convex-adam,continuous] [--quick]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

import _common as C
from dirio.api import register
from dirio.core.fields import warp
from dirio.io.images import load_image
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian, sdlogj_l2r
from dirio.testing.synthetic import smooth_random_field

NAME = "lung_synthetic"
FOLDER = C.DATA / "elastix-lung-ct"
NOISE_HU = 20.0
SIGMA = 10.0
METHODS = {
    "lung-ct": {"preset": "lung-ct"},
    "convex-adam": {"preset": "convex-adam", "affine": "affine"},
    "convex-adam-no-affine": {"preset": "convex-adam"},
    "continuous": {"preset": "continuous", "affine": "affine"},
}


def known_pair(seed: int, shift: tuple[float, ...], max_disp: float) -> dict:
    """Fixed, moving, masks and the true field ``(*S, 3)`` (voxels) of one seed."""
    image = load_image(C.require(FOLDER / "baseline.nii.gz", NAME))
    mask = load_image(C.require(FOLDER / "baseline_mask.nii.gz", NAME), labels=True)
    shape = image.shape
    true = smooth_random_field(shape, sigma=SIGMA, max_displacement=max_disp, seed=seed)
    true = true + torch.tensor(shift, dtype=torch.float32).view(1, 3, 1, 1, 1)
    moving = torch.from_numpy(np.ascontiguousarray(image.data, dtype=np.float32))[None, None]
    fixed = warp(moving, true)[0, 0].numpy()
    fixed_mask = warp(torch.from_numpy(np.ascontiguousarray(mask.data))[None, None], true, mode="nearest")[0, 0].numpy()
    rng = np.random.default_rng(seed + 100)
    return {
        "fixed": (fixed + rng.normal(0, NOISE_HU, shape)).astype(np.float32),
        "moving": (image.data + rng.normal(0, NOISE_HU, shape)).astype(np.float32),
        "fixed_mask": fixed_mask, "moving_mask": np.asarray(mask.data),
        "true": true[0].permute(1, 2, 3, 0).numpy(), "spacing": np.asarray(image.spacing, dtype=np.float64),
    }


def endpoint_errors_mm(pair: dict, disp: np.ndarray) -> np.ndarray:
    """Endpoint errors (mm) at the voxels of the fixed lung mask."""
    error = np.linalg.norm((disp - pair["true"]) * pair["spacing"], axis=-1)
    return error[pair["fixed_mask"] > 0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=C.int_list, default=(1, 2), help="seeds of the known fields (default 1,2)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--shift", type=lambda t: tuple(float(v) for v in t.split(",")), default=(4.0, -6.0, 3.0),
                        help="constant part of the field, voxels (default 4,-6,3: ~12 mm)")
    parser.add_argument("--max-disp", type=float, default=6.0, help="largest component of the smooth part, voxels")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 iterations per level (NOT results)")
    parser.add_argument("--out", default=C.OUT_ROOT / NAME)
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        sys.exit(f"{NAME}: unknown method {unknown[0]!r}")
    rows, records = [], []
    for seed in args.seeds:
        pair = known_pair(seed, args.shift, args.max_disp)
        before = endpoint_errors_mm(pair, np.zeros_like(pair["true"]))
        rows.append([seed, "before", C.fmt(before.mean(), 2), C.fmt(np.percentile(before, 95), 2), "-", "-", "-"])
        for name in methods:
            overrides = dict(METHODS[name])
            if args.quick:
                levels = overrides.get("levels") or C.make_settings(overrides["preset"]).pyramid.levels
                overrides["iterations"] = (C.QUICK_ITERATIONS,) * len(levels)
            result = register(pair["fixed"], pair["moving"], fixed_mask=pair["fixed_mask"],
                              moving_mask=pair["moving_mask"], spacing=tuple(pair["spacing"]),
                              device=args.device, progress=False, **overrides)
            error = endpoint_errors_mm(pair, result.disp)
            record = {"seed": seed, "method": name, "epe_mm": float(error.mean()),
                      "epe95_mm": float(np.percentile(error, 95)), "epe_before_mm": float(before.mean()),
                      "percent_nonpositive_jacobian": 100 * fraction_nonpositive_jacobian(result.disp),
                      "sdlogj_l2r": sdlogj_l2r(result.disp), "seconds": result.seconds}
            records.append(record)
            rows.append([seed, name, C.fmt(record["epe_mm"], 2), C.fmt(record["epe95_mm"], 2),
                         C.fmt(record["percent_nonpositive_jacobian"], 3), C.fmt(record["sdlogj_l2r"], 3),
                         C.fmt(record["seconds"], 1)])
            print(f"seed {seed} {name}: EPE {record['epe_mm']:.2f} mm, {record['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
    header = ["seed", "method", "EPE mm", "EPE p95 mm", "% det<=0", "SDlogJ", "s"]
    notes = [
        f"Moving: elastix lung baseline (115x157x129, 1.366x1.366x2.5 mm); fixed: the same pulled through "
        f"u_true = shift {args.shift} voxels + smooth field (sigma {SIGMA:g} voxels, max {args.max_disp:g} voxels); "
        f"N(0, {NOISE_HU:g} HU) noise on both; lung masks on both sides.",
        "EPE: |(u - u_true) * spacing| inside the fixed lung mask; before = |u_true|.",
        f"torch threads {torch.get_num_threads()}; s = seconds inside register().",
    ]
    C.finish(NAME, "Lung CT baseline against a known warp of itself", args,
             {"device": args.device, "rows": records}, [C.markdown_table(header, rows)], notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
