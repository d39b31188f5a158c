"""Benchmark: GSMorph's claim for trained networks — gradient surgery against the weighted sum.

GSMorph (Dou et al., MICCAI 2023) trains with the similarity gradient projected onto the normal
plane of the regularizer gradient, layer by layer, and claims this reaches the accuracy/smoothness
trade-off without tuning the regularizer weight. Here the same small 2D U-Net is trained with the
weighted sum at several weights, with pcgrad, and with surgery (dirio's ``surgery``, scope
``tensor`` = layer-wise), for equal epochs, and each model is placed on the Dice vs folding plane.

Data (``../shared/data``; every brain on the voxelmorph grid 160x192x224, affinely aligned):

* training subjects: conditional-lapirn A and B (fullsize) and c2fvit B (on-voxelmorph-grid), no labels;
* held-out validation subjects (never trained on): the voxelmorph scan (its aseg merged into 13
  classes, ``voxelmorph_seg13``) and c2fvit A (``image_A_seg13``).

2D axial slices (index 84..140 step 4 on the inferior axis, 15 per subject, where 5-10 of the 13
classes are present), average-pooled 2x to 80x112 (labels: every second voxel). Training pairs:
two different training subjects at the same slice index (inter-subject) or, with probability 1/2,
two augmentations of one slice (synthetic deformation); every image is augmented (random affine:
rotation 5 degrees, scale 0.05, translation 0.03; smooth elastic displacement of 2 voxels std on a
16-voxel control grid; intensity 0.1, gamma 0.2, noise 0.01). Loss: LNCC (window 9, squared) +
diffusion; Adam, learning rate 1e-3 with a cosine decay to 1e-4 over the epochs, batch 4.
Validation after every epoch:

* ``inter``: the first 20 of the 30 real inter-subject pairs (voxelmorph slice k <-> c2fvit A slice k,
  both directions) with the 13-class Dice (mean over the classes present);
* ``synth``: 20 synthetic pairs (two augmentations of a held-out slice; the warped labels are
  the ground truth), Dice likewise;
* % det <= 0 and SDlogJ (Learn2Reg definitions) of every predicted field.

The numbers reported are those of the **last** epoch (no checkpoint selection: equal epochs).

    nice -n 10 python benchmarks/gsmorph_study.py [--epochs 8] [--steps 60] [--batch 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

import _common as C
from dirio.apps.train import validator
from dirio.io.atomic import write_json, write_text
from dirio.losses.regularizers import make_regularizer
from dirio.losses.similarity import make_similarity
from dirio.losses.terms import RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.training_data import Augmentation, TrainingImage, augmented
from dirio.optim.trainer import Batch, TrainConfig, fit
from dirio.transforms.network import NetworkTransform
from dirio.transforms.networks import UNet

SLICES = list(range(84, 141, 4))
TRAIN = ["conditional-lapirn-oasis-brain/image_A_fullsize.nii.gz", "conditional-lapirn-oasis-brain/image_B_fullsize.nii.gz",
         "c2fvit-oasis-brain/on-voxelmorph-grid/image_B.nii.gz"]
VALIDATION = [("voxelmorph-brain/test_scan_vol.nii.gz", "c2fvit-oasis-brain/on-voxelmorph-grid/voxelmorph_seg13.nii.gz"),
              ("c2fvit-oasis-brain/on-voxelmorph-grid/image_A.nii.gz", "c2fvit-oasis-brain/on-voxelmorph-grid/image_A_seg13.nii.gz")]
LABELS = list(range(1, 14))
AUGMENT = Augmentation(rotation=5, scale=0.05, translation=0.03, elastic=2.0, elastic_spacing=16, intensity=0.1,
                       gamma=0.2, noise=0.01)
NETWORK = dict(ndim=2, encoder_channels=(8, 16, 16), decoder_channels=(16, 16, 16), final_channels=(8,))


def slices(path: str, labels: str | None) -> list[TrainingImage]:
    """The study's axial slices of one subject, 80x112, intensities percentile-normalised per volume."""
    volume = nib.load(C.require(C.DATA / path, "gsmorph_study")).get_fdata().astype(np.float32)
    nonzero = volume[volume > 0]
    low, high = np.percentile(nonzero, (0.5, 99.5))
    volume = np.clip((volume - low) / (high - low), 0, 1).astype(np.float32)
    seg = None if labels is None else np.rint(nib.load(C.DATA / labels).get_fdata()).astype(np.int64)
    out = []
    for k in SLICES:
        plane = torch.from_numpy(np.ascontiguousarray(volume[:, k, :]))[None, None]
        image = F.avg_pool2d(plane, 2)[0]
        lab = None if seg is None else torch.from_numpy(np.ascontiguousarray(seg[::2, k, ::2]))[None]
        out.append(TrainingImage(f"{Path(path).parent.name}/{Path(path).stem}:{k}", image, lab))
    return out


