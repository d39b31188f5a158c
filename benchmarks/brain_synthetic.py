"""Benchmark: the voxelmorph brain against a known smooth synthetic warp of itself.

For each seed, ``dirio.testing.synthetic.warped_pair`` builds fixed = brain warped by a smooth random field
(Gaussian-smoothed noise, sigma 14 voxels, largest component 8 voxels) and moving = brain, with
N(0, 0.01) noise added to both; the true answer is ``pair.true_disp``. Reported per seed: Dice
over the 30 VoxelMorph labels before/after, mean endpoint error inside the brain (fixed labels > 0)
before/after, HD95 (voxels), SDlogJ (Learn2Reg variant), % det <= 0, NDV %, optimisation time,
seconds per iteration per pyramid level, peak memory, and the wall time of the whole
``dirio register`` command on the same pair written to NIfTI.

    python benchmarks/brain_synthetic.py [--seeds 1,2,3] [--device auto] [--quick] [--skip-cli]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import _common as C
from dirio.api import register
from dirio.io.images import save_image
from dirio.evaluation.evaluate import evaluate_field
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian, sdlogj_l2r
from dirio.evaluation.overlap import dice_per_label, mean_dice
from dirio.evaluation.surface import hd95_per_label
from dirio.testing.synthetic import endpoint_error, warped_pair

NAME = "brain_synthetic"
# The synthetic warp of the task: smoothing sigma and largest component in voxels, noise std
# in the images' [0, 1] intensity units.
SIGMA_VOXELS = 14.0
MAX_DISPLACEMENT_VOXELS = 8.0
NOISE_STD = 0.01
IDENTITY_AFFINE = np.eye(4)  # the voxelmorph grid has no known world coordinates (1 mm, README)


def write_pair(folder: Path, pair) -> dict[str, Path]:
    """Write the pair's images and label maps as NIfTI (identity affine); return their paths."""
    paths = {
        "fixed": folder / "fixed.nii.gz",
        "moving": folder / "moving.nii.gz",
        "fixed_labels": folder / "fixed_labels.nii.gz",
        "moving_labels": folder / "moving_labels.nii.gz",
    }
    save_image(paths["fixed"], pair.fixed, IDENTITY_AFFINE, overwrite=True)
    save_image(paths["moving"], pair.moving, IDENTITY_AFFINE, overwrite=True)
    save_image(paths["fixed_labels"], pair.fixed_labels, IDENTITY_AFFINE, overwrite=True)
    save_image(paths["moving_labels"], pair.moving_labels, IDENTITY_AFFINE, overwrite=True)
    return paths


def run_cli(args, paths: dict[str, Path], labels_path: Path, out: Path) -> dict:
    """Time ``dirio register`` on the written pair; return wall time and its own metrics.json numbers."""
    command = [
        *C.dirio_command(), "register", str(paths["fixed"]), str(paths["moving"]), "-o", str(out),
        "--fixed-labels", str(paths["fixed_labels"]), "--moving-labels", str(paths["moving_labels"]),
        "--label-ids", str(labels_path), "--overwrite", "-q", *C.cli_flags_from_args(args),
    ]
    wall, completed = C.run_timed(command)
    if completed.returncode != 0:
        raise SystemExit(f"{NAME}: `dirio register` failed (exit {completed.returncode}):\n{completed.stderr.strip()}")
    record = json.loads((out / "metrics.json").read_text())
    return {
        "command": command,
        "wall_seconds": wall,
        "total_seconds_in_process": record["total_seconds"],
        "optimisation_seconds": record["optimisation_seconds"],
        "peak_memory_mb": record["peak_memory_mb"],
        "dice_after": record["after"].get("dice_mean"),
    }


def run_seed(args, seed: int, image, seg, label_ids, labels_path) -> dict:
    """Build, register and score the pair of one seed."""
    pair = warped_pair(image, seg, sigma=SIGMA_VOXELS, max_displacement=MAX_DISPLACEMENT_VOXELS,
                       noise_std=NOISE_STD, seed=seed)
    folder = Path(args.out) / f"seed{seed}"
    paths = write_pair(folder / "inputs", pair)  # outside every timing

    rss_baseline = C.reset_peak_rss()
    result = register(pair.fixed, pair.moving, preset=args.preset, device=args.device, **C.overrides_from_args(args))

    labels = [int(v) for v in label_ids]
    brain = pair.fixed_labels > 0  # the field lives on the fixed grid
    dice_before = dice_per_label(pair.fixed_labels, pair.moving_labels, labels, moving_labels=pair.moving_labels)
    hd95_before = hd95_per_label(pair.fixed_labels, pair.moving_labels, labels, None, moving_labels=pair.moving_labels)
    after = evaluate_field(result.disp, fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels, labels=labels)
    epe_before = endpoint_error(np.zeros_like(pair.true_disp), pair.true_disp, brain)
    epe_after = endpoint_error(result.disp, pair.true_disp, brain)
    row = {
        "seed": seed,
        **C.overlap_before_after(dice_before, hd95_before, after),
        "epe_before_voxels": epe_before,
        "epe_after_voxels": epe_after,
        "epe_ratio": epe_after / epe_before,
        "sdlogj_l2r": after["sdlogj_l2r"],
        "sdlogj": after["sdlogj"],
        "percent_nonpositive_jacobian": after["percent_nonpositive_jacobian"],
        "ndv_percent": after["ndv_percent"],
        "true_field_sdlogj_l2r": sdlogj_l2r(pair.true_disp),
        "true_field_percent_nonpositive_jacobian": 100.0 * fraction_nonpositive_jacobian(pair.true_disp),
        "optimisation_seconds": result.seconds,
        "levels": C.level_timings(result.levels),
        "peak_memory_mb": result.peak_memory_mb,
        "rss_at_register_start_mb": rss_baseline,
        "device": result.device,
        "settings": result.settings.to_dict(),
    }
    if not args.skip_cli:
        row["cli"] = run_cli(args, paths, labels_path, folder / "cli")
    return row


