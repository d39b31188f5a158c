"""The similarity contract: the :class:`Similarity` base class, input checks and masked averaging.

Contract shared by every similarity object (the optimisation engine codes against it):

* ``name``: short identifier (the factory name, see :mod:`dirio.losses.similarity`).
* ``features(image) -> features``: ``(B, C, *S) -> (B, C', *S)``, called once per pyramid level
  on the fixed and on the moving image. Intensity measures return the image itself; MIND returns
  its self-similarity descriptors. The engine warps the moving *features* every iteration.
* ``__call__(fixed_features, warped_features, mask=None) -> scalar``: the loss, **lower is
  better**. ``mask`` is an optional ``(B, 1, *S)`` (or ``(1, 1, *S)``) float weight in ``[0, 1]``
  on the fixed grid; it is treated as a constant (no gradient flows into it).

Masked averaging rule (all voxel-wise measures: LNCC, MSE, MIND): with per-voxel loss ``l(b, c, x)``
the loss is ``sum_{b,c,x} m(b, x) l(b, c, x) / (C * sum_{b,x} m(b, x))``, i.e. the mask-weighted
mean over batch, channels and voxels (the plain mean without a mask, and 0 when the mask is all
zero). Global measures (NCC, NMI) use the mask as voxel weights inside their statistics, compute
one value per batch element and channel, and average those values.

Everything works on 2D ``(B, C, H, W)`` and 3D ``(B, C, D, H, W)`` tensors, on the inputs'
device and dtype, and is differentiable with torch autograd.
"""

from __future__ import annotations

import inspect

import torch

__all__ = ["Similarity", "check_pair", "masked_mean"]


def check_pair(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Validate a similarity's inputs; return the mask as a constant tensor of ``warped``'s dtype.

    Args:
        fixed, warped: ``(B, C, *S)`` features of one shape, 2 or 3 spatial axes.
        mask: ``(B or 1, 1, *S)`` weights, or None.
    Returns:
        the mask, detached, on ``warped``'s device and dtype; None without a mask.
    Raises:
        ValueError: shapes differ, are not 4D / 5D, or the mask does not fit.
    """
    if fixed.shape != warped.shape:
        raise ValueError(f"fixed and warped features differ in shape: {tuple(fixed.shape)} vs {tuple(warped.shape)}")
    if fixed.dim() not in (4, 5):
        raise ValueError(f"expected (B, C, H, W) or (B, C, D, H, W) tensors, got shape {tuple(fixed.shape)}")
    if mask is None:
        return None
    batch_ok = mask.shape[0] in (1, fixed.shape[0])
    if mask.dim() != fixed.dim() or mask.shape[1] != 1 or mask.shape[2:] != fixed.shape[2:] or not batch_ok:
        expected = (1, *fixed.shape[2:])
        raise ValueError(f"mask must have shape (B or 1, {', '.join(map(str, expected))}), got {tuple(mask.shape)}")
    return mask.detach().to(device=warped.device, dtype=warped.dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mask-weighted mean over batch, channels and voxels (the averaging rule of the module docstring).

    Args:
        values: ``(B, C, *S)`` per-voxel losses.
        mask: ``(B or 1, 1, *S)`` weights in ``[0, 1]`` or None.
    Returns:
        scalar ``sum(m * v) / (C * sum_b m)``; the plain mean when ``mask`` is None; 0 for an
        all-zero mask.
    """
    if mask is None:
        return values.mean()
    batch, channels = values.shape[:2]
    total = mask.sum() * (batch // mask.shape[0]) * channels
    return (values * mask).sum() / total.clamp_min(torch.finfo(values.dtype).tiny)


# --- the contract ---------------------------------------------------------------------------------


class Similarity:
    """Base class: ``features`` is the identity; subclasses implement ``__call__``."""

    name = "similarity"

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, C, *S)``: intensity measures compare the images themselves."""
        return image

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self._options().items())
        return f"{type(self).__name__}({options})"

    def _options(self) -> dict:
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}
