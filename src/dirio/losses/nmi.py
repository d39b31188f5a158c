"""Normalised mutual information (NMI) with Gaussian Parzen windows and a chunked analytic gradient."""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from dirio.losses.base import Similarity, check_pair

__all__ = ["NMI"]


# Voxels per chunk of the Parzen joint histogram: (R, chunk, bins) temporaries of a few MiB.
_NMI_CHUNK_VOXELS = 1 << 15


def _parzen_window(values, lo, hi, scale, bins: int, sigma: float):
    """Normalised Gaussian Parzen weights of intensities over the bin centres ``0 .. bins - 1``.

    Args:
        values: ``(R, n)`` intensities; ``lo``, ``hi``, ``scale``: ``(R, 1)``, the intensity range
            and the mapping ``t = (v - lo) scale`` (``scale = (bins - 1) / (hi - lo)``).
    Returns:
        ``weights (R, n, bins)`` summing to 1 over bins, ``slope (R, n, bins) = (k - t) / sigma^2``
        (``d log g_k / dt``), and ``inside (R, n)``: where ``lo <= v <= hi``, i.e. where the clamp
        of ``t`` to ``[0, bins - 1]`` passes the gradient (as torch.clamp does at its bounds).
    """
    raw = (values - lo) * scale
    coords = raw.clamp(0.0, bins - 1.0)
    centres = torch.arange(bins, device=values.device, dtype=values.dtype)
    slope = (centres - coords.unsqueeze(-1)).div_(sigma * sigma)
    # The exponent is clamped at -80 (exp(-80) ~ 2e-35, still a normal float32): arguments far
    # below that underflow through denormals, which makes exp ~10x slower on x86 CPUs.
    weights = (slope * slope).mul_(-0.5 * sigma * sigma).clamp_(min=-80.0).exp_()
    weights.div_(weights.sum(dim=-1, keepdim=True))
    return weights, slope, (values >= lo) & (values <= hi)


class _ParzenJointHistogram(torch.autograd.Function):
    """``P[r] = sum_x m(x) w_A(x) w_B(x)^T / total[r]``, in voxel chunks, with an analytic gradient.

    Memory is ``O(chunk * bins)`` instead of the autograd graph's ``O(voxels * bins)``: backward
    recomputes the Parzen weights chunk by chunk. With ``w_k = g_k / sum_j g_j`` and
    ``g_k = exp(-(t - k)^2 / (2 sigma^2))``: ``dw_k/dt = w_k (s_k - sum_j w_j s_j)``,
    ``s_k = (k - t) / sigma^2``; ``dt/dv = scale`` where ``t`` is not clamped, else 0.
    """

    @staticmethod
    def forward(ctx, a, b, mask, range_a, range_b, total, bins, sigma):
        joint = torch.zeros((a.shape[0], bins, bins), device=a.device, dtype=a.dtype)
        for start in range(0, a.shape[1], _NMI_CHUNK_VOXELS):
            count = min(_NMI_CHUNK_VOXELS, a.shape[1] - start)
            wa = _parzen_window(a.narrow(1, start, count), *range_a.unbind(0), bins, sigma)[0]
            wb = _parzen_window(b.narrow(1, start, count), *range_b.unbind(0), bins, sigma)[0]
            if mask is not None:
                wa.mul_(mask.narrow(1, start, count).unsqueeze(-1))
            joint.baddbmm_(wa.transpose(1, 2), wb)
        ctx.save_for_backward(a, b, mask, range_a, range_b, total)
        ctx.bins, ctx.sigma = bins, sigma
        return joint.div_(total)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_joint):
        a, b, mask, range_a, range_b, total = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_joint = grad_joint / total
        grad_a = torch.empty_like(a) if need_a else None
        grad_b = torch.empty_like(b) if need_b else None

        def through_parzen(upstream, weights, slope, inside, scale):
            """d loss / d v from d loss / d w (R, n, bins)."""
            upstream = upstream.mul_(weights)
            mean_slope = (weights * slope).sum(dim=-1)
            return ((upstream * slope).sum(dim=-1) - upstream.sum(dim=-1) * mean_slope) * scale * inside

        for start in range(0, a.shape[1], _NMI_CHUNK_VOXELS):
            count = min(_NMI_CHUNK_VOXELS, a.shape[1] - start)
            wa, slope_a, inside_a = _parzen_window(a.narrow(1, start, count), *range_a.unbind(0), ctx.bins, ctx.sigma)
            wb, slope_b, inside_b = _parzen_window(b.narrow(1, start, count), *range_b.unbind(0), ctx.bins, ctx.sigma)
            m = None if mask is None else mask.narrow(1, start, count).unsqueeze(-1)
            if need_b:
                upstream = torch.bmm(wa if m is None else wa * m, grad_joint)
                grad_b.narrow(1, start, count).copy_(through_parzen(upstream, wb, slope_b, inside_b, range_b[2]))
            if need_a:
                upstream = torch.bmm(wb, grad_joint.transpose(1, 2))
                if m is not None:
                    upstream.mul_(m)
                grad_a.narrow(1, start, count).copy_(through_parzen(upstream, wa, slope_a, inside_a, range_a[2]))
        return grad_a, grad_b, None, None, None, None, None, None


