"""3D convolution weights stored channels-last: same field, same checkpoint, on the CPU path."""

from __future__ import annotations

import pytest
import torch

from dirio.io.checkpoints import save_checkpoint
from dirio.methods.network import NetworkConfig, clear_model_cache, load_model
from dirio.transforms.networks import LapIRN, UNet
from dirio.transforms.networks.layout import channels_last_3d, is_channels_last_3d

pytestmark = pytest.mark.usefixtures("one_thread")


def lapirn(seed: int = 0) -> LapIRN:
    torch.manual_seed(seed)
    return LapIRN(start_channel=2)


def pair(shape=(20, 24, 28), seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *shape, generator=generator), torch.rand(1, 1, *shape, generator=generator)


def test_the_layout_changes_the_storage_order_not_the_values():
    model = lapirn()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    assert not is_channels_last_3d(model)
    assert channels_last_3d(model) is model and is_channels_last_3d(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    strides = [p.stride() for p in model.parameters() if p.dim() == 5]
    assert all(s[1] == 1 for s in strides)  # the channel is the fastest-varying axis


def unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(ndim=3, encoder_channels=(4, 8), decoder_channels=(8, 8), final_channels=(8,), init_std=0.1)


@pytest.mark.parametrize("build", [lapirn, unet], ids=["lapirn", "unet"])
def test_the_field_and_the_gradients_agree_with_the_contiguous_network(build):
    fixed, moving = pair(shape=(16, 20, 24))
    plain, fast = build(), channels_last_3d(build())
    assert is_channels_last_3d(fast)
    fields = []
    for model in (plain, fast):
        disp = model(fixed, moving)
        disp.square().mean().backward()
        fields.append(disp.detach())
    torch.testing.assert_close(fields[1], fields[0], rtol=0, atol=1e-5)
    for a, b in zip(plain.parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6)


def test_two_dimensional_networks_are_left_as_they_are():
    model = UNet(ndim=2)
    before = [p.stride() for p in model.parameters()]
    channels_last_3d(model)
    assert [p.stride() for p in model.parameters()] == before and not is_channels_last_3d(model)


def test_the_cpu_model_is_channels_last_and_saves_the_same_checkpoint(tmp_path):
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, lapirn())
    clear_model_cache()
    try:
        model = load_model(NetworkConfig(model=str(path)), torch.device("cpu"))
        assert is_channels_last_3d(model)
        again = tmp_path / "again.pt"
        save_checkpoint(again, model)
        saved, resaved = torch.load(path, weights_only=False), torch.load(again, weights_only=False)
        state, restate = saved["state_dict"], resaved["state_dict"]
        assert state.keys() == restate.keys() and all(torch.equal(state[k], restate[k]) for k in state)
    finally:
        clear_model_cache()
