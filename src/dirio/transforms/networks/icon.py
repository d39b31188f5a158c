"""uniGradICON / multiGradICON (Tian et al.; Demir et al.) as dirio networks, when their packages are installed.

Optional: ``pip install "dirio[icon]"`` (``icon_registration`` and ``unigradicon``). The
architecture is built here with the packages' own constructor (``unigradicon.make_network``: four
U-Nets at 1/4, 1/2, 1 and 1 resolution, composed), never by their download helper; the weights
come from a file the user names (``--model Step_2_final.trch --network-architecture unigradicon``).

Contract of the adapter (:class:`ICONNetwork`), dirio's network contract:
``forward(fixed, moving) -> (B, 3, *S)`` displacement in voxels of the input grid, pull
convention. ICON's convention is ``A o phi_AB ~ B`` with coordinates in [0, 1] along each axis
(component ``d`` belongs to spatial axis ``d``): dirio's ``moving`` is ICON's ``A`` and ``fixed``
its ``B``. The network needs inputs of exactly its ``input_shape`` (175^3 for uniGradICON): the
adapter resamples the images to it *inside the network* (as LapIRN pads internally) and brings
the field back to the input grid; the user's images are not changed. Images are expected in [0, 1]
(uniGradICON's preprocessing). The model registers both ways, so GradICON's inverse-consistency
regularizer (``--network-regularizer gradicon``) applies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dirio.errors import DirioError

#: Architectures the adapter builds: name -> input shape of the network.
ICON_ARCHITECTURES = {"unigradicon": (175, 175, 175), "multigradicon": (175, 175, 175)}


def icon_available() -> bool:
    """Whether ``icon_registration`` and ``unigradicon`` can be imported."""
    try:
        import icon_registration  # noqa: F401
        import unigradicon  # noqa: F401
    except ImportError:
        return False
    return True


def _require_icon() -> None:
    if not icon_available():
        raise DirioError("the uniGradICON adapter needs the optional packages icon_registration and unigradicon: "
                         'pip install "dirio[icon]"')


class ICONNetwork(nn.Module):
    """An ICON registration network (``regis_net``) behind dirio's network contract (module docstring).

    Args:
        regis_net: the ICON module (its identity maps assigned for ``input_shape``).
        input_shape: the spatial shape the network takes.
        architecture: registry name (``unigradicon``...).
    """

    #: spatial dimensions of the images it takes (3D only)
    ndim = 3

    def __init__(self, regis_net: nn.Module, input_shape: Sequence[int], architecture: str = "unigradicon"):
        super().__init__()
        self.regis_net = regis_net
        self.input_shape = tuple(int(n) for n in input_shape)
        self.architecture = architecture

    @property
    def settings(self) -> dict:
        return {"input_shape": list(self.input_shape)}

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` images in [0, 1] -> ``(B, 3, *S)`` displacement in voxels of ``S``."""
        shape = tuple(fixed.shape[2:])
        if len(shape) != 3:
            raise ValueError(f"the ICON adapter takes 3D images (B, 1, D, H, W), got {tuple(fixed.shape)}")

        def to_network(image):
            return image if shape == self.input_shape else F.interpolate(
                image, size=self.input_shape, mode="trilinear", align_corners=True)

        phi = self.regis_net(to_network(moving), to_network(fixed))  # ICON: A = moving, B = fixed
        identity = self.regis_net.identity_map
        disp = phi(identity) - identity  # (B, 3, *input_shape) in units of the axis length
        if shape != self.input_shape:
            disp = F.interpolate(disp, size=shape, mode="trilinear", align_corners=True)
        scale = torch.tensor([n - 1 for n in shape], device=disp.device, dtype=disp.dtype)
        return disp * scale.view(1, 3, 1, 1, 1)


def build_icon_architecture(architecture: str = "unigradicon", input_shape: Sequence[int] | None = None) -> ICONNetwork:
    """The ICON architecture with random weights (the packages' constructor, no download)."""
    _require_icon()
    if architecture not in ICON_ARCHITECTURES:
        raise DirioError(f"unknown ICON architecture {architecture!r}; choose one of {', '.join(ICON_ARCHITECTURES)}")
    from unigradicon import make_network

    shape = tuple(input_shape or ICON_ARCHITECTURES[architecture])
    wrapper = make_network([1, 1, *shape], include_last_step=True)
    return ICONNetwork(wrapper.regis_net, shape, architecture)


def build_icon_network(architecture: str, weights: str | Path, device: str | torch.device = "cpu",
                       input_shape: Sequence[int] | None = None) -> ICONNetwork:
    """The ICON architecture with the weights of a file (``Step_2_final.trch`` of uniGradICON's releases).

    Raises:
        DirioError: one line naming a missing file, missing packages, or weights that do not fit.
    """
    path = Path(weights).expanduser()
    if not path.is_file():
        raise DirioError(f"{path}: {architecture} weights not found (--model)")
    network = build_icon_architecture(architecture, input_shape)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.regis_net.load_state_dict(state)
    except Exception as error:  # noqa: BLE001 - any unreadable or mismatching file is the user's to fix
        raise DirioError(f"{path}: not {architecture} weights: {str(error).splitlines()[0]}") from None
    return network.to(device).eval()