class NMI(Similarity):
    """Normalised mutual information with Gaussian Parzen windows; loss ``-NMI`` in ``[-2, -1]``.

    Variant: ``NMI = (H(A) + H(B)) / H(A, B)`` (Studholme et al. 1999), natural logarithms.
    Intensities are mapped linearly to bin coordinates ``t = (v - lo) / (hi - lo) * (bins - 1)``
    (clamped to ``[0, bins - 1]``), with ``(lo, hi)`` the min / max of each image (detached; over
    the voxels with positive mask weight when a mask is given) unless ``intensity_range=(lo, hi)``
    is given for both. Each voxel contributes the weights
    ``exp(-(t - k)^2 / (2 sigma^2))`` over the bin centres ``k = 0 .. bins - 1``, normalised to sum
    1; ``sigma`` is in bin widths (default 0.5, MONAI's ``sigma_ratio`` default). The joint
    histogram is ``P = sum_x m(x) w_A(x) w_B(x)^T / sum_x m(x)``. One value per batch element and
    channel, averaged; 0 for an all-zero mask.

    The histogram is accumulated in chunks of voxels with an analytic gradient, so memory is
    ``O(bins^2 + chunk * bins)`` at any volume size. ``samples``: if given, only that many voxels
    (drawn uniformly with replacement by a generator seeded with ``seed`` on every call, so the
    same voxels each call) enter the histogram, for speed.
    """

    name = "nmi"

    def __init__(
        self,
        bins: int = 32,
        sigma: float | None = None,
        intensity_range: tuple[float, float] | None = None,
        samples: int | None = None,
        seed: int = 0,
    ):
        if not isinstance(bins, int) or bins < 2:
            raise ValueError(f"NMI bins must be an int >= 2, got {bins!r}")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"NMI sigma must be > 0 bin widths, got {sigma!r}")
        if intensity_range is not None and not (len(intensity_range) == 2 and intensity_range[1] > intensity_range[0]):
            raise ValueError(f"NMI intensity_range must be (lo, hi) with hi > lo, got {intensity_range!r}")
        if samples is not None and (not isinstance(samples, int) or samples < 1):
            raise ValueError(f"NMI samples must be None or a positive int, got {samples!r}")
        self.bins = bins
        self.sigma = 0.5 if sigma is None else float(sigma)
        self.intensity_range = None if intensity_range is None else (float(intensity_range[0]), float(intensity_range[1]))
        self.samples = samples
        self.seed = int(seed)

    def _bin_mapping(self, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``(R, N)`` intensities -> ``(3, R, 1)``: ``lo, hi, scale`` with ``t = (v - lo) * scale`` (detached).

        The intensity range is the min / max over the voxels with positive mask weight.
        """
        with torch.no_grad():
            if self.intensity_range is None:
                inside = values if mask is None else values.masked_fill(mask <= 0, math.inf)
                lo = inside.amin(dim=1, keepdim=True)
                inside = values if mask is None else values.masked_fill(mask <= 0, -math.inf)
                hi = inside.amax(dim=1, keepdim=True)
                if mask is not None:  # all-zero mask: fall back to the whole image's range
                    lo = torch.where(torch.isfinite(lo), lo, values.amin(dim=1, keepdim=True))
                    hi = torch.where(torch.isfinite(hi), hi, values.amax(dim=1, keepdim=True))
            else:
                lo = torch.full_like(values[:, :1], self.intensity_range[0])
                hi = torch.full_like(values[:, :1], self.intensity_range[1])
            scale = (self.bins - 1) / (hi - lo).clamp_min(torch.finfo(values.dtype).eps)
        return torch.stack([lo, hi, scale])

    def joint_histogram(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Parzen joint histogram ``(B * C, bins, bins)`` (rows: fixed bins, columns: warped bins)."""
        mask = check_pair(fixed, warped, mask)
        fixed = fixed.to(warped.dtype)
        batch, channels = fixed.shape[:2]
        a = fixed.reshape(batch * channels, -1)
        b = warped.reshape(batch * channels, -1)
        m = None
        if mask is not None:
            m = mask.expand(batch, channels, *mask.shape[2:]).reshape(batch * channels, -1)
        if self.samples is not None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
            index = torch.randint(a.shape[1], (self.samples,), generator=generator).to(a.device)
            a, b = a[:, index], b[:, index]
            m = None if m is None else m[:, index]
        range_a = self._bin_mapping(a, m)
        range_b = self._bin_mapping(b, m)
        if m is not None:
            total = m.sum(dim=1).clamp_min(torch.finfo(a.dtype).tiny).view(-1, 1, 1)
        else:
            total = torch.full((a.shape[0], 1, 1), float(a.shape[1]), device=a.device, dtype=a.dtype)
        return _ParzenJointHistogram.apply(a, b, m, range_a, range_b, total, self.bins, self.sigma)

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        joint = self.joint_histogram(fixed, warped, mask)
        # An all-zero mask gives an all-zero table and entropies: NMI (and the loss) is then 0.
        joint_entropy = _entropy(joint.flatten(1)).clamp_min(torch.finfo(joint.dtype).tiny)
        nmi = (_entropy(joint.sum(dim=2)) + _entropy(joint.sum(dim=1))) / joint_entropy
        return -nmi.mean()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of a ``(R, K)`` probability table (``0 log 0 = 0``)."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=1)
