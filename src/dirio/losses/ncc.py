"""Global normalised cross-correlation (NCC): one correlation per batch element and channel."""

from __future__ import annotations

import torch

from dirio.losses.base import Similarity, check_pair

__all__ = ["NCC"]


class NCC(Similarity):
    """Global normalised cross-correlation loss ``-ncc`` in ``[-1, 1]``.

    ``ncc = sum w I' J' / sqrt(sum w I'^2 * sum w J'^2 + eps)`` with ``I' = I - sum w I``
    (weights ``w`` = mask normalised to sum 1 per batch element, uniform without mask), per batch
    element and channel, then averaged. ``eps`` guards constant images.
    """

    name = "ncc"

    def __init__(self, eps: float = 1e-8):
        if not eps > 0:
            raise ValueError(f"NCC eps must be > 0, got {eps!r}")
        self.eps = float(eps)

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = check_pair(fixed, warped, mask)
        fixed = fixed.to(warped.dtype)
        spatial = tuple(range(2, fixed.dim()))
        if mask is None:
            shape = (1, 1) + tuple(fixed.shape[2:])
            weights = torch.full(shape, 1.0 / fixed.shape[2:].numel(), device=warped.device, dtype=warped.dtype)
        else:
            weights = mask / mask.sum(dim=spatial, keepdim=True).clamp_min(torch.finfo(warped.dtype).tiny)
        i = fixed - (weights * fixed).sum(dim=spatial, keepdim=True)
        j = warped - (weights * warped).sum(dim=spatial, keepdim=True)
        cross = (weights * i * j).sum(dim=spatial)
        var_i = (weights * i * i).sum(dim=spatial)
        var_j = (weights * j * j).sum(dim=spatial)
        return -(cross / torch.sqrt(var_i * var_j + self.eps)).mean()
