"""LapIRN reproduction check: dirio's LapIRN with the upstream weights against upstream's own output.

Loads ``LapIRN_{disp,diff}_fea7.pth`` (``../shared/data/lapirn-weights``), registers the OASIS demo
pair (fixed image_A, moving image_B, ``../shared/data/lapirn-oasis-brain``) and prints, per variant:
the largest absolute difference from upstream's field at the reference voxels (CSV, in voxels), the
Dice of the warped labels beside upstream's (``reference/summary.json``), and the time of one
forward pass on the CPU with 2 threads. Labels are warped as upstream does (nearest neighbour,
border padding: :func:`dirio.core.fields.warp`); the Learn2Reg-style warp
(:func:`dirio.evaluation.overlap.warp_labels`, label 0 outside the grid) is printed beside it.

Run: ``python benchmarks/lapirn_reference.py`` (about 20 s per variant on 2 CPU cores).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dirio.core.fields import field_to_numpy, warp
from dirio.evaluation.overlap import dice_per_label, warp_labels
from dirio.transforms.networks import build_network
from dirio.io.images import load_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = DATA / "lapirn-weights"
PAIR = DATA / "lapirn-oasis-brain"
LABELS = (1, 2)


def main() -> int:
    if not (WEIGHTS / "reference" / "summary.json").is_file() or not PAIR.is_dir():
        print(f"lapirn_reference: shared data not found under {DATA}", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    fixed = load_image(PAIR / "image_A_160x192x144.nii.gz").to_tensor()
    moving = load_image(PAIR / "image_B_160x192x144.nii.gz").to_tensor()
    fixed_labels = np.asarray(load_image(PAIR / "image_A_160x192x144_seg.nii.gz", labels=True).data)
    moving_labels = np.asarray(load_image(PAIR / "image_B_160x192x144_seg.nii.gz", labels=True).data)
    summary = json.loads((WEIGHTS / "reference" / "summary.json").read_text())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, input {tuple(fixed.shape)}")
    for variant in ("disp", "diff"):
        model = build_network(WEIGHTS / f"LapIRN_{variant}_fea7.pth", architecture=f"lapirn-{variant}")
        start = time.perf_counter()
        with torch.no_grad():
            disp = model(fixed, moving)
        seconds = time.perf_counter() - start
        reference = np.loadtxt(WEIGHTS / "reference" / f"{variant}_A_from_B_samples.csv", delimiter=",", skiprows=1)
        ijk = reference[:, :3].astype(int)
        field = field_to_numpy(disp)
        got = field[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
        error = np.abs(got - reference[:, 3:]).max()
        warped = warp(torch.from_numpy(moving_labels.astype(np.int64))[None, None], disp, mode="nearest")
        dice = dice_per_label(fixed_labels, warped[0, 0].numpy(), LABELS, moving_labels=moving_labels)
        dice_l2r = dice_per_label(fixed_labels, warp_labels(moving_labels, field), LABELS, moving_labels=moving_labels)
        expected = summary[variant]["dice_after"]
        dice_text = ", ".join(
            f"label {k}: {dice[k]:.6f} (upstream {expected[str(k)]:.6f}, Learn2Reg warp {dice_l2r[k]:.6f})" for k in LABELS
        )
        print(
            f"{variant}: max |u - u_upstream| = {error:.2e} voxels over {len(ijk)} samples; "
            f"Dice {dice_text}; forward {seconds:.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
