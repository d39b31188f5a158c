"""The uniGradICON adapter (optional packages ``icon_registration`` and ``unigradicon``): the architecture
is built locally with random weights, meets dirio's network contract (a field in voxels on the input
grid), takes a few instance-optimisation steps with GradICON's inverse-consistency regularizer and
has its weights restored; a missing weights file is a one-line error naming it."""

from __future__ import annotations

import pytest
import torch

from dirio.errors import DirioError
from dirio.transforms.networks.icon import build_icon_network, icon_available

pytestmark = [
    pytest.mark.skipif(not icon_available(), reason="optional packages icon_registration and unigradicon are not "
                       'installed (pip install "dirio[icon]")'),
    pytest.mark.usefixtures("one_thread"),
]

# The smallest cube the four U-Nets accept (two 2x downsamplings, then the U-Net's own).
INPUT = (80, 80, 80)


def test_random_weight_unigradicon_registers_a_small_pair_and_is_restored(tmp_path):
    from dirio.methods.network import NetworkConfig, NetworkStage, register_network
    from dirio.transforms.networks.icon import build_icon_architecture

    torch.manual_seed(0)
    network = build_icon_architecture("unigradicon", INPUT)
    weights = tmp_path / "random.trch"
    torch.save(network.regis_net.state_dict(), weights)
    model = build_icon_network("unigradicon", weights, input_shape=INPUT)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = torch.stack(torch.meshgrid(*[torch.arange(12.0)] * 3, indexing="ij"))
    fixed = torch.exp(-((grid - 6.0) ** 2).sum(0) / 8.0)[None, None]
    moving = torch.exp(-((grid - 7.0) ** 2).sum(0) / 8.0)[None, None]
    with torch.no_grad():
        disp = model(fixed, moving)
    assert disp.shape == (1, 3, 12, 12, 12) and torch.isfinite(disp).all()
    options = NetworkStage(mode="network-io", config=NetworkConfig(network_iterations=(1,), network_lr=1e-4,
                                                                     network_regularizer="gradicon"))
    result = register_network(fixed, moving, options, model=model, progress=False)
    assert len(result.history) == 1 and "gradicon" in result.history[0]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_missing_weights_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(DirioError, match="nothing.trch: unigradicon weights not found"):
        build_icon_network("unigradicon", tmp_path / "nothing.trch")
