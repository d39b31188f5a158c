"""Network instance optimisation on brains LapIRN (OASIS weights) never saw, on this CPU.

Pairs (fixed <- moving), all on the 160 x 192 x 224 VoxelMorph grid:

* ``oasisA``: the voxelmorph scan <- OASIS subject A of c2fvit-oasis-brain/on-voxelmorph-grid
  (13 bilateral classes: voxelmorph_seg13 / image_A_seg13), a real inter-subject pair;
* ``oasisA-gamma0.5``, ``oasisA-gamma2``, ``oasisA-inverted``: the same with the moving contrast
  changed (min-max, then ``m ** gamma``, or ``1 - m`` inside the brain);
* ``synthetic``: the voxelmorph scan warped by a smooth random field (seed 1, 8 voxels) <- the scan
  (30 VoxelMorph labels);
* ``mirror``: the scan <- its left-right mirror (labels swapped left/right; 30 labels).

Modes (``--modes``; each a set of ``dirio.api.register`` overrides, see MODES): ``direct``
(network inference), ``nio-cpu`` (``--network-budget cpu``: NIO on LapIRN level 1 only, the loss at
half resolution, then the full-resolution final pass), ``nio-l12`` (levels 1-2, 60 and 8 steps:
Issue 11's CPU budget), ``nio-l1`` (level 1 only, 60 steps), ``network+dense``,
``dense`` (the brain-mri preset), and ``io-sum`` / ``io-pcgrad`` (network-io; every step is a
full-resolution forward and backward: minutes per step on 2 cores, use ``--io-steps``).

Issue 21 found that the optimising modes' final full-resolution pass fed the network the
preprocessed images instead of its own inputs (fixed in ``dirio.optim.pyramid``); the Issue 11
numbers of ``io-*`` and ``nio-*`` in benchmarks/RESULTS.md predate the fix.
``benchmarks/network_claims.py`` runs the papers' schedules.

Every result is appended as one JSON line to ``OUT/results.jsonl`` as soon as it is known, so a long
run can be stopped and read; ``--summary`` prints the Markdown table of a results file.

    nice -n 10 python benchmarks/network_io.py --pairs oasisA --modes direct,nio-cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

import _common as C
from dirio.api import apply_field, register
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian, ndv_fraction, sdlogj_l2r
from dirio.evaluation.overlap import dice_per_label, mean_dice
from dirio.testing.synthetic import warped_pair

NAME = "network_io"
GRID = C.DATA / "c2fvit-oasis-brain" / "on-voxelmorph-grid"
AXES = "voxelmorph-grid"

MODES = {
    "direct": {"method": "network"},
    "nio-cpu": {"method": "nio", "network_budget": "cpu"},
    "nio-l12": {"method": "nio", "network_levels": (1, 2), "network_iterations": (60, 8, 0),
                "network_resolution": (2, 2, 1)},
    "nio-l1": {"method": "nio", "network_levels": (1,), "network_iterations": (60, 0, 0),
               "network_resolution": (2, 2, 1)},
    "nio-l12-long": {"method": "nio", "network_levels": (1, 2), "network_iterations": (100, 30, 0),
                     "network_resolution": (2, 2, 1)},
    "network+dense": {"method": "network+dense", "preset": "brain-mri"},
    "dense": {"method": "dense", "preset": "brain-mri"},
    "io-sum": {"method": "network-io", "combine": "sum"},
    "io-pcgrad": {"method": "network-io", "combine": "pcgrad"},
}


def _load(path: Path, labels: bool = False) -> np.ndarray:
    data = np.asarray(nib.load(C.require(path, NAME)).dataobj)
    return data.astype(np.int16) if labels else data.astype(np.float32)


def contrast(image: np.ndarray, kind: str) -> np.ndarray:
    """Min-max to [0, 1], then ``m ** gamma`` or ``1 - m`` inside the brain (background stays 0)."""
    m = (image - image.min()) / (image.max() - image.min())
    if kind.startswith("gamma"):
        return (m ** float(kind[5:])).astype(np.float32)
    return np.where(m > 0.02, 1.0 - m, 0.0).astype(np.float32)


def pairs(names):
    """``name -> (fixed, moving, fixed labels, moving labels, label ids)``."""
    out = {}
    need_oasis = any(n.startswith("oasisA") for n in names)
    if need_oasis:
        scan = _load(C.DATA / "voxelmorph-brain" / "test_scan_vol.nii.gz")
        scan_seg = _load(GRID / "voxelmorph_seg13.nii.gz", labels=True)
        a = _load(GRID / "image_A.nii.gz")
        a_seg = _load(GRID / "image_A_seg13.nii.gz", labels=True)
        for name in names:
            if name == "oasisA":
                out[name] = (scan, a, scan_seg, a_seg, list(range(1, 14)))
            elif name.startswith("oasisA-"):
                out[name] = (scan, contrast(a, name.split("-", 1)[1]), scan_seg, a_seg, list(range(1, 14)))
    if "synthetic" in names or "mirror" in names:
        image, seg, label_ids, _ = C.load_voxelmorph_brain(NAME)
        if "synthetic" in names:
            pair = warped_pair(image, seg, sigma=14.0, max_displacement=8.0, seed=1)
            out["synthetic"] = (pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels, list(label_ids))
        if "mirror" in names:
            sys.path.insert(0, str(Path(__file__).parent))
            from brain_mirror import left_right_axis, swap_left_right_labels

            axis, _ = left_right_axis(seg)
            mirrored = np.flip(image, axis).copy()
            mirrored_seg = swap_left_right_labels(np.flip(seg, axis).copy())
            out["mirror"] = (image, mirrored, seg, mirrored_seg, list(label_ids))
    return out


def score(disp: np.ndarray, fixed_seg, moving_seg, label_ids) -> dict:
    warped = apply_field(moving_seg, disp, labels=True)
    return {
        "dice": mean_dice(dice_per_label(fixed_seg, warped, label_ids, moving_labels=moving_seg)),
        "ndv_percent": 100.0 * ndv_fraction(disp),
        "sdlogj": sdlogj_l2r(disp),
        "det_nonpositive_percent": 100.0 * fraction_nonpositive_jacobian(disp),
    }


def run(args) -> None:
    out = Path(args.out) if args.out else C.OUT_ROOT / NAME
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    for name, (fixed, moving, fixed_seg, moving_seg, label_ids) in pairs(args.pairs.split(",")).items():
        before = mean_dice(dice_per_label(fixed_seg, moving_seg, label_ids, moving_labels=moving_seg))
        for mode in modes:
            overrides = dict(MODES[mode])
            if mode.startswith("io-"):
                overrides["network_iterations"] = (args.io_steps,)
            if overrides.get("method", "dense") != "dense":
                overrides["network_axes"] = args.axes
            preset = overrides.pop("preset", None)
            start = time.perf_counter()
            result = register(fixed, moving, preset=preset, device="cpu", progress=False, **overrides)
            wall = time.perf_counter() - start
            row = {"pair": name, "mode": mode, "axes": args.axes, "dice_before": before,
                   **score(result.disp, fixed_seg, moving_seg, label_ids), "seconds": wall,
                   "optimisation_seconds": result.seconds, "peak_memory_mb": result.peak_memory_mb,
                   "iterations": len(result.history), "overrides": {k: v for k, v in overrides.items()},
                   "stages": [{k: s[k] for k in ("stage", "seconds")} for s in result.stages],
                   "levels": [{k: level.get(k) for k in ("iterations_run", "seconds_per_iteration", "setup_seconds")}
                              for level in result.levels],
                   "cpu_seconds": time.process_time()}
            print(json.dumps(row), flush=True)
            with results.open("a") as handle:
                handle.write(json.dumps(row) + "\n")


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = ["pair", "mode", "Dice (before)", "NDV %", "SDlogJ", "% det<=0", "time s", "peak MB"]
    body = [[r["pair"], r["mode"], f"{r['dice']:.3f} ({r['dice_before']:.3f})", f"{r['ndv_percent']:.3f}",
             f"{r['sdlogj']:.3f}", f"{r['det_nonpositive_percent']:.3f}", f"{r['seconds']:.0f}",
             f"{r['peak_memory_mb']:.0f}"] for r in rows]
    return C.markdown_table(header, body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="oasisA", help="comma-separated: oasisA, oasisA-gamma0.5, oasisA-gamma2, "
                        "oasisA-inverted, synthetic, mirror")
    parser.add_argument("--modes", default="direct,nio-cpu", help=f"comma-separated: {', '.join(MODES)}")
    parser.add_argument("--axes", default=AXES, help="--network-axes for the network modes")
    parser.add_argument("--io-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--summary", metavar="RESULTS_JSONL", help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(Path(args.summary)))
        return
    run(args)


if __name__ == "__main__":
    main()