class StudySampler:
    """Half inter-subject pairs at one slice index, half synthetic (two augmentations of one slice)."""

    def __init__(self, subjects: list[list[TrainingImage]], augmentation: Augmentation):
        self.subjects, self.augmentation = subjects, augmentation

    def sample(self, generator: torch.Generator, batch_size: int) -> Batch:
        fixed, moving = [], []
        for _ in range(batch_size):
            k = int(torch.randint(len(SLICES), (1,), generator=generator))
            a = int(torch.randint(len(self.subjects), (1,), generator=generator))
            synthetic = bool(torch.rand(1, generator=generator) < 0.5)
            b = a if synthetic else (a + 1 + int(torch.randint(len(self.subjects) - 1, (1,), generator=generator))) % len(self.subjects)
            fixed.append(augmented(self.subjects[a][k], self.augmentation, generator)[0])
            moving.append(augmented(self.subjects[b][k], self.augmentation, generator)[0])
        return Batch(torch.cat(fixed), torch.cat(moving))


def validation_pairs(subjects: list[list[TrainingImage]], count: int, seed: int) -> tuple[list[Batch], list[Batch]]:
    """(real inter-subject pairs, synthetic pairs) with integer label maps."""
    first, second = subjects
    inter = []
    for k in range(len(SLICES)):
        for f, m in ((first[k], second[k]), (second[k], first[k])):
            inter.append(Batch(f.image[None], m.image[None], {"fixed_label_map": f.labels[None], "moving_label_map": m.labels[None]}))
    generator = torch.Generator().manual_seed(seed)
    synth = []
    for _ in range(count):
        item = subjects[int(torch.randint(2, (1,), generator=generator))][int(torch.randint(len(SLICES), (1,), generator=generator))]
        f_image, f_labels = augmented(item, AUGMENT, generator)
        m_image, m_labels = augmented(item, AUGMENT, generator)
        synth.append(Batch(f_image, m_image, {"fixed_label_map": f_labels, "moving_label_map": m_labels}))
    return inter[:count], synth


def run(name: str, combine: str, weight: float, args, train_subjects, inter, synth) -> dict:
    torch.manual_seed(0)
    network = UNet(**NETWORK)
    transform = NetworkTransform(network)
    terms = [Term("lncc", Role.SIMILARITY, SimilarityTerm(make_similarity("lncc", window=9)), 1.0),
             Term("diffusion", Role.REGULARIZER, RegularizerTerm(make_regularizer("diffusion")), weight)]
    config = TrainConfig(epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch, lr=args.lr,
                         schedule="cosine", schedule_options={"final": 0.1}, combine=combine, seed=args.seed,
                         monitor="inter_dice", amp="off")
    validate_inter = validator(inter, terms, LABELS, torch.device("cpu"))
    validate_synth = validator(synth, terms, LABELS, torch.device("cpu"))

    def validate(t):
        a, b = validate_inter(t), validate_synth(t)
        return {**{f"inter_{k}": v for k, v in a.items()}, **{f"synth_{k}": v for k, v in b.items()}}

    def report(history, epochs):
        e = epochs[-1]
        print(f"  {name} epoch {e['epoch'] + 1}: loss {e['loss']:.4f}, inter Dice {e['val_inter_dice']:.4f}, "
              f"{e['seconds']:.0f} s", flush=True)

    result = fit(transform, terms, StudySampler(train_subjects, AUGMENT), config, validate=validate, on_epoch=report)
    last = result.epochs[-1]
    row = {"run": name, "combine": combine, "weight": weight if combine != "surgery" else None,
           "epoch_seconds": float(np.mean([e["seconds"] for e in result.epochs])),
           "pairs_per_second": float(np.mean([e["pairs_per_second"] for e in result.epochs])),
           **{k[4:]: v for k, v in last.items() if k.startswith("val_")},
           "curve_inter_dice": [e["val_inter_dice"] for e in result.epochs],
           "train_loss": [e["loss"] for e in result.epochs]}
    print(f"{name}: inter Dice {row['inter_dice']:.4f} det<=0 {row['inter_folding_percent']:.3f}% "
          f"SDlogJ {row['inter_sdlogj']:.4f}; synth Dice {row['synth_dice']:.4f} det<=0 "
          f"{row['synth_folding_percent']:.3f}%; {row['epoch_seconds']:.1f} s/epoch", flush=True)
    return row


