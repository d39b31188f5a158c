"""``dirio train``: the run folder, resuming after SIGKILL, refusing another network on resume, torchrun.

Tiny 2D images (24x24 blobs with two-label maps), a U-Net of 4 channels, a few steps per epoch.
"""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dirio.apps.cli import main
from dirio.transforms.networks import UNet

REPO = Path(__file__).resolve().parents[1]
NETWORK = "encoder_channels=4/4,decoder_channels=4/4,final_channels=4/,init_std=0.01"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-images")
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(np.arange(24.0), np.arange(24.0), indexing="ij"))
    for i in range(4):
        centre = 12 + rng.uniform(-2.5, 2.5, 2)
        distance = np.sqrt(((grid - centre[:, None, None]) ** 2).sum(0))
        image = np.clip(1.2 - distance / 6, 0, 1) + 0.3 * (distance < 3)
        labels = (distance < 6).astype(np.int16) + (distance < 3)
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), folder / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), folder / f"lab{i}.nii.gz")
    return folder


def arguments(images, out, *extra, network=NETWORK):
    return ["train", str(images / "img*.nii.gz"), "--labels", str(images / "lab*.nii.gz"), "-o", str(out),
            "--ndim", "2", "--val-count", "1", "--val-pairs", "2", "--batch-size", "2", "--lr", "1e-2",
            "--network-options", network, "--combine", "pcgrad", "--threads", "1", "-q", *extra]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(*args):
    return [sys.executable, "-m", "dirio", *args]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}


OPTIONS = ("--epochs", "3", "--steps-per-epoch", "6")


@pytest.fixture(scope="module")
def whole(images, tmp_path_factory):
    """An uninterrupted run (3 epochs of 6 steps, pcgrad, validation Dice on a held-out image)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    assert main(arguments(images, out, *OPTIONS)) == 0
    return out


def test_the_run_folder_has_checkpoints_history_curves_and_the_configuration(whole):
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "history.csv", "epochs.csv", "train.json",
                 "loss_curves.png"):
        assert (whole / name).is_file(), name
    record = json.loads((whole / "train.json").read_text())
    assert record["network"]["architecture"] == "unet" and record["config"]["combine"] == "pcgrad"
    assert record["best_epoch"] in (0, 1, 2) and 0 <= record["best_dice"] <= 1
    epochs = list(csv.DictReader((whole / "epochs.csv").open()))
    assert len(epochs) == 3 and "val_dice" in epochs[0] and "val_folding_percent" in epochs[0]
    assert len(list(csv.DictReader((whole / "history.csv").open()))) == 18
    checkpoint = torch.load(whole / "checkpoint_last.pt", weights_only=True)
    assert checkpoint["architecture"] == "unet"
    assert checkpoint["extra"]["training"]["metadata"]["options"]["similarity"] == "lncc"


def test_a_run_killed_after_its_first_checkpoint_resumes_with_the_same_seeded_losses(images, whole, tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(*arguments(images, killed, *OPTIONS)), env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint_last.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    stopped_at = torch.load(killed / "checkpoint_last.pt", weights_only=True)["extra"]["training"]["epoch"]
    assert stopped_at < 2  # killed before the end
    assert main(arguments(images, killed, *OPTIONS, "--resume")) == 0
    record = json.loads((killed / "train.json").read_text())
    assert record["resumed_from_epoch"] == stopped_at
    # every loss, diagnostic and learning rate of every step, as text
    assert (killed / "history.csv").read_text() == (whole / "history.csv").read_text()
    expected = torch.load(whole / "checkpoint_last.pt", weights_only=True)["state_dict"]
    resumed = torch.load(killed / "checkpoint_last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_resuming_with_another_network_is_a_one_line_error(images, whole, tmp_path, capsys):
    shutil.copytree(whole, tmp_path / "run")
    code = main(arguments(images, tmp_path / "run", *OPTIONS, "--resume",
                          network="encoder_channels=8/8,decoder_channels=4/4,final_channels=4/"))
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1
    assert "checkpoint_last.pt: holds a unet network" in error and "encoder_channels=[4, 4]" in error
    assert "--architecture" in error and "--network-options" in error


def test_resuming_with_other_options_is_a_one_line_error(images, whole, tmp_path, capsys):
    shutil.copytree(whole, tmp_path / "run")
    assert main(arguments(images, tmp_path / "run", *OPTIONS, "--resume", "--seed", "3")) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "--seed" in error


def test_an_existing_run_is_not_replaced_without_resume_or_overwrite(images, whole, capsys):
    assert main(arguments(images, whole, *OPTIONS)) == 2
    assert "--resume" in capsys.readouterr().err


def test_torchrun_with_two_gloo_processes_matches_one_process(images, tmp_path):
    # SGD (Adam turns float32 rounding differences of near-zero gradient entries into full steps);
    # tolerance 5e-5 on every weight after 4 steps that move the weights by more than 1e-3.
    options = ("--epochs", "2", "--steps-per-epoch", "2", "--optimizer", "sgd", "--lr", "0.5", "--combine", "surgery")
    assert main(arguments(images, tmp_path / "one", *options)) == 0
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "dirio",
                             *arguments(images, tmp_path / "two", *options)],
                            env=environment(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "train.json").read_text())["world_size"] == 2
    one = torch.load(tmp_path / "one" / "checkpoint_last.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint_last.pt", weights_only=True)
    torch.manual_seed(0)  # the network's initial weights: seeded by --seed (0)
    initial = UNet(ndim=2, encoder_channels=(4, 4), decoder_channels=(4, 4), final_channels=(4,),
                   init_std=0.01).state_dict()
    moved = max(float((one["state_dict"][k] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-3
    for name, value in one["state_dict"].items():
        gap = float((value - two["state_dict"][name]).abs().max())
        assert gap < 5e-5, (name, gap)
