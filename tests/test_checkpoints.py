"""Network checkpoints: dirio's format round-trips bit for bit, loads weights-only, and every wrong
file is a one-line DirioError naming the file and the problem; the packaged brain model loads."""

from __future__ import annotations

import pytest
import torch

from dirio.errors import DirioError
from dirio.io.checkpoints import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from dirio.transforms.networks import build_network
from dirio.transforms.networks import NETWORKS, LapIRN, UNet, default_brain_model
from dirio.transforms.networks import lapirn as lapirn_module
from dirio.transforms.networks import registry as registry_module

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = dict(ndim=2, encoder_channels=(4, 8), decoder_channels=(8, 8), final_channels=(8,), init_std=0.1)


def _images(shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *shape, generator=generator), torch.rand(1, 1, *shape, generator=generator)


def _one_line_naming(info, *parts):
    message = str(info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: UNet(**TINY_UNET), (12, 10)),
        (lambda: UNet(field="velocity", **TINY_UNET), (12, 10)),
        (lambda: LapIRN(start_channel=1), (8, 8, 8)),
        (lambda: LapIRN(diffeomorphic=True, start_channel=1, integration_steps=5), (8, 8, 8)),
    ],
)
def test_round_trip_gives_bit_identical_outputs(tmp_path, make, shape):
    """save_checkpoint then build_network rebuilds the architecture from its settings and gives
    exactly the same field."""
    torch.manual_seed(0)
    model = make().eval()
    fixed, moving = _images(shape)
    path = tmp_path / "net.pt"
    save_checkpoint(path, model, extra={"note": "test", "losses": [1.0, 0.5]})
    rebuilt = build_network(path)
    assert type(rebuilt) is type(model) and rebuilt.settings == model.settings
    with torch.no_grad():
        assert torch.equal(rebuilt(fixed, moving), model(fixed, moving))


def test_file_is_the_documented_dict_and_loads_weights_only(tmp_path):
    """The file is {format, version, architecture, settings, state_dict, extra}, readable with
    torch.load(weights_only=True), and load_checkpoint returns the same dict."""
    model = UNet(**TINY_UNET)
    path = tmp_path / "net.pt"
    save_checkpoint(path, model, "unet", model.settings, extra={"epoch": 3})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"format", "version", "architecture", "settings", "state_dict", "extra"}
    assert raw["format"] == CHECKPOINT_FORMAT and raw["version"] == 1 and raw["architecture"] == "unet"
    assert raw["extra"] == {"epoch": 3}
    loaded = load_checkpoint(path)
    assert loaded["settings"] == model.settings
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in model.state_dict().items())
    assert set(NETWORKS.names()) >= {"lapirn-disp", "lapirn-diff", "unet"}


def test_wrong_architecture_is_a_one_line_error_naming_the_keys(tmp_path):
    """A U-Net file read as LapIRN: by name when asked for another architecture, and by its keys
    when the file claims an architecture its weights do not fit."""
    model = UNet(**TINY_UNET)
    path = tmp_path / "unet.pt"
    save_checkpoint(path, model)
    with pytest.raises(DirioError) as info:
        build_network(path, architecture="lapirn-disp")
    _one_line_naming(info, "unet.pt", "'unet'", "'lapirn-disp'")

    mislabelled = tmp_path / "mislabelled.pt"
    save_checkpoint(mislabelled, model, architecture="lapirn-disp", settings={"start_channel": 1})
    with pytest.raises(DirioError) as info:
        build_network(mislabelled)
    _one_line_naming(info, "mislabelled.pt", "missing keys levels.0.encoder.0.weight", "unexpected keys encoder.0.conv.weight", "more)")


def test_settings_an_architecture_does_not_take_are_an_error(tmp_path):
    path = tmp_path / "net.pt"
    save_checkpoint(path, LapIRN(start_channel=1), architecture="lapirn-disp", settings={"start_channel": 1, "depth": 4})
    with pytest.raises(DirioError) as info:
        build_network(path)
    _one_line_naming(info, "net.pt", "depth")


def test_missing_and_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(DirioError) as info:
        load_checkpoint(tmp_path / "absent.pt")
    _one_line_naming(info, "absent.pt", "no such")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(DirioError) as info:
        build_network(garbage)
    _one_line_naming(info, "garbage.pt", "not a readable")
    good = tmp_path / "good.pt"
    save_checkpoint(good, UNet(**TINY_UNET))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DirioError) as info:
        build_network(truncated)
    _one_line_naming(info, "truncated.pt", "damaged or truncated")
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(DirioError) as info:
        load_checkpoint(other)
    _one_line_naming(info, "other.pt", "unknown layout", "weight")


def test_saving_refuses_to_overwrite_and_non_plain_settings(tmp_path):
    model = UNet(**TINY_UNET)
    path = tmp_path / "net.pt"
    save_checkpoint(path, model)
    with pytest.raises(DirioError, match="exists"):
        save_checkpoint(path, model)
    save_checkpoint(path, model, overwrite=True)
    with pytest.raises(ValueError, match="settings"):
        save_checkpoint(tmp_path / "bad.pt", model, "unet", {"ndim": object()})


def test_packaged_brain_model_loads_and_a_missing_file_is_a_one_line_error(monkeypatch, tmp_path):
    """default_brain_model() is upstream's LapIRN_disp_fea7 (start_channel 7) from the package data."""
    model = default_brain_model()
    assert isinstance(model, LapIRN) and model.architecture == "lapirn-disp" and model.start_channel == 7
    assert sum(p.numel() for p in model.parameters()) == 923_748
    assert (lapirn_module.PRETRAINED_DIR / "LICENSE.md").is_file()
    monkeypatch.setattr(registry_module, "DEFAULT_BRAIN_WEIGHTS", tmp_path / "LapIRN_disp_fea7.pth")
    with pytest.raises(DirioError) as info:
        registry_module.default_brain_model()
    _one_line_naming(info, "LapIRN_disp_fea7.pth", "missing")
