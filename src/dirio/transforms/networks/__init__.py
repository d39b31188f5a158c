"""Registration networks (LapIRN, a VoxelMorph-style U-Net) and the registry that builds them by name.

Every network takes ``forward(fixed, moving)`` and returns a ``(B, ndim, *S)`` displacement in
voxels of the fixed grid (dirio's pull convention), pads its input internally to the size it needs,
and has ``architecture`` and ``settings`` attributes, so that :mod:`dirio.io.checkpoints` can save it
and :data:`NETWORKS` can rebuild it.
"""

from __future__ import annotations

from dirio.core.registry import Registry
from dirio.transforms.networks.lapirn import INTEGRATION_STEPS, RANGE_FLOW, LapIRN, default_brain_model
from dirio.transforms.networks.unet import UNet

__all__ = ["NETWORKS", "LapIRN", "UNet", "default_brain_model"]

#: Architecture name -> factory taking the checkpoint's ``settings``.
NETWORKS: Registry = Registry("network architecture")


@NETWORKS.register("lapirn-disp")
def lapirn_disp(start_channel: int = 7, range_flow: float = RANGE_FLOW) -> LapIRN:
    """LapIRN predicting displacements (upstream ``LapIRN_disp``)."""
    return LapIRN(diffeomorphic=False, start_channel=start_channel, range_flow=range_flow)


@NETWORKS.register("lapirn-diff")
def lapirn_diff(
    start_channel: int = 7, range_flow: float = RANGE_FLOW, integration_steps: int = INTEGRATION_STEPS
) -> LapIRN:
    """LapIRN predicting stationary velocities integrated by scaling and squaring (upstream ``LapIRN_diff``)."""
    return LapIRN(diffeomorphic=True, start_channel=start_channel, range_flow=range_flow, integration_steps=integration_steps)


NETWORKS.register("unet", UNet)
