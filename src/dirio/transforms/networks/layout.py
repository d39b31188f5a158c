"""Memory layout of a network's 3D convolution weights (faster CPU kernels, same maths).

PyTorch's oneDNN convolutions pick their kernel from the layout of the weight and the input. With
the weights of every 3D convolution in channels-last order (``torch.channels_last_3d``: the channel
is the fastest-varying axis), the activations follow, and a LapIRN forward and backward pass on
one 80 x 96 x 112 pair takes 9.7 instead of 13.0 CPU seconds on the 2-core development CPU (1
thread; benchmarks/RESULTS.md, Issue 21). The values are the same up to float32 summation order
(the field differs by at most 3e-5 voxels).

Only the storage order changes: shapes, ``state_dict`` keys and values, and checkpoints written
from the model are the same as before.
"""

from __future__ import annotations

import torch


def channels_last_3d(model: torch.nn.Module) -> torch.nn.Module:
    """Store every 5-D parameter of ``model`` (3D convolution weights) channels-last, in place.

    Args:
        model: any module; 2-D networks and other parameters are left as they are.
    Returns:
        ``model`` itself.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 5:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)
    return model


def is_channels_last_3d(model: torch.nn.Module) -> bool:
    """Whether every 5-D parameter of ``model`` is stored channels-last (``False`` when it has none)."""
    weights = [p for p in model.parameters() if p.dim() == 5]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
