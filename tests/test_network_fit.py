"""``dirio.methods.network_fit.coarse_fit``: the stage's similarity of the pair unregistered and warped
by the network's coarsest field, on the first level's loss grid; a field that undoes the pair's shift
fits, one that doubles it does not, and the identity's value is the similarity of the resized pair."""

from __future__ import annotations

import pytest
import torch

from dirio.core.fields import resize_image
from dirio.losses.similarity import make_similarity
from dirio.methods.network import NetworkConfig
from dirio.methods.network_fit import coarse_fit
from dirio.transforms.network import LevelwiseNetworkTransform

pytestmark = pytest.mark.usefixtures("one_thread")


class ShiftNetwork(torch.nn.Module):
    """A stand-in multi-level network: level 1 predicts a constant shift along axis 0 (voxels of its
    input grid), finer levels add nothing; it records the levels it was asked to run."""

    num_levels = 3

    def __init__(self, shift: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.shift = shift
        self.calls = []

    def level_parameters(self, k):
        return [self.weight]

    def forward(self, fixed, moving, levels=3):
        self.calls.append(levels)
        disp = torch.zeros(1, 3, *fixed.shape[2:])
        disp[:, 0] = self.shift
        return disp + self.weight


def blob(centre, size=24):
    axes = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij")
    return torch.exp(-sum(((a - c) / 5.0) ** 2 for a, c in zip(axes, centre)))[None, None]


@pytest.mark.parametrize("shift, fits", [(2.0, True), (-2.0, False)])
def test_the_coarsest_field_fits_when_it_aligns_the_pair_better_than_no_deformation(shift, fits):
    fixed, moving = blob((12, 12, 12)), blob((14, 12, 12))  # moving(x + 2 e0) = fixed(x)
    network = ShiftNetwork(shift)
    transform = LevelwiseNetworkTransform(network, schedule=(1, 2, 3), optimised=(1, 2, 3))
    similarity = NetworkConfig().terms()[0]
    result = coarse_fit(transform, similarity, fixed, moving, 2.0)
    assert result.fits is fits and network.calls == [1]  # only the coarsest level ran
    lncc = make_similarity("lncc", window=7)
    expected = float(lncc(resize_image(fixed, (12, 12, 12)), resize_image(moving, (12, 12, 12)), None))
    assert result.identity == pytest.approx(expected, abs=1e-6)
    assert (result.network < result.identity - 0.01) is fits  # by a clear margin either way
    assert result.record() == {"identity": result.identity, "network": result.network, "fits": fits}
    assert network.weight.grad is None  # no gradients, no weight change
