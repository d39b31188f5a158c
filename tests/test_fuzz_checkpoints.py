"""Fuzzing network checkpoints: damaged and foreign ``.pt`` / ``.pth`` files.

Every file given as a checkpoint must end one of two ways: a network is built whose weights are
finite and fit its architecture (a bit flip in the weights of a file without checksums can go
unnoticed, like in an uncompressed NIfTI), or it is refused with a one-line :class:`DirioError`
naming the file. Any other exception is a crash. No file is ever executed: a pickle whose loading
would run code (``__reduce__`` calling a function) leaves no trace of having run. The cases:

* truncations of a dirio checkpoint and of an upstream-layout LapIRN ``state_dict`` at a random length;
* 1 to 3 random bit flips anywhere in those files;
* foreign files: pickles that run code on load (plain pickle and inside ``torch.save``), a whole
  ``nn.Module`` saved by ``torch.save``, the legacy (non-zip) torch format, a NumPy ``.npy``, a
  zip archive of text, JSON, an empty file, a directory, and torch files holding a list, a tensor,
  or a dirio checkpoint whose entries have the wrong types.

Bounded: a fixed number of cases per kind on a tiny network, a few seconds in all.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

from dirio.errors import DirioError
from dirio.io.checkpoints import save_checkpoint
from dirio.transforms.networks import LapIRN, UNet, build_network
from tiny_networks import upstream_lapirn_layout

pytestmark = pytest.mark.usefixtures("one_thread")

CASES_PER_KIND = 40
TINY_UNET = dict(ndim=2, encoder_channels=(2, 2), decoder_channels=(2, 2), final_channels=(2,), init_std=0.1)


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that a file was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)




@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-checkpoints")
    torch.manual_seed(0)
    save_checkpoint(folder / "unet.pt", UNet(**TINY_UNET))
    torch.save(upstream_lapirn_layout(LapIRN(start_channel=1).state_dict()), folder / "LapIRN_disp.pth")
    return {"unet.pt": ((folder / "unet.pt").read_bytes(), None),
            "LapIRN_disp.pth": ((folder / "LapIRN_disp.pth").read_bytes(), "lapirn-disp")}


def _outcome(path, architecture=None) -> str:
    """``"built"`` or ``"refused"``; fails the test on a crash."""
    try:
        network = build_network(path, architecture=architecture)
    except DirioError as error:
        message = str(error)
        assert "\n" not in message and str(path) in message, message
        return "refused"
    assert all(bool(torch.isfinite(p).all()) for p in network.parameters())
    return "built"


@pytest.mark.parametrize("name", ["unet.pt", "LapIRN_disp.pth"])
def test_truncated_checkpoints_are_refused(originals, tmp_path, name):
    content, architecture = originals[name]
    rng = np.random.default_rng(1)
    outcomes = []
    for case, length in enumerate(rng.integers(0, len(content) - 1, CASES_PER_KIND)):
        path = tmp_path / f"{case}_{name}"
        path.write_bytes(content[:length])
        outcomes.append(_outcome(path, architecture))
    assert set(outcomes) == {"refused"}


@pytest.mark.parametrize("name", ["unet.pt", "LapIRN_disp.pth"])
def test_bit_flipped_checkpoints_build_finite_networks_or_are_refused(originals, tmp_path, name):
    content, architecture = originals[name]
    rng = np.random.default_rng(2)
    outcomes = []
    for case in range(CASES_PER_KIND):
        damaged = bytearray(content)
        for _ in range(int(rng.integers(1, 4))):
            damaged[int(rng.integers(0, len(damaged)))] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"{case}_{name}"
        path.write_bytes(bytes(damaged))
        outcomes.append(_outcome(path, architecture))
    assert "refused" in outcomes  # most flips break the zip structure, the pickle or the weights


def test_foreign_files_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed"
    files = {}

    def write(name, data: bytes):
        files[name] = tmp_path / name
        files[name].write_bytes(data)

    write("payload.pth", pickle.dumps({"state_dict": _Payload(str(marker))}))
    buffer = io.BytesIO()
    torch.save({"format": "dirio-network", "version": 1, "architecture": "unet", "settings": {},
                "state_dict": _Payload(str(marker))}, buffer)
    write("payload_in_torch.pt", buffer.getvalue())
    buffer = io.BytesIO()
    torch.save(UNet(**TINY_UNET), buffer)
    write("whole_module.pt", buffer.getvalue())
    buffer = io.BytesIO()
    torch.save(UNet(**TINY_UNET).state_dict(), buffer, _use_new_zipfile_serialization=False)
    write("legacy_unet_state.pth", buffer.getvalue())
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((3, 3)))
    write("array.pt", buffer.getvalue())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "not a checkpoint")
    write("archive.pt", buffer.getvalue())
    write("config.pt", json.dumps({"format": "dirio-network"}).encode())
    write("empty.pth", b"")
    for name, value in (("list.pt", [1, 2, 3]), ("tensor.pt", torch.zeros(3)),
                        ("wrong_types.pt", {"format": "dirio-network", "version": 1, "architecture": 7,
                                            "settings": "abc", "state_dict": [torch.zeros(1)]}),
                        ("int_keys.pth", {1: torch.zeros(1)})):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        write(name, buffer.getvalue())
    (tmp_path / "folder.pt").mkdir()
    files["folder.pt"] = tmp_path / "folder.pt"
    for name, path in files.items():
        assert _outcome(path) == "refused", name
    assert not marker.exists()
