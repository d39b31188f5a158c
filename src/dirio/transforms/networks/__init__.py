"""Registration networks (LapIRN, a VoxelMorph-style U-Net) and the registry that builds them by name.

Every network takes ``forward(fixed, moving)`` and returns a ``(B, ndim, *S)`` displacement in
voxels of the fixed grid (dirio's pull convention), pads its input internally to the size it needs,
and has ``architecture`` and ``settings`` attributes, so that :mod:`dirio.io.checkpoints` can save it
and :data:`NETWORKS` can rebuild it.
"""

from __future__ import annotations

from dirio.transforms.networks.lapirn import LapIRN
from dirio.transforms.networks.registry import NETWORKS, build_network, default_brain_model
from dirio.transforms.networks.unet import UNet

__all__ = ["NETWORKS", "LapIRN", "UNet", "build_network", "default_brain_model"]
