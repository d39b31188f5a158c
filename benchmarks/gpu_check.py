"""One command for a GPU: the network and dense paths timed on a real brain pair, written to one JSON file.

Run it first whenever a GPU is lent (it is sized to finish within about 8 minutes on one H100):

    python benchmarks/gpu_check.py                 # device cuda, the real brain pair
    python benchmarks/gpu_check.py --smoke         # the CPU, tiny inputs, seconds (the test suite runs it)

Sections (each is timed, with the device synchronised before every clock reading, and gets the
peak memory of the device: ``torch.cuda.max_memory_allocated`` after a reset on CUDA, the
process's peak resident size on the CPU; a failing section records its error and the others run):

* ``brain_mri_dense``: the whole ``dirio register --preset brain-mri`` command (start-up, reading,
  registration, every output) and its registration time (``optimisation_seconds`` of metrics.json);
* ``lapirn_direct``: ``--method network`` (one LapIRN forward pass), in process;
* ``nio``: ``--method nio`` with the paper's full schedule [100, 60, 30];
* ``io_pcgrad_50``: ``--method network-io --combine pcgrad``, 50 steps;
* ``train``: ``dirio train`` (the default U-Net) with ``--amp off`` and ``--amp bf16`` from the same
  seed: pairs per second of each and the validation Dice difference autocast makes;
* ``torchrun``: ``dirio train`` launched by ``torchrun --nproc-per-node 1``, and a one-process
  NCCL group (gloo on the CPU) that all-reduces a tensor on the device.

The pair: the voxelmorph scan <- OASIS subject A on its grid (160x192x224, 13 classes, out of
LapIRN's training domain, ``--network-axes voxelmorph-grid``); with ``--smoke`` two 32^3 blobs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

import _common as C
from dirio.io.atomic import write_json

NAME = "gpu_check"
GRID = C.DATA / "c2fvit-oasis-brain" / "on-voxelmorph-grid"
PAIR_FILES = {"fixed": C.DATA / "voxelmorph-brain" / "test_scan_vol.nii.gz", "moving": GRID / "image_A.nii.gz",
              "fixed_labels": GRID / "voxelmorph_seg13.nii.gz", "moving_labels": GRID / "image_A_seg13.nii.gz"}
LABELS = tuple(range(1, 14))
AXES = "voxelmorph-grid"
SMOKE_SHAPE = (32, 32, 32)

#: Budgets of the sections: (full run, --smoke).
BUDGETS = {
    "nio_iterations": ((100, 60, 30), (2, 1, 1)),
    "io_steps": ((50,), (2,)),
    "train": ({"epochs": 2, "steps_per_epoch": 25, "val_pairs": 2},
              {"epochs": 1, "steps_per_epoch": 2, "val_pairs": 1}),
    "dense_iterations": (None, (3, 2, 1)),
}
SMOKE_UNET = "encoder_channels=4/8,decoder_channels=8/8,final_channels=4"


# --- measuring ---------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        C.reset_peak_rss()


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return C.process_peak_rss_mb()


class Timed:
    """Wall seconds of a block, with the device synchronised at both ends, and its peak memory."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        synchronize(self.device)
        reset_peak(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
        self.peak_memory_mb = peak_mb(self.device)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- inputs ------------------------------------------------------------------------------------


def smoke_pair() -> dict:
    """Two 32^3 blobs (the moving one shifted by 2 voxels) with 2 labels each."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in SMOKE_SHAPE], indexing="ij"))

    def blob(shift):
        centre = np.array([n / 2 + shift for n in SMOKE_SHAPE], dtype=np.float32).reshape(3, 1, 1, 1)
        r2 = (((grid - centre) / 6.0) ** 2).sum(0)
        return np.exp(-r2).astype(np.float32), ((r2 < 1.0).astype(np.int16) + (r2 < 0.3)).astype(np.int16)

    fixed, fixed_labels = blob(0.0)
    moving, moving_labels = blob(2.0)
    return {"fixed": fixed, "moving": moving, "fixed_labels": fixed_labels, "moving_labels": moving_labels,
            "labels": (1, 2), "axes": "identity"}


def brain_pair() -> dict:
    import nibabel as nib

    arrays = {key: np.asarray(nib.load(C.require(path, NAME)).dataobj) for key, path in PAIR_FILES.items()}
    return {"fixed": arrays["fixed"].astype(np.float32), "moving": arrays["moving"].astype(np.float32),
            "fixed_labels": arrays["fixed_labels"].astype(np.int16),
            "moving_labels": arrays["moving_labels"].astype(np.int16), "labels": LABELS, "axes": AXES}


def write_pair(pair: dict, folder: Path) -> dict:
    """The pair as NIfTI files (1 mm, identity affine) for the command-line sections."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        paths[key] = folder / f"{key}.nii.gz"
        nib.save(nib.Nifti1Image(pair[key], np.eye(4)), paths[key])
    return paths


def dice(disp: np.ndarray, pair: dict) -> float:
    from dirio.api import apply_field
    from dirio.evaluation.overlap import dice_per_label, mean_dice

    warped = apply_field(pair["moving_labels"], disp, labels=True)
    return mean_dice(dice_per_label(pair["fixed_labels"], warped, pair["labels"], moving_labels=pair["moving_labels"]))


def folding_percent(disp: np.ndarray) -> float:
    from dirio.evaluation.jacobian import fraction_nonpositive_jacobian

    return 100.0 * fraction_nonpositive_jacobian(disp)


# --- sections ----------------------------------------------------------------------------------


def run_command(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    wall, completed = C.run_timed(command)
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout)[-2000:]
        raise RuntimeError(f"exit status {completed.returncode}: {' '.join(command[:4])} ...\n{tail}")
    return wall, completed


def section_brain_mri_dense(ctx) -> dict:
    out = ctx.work / "dense"
    command = [*C.dirio_command(), "register", str(ctx.files["fixed"]), str(ctx.files["moving"]), "-o", str(out),
               "--preset", "brain-mri", "--device", ctx.device_name, "--fixed-labels", str(ctx.files["fixed_labels"]),
               "--moving-labels", str(ctx.files["moving_labels"]), "--overwrite", "-q"]
    iterations = BUDGETS["dense_iterations"][ctx.smoke]
    if iterations:
        command += ["--iterations", ",".join(map(str, iterations))]
    wall, _ = run_command(command)
    metrics = json.loads((out / "metrics.json").read_text())
    return {"command_seconds": wall, "registration_seconds": metrics["optimisation_seconds"],
            "command_total_seconds_in_process": metrics.get("total_seconds"),
            "peak_memory_mb": metrics["peak_memory_mb"], "dice": metrics["after"].get("dice_mean"),
            "dice_before": metrics["before"].get("dice_mean"), "device": metrics["device"]}


def _network_section(ctx, **overrides) -> dict:
    from dirio.api import register

    pair = ctx.pair
    register(pair["fixed"][:8, :8, :8], pair["moving"][:8, :8, :8], method="network", network_axes=pair["axes"],
             device=ctx.device_name, progress=False)  # loads the model and warms the device up
    with Timed(ctx.device) as timer:
        result = register(pair["fixed"], pair["moving"], device=ctx.device_name, progress=False,
                          network_axes=pair["axes"], **overrides)
    return {"seconds": timer.seconds, "optimisation_seconds": result.seconds, "peak_memory_mb": timer.peak_memory_mb,
            "steps": len(result.history), "dice": dice(result.disp, pair),
            "det_nonpositive_percent": folding_percent(result.disp), "device": result.device}


def section_lapirn_direct(ctx) -> dict:
    return _network_section(ctx, method="network")


def section_nio(ctx) -> dict:
    return _network_section(ctx, method="nio", network_iterations=BUDGETS["nio_iterations"][ctx.smoke])


def section_io_pcgrad_50(ctx) -> dict:
    return _network_section(ctx, method="network-io", combine="pcgrad",
                            network_iterations=BUDGETS["io_steps"][ctx.smoke])


def _train_command(ctx, out: Path, amp: str, launcher: list[str] | None = None) -> list[str]:
    budget = BUDGETS["train"][ctx.smoke]
    files = ctx.files
    command = [*(launcher or C.dirio_command()), "train", str(files["fixed"]), str(files["moving"]),
               "--labels", str(files["fixed_labels"]), str(files["moving_labels"]),
               "--val-images", str(files["fixed"]), str(files["moving"]),
               "--val-labels", str(files["fixed_labels"]), str(files["moving_labels"]),
               "--epochs", str(budget["epochs"]), "--steps-per-epoch", str(budget["steps_per_epoch"]),
               "--val-pairs", str(budget["val_pairs"]), "--amp", amp, "--seed", "0",
               "--device", ctx.device_name, "-o", str(out), "--overwrite", "-q"]
    if ctx.smoke:
        command += ["--network-options", SMOKE_UNET]
    return command


def _train_record(out: Path) -> dict:
    record = json.loads((out / "train.json").read_text())
    last = record["epochs"][-1]
    rates = [epoch["pairs_per_second"] for epoch in record["epochs"]]
    return {"pairs_per_second": rates[-1], "pairs_per_second_per_epoch": rates,
            "val_dice": last.get("val_dice"), "seconds": record["seconds"], "world_size": record["world_size"],
            "device": record["device"]}


def section_train(ctx) -> dict:
    """``dirio train`` with and without autocast, in this process (so that its peak memory is known).

    ``pairs_per_second`` is the last epoch's (the first includes the warm-up); ``dice_difference`` is
    the validation Dice with bf16 autocast minus without, from the same seed and batches.
    """
    from dirio.apps.cli import main as dirio_main

    runs = {}
    for amp in ("off", "bf16"):
        out = ctx.work / f"train_{amp}"
        command = _train_command(ctx, out, amp, launcher=["dirio"])
        with Timed(ctx.device) as timer:
            code = dirio_main(command[1:])
        if code != 0:
            raise RuntimeError(f"dirio train --amp {amp} exited with {code}")
        runs[amp] = {"command_seconds_in_process": timer.seconds, "peak_memory_mb": timer.peak_memory_mb,
                     **_train_record(out)}
    off, bf16 = runs["off"]["val_dice"], runs["bf16"]["val_dice"]
    return {"fp32": runs["off"], "bf16": runs["bf16"],
            "speed_up": runs["bf16"]["pairs_per_second"] / runs["off"]["pairs_per_second"],
            "dice_difference": None if off is None or bf16 is None else bf16 - off,
            "peak_memory_mb": max(runs["off"]["peak_memory_mb"], runs["bf16"]["peak_memory_mb"])}


_NCCL_SCRIPT = """\
import os, sys, torch, torch.distributed as dist
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if sys.argv[1] == "nccl" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
dist.init_process_group(sys.argv[1])
value = torch.full((4,), float(dist.get_rank() + 1), device=device)
dist.all_reduce(value)
dist.barrier()
print("ALLREDUCE", dist.get_backend(), dist.get_world_size(), float(value.sum()))
dist.destroy_process_group()
"""


def section_torchrun(ctx) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port())]
    backend = "nccl" if ctx.device.type == "cuda" else "gloo"
    script = ctx.work / "allreduce.py"
    script.write_text(_NCCL_SCRIPT)
    wall_group, completed = run_command([*launcher, str(script), backend])
    line = [x for x in completed.stdout.splitlines() if x.startswith("ALLREDUCE")]
    if not line:
        raise RuntimeError(f"the {backend} all-reduce printed nothing:\n{completed.stdout[-1000:]}")
    _, used, world, total = line[-1].split()
    if used != backend or int(world) != 1 or float(total) != 4.0:
        raise RuntimeError(f"all-reduce gave backend {used}, world {world}, sum {total} (expected {backend}, 1, 4.0)")
    out = ctx.work / "train_torchrun"
    launcher[-1] = str(free_port())
    wall_train, _ = run_command(_train_command(ctx, out, "auto", [*launcher, "-m", "dirio"]))
    return {"backend": used, "world_size": int(world), "group_seconds": wall_group, "train_command_seconds": wall_train,
            "train": _train_record(out),
            "peak_memory_mb": None, "note": "separate processes: their peak memory is not measured here"}


