"""Benchmark: the voxelmorph brain (fixed) against its own left-right mirror image (moving).

The mirror image is a real anatomical deformation problem with a known label correspondence:
after flipping the left-right voxel axis, the left structures of the mirrored label map lie where
the right ones were, so left/right FreeSurfer labels are swapped (2 <-> 41, 3 <-> 42, ...; midline
labels such as 14, 15, 16, 24 keep their id) and then compared with the fixed labels as usual.

Left-right axis: in the voxelmorph 160x192x224 grid it is **voxel axis 0**. The script does not
assume it: it flips each axis in turn and picks the one that maps the centroid of label 2 (left
cerebral white matter) closest to the centroid of label 41 (right cerebral white matter); on
test_scan that is about 2 voxels for axis 0 against 58-66 voxels for axes 1 and 2.

Reported: Dice over the 30 VoxelMorph labels before/after, HD95 (voxels), SDlogJ (Learn2Reg), % det
<= 0, NDV %, optimisation time, seconds per iteration per level, peak memory.

    python benchmarks/brain_mirror.py [--device auto] [--quick]
"""

from __future__ import annotations

import sys

import numpy as np

import _common as C
from dirio.api import register
from dirio.evaluation.evaluate import evaluate_field
from dirio.evaluation.overlap import dice_per_label, mean_dice
from dirio.evaluation.surface import hd95_per_label

NAME = "brain_mirror"
# FreeSurfer aseg left/right pairs (FreeSurferColorLUT): cerebral WM, cortex, lateral ventricle,
# inferior lateral ventricle, cerebellum WM, cerebellum cortex, thalamus, caudate, putamen,
# pallidum, hippocampus, amygdala, accumbens, ventral DC, vessel, choroid plexus.
LEFT_RIGHT_PAIRS = (
    (2, 41), (3, 42), (4, 43), (5, 44), (7, 46), (8, 47), (10, 49), (11, 50), (12, 51), (13, 52),
    (17, 53), (18, 54), (26, 58), (28, 60), (30, 62), (31, 63),
)
# Labels whose centroids decide the left-right axis: left / right cerebral white matter.
AXIS_PROBE = (2, 41)


def centroid(labels: np.ndarray, label: int) -> np.ndarray:
    """Mean voxel coordinate ``(i, j, k)`` of a label."""
    return np.argwhere(labels == label).mean(axis=0)


def left_right_axis(labels: np.ndarray, probe: tuple[int, int] = AXIS_PROBE) -> tuple[int, list[float]]:
    """The voxel axis whose flip maps the centroid of ``probe[0]`` nearest to that of ``probe[1]``.

    Returns:
        The axis and, per axis, the distance (voxels) between the flipped left centroid and the
        right centroid.
    """
    left, right = centroid(labels, probe[0]), centroid(labels, probe[1])
    distances = []
    for axis, size in enumerate(labels.shape):
        flipped = left.copy()
        flipped[axis] = size - 1 - flipped[axis]
        distances.append(float(np.linalg.norm(flipped - right)))
    return int(np.argmin(distances)), distances


def swap_left_right_labels(labels: np.ndarray, pairs=LEFT_RIGHT_PAIRS) -> np.ndarray:
    """Exchange the ids of each left/right pair; other labels are unchanged (uint8 label map in and out)."""
    lookup = np.arange(256, dtype=labels.dtype)
    for left, right in pairs:
        lookup[left], lookup[right] = right, left
    return lookup[labels]


def main(argv=None) -> None:
    parser = C.base_parser(NAME, __doc__.splitlines()[0], "brain-mri")
    args = parser.parse_args(argv)
    image, seg, label_ids, _ = C.load_voxelmorph_brain(NAME)
    axis, distances = left_right_axis(seg)
    print(f"[{NAME}] left-right axis {axis} (flipped label-{AXIS_PROBE[0]} centroid to label-{AXIS_PROBE[1]} "
          f"centroid: {', '.join(f'axis {a}: {d:.1f}' for a, d in enumerate(distances))} voxels)",
          file=sys.stderr, flush=True)
    moving = np.ascontiguousarray(np.flip(image, axis=axis))
    moving_labels = swap_left_right_labels(np.ascontiguousarray(np.flip(seg, axis=axis)))

    rss_baseline = C.reset_peak_rss()
    result = register(image, moving, preset=args.preset, device=args.device, **C.overrides_from_args(args))

    labels = [int(v) for v in label_ids]
    dice_before = dice_per_label(seg, moving_labels, labels, moving_labels=moving_labels)
    hd95_before = hd95_per_label(seg, moving_labels, labels, None, moving_labels=moving_labels)
    after = evaluate_field(result.disp, fixed_labels=seg, moving_labels=moving_labels, labels=labels)
    row = {
        "left_right_axis": axis,
        "axis_probe_distances_voxels": distances,
        **C.overlap_before_after(dice_before, hd95_before, after),
        **C.regularity_and_run(after, result, rss_baseline),
    }
    header = ["pair", "Dice before", "Dice after", "HD95 before", "HD95 after", "SDlogJ", "% det<=0", "NDV %",
              "opt s", "s/it per level", "peak MB"]
    body = [[
        "brain vs LR mirror", C.fmt(row["dice_before"]), C.fmt(row["dice_after"]), C.fmt(row["hd95_before_voxels"], 2),
        C.fmt(row["hd95_after_voxels"], 2), C.fmt(row["sdlogj_l2r"], 4), C.fmt(row["percent_nonpositive_jacobian"], 4),
        C.fmt(row["ndv_percent"], 4), C.fmt(row["optimisation_seconds"], 1), C.format_levels(row["levels"]),
        C.fmt(row["peak_memory_mb"], 0),
    ]]
    notes = [
        f"Fixed: voxelmorph test_scan {image.shape}; moving: the same scan flipped along voxel axis {axis} "
        f"(the left-right axis, found from the data: flipping it maps the label-{AXIS_PROBE[0]} centroid to "
        f"{distances[axis]:.1f} voxels from the label-{AXIS_PROBE[1]} centroid), with the {len(LEFT_RIGHT_PAIRS)} "
        f"FreeSurfer left/right label pairs swapped. Preset {args.preset}, device {row['device']}.",
        f"Dice: mean over the {len(labels)} labels of labels.npz; HD95 in voxels; SDlogJ: Learn2Reg variant.",
        "s/it per level = level wall time / iterations (set-up included), keyed by shrink factor.",
        C.peak_memory_note([row]),
    ]
    C.finish(NAME, "Brain vs its left-right mirror (voxelmorph test_scan)", args, {"device": row["device"],
             "preset": args.preset, "rows": [row]}, [C.markdown_table(header, body)], notes)


if __name__ == "__main__":
    main()
