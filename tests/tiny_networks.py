"""A tiny registration CNN for engine tests: reads the pair, predicts a 2D field (voxels)."""

import torch
from torch import nn


class TinyRegistrationNet(nn.Module):
    """Two 3x3 convolutions on the concatenated pair, then a 2-channel field head.

    Follows the network contract of :mod:`dirio.transforms.network`: ``forward(fixed, moving)``
    returns a ``(B, 2, H, W)`` displacement in voxels. ``scale`` sets the field's amplitude.
    """

    def __init__(self, width: int = 8, scale: float = 2.0, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(2, width, 3, padding=1), nn.LeakyReLU(0.2),
                                  nn.Conv2d(width, width, 3, padding=1), nn.LeakyReLU(0.2))
        self.head = nn.Conv2d(width, 2, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
            self.head.weight.mul_(0.1)
            self.head.bias.zero_()
        self.scale = scale

    def forward(self, fixed, moving):
        return self.scale * self.head(self.body(torch.cat([fixed, moving], dim=1)))


def blob_pair(batch: int = 1, size: int = 24, shift: float = 1.5, seed: int = 0, jitter: float = 0.0):
    """``batch`` 2D pairs: a Gaussian blob (moving) and the same blob moved by ``shift`` voxels along axis 0
    (plus a uniform random ``[-jitter, jitter]`` per pair)."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij"))
    fixed, moving = [], []
    for _ in range(batch):
        centre = size / 2 + torch.rand(2, generator=generator) * 2 - 1
        width = 20.0 + 10.0 * float(torch.rand(1, generator=generator))
        moving.append(torch.exp(-((grid - centre[:, None, None]) ** 2).sum(0) / width))
        offset = shift + jitter * (2 * float(torch.rand(1, generator=generator)) - 1)
        moved = centre - torch.tensor([offset, 0.0])
        fixed.append(torch.exp(-((grid - moved[:, None, None]) ** 2).sum(0) / width))
    return torch.stack(fixed)[:, None], torch.stack(moving)[:, None]


def upstream_lapirn_layout(state_dict) -> dict:
    """dirio's LapIRN state dict back to the upstream code's nested key layout (the key tables of
    :mod:`dirio.transforms.networks.lapirn`), as an upstream ``.pth`` file holds it."""
    from dirio.transforms.networks import lapirn as lapirn_module

    prefixes = {index: prefix for prefix, index in lapirn_module._UPSTREAM_LEVEL_PREFIXES}
    names = {new: old for old, new in lapirn_module._UPSTREAM_LAYER_NAMES.items()}
    out = {}
    for key, value in state_dict.items():
        _, index, layer, rest = key.split(".", 3)
        out[f"{prefixes[int(index)]}{names[layer]}.{rest}"] = value.clone()
    return out
