"""Benchmark: training throughput (pairs per second) of the U-Net with dirio's trainer, 2D and 3D.

The default U-Net of :class:`dirio.transforms.networks.UNet` (encoder 16/32/32/32, decoder
32/32/32/32, final 32/16/16, ~VoxelMorph's) and a small one (8/16/16, 16/16/16, 8), LNCC (window 9)
+ diffusion, Adam, the whole training step as :func:`dirio.optim.trainer.fit` runs it: augmented
pair sampling (:class:`dirio.methods.training_data.ImagePairSampler`, default augmentation),
forward, the combination rule's backward passes, the optimiser step. Images are smooth random
volumes (the content does not change the cost). The first epoch (warm-up) is left out; the
median over the other epochs is reported.

    nice -n 10 python benchmarks/train_throughput.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

import _common as C
from dirio.io.atomic import write_json
from dirio.losses.regularizers import make_regularizer
from dirio.losses.similarity import make_similarity
from dirio.losses.terms import RegularizerTerm, Role, SimilarityTerm, Term
from dirio.methods.training_data import ImagePairSampler, TrainingImage
from dirio.optim.trainer import TrainConfig, fit
from dirio.transforms.network import NetworkTransform
from dirio.transforms.networks import UNet

SMALL = dict(encoder_channels=(8, 16, 16), decoder_channels=(16, 16, 16), final_channels=(8,))
CASES = [  # (name, shape, network settings, batch, steps per epoch)
    ("2D 80x112, small U-Net", (80, 112), SMALL, 4, 10),
    ("2D 160x192, default U-Net", (160, 192), {}, 4, 4),
    ("3D 64x64x64, small U-Net", (64, 64, 64), SMALL, 1, 4),
    ("3D 64x64x64, default U-Net", (64, 64, 64), {}, 1, 3),
]


def images(shape, count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    out = []
    for k in range(count):
        coarse = torch.rand(1, 1, *[max(2, n // 8) for n in shape], generator=generator)
        out.append(TrainingImage(f"i{k}", F.interpolate(coarse, size=shape, mode=mode, align_corners=True)[0]))
    return out


def measure(name, shape, settings, batch, steps, rule, epochs):
    torch.manual_seed(0)
    network = UNet(ndim=len(shape), **settings)
    terms = [Term("lncc", Role.SIMILARITY, SimilarityTerm(make_similarity("lncc", window=9)), 1.0),
             Term("diffusion", Role.REGULARIZER, RegularizerTerm(make_regularizer("diffusion")), 1.0)]
    config = TrainConfig(epochs=epochs, steps_per_epoch=steps, batch_size=batch, lr=1e-4, combine=rule, amp="off")
    result = fit(NetworkTransform(network), terms, ImagePairSampler(images(shape), "random"), config)
    rates = [e["pairs_per_second"] for e in result.epochs[1:]]
    row = {"case": name, "rule": rule, "batch": batch, "pairs_per_second": statistics.median(rates),
           "parameters": sum(p.numel() for p in network.parameters())}
    print(f"{name}, {rule}, batch {batch}: {row['pairs_per_second']:.2f} pairs/s", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("-o", "--output", default=str(C.OUT_ROOT / "train_throughput"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for case in CASES:
        for rule in ("sum", "surgery"):
            rows.append(measure(*case, rule, args.epochs))
    record = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
                         f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at the end",
              "rows": rows}
    os.makedirs(args.output, exist_ok=True)
    write_json(os.path.join(args.output, "train_throughput.json"), record, overwrite=True)
    print(record["machine"])


if __name__ == "__main__":
    sys.exit(main())