def table(rows: list[dict]) -> str:
    header = ["seed", "Dice before", "Dice after", "EPE before (vox)", "EPE after (vox)", "EPE ratio",
              "HD95 before", "HD95 after", "SDlogJ", "% det<=0", "NDV %", "opt s", "s/it per level",
              "peak MB", "CLI wall s", "CLI peak MB"]
    body = []
    for r in rows:
        cli = r.get("cli", {})
        body.append([
            r["seed"], C.fmt(r["dice_before"]), C.fmt(r["dice_after"]), C.fmt(r["epe_before_voxels"]),
            C.fmt(r["epe_after_voxels"]), C.fmt(r["epe_ratio"]), C.fmt(r["hd95_before_voxels"], 2),
            C.fmt(r["hd95_after_voxels"], 2), C.fmt(r["sdlogj_l2r"], 4), C.fmt(r["percent_nonpositive_jacobian"], 4),
            C.fmt(r["ndv_percent"], 4), C.fmt(r["optimisation_seconds"], 1), C.format_levels(r["levels"]),
            C.fmt(r["peak_memory_mb"], 0), C.fmt(cli.get("wall_seconds"), 1), C.fmt(cli.get("peak_memory_mb"), 0),
        ])
    if len(rows) > 1:
        def mean(key, digits=3):
            return C.fmt(float(np.mean([r[key] for r in rows])), digits)
        walls = [r["cli"]["wall_seconds"] for r in rows if "cli" in r]
        body.append([
            "**mean**", mean("dice_before"), mean("dice_after"), mean("epe_before_voxels"), mean("epe_after_voxels"),
            mean("epe_ratio"), mean("hd95_before_voxels", 2), mean("hd95_after_voxels", 2), mean("sdlogj_l2r", 4),
            mean("percent_nonpositive_jacobian", 4), mean("ndv_percent", 4), mean("optimisation_seconds", 1), "",
            "", C.fmt(float(np.mean(walls)) if walls else None, 1), "",
        ])
    return C.markdown_table(header, body)


def main(argv=None) -> None:
    parser = C.base_parser(NAME, __doc__.splitlines()[0], "brain-mri")
    parser.add_argument("--seeds", type=C.int_list, help="seeds of the synthetic warps (default 1,2,3; --quick: 1)")
    parser.add_argument("--skip-cli", action="store_true", help="do not time the whole `dirio register` command")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ((1,) if args.quick else (1, 2, 3))
    image, seg, label_ids, labels_path = C.load_voxelmorph_brain(NAME)
    rows = []
    for seed in seeds:
        print(f"[{NAME}] seed {seed} ...", file=sys.stderr, flush=True)
        rows.append(run_seed(args, seed, image, seg, label_ids, labels_path))
    notes = [
        f"Pair: voxelmorph test_scan {image.shape}; fixed = scan warped by a smooth random field "
        f"(sigma {SIGMA_VOXELS:g} voxels, largest component {MAX_DISPLACEMENT_VOXELS:g} voxels), moving = scan, "
        f"N(0, {NOISE_STD:g}) noise on both. Preset {args.preset}, device {rows[0]['device']}.",
        f"Dice: mean over the {len(label_ids)} labels of labels.npz (Learn2Reg nearest-neighbour warping). "
        "EPE: mean |u - u_true| in voxels inside the fixed brain (labels > 0); ratio = after / before. "
        "HD95 in voxels (Learn2Reg). SDlogJ: Learn2Reg variant std(log(clip(det + 3))).",
        "True-field reference: SDlogJ " + ", ".join(C.fmt(r["true_field_sdlogj_l2r"], 4) for r in rows)
        + "; % det<=0 " + ", ".join(C.fmt(r["true_field_percent_nonpositive_jacobian"], 4) for r in rows) + ".",
        "opt s: optimisation wall time inside register(); s/it per level = level wall time / iterations "
        "(level set-up included), keyed by pyramid shrink factor.",
        C.peak_memory_note(rows) + " CLI peak MB: the same measure inside the `dirio register` process (started "
        "from a small launcher, because Linux keeps ru_maxrss across fork/exec).",
        "CLI wall s: perf_counter around the whole `dirio register` subprocess (start-up, imports, reading NIfTI, "
        "registration, writing outputs, metrics, figure); the NIfTI pair was written before the timing.",
    ]
    results = {"device": rows[0]["device"], "preset": args.preset, "seeds": list(seeds), "rows": rows}
    C.finish(NAME, "Brain, synthetic warp (voxelmorph test_scan)", args, results, [table(rows)], notes)


if __name__ == "__main__":
    main()