def before(inter, synth) -> dict:
    """The identity field's scores (no registration)."""
    class Zero(torch.nn.Module):
        def forward(self, fixed, moving):
            return torch.zeros(fixed.shape[0], 2, *fixed.shape[2:])
    terms = [Term("lncc", Role.SIMILARITY, SimilarityTerm(make_similarity("lncc", window=9)), 1.0)]
    t = NetworkTransform(Zero())
    return {"inter_dice": validator(inter, terms, LABELS, torch.device("cpu"))(t)["dice"],
            "synth_dice": validator(synth, terms, LABELS, torch.device("cpu"))(t)["dice"]}


def pareto(rows: list[dict], key: str) -> list[str]:
    """Names of the runs no other run beats on both Dice (higher) and folding (lower)."""
    front = []
    for r in rows:
        dominated = any(o is not r and o[f"{key}_dice"] >= r[f"{key}_dice"] and o[f"{key}_folding_percent"] <= r[f"{key}_folding_percent"]
                        and (o[f"{key}_dice"] > r[f"{key}_dice"] or o[f"{key}_folding_percent"] < r[f"{key}_folding_percent"]) for o in rows)
        if not dominated:
            front.append(r["run"])
    return front


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", default="0.1,1,8")
    parser.add_argument("--pcgrad-weight", type=float, default=1.0)
    parser.add_argument("--val-pairs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 epochs of 3 steps (code paths only)")
    parser.add_argument("-o", "--output", default=str(C.OUT_ROOT / "gsmorph_study"))
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.steps, args.val_pairs = 2, 3, 4
    torch.set_num_threads(args.threads)
    train_subjects = [slices(p, None) for p in TRAIN]
    val_subjects = [slices(p, l) for p, l in VALIDATION]
    inter, synth = validation_pairs(val_subjects, args.val_pairs, seed=12345)
    rows = []
    for w in [float(v) for v in args.weights.split(",")]:
        rows.append(run(f"sum w={w:g}", "sum", w, args, train_subjects, inter, synth))
    rows.append(run(f"pcgrad w={args.pcgrad_weight:g}", "pcgrad", args.pcgrad_weight, args, train_subjects, inter, synth))
    rows.append(run("surgery", "surgery", 1.0, args, train_subjects, inter, synth))
    record = {"machine": f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}",
              "args": vars(args), "network": {k: list(v) if isinstance(v, tuple) else v for k, v in NETWORK.items()},
              "before": before(inter, synth), "runs": rows,
              "pareto_inter": pareto(rows, "inter"), "pareto_synth": pareto(rows, "synth")}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gsmorph_study.json", record, overwrite=True)
    lines = ["| run | inter Dice | inter % det<=0 | inter SDlogJ | synth Dice | synth % det<=0 | synth SDlogJ | s/epoch | pairs/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['inter_dice']:.4f} | {r['inter_folding_percent']:.3f} | {r['inter_sdlogj']:.4f} | "
                     f"{r['synth_dice']:.4f} | {r['synth_folding_percent']:.3f} | {r['synth_sdlogj']:.4f} | "
                     f"{r['epoch_seconds']:.1f} | {r['pairs_per_second']:.1f} |")
    lines.append(f"\nbefore (identity): inter Dice {record['before']['inter_dice']:.4f}, synth Dice {record['before']['synth_dice']:.4f}")
    lines.append(f"Pareto front (Dice up, % det<=0 down): inter {record['pareto_inter']}; synth {record['pareto_synth']}")
    write_text(out / "gsmorph_study.md", "\n".join(lines) + "\n", overwrite=True)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
