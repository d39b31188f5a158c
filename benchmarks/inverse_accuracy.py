"""Benchmark: how well dirio inverts fields, on known warps of the voxelmorph brain and on real registrations.

Known warps (the voxelmorph brain's grid, 160 x 192 x 224, 1 mm): for each seed a smooth random
field (``dirio.testing.synthetic.smooth_random_field``, sigma 14 voxels, largest component 8 voxels:
the ``synth2``-like warp) is

* inverted as a displacement field (:func:`dirio.core.inverse.invert_displacement`: a fixed-point
  step, then Newton steps);
* taken as a stationary velocity, integrated (7 squarings), and inverted exactly (the negated velocity).

* inverted as a displacement field by fixed-point steps only (``newton=False``), for comparison;

Real fields: the LapIRN OASIS pair (``lapirn-oasis-brain``, B -> A, 160 x 192 x 144) registered
with the ``brain-mri`` preset (a composed displacement field) and with ``--diffeomorphic`` (a
velocity field: its exact inverse through ``dirio.api.register(..., inverse=True)``); each field
is also inverted by Newton and by fixed-point steps. The fields are saved in ``--out``
(``--reuse-fields`` inverts the saved brain-mri field again without registering).

Reported per field: the round trip forward then inverse ``|u(x) + v(x + u(x))|`` (mean, 95th
percentile, max; whole grid and inside the brain), the residual ``|v(y) + u(y + v(y))|`` (mean,
max), fixed-point iterations, % det <= 0 of the forward field, and the CPU seconds of the
inversion.

    python benchmarks/inverse_accuracy.py [--seeds 1,2,3] [--skip-real] [--reuse-fields] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import _common as C
from dirio.api import register
from dirio.core.fields import integrate_velocity, jacobian_determinant
from dirio.core.inverse import field_statistics, inverse_consistency, inverse_residual, invert_displacement, invert_velocity
from dirio.io.images import load_image
from dirio.testing.synthetic import smooth_random_field

NAME = "inverse_accuracy"
SIGMA_VOXELS = 14.0
MAX_DISPLACEMENT_VOXELS = 8.0


def _measures(forward: torch.Tensor, inverse: torch.Tensor, mask: np.ndarray | None) -> dict:
    """Round trip and residual statistics of a forward / inverse pair (voxels = mm on these 1 mm grids)."""
    round_trip = inverse_consistency(forward, inverse)
    residual = inverse_residual(forward, inverse)
    row = {f"round_trip_{k}": v for k, v in field_statistics(round_trip).items()}
    row.update({f"residual_{k}": v for k, v in field_statistics(residual).items() if k != "p95"})
    if mask is not None:
        inside = torch.from_numpy(mask)[None]
        row.update({f"round_trip_brain_{k}": v for k, v in field_statistics(round_trip[inside]).items()})
    det = jacobian_determinant(forward)
    row["forward_percent_det_le_0"] = 100.0 * float((det <= 0).float().mean())
    return row


def _timed_inverse(forward: torch.Tensor, newton: bool) -> tuple[torch.Tensor, dict]:
    cpu, wall = C.cpu_seconds(), time.perf_counter()
    found = invert_displacement(forward, newton=newton)
    return found.field, {"iterations": found.iterations, "cpu_seconds": C.cpu_seconds() - cpu,
                         "wall_seconds": time.perf_counter() - wall}


def known_warps(seeds, brain_mask: np.ndarray, shape) -> list[dict]:
    rows = []
    for seed in seeds:
        field = smooth_random_field(shape, sigma=SIGMA_VOXELS, max_displacement=MAX_DISPLACEMENT_VOXELS, seed=seed)
        for newton in (True, False):
            inverse, row = _timed_inverse(field, newton)
            row = {"case": f"known warp seed {seed}", "kind": f"displacement, {'newton' if newton else 'fixed-point'}",
                   **row}
            row.update(_measures(field, inverse, brain_mask))
            rows.append(row)
            print(json.dumps(row), flush=True)
        forward = integrate_velocity(field)
        cpu, wall = C.cpu_seconds(), time.perf_counter()
        inverse = invert_velocity(field)
        row = {"case": f"known warp seed {seed}", "kind": "velocity, exact", "iterations": 0,
               "cpu_seconds": C.cpu_seconds() - cpu, "wall_seconds": time.perf_counter() - wall}
        row.update(_measures(forward, inverse, brain_mask))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def real_fields(quick: bool, out: Path, reuse: bool) -> list[dict]:
    """Both registrations of the OASIS pair; each field inverted by Newton and by fixed-point steps,
    the velocity field also exactly. ``reuse``: the brain-mri field saved by an earlier run."""
    folder = C.require(C.DATA / "lapirn-oasis-brain", NAME)
    fixed = load_image(folder / "image_A_160x192x144.nii.gz")
    moving = load_image(folder / "image_B_160x192x144.nii.gz")
    mask = load_image(folder / "image_A_160x192x144_seg.nii.gz", labels=True).data > 0
    rows = []
    for name, overrides in (("brain-mri", {}), ("brain-mri --diffeomorphic", {"diffeomorphic": True,
                                                                           "compose_every": 0})):
        if quick:
            overrides = {**overrides, "iterations": (C.QUICK_ITERATIONS,) * 3}
        saved = out / f"real_{name.replace(' --', '_')}.npy"
        exact = name.endswith("diffeomorphic")
        result = None
        if reuse and not exact and saved.is_file():
            disp = np.load(saved)
        else:
            result = register(fixed, moving, preset="brain-mri", inverse=exact, progress=False, device="cpu",
                              **overrides)
            disp = result.disp
            out.mkdir(parents=True, exist_ok=True)
            np.save(saved, disp)
        forward = torch.from_numpy(np.moveaxis(disp, -1, 0).copy())[None]
        case = f"OASIS B -> A (real), {name}"
        if exact:
            inverse = torch.from_numpy(np.moveaxis(result.inverse_disp, -1, 0).copy())[None]
            row = {"case": case, "kind": "velocity, exact", "iterations": 0,
                   "wall_seconds": result.inverse["seconds"]}
            row.update(_measures(forward, inverse, mask))
            rows.append(row)
            print(json.dumps(row), flush=True)
        for newton in (True, False):
            inverse, row = _timed_inverse(forward, newton)
            row = {"case": case, "kind": f"displacement, {'newton' if newton else 'fixed-point'}", **row}
            row.update(_measures(forward, inverse, mask))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows) -> str:
    lines = ["| case | inverse | round trip mean / p95 / max (vox) | inside brain mean / p95 | residual mean / max "
             "(vox) | iterations | % det<=0 fwd | seconds (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        brain = (f"{r['round_trip_brain_mean']:.4f} / {r['round_trip_brain_p95']:.4f}"
                 if "round_trip_brain_mean" in r else "")
        seconds = r.get("cpu_seconds")
        lines.append(
            f"| {r['case']} | {r['kind']} | {r['round_trip_mean']:.4f} / {r['round_trip_p95']:.4f} / "
            f"{r['round_trip_max']:.3f} | {brain} | {r['residual_mean']:.2g} / {r['residual_max']:.2g} | "
            f"{r['iterations']} | {r['forward_percent_det_le_0']:.4f} | "
            f"{'%.1f' % seconds if seconds is not None else '%.1f wall' % r['wall_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=C.int_list, default=(1, 2, 3))
    parser.add_argument("--skip-real", action="store_true", help="only the known warps")
    parser.add_argument("--reuse-fields", action="store_true",
                        help="use the brain-mri field saved in --out by an earlier run instead of registering again")
    parser.add_argument("--quick", action="store_true", help="smoke test: few registration iterations")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--out", type=Path, default=C.OUT_ROOT / NAME)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image, seg, _, _ = C.load_voxelmorph_brain(NAME)
    rows = known_warps(args.seeds, seg > 0, image.shape)
    if not args.skip_real:
        rows.extend(real_fields(args.quick, args.out, args.reuse_fields))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "versions": C.software_versions()}, indent=2))
    (args.out / "results.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