SECTIONS = {
    "brain_mri_dense": section_brain_mri_dense,
    "lapirn_direct": section_lapirn_direct,
    "nio": section_nio,
    "io_pcgrad_50": section_io_pcgrad_50,
    "train": section_train,
    "torchrun": section_torchrun,
}


class Context:
    def __init__(self, device_name: str, smoke: bool, work: Path):
        self.device_name = device_name
        self.device = torch.device(device_name)
        self.smoke = int(bool(smoke))
        self.work = work
        self.pair = smoke_pair() if smoke else brain_pair()
        self.files = write_pair(self.pair, work / "pair")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny inputs and budgets on the CPU (seconds): "
                        "checks that every section runs; the numbers are not results")
    parser.add_argument("--device", help="default: cuda, or cpu with --smoke")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--out", type=Path, default=C.OUT_ROOT / NAME / "gpu_check.json", help="the JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    device_name = args.device or ("cpu" if args.smoke else "cuda")
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        print(f"{NAME}: no CUDA device here; run it on a GPU machine, or use --smoke on the CPU", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.sections.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    start = time.perf_counter()
    record = {"benchmark": NAME, "smoke": args.smoke, "command": [sys.executable, *sys.argv],
              "machine": C.machine_info(device_name), "versions": C.software_versions(), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="dirio_gpu_check_") as tmp:
        ctx = Context(device_name, args.smoke, Path(tmp))
        for name in names:
            print(f"[{NAME}] {name} ...", file=sys.stderr, flush=True)
            section_start = time.perf_counter()
            try:
                result = {"ok": True, **SECTIONS[name](ctx)}
            except Exception as error:  # a failing section is recorded; the others still run
                result = {"ok": False, "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc(limit=5)}
            result["section_seconds"] = time.perf_counter() - section_start
            record["sections"][name] = result
            record["total_seconds"] = time.perf_counter() - start
            write_json(args.out, record, overwrite=True)  # after every section: partial results survive
            print(json.dumps({name: result}, default=str), flush=True)
    failed = [n for n, r in record["sections"].items() if not r["ok"]]
    print(f"wrote {args.out}; {len(names) - len(failed)}/{len(names)} sections ok"
          + (f", failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
