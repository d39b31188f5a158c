"""Mean squared difference (MSE), with a cache-blocked, float64-accumulated masked path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dirio.losses.base import Similarity, check_pair

__all__ = ["MSE", "squared_error"]


# Elements (all channels) per slab of the blocked squared error: ~1 MiB temporaries stay in cache.
_SQUARED_ERROR_SLAB_ELEMENTS = 1 << 18


class _SquaredError(torch.autograd.Function):
    """``sum m (W - F)^2 / total`` (``m = 1`` without a mask) and its gradient ``2 m (W - F) / total``.

    Processed in slabs along the first spatial axis: each slab's difference stays in cache, its
    sum is accumulated in float64 (a whole-volume float32 dot product loses ~1e-3 relative
    accuracy at 160x192x224x12), and the gradient is written once. Forward stores the gradient
    w.r.t. ``W`` (that w.r.t. ``F`` is its negative); backward only scales it.
    """

    @staticmethod
    def forward(ctx, warped, fixed, mask, total):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        gradient = torch.empty_like(warped) if need_grad else None
        # float64 accumulation (MPS has no float64).
        sum_dtype = warped.dtype if warped.device.type == "mps" else torch.float64
        accumulator = torch.zeros((), device=warped.device, dtype=sum_dtype)
        n = warped.shape[2]
        per_row = max(1, warped[:, :, :1].numel())
        rows = n if warped.device.type != "cpu" else max(1, _SQUARED_ERROR_SLAB_ELEMENTS // per_row)
        for start in range(0, n, rows):
            count = min(rows, n - start)
            diff = warped.narrow(2, start, count) - fixed.narrow(2, start, count)
            weighted = diff if mask is None else diff * mask.narrow(2, start, count)
            accumulator += torch.dot(weighted.flatten(), diff.flatten()).to(accumulator.dtype)
            if need_grad:
                torch.mul(weighted, 2.0 / total, out=gradient.narrow(2, start, count))
        if need_grad:
            ctx.save_for_backward(gradient)
        return (accumulator / total).to(warped.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (gradient,) = ctx.saved_tensors
        grad_warped = gradient * grad_loss if ctx.needs_input_grad[0] else None
        grad_fixed = gradient * -grad_loss if ctx.needs_input_grad[1] else None
        return grad_warped, grad_fixed, None, None


def squared_error(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``masked_mean((warped - fixed)^2, mask)`` of ``(B, C, *S)`` images with an optional ``(B or 1, 1, *S)``
    mask, a scalar in intensity units squared: ``F.mse_loss`` without a mask (already fused and
    accurate), the blocked :class:`_SquaredError` with one (3x faster than the autograd chain)."""
    fixed = fixed.to(warped.dtype)
    if mask is None:
        return F.mse_loss(warped, fixed)
    batch, channels = warped.shape[:2]
    total = float(mask.sum()) * (batch // mask.shape[0]) * channels
    if total <= 0.0:  # all-zero mask: the loss is 0, with zero gradients
        return (warped * 0.0).sum() + (fixed * 0.0).sum()
    return _SquaredError.apply(warped, fixed, mask, total)


class MSE(Similarity):
    """Mean squared difference ``masked_mean((I - J)^2)`` in ``[0, inf)`` (intensity units squared)."""

    name = "mse"

    def __init__(self):
        pass

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return squared_error(fixed, warped, check_pair(fixed, warped, mask))
