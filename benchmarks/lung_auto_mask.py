"""Benchmark: the automatic lung mask (``auto_mask = "lungs"``) against the provided lung masks and
against no mask, for the ``lung-ct`` and ``convex-adam`` presets.

Validation sets (the mask's thresholds come from image statistics, not from any landmark):

* the elastix pair, index set-up (``lung_pair.py``): TRE on the 10 shared landmarks, all 10 and the
  two halves (points 0-4, 5-9) separately;
* the elastix pair, world set-up (the headers' 35 mm shift kept);
* the baseline against known warps of itself (``lung_synthetic.py``, seeds 1 and 2): endpoint error
  inside the lungs, a set with no landmark at all.

Also the Dice of the automatic masks with the provided ones.

    python benchmarks/lung_auto_mask.py [--presets lung-ct,convex-adam] [--seeds 1,2]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import _common as C
import lung_pair as LP
import lung_synthetic as LS
from dirio.api import register
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian
from dirio.evaluation.landmarks import tre
from dirio.methods.lung_mask import lung_mask

MODES = ("provided", "auto", "none")


def masks_for(mode: str, fixed_mask, moving_mask) -> dict:
    if mode == "provided":
        return {"fixed_mask": fixed_mask, "moving_mask": moving_mask, "auto_mask": "none"}
    return {"fixed_mask": None, "moving_mask": None, "auto_mask": "lungs" if mode == "auto" else "none"}


def dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="lung-ct,convex-adam")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    presets = [p for p in args.presets.split(",") if p]
    data = LP.load_lung_data()
    fixed = data["baseline"]
    print(f"automatic vs provided masks, Dice: baseline {dice(lung_mask(fixed.data), data['baseline_mask'].data):.3f}, "
          f"follow-up {dice(lung_mask(data['followup'].data), data['followup_mask'].data):.3f}")
    rows = []
    for variant, inputs in (("index", LP.index_crop_inputs(data)), ("world", LP.world_inputs(data))):
        fixed_points, moving_points = data["baseline_points"], inputs["moving_points"]
        for preset in presets:
            for mode in MODES:
                start = time.perf_counter()
                result = register(fixed, inputs["moving"], preset=preset, device="cpu", progress=False,
                                  **masks_for(mode, data["baseline_mask"].data, inputs["moving_mask"]))
                errors = tre(fixed_points, moving_points, result.disp, fixed.spacing, order=3)
                row = (f"elastix {variant}", preset, mode, errors.mean(), errors[:5].mean(), errors[5:].mean(),
                       100 * fraction_nonpositive_jacobian(result.disp), time.perf_counter() - start)
                rows.append(row)
                print("| " + " | ".join(C.fmt(v, 2) if isinstance(v, float) else str(v) for v in row) + " |", flush=True)
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        pair = LS.known_pair(seed, (4.0, -6.0, 3.0), 6.0)  # lung_synthetic.py's defaults
        for preset in presets:
            for mode in MODES:
                start = time.perf_counter()
                result = register(pair["fixed"], pair["moving"], preset=preset, device="cpu", progress=False,
                                  spacing=tuple(pair["spacing"]), **masks_for(mode, pair["fixed_mask"], pair["moving_mask"]))
                errors = LS.endpoint_errors_mm(pair, result.disp)
                row = (f"known warp seed {seed}", preset, mode, float(errors.mean()), float("nan"), float("nan"),
                       100 * fraction_nonpositive_jacobian(result.disp), time.perf_counter() - start)
                rows.append(row)
                print("| " + " | ".join(C.fmt(v, 2) if isinstance(v, float) else str(v) for v in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
