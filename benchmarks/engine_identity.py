"""Fields of the presets on the benchmark pairs, written as .npy, to compare two versions of dirio
bit for bit (the engine redesign promised identical fields where the maths did not change).

Uses only ``dirio.api.register`` (stable across versions), nibabel and numpy, so the same script runs
against an older checkout (``PYTHONPATH=old/src python benchmarks/engine_identity.py OUT``) and the
current one; then ``--compare A B`` prints, per case, whether the fields are bitwise equal and the
largest difference. One thread, so that runs are deterministic.

Cases (2-core CPU, a few seconds each): the voxelmorph brain at half resolution against a smooth
known warp of itself (brain-mri; brain-mri with pcgrad; brain-mri diffeomorphic; convex-adam) and
the elastix lung pair (lung-ct with masks: affine stage then MIND dense stage).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def brain_pair():
    volume = np.asarray(nib.load(DATA / "voxelmorph-brain" / "test_scan_vol.nii.gz").dataobj, dtype=np.float32)
    half = volume[::2, ::2, ::2].copy()
    rng = np.random.default_rng(1)
    field = np.stack([gaussian_filter(rng.standard_normal(half.shape), 6) for _ in range(3)])
    field *= 3.0 / np.abs(field).max()
    grid = np.indices(half.shape, dtype=np.float64) + field
    moving = map_coordinates(half, grid, order=1, mode="nearest").astype(np.float32)
    return half, moving


def lung_pair():
    folder = DATA / "elastix-lung-ct"
    load = lambda name: np.asarray(nib.load(folder / f"{name}.nii.gz").dataobj, dtype=np.float32)
    fixed, moving = load("baseline"), load("followup")
    shape = tuple(min(a, b) for a, b in zip(fixed.shape, moving.shape))
    crop = tuple(slice(0, n) for n in shape)
    return fixed[crop], moving[crop], load("baseline_mask")[crop], load("followup_mask")[crop]


def cases():
    from dirio.api import register

    fixed, moving = brain_pair()
    yield "brain-mri", lambda: register(fixed, moving, preset="brain-mri", progress=False, device="cpu")
    yield "brain-mri-pcgrad", lambda: register(fixed, moving, preset="brain-mri", combine="pcgrad", progress=False,
                                               device="cpu")
    yield "brain-mri-velocity", lambda: register(fixed, moving, preset="brain-mri", diffeomorphic=True,
                                                 progress=False, device="cpu")
    yield "convex-adam", lambda: register(fixed, moving, preset="convex-adam", progress=False, device="cpu")
    lf, lm, fm, mm = lung_pair()
    yield "lung-ct", lambda: register(lf, lm, preset="lung-ct", fixed_mask=fm, moving_mask=mm, progress=False,
                                      device="cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", help="folder for the .npy fields")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two folders of fields")
    args = parser.parse_args(argv)
    if args.compare:
        a, b = map(Path, args.compare)
        for path in sorted(a.glob("*.npy")):
            x, y = np.load(path), np.load(b / path.name)
            print(f"{path.stem:22s} bitwise equal: {np.array_equal(x, y)}  max |diff| {np.abs(x - y).max():.3g} voxels")
        return 0
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, run in cases():
        start = time.perf_counter()
        result = run()
        np.save(out / f"{name}.npy", result.disp)
        print(f"{name}: {time.perf_counter() - start:.1f} s, mean |u| {np.abs(result.disp).mean():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
