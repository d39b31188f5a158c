"""Image similarity terms: LNCC, global NCC, MSE, MIND-SSC (features + MSE) and Parzen NMI.

Contract shared by every similarity object (the optimisation engine codes against it):

* ``name``: short identifier (the factory name).
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
import itertools
import math
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dirio.core.fields import gaussian_kernel_1d

__all__ = [
    "Similarity",
    "LNCC",
    "NCC",
    "MSE",
    "MINDSSC",
    "NMI",
    "SIMILARITIES",
    "make_similarity",
    "local_mean",
    "masked_mean",
    "mind_ssc",
    "lncc_map",
]


# --- normalised separable filtering -------------------------------------------------------------


def _shift_add(
    x: torch.Tensor, weights: Sequence[float], dim: int, start: int = 0, count: int | None = None
) -> torch.Tensor:
    """Zero-padded correlation of ``x`` with a symmetric odd 1D kernel along tensor dim ``dim``.

    Implemented as in-place shifted adds (no padded copy, no convolution call), which on the CPU
    is several times faster than ``conv3d`` with a 1D kernel or 1D ``avg_pool3d`` passes.
    Not differentiable by itself.

    Args:
        x: any tensor.
        weights: ``2r + 1`` kernel weights, symmetric about the centre.
        dim: the tensor dimension to filter.
        start, count: compute only the output positions ``start .. start + count - 1`` (default
            all); the rest of ``x`` serves as the halo.
    Returns:
        tensor of ``x``'s shape with ``count`` positions along ``dim``:
        ``out[k] = sum_s weights[r + s] * x[start + k + s]`` over ``|s| <= r``, with ``x`` taken as
        0 outside the tensor.
    """
    n = x.shape[dim]
    count = n - start if count is None else count
    radius = len(weights) // 2
    centre = float(weights[radius])
    own = x.narrow(dim, start, count)
    out = own.clone(memory_format=torch.contiguous_format) if centre == 1.0 else own * centre
    for shift in range(-radius, radius + 1):
        first = max(0, -start - shift)
        last = min(count, n - start - shift)
        if shift == 0 or last <= first:
            continue
        source = x.narrow(dim, start + first + shift, last - first)
        out.narrow(dim, first, last - first).add_(source, alpha=float(weights[radius + shift]))
    return out


def _inverse_norm(weights: Sequence[float], n: int, device, dtype) -> torch.Tensor:
    """``1 / (sum of the kernel weights that fall inside a line of n voxels)``, per position: ``(n,)``."""
    ones = torch.ones(n, dtype=torch.float64)
    return (1.0 / _shift_add(ones, weights, 0)).to(device=device, dtype=dtype)


def _filter_all_axes(x: torch.Tensor, kernels: Sequence[Sequence[float]], transpose: bool) -> torch.Tensor:
    """Apply the normalised separable filter ``A = prod_a N_a S_a`` (or its transpose) to ``x``.

    ``S_a`` is the zero-padded correlation along spatial axis ``a`` and ``N_a`` the division by the
    in-volume kernel mass, so ``A`` is the weighted mean over the part of the window that lies
    inside the volume. ``A^T = prod_a S_a N_a`` because the kernels are symmetric.
    """
    ndim = len(kernels)
    for axis, weights in enumerate(kernels):
        if len(weights) == 1:
            continue
        dim = x.dim() - ndim + axis
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        inv_norm = _inverse_norm(weights, x.shape[dim], x.device, x.dtype).view(shape)
        if transpose:
            x = _shift_add(x * inv_norm, weights, dim)
        else:
            x = _shift_add(x, weights, dim).mul_(inv_norm)
    return x


class _LocalMean(torch.autograd.Function):
    """Differentiable normalised separable filter (see :func:`local_mean`)."""

    @staticmethod
    def forward(ctx, x, kernels):
        ctx.kernels = kernels
        out = _filter_all_axes(x, kernels, transpose=False)
        return out.clone() if out is x else out

    @staticmethod
    def backward(ctx, grad):
        return _filter_all_axes(grad, ctx.kernels, transpose=True), None


def _window_kernels(ndim: int, window: int, kernel: str, sigma: float | None) -> tuple[tuple[float, ...], ...]:
    """One 1D kernel (tuple of weights) per spatial axis for a box or Gaussian window."""
    if kernel == "box":
        weights = (1.0,) * window
    else:
        weights = tuple(float(w) for w in gaussian_kernel_1d(sigma, dtype=torch.float64))
    return (weights,) * ndim


def local_mean(image: torch.Tensor, window: int = 5, kernel: str = "box", sigma: float | None = None) -> torch.Tensor:
    """Local (windowed) mean of every channel, computed as 1D passes along each spatial axis.

    The window is a box of ``window`` voxels per axis or a Gaussian of standard deviation
    ``sigma`` voxels truncated at ``ceil(3 sigma)`` (:func:`dirio.core.fields.gaussian_kernel_1d`).
    At the border the mean is taken over the part of the window inside the volume (the kernel is
    renormalised), so no padding values enter the statistics. Differentiable.

    Args:
        image: ``(B, C, *S)`` with 2 or 3 spatial axes.
    Returns:
        ``(B, C, *S)`` local means.
    """
    if kernel not in ("box", "gaussian") or window < 1 or window % 2 == 0:
        raise ValueError(f"local_mean needs kernel 'box' or 'gaussian' and an odd window, got {kernel!r}, {window!r}")
    ndim = image.dim() - 2
    if kernel == "gaussian" and sigma is None:
        sigma = _box_matched_sigma(window)
    return _LocalMean.apply(image, _window_kernels(ndim, window, kernel, sigma))


def _window_voxels(ndim: int, window: int, kernel: str, sigma: float | None) -> float:
    """Voxel count ``n`` of the window: ``window^ndim`` for a box; for a Gaussian, the same for
    the box with the same standard deviation (width ``sqrt(12 sigma^2 + 1)`` per axis)."""
    width = window if kernel == "box" else math.sqrt(12.0 * sigma * sigma + 1.0)
    return float(width) ** ndim


def _box_matched_sigma(window: int) -> float:
    """Standard deviation of a discrete uniform window of ``window`` voxels: ``sqrt((w^2 - 1) / 12)``."""
    return math.sqrt((window * window - 1) / 12.0)


# --- validation and masked averaging ------------------------------------------------------------


def _check_pair(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Validate shapes; return the mask as a constant tensor of ``warped``'s dtype (or None)."""
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
    """Mask-weighted mean over batch, channels and voxels (the module's averaging rule).

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


# --- the similarity objects ---------------------------------------------------------------------


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


# LNCC -------------------------------------------------------------------------------------------


def lncc_map(
    fixed: torch.Tensor,
    warped: torch.Tensor,
    window: int = 5,
    kernel: str = "box",
    sigma: float | None = None,
    squared: bool = True,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Per-voxel local correlation, by plain autograd (reference implementation).

    With local means ``<.>`` over the window (see :func:`local_mean`):
    ``cross = <IJ> - <I><J>``, ``var_I = <I^2> - <I>^2``, ``var_J = <J^2> - <J>^2`` (clamped at 0),
    ``cc^2 = cross^2 / (var_I var_J + eps / n^2)`` (squared) or
    ``cc = cross / sqrt(var_I var_J + eps / n^2)``, where ``n`` is the window's voxel count
    (:func:`_window_voxels`). Dividing by ``n^2`` makes ``eps`` VoxelMorph's constant, which is
    added to the product of window *sums* of squared deviations (``n var``), so ``eps = 1e-5``
    behaves as in VoxelMorph for any window. The five local statistics are computed in one
    filtering call on a stacked tensor. (The images are not centred: exact zero backgrounds then
    give exactly zero statistics and gradients.)

    Args:
        fixed, warped: ``(B, C, *S)``.
    Returns:
        ``(B, C, *S)``: ``cc^2`` in ``[0, 1]`` or ``cc`` in ``[-1, 1]`` (up to rounding).
    """
    i, j = fixed, warped
    if kernel == "gaussian" and sigma is None:
        sigma = _box_matched_sigma(window)
    ndim = fixed.dim() - 2
    kernels = _window_kernels(ndim, window, kernel, sigma)
    eps = eps / _window_voxels(ndim, window, kernel, sigma) ** 2
    stats = _LocalMean.apply(torch.stack([i, j, i * i, j * j, i * j], dim=1), kernels)
    mean_i, mean_j, mean_ii, mean_jj, mean_ij = stats.unbind(1)
    cross = mean_ij - mean_i * mean_j
    var_i = (mean_ii - mean_i * mean_i).clamp_min(0.0)
    var_j = (mean_jj - mean_j * mean_j).clamp_min(0.0)
    denominator = var_i * var_j + eps
    if squared:
        return cross * cross / denominator
    return cross / torch.sqrt(denominator)


# Spatial extent (voxels per channel) of one slab of the cache-blocked LNCC: slabs of a few
# hundred thousand voxels keep the ~10 slab-sized temporaries inside the last-level cache of
# common CPUs (32 MiB on the 2-core development machine); measured to be ~2x faster than
# whole-volume passes at 160x192x224.
_LNCC_SLAB_VOXELS = 1 << 18


def _slab_rows(shape: Sequence[int], device: torch.device) -> int:
    """Number of first-axis rows per slab for a spatial ``shape`` (whole volume off the CPU)."""
    if device.type != "cpu":
        return shape[0]
    return max(1, _LNCC_SLAB_VOXELS // max(1, math.prod(shape[1:])))


def _slab_filter(x: torch.Tensor, kernels, inv_norms, first: int, start: int, count: int) -> torch.Tensor:
    """Normalised separable filter of a slab with halo (along tensor dim ``first``).

    ``x`` holds rows ``lo .. hi - 1`` of the volume's first spatial axis (``lo`` = row 0 of
    ``x``); the result holds rows ``lo + start .. lo + start + count - 1``, exact because the halo
    contains every row the window reaches (rows beyond the volume are zero by construction).
    ``inv_norms[a]`` is the per-position inverse kernel mass along axis ``a`` for the rows needed,
    or None to skip the normalisation (the plain correlation, used by the transposed filter).
    """
    ndim = len(kernels)
    for axis in range(ndim - 1, -1, -1):
        if len(kernels[axis]) > 1:
            x = _shift_add(x, kernels[axis], first + axis) if axis else _shift_add(x, kernels[0], first, start, count)
            if inv_norms[axis] is not None:
                x.mul_(inv_norms[axis])
        elif axis == 0:
            x = x.narrow(first, start, count)
    return x


def _axis_inverse_norms(kernels, shape, ndim_total: int, first: int, device, dtype) -> list[torch.Tensor]:
    """Per-axis inverse kernel masses, shaped to broadcast against a tensor of ``ndim_total`` dims."""
    norms = []
    for axis, weights in enumerate(kernels):
        view = [1] * ndim_total
        view[first + axis] = shape[axis]
        norms.append(_inverse_norm(weights, shape[axis], device, dtype).view(view))
    return norms


class _FastLNCC(torch.autograd.Function):
    """LNCC loss with an analytic, cache-blocked gradient w.r.t. the warped image only.

    Inputs: the warped image ``j`` (B, C, *S), the fixed image ``i`` and its
    cached local mean ``mean_i`` and variance ``var_i``, the voxel weights (0-dim, or
    ``(B|1, 1, *S)``; they sum to 1 over batch x channels x voxels), the kernels and the variant.

    The volume is processed in slabs along the first spatial axis (with a halo of the kernel
    radius), so each slab's temporaries stay in cache. Forward filters only the three
    warped-dependent statistics ``b = <J>, d = <J^2>, e = <IJ>`` and stores the loss derivatives
    ``g_b, g_d, g_e``; backward applies the transposed filter ``A^T`` to them and returns
    ``dL/dJ = A^T g_b + 2 J A^T g_d + I A^T g_e``.
    """

    @staticmethod
    def forward(ctx, j, i, mean_i, var_i, weights, kernels, squared, eps):
        shape = tuple(j.shape[2:])
        need_grad = ctx.needs_input_grad[0]
        # Tensors of statistics are (B, 3, C, *S): first spatial axis is dim 3; images are dim 2.
        inv_norms = _axis_inverse_norms(kernels, shape, j.dim() + 1, 3, j.device, j.dtype)
        partials = torch.empty((j.shape[0], 3) + tuple(j.shape[1:]), device=j.device, dtype=j.dtype) if need_grad else None
        radius = len(kernels[0]) // 2
        rows = _slab_rows(shape, j.device)
        # float64 accumulation of the slab sums (MPS has no float64).
        total = torch.zeros((), device=j.device, dtype=j.dtype if j.device.type == "mps" else torch.float64)
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            lo, hi = max(start - radius, 0), min(start + count + radius, shape[0])
            j_halo, i_halo = j.narrow(2, lo, hi - lo), i.narrow(2, lo, hi - lo)
            stacked = torch.stack([j_halo, j_halo * j_halo, i_halo * j_halo], dim=1)
            norms = [inv_norms[0].narrow(3, start, count)] + inv_norms[1:]
            stats = _slab_filter(stacked, kernels, norms, 3, start - lo, count)
            mean_j, mean_jj, mean_ij = stats.unbind(1)
            a = mean_i.narrow(2, start, count)
            v_i = var_i.narrow(2, start, count)
            w = weights if weights.dim() == 0 else weights.narrow(2, start, count)
            cross = mean_ij.addcmul_(a, mean_j, value=-1.0)
            denominator = mean_jj.addcmul_(mean_j, mean_j, value=-1.0).clamp_min_(0.0).mul_(v_i).add_(eps)
            if squared:
                score = (cross * cross).div_(denominator)
            else:
                score = cross / denominator.sqrt()
            total += (score * w).sum(dtype=total.dtype) if weights.dim() else score.sum(dtype=total.dtype) * w
            if need_grad:
                # d score/d cross and d score/d var_J, chained through d cross/d<J> = -<I>,
                # d var_J/d<J> = -2<J>, d var_J/d<J^2> = 1, d cross/d<IJ> = 1; times -w.
                g = partials.narrow(3, start, count)
                g_b, g_d, g_e = g.unbind(1)
                if squared:
                    torch.div(cross, denominator, out=g_e).mul_(w).mul_(-2.0)
                    torch.div(score, denominator, out=g_d).mul_(v_i).mul_(w)
                else:
                    torch.rsqrt(denominator, out=g_e).mul_(w).neg_()
                    torch.div(score, denominator, out=g_d).mul_(v_i).mul_(w).mul_(0.5)
                torch.mul(a, g_e, out=g_b).addcmul_(mean_j, g_d, value=2.0).neg_()
        if need_grad:
            ctx.save_for_backward(j, i, partials)
            ctx.kernels = kernels
        return (-total).to(j.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        j, i, partials = ctx.saved_tensors
        kernels = ctx.kernels
        shape = tuple(j.shape[2:])
        inv_norms = _axis_inverse_norms(kernels, shape, partials.dim(), 3, j.device, j.dtype)
        radius = len(kernels[0]) // 2
        rows = _slab_rows(shape, j.device)
        grad_j = torch.empty_like(j)
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start)
            lo, hi = max(start - radius, 0), min(start + count + radius, shape[0])
            # A^T = prod_a S_a N_a: scale by all inverse norms (diagonal), then correlate.
            scale = inv_norms[0].narrow(3, lo, hi - lo)
            for norm in inv_norms[1:]:
                scale = scale * norm
            back = partials.narrow(3, lo, hi - lo) * (scale * grad_loss)
            back = _slab_filter(back, kernels, [None] * len(kernels), 3, start - lo, count)
            rows_j, rows_i = j.narrow(2, start, count), i.narrow(2, start, count)
            out = grad_j.narrow(2, start, count)
            torch.addcmul(back[:, 0], rows_j, back[:, 1], value=2.0, out=out).addcmul_(rows_i, back[:, 2])
        return grad_j, None, None, None, None, None, None, None


class LNCC(Similarity):
    """Local normalised cross-correlation loss (VoxelMorph-style when squared).

    Variant: local statistics over a window (box of ``window`` voxels per axis, or a Gaussian of
    standard deviation ``sigma`` voxels truncated at 3 sigma; ``sigma`` defaults to
    ``sqrt((window^2 - 1) / 12)``, the standard deviation of the box, so both kernels have the same
    spread), renormalised at the border (see :func:`local_mean`); ``eps`` is VoxelMorph's
    constant on the product of window sums of squared deviations, i.e. ``eps / n^2`` is added to
    ``var_I * var_J`` with ``n`` the window's voxel count (:func:`lncc_map`).

    Loss: ``-masked_mean(cc^2)`` in ``[-1, 0]`` when ``squared`` (default, VoxelMorph's choice;
    ignores the sign of the correlation), else ``-masked_mean(cc)`` in ``[-1, 1]``. Equals -1 for
    ``warped = a * fixed + b`` (``a > 0``, or any ``a != 0`` when squared) wherever the window is not
    flat; flat windows contribute ~0 because of ``eps``.

    Speed: when the fixed image does not require a gradient, its local mean and variance are
    computed once and cached (keyed on the tensor object and its in-place version counter), and the
    loss uses a custom autograd function that filters only the three warped-dependent statistics
    forward and three partial derivatives backward. Otherwise the plain-autograd reference
    :func:`lncc_map` is used. Both give the same values and gradients.
    """

    name = "lncc"

    def __init__(
        self,
        window: int = 5,
        kernel: str = "box",
        sigma: float | None = None,
        squared: bool = True,
        eps: float = 1e-5,
        cache_fixed: bool = True,
    ):
        if not isinstance(window, int) or window < 1 or window % 2 == 0:
            raise ValueError(f"LNCC window must be an odd positive number of voxels, got {window!r}")
        if kernel not in ("box", "gaussian"):
            raise ValueError(f"LNCC kernel must be one of ('box', 'gaussian'), got {kernel!r}")
        if sigma is not None and kernel != "gaussian":
            raise ValueError("LNCC sigma is only used with kernel='gaussian'")
        if sigma is not None and not sigma > 0:
            raise ValueError(f"LNCC sigma must be > 0 voxels, got {sigma!r}")
        if not eps > 0:
            raise ValueError(f"LNCC eps must be > 0, got {eps!r}")
        self.window = window
        self.kernel = kernel
        self.sigma = (_box_matched_sigma(window) if sigma is None else float(sigma)) if kernel == "gaussian" else None
        self.squared = bool(squared)
        self.eps = float(eps)
        self.cache_fixed = bool(cache_fixed)
        self._cache: tuple | None = None

    def __getstate__(self) -> dict:
        """Pickle / deep-copy without the cache (it holds a weak reference and large tensors)."""
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def _fixed_statistics(self, fixed: torch.Tensor, kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """Local mean and local variance of the fixed image (cached per fixed tensor)."""
        key = (fixed._version, fixed.shape, fixed.dtype, fixed.device)
        if self.cache_fixed and self._cache is not None:
            ref, cached_key, values = self._cache
            if ref() is fixed and cached_key == key:
                return values
        stats = _filter_all_axes(torch.stack([fixed, fixed * fixed], dim=1), kernels, transpose=False)
        mean_i = stats[:, 0]
        var_i = stats[:, 1].addcmul_(mean_i, mean_i, value=-1.0).clamp_min_(0.0)
        values = (mean_i, var_i)
        if self.cache_fixed:
            self._cache = (weakref.ref(fixed), key, values)
        return values

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _check_pair(fixed, warped, mask)
        fixed = fixed.to(warped.dtype)
        if fixed.requires_grad and torch.is_grad_enabled():
            score = lncc_map(fixed, warped, self.window, self.kernel, self.sigma, self.squared, self.eps)
            return -masked_mean(score, mask)
        ndim = fixed.dim() - 2
        kernels = _window_kernels(ndim, self.window, self.kernel, self.sigma)
        eps = self.eps / _window_voxels(ndim, self.window, self.kernel, self.sigma) ** 2
        with torch.no_grad():
            mean_i, var_i = self._fixed_statistics(fixed, kernels)
            batch, channels = warped.shape[:2]
            if mask is None:
                weights = torch.tensor(1.0 / warped.numel(), device=warped.device, dtype=warped.dtype)
            else:
                total = mask.sum() * (batch // mask.shape[0]) * channels
                weights = mask / total.clamp_min(torch.finfo(warped.dtype).tiny)
        return _FastLNCC.apply(warped, fixed.detach(), mean_i, var_i, weights, kernels, self.squared, eps)


# NCC, MSE ---------------------------------------------------------------------------------------


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
        mask = _check_pair(fixed, warped, mask)
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


def _squared_error(fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``masked_mean((warped - fixed)^2, mask)``: ``F.mse_loss`` without a mask (already fused and
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
        return _squared_error(fixed, warped, _check_pair(fixed, warped, mask))


# MIND-SSC ---------------------------------------------------------------------------------------

# ConvexAdam (Siebert, Hansen & Heinrich 2021, convex_adam_utils.MINDSSC) clamps the per-voxel
# variance estimate to [1e-3, 1e3] times its mean over the volume.
_MIND_VARIANCE_CLAMP = (1e-3, 1e3)


def _mind_ssc_pairs(ndim: int, dilation: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Pairs of 2*ndim-neighbourhood offsets that are ``sqrt(2) * dilation`` apart.

    The neighbourhood is ``{±dilation * e_a}``; two members are ``sqrt(2) d`` apart exactly when
    they lie on different axes, giving ``4 * C(ndim, 2)`` pairs: 12 in 3D, 4 in 2D. Order: for
    each axis pair ``(a, b)`` with ``a < b`` (lexicographic), signs ``(-,-), (-,+), (+,-), (+,+)``.
    """
    pairs = []
    for a, b in itertools.combinations(range(ndim), 2):
        for sign_a, sign_b in itertools.product((-1, 1), repeat=2):
            first = [0] * ndim
            second = [0] * ndim
            first[a] = sign_a * dilation
            second[b] = sign_b * dilation
            pairs.append((tuple(first), tuple(second)))
    return pairs


def _box_mean_replicate(x: torch.Tensor, radius: int, inplace: bool) -> torch.Tensor:
    """Box mean of width ``2 radius + 1`` over the spatial axes with replicate padding (as ConvexAdam).

    ``inplace`` accumulates into fresh buffers with in-place adds (not differentiable; ~3x faster
    than the out-of-place chain that autograd needs).
    """
    if radius == 0:
        return x
    ndim = x.dim() - 2
    padded = F.pad(x, [radius] * (2 * ndim), mode="replicate")
    for axis in range(ndim):
        dim = 2 + axis
        n = padded.shape[dim] - 2 * radius
        total = padded.narrow(dim, 0, n) + padded.narrow(dim, 1, n)
        for shift in range(2, 2 * radius + 1):
            total = total.add_(padded.narrow(dim, shift, n)) if inplace else total + padded.narrow(dim, shift, n)
        padded = total
    scale = 1.0 / (2 * radius + 1) ** ndim
    return padded.mul_(scale) if inplace else padded * scale


def mind_ssc(image: torch.Tensor, radius: int = 2, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al., MICCAI 2013), following ConvexAdam's constants.

    For each pair ``(p, q)`` of :func:`_mind_ssc_pairs` (12 in 3D, 4 in 2D) the patch distance is
    ``D_pq(x) = box_r[(I(x + p) - I(x + q))^2]`` with replicate padding for the shifts and for the
    box mean of width ``2 radius + 1`` (box, as ConvexAdam, not the paper's Gaussian). Then
    ``D' = D - min_pairs D`` (per voxel), ``V = mean_pairs D'`` clamped to
    ``[1e-3, 1e3] * mean_x V`` (mean over the voxels of each image; bound detached; plus a floor of
    the dtype's ``tiny`` so constant images give all-ones descriptors) and the descriptor is
    ``exp(-D' / V)``. Its per-voxel maximum is exactly 1 (the minimising pair), so the
    normalisation by the maximum is implicit. Invariant to ``I -> a I + b`` (``a != 0``).
    ConvexAdam additionally permutes the 12 channels to match its C++ code; the order does not
    change the MSE loss and is not reproduced. Differentiable; when no gradient is needed it runs
    with in-place operations (~3x faster: 0.8 s at 160x192x224 on the 2-core CPU).

    Args:
        image: ``(B, C, *S)``, 2 or 3 spatial axes.
        radius: patch radius in voxels (``>= 0``).
        dilation: spacing of the neighbourhood in voxels (``>= 1``).
    Returns:
        ``(B, C * P, *S)`` in ``(0, 1]`` with ``P`` pairs per channel, channel ``c * P + k``
        for pair ``k`` of channel ``c``.
    """
    batch, channels = image.shape[:2]
    spatial = tuple(image.shape[2:])
    ndim = len(spatial)
    inplace = not (torch.is_grad_enabled() and image.requires_grad)
    flat = image.reshape(batch * channels, 1, *spatial)
    padded = F.pad(flat, [dilation] * (2 * ndim), mode="replicate")

    def shifted(offset):
        view = padded
        for axis, step in enumerate(offset):
            view = view.narrow(2 + axis, dilation + step, spatial[axis])
        return view

    pairs = _mind_ssc_pairs(ndim, dilation)
    if inplace:
        distances = torch.empty((batch * channels, len(pairs)) + spatial, device=image.device, dtype=image.dtype)
        for k, (p, q) in enumerate(pairs):
            torch.sub(shifted(p), shifted(q), out=distances[:, k : k + 1]).square_()
    else:
        distances = torch.cat([(shifted(p) - shifted(q)) ** 2 for p, q in pairs], dim=1)
    distances = _box_mean_replicate(distances, radius, inplace)
    minimum = distances.amin(dim=1, keepdim=True)
    distances = distances.sub_(minimum) if inplace else distances - minimum
    variance = distances.mean(dim=1, keepdim=True)
    with torch.no_grad():
        level = variance.mean(dim=tuple(range(1, variance.dim())), keepdim=True)
        low = (level * _MIND_VARIANCE_CLAMP[0]).clamp_min(torch.finfo(image.dtype).tiny)
        high = (level * _MIND_VARIANCE_CLAMP[1]).clamp_min(torch.finfo(image.dtype).tiny)
    variance = torch.maximum(torch.minimum(variance, high), low)
    if inplace:
        descriptors = distances.div_(variance).neg_().exp_()
    else:
        descriptors = torch.exp(-distances / variance)
    return descriptors.reshape(batch, -1, *spatial)


class MINDSSC(Similarity):
    """MIND-SSC features with a mean-squared-difference loss.

    ``features`` gives :func:`mind_ssc` descriptors (12 channels per image channel in 3D, 4 in 2D).
    Loss: ``masked_mean((MIND_F - MIND_W)^2)`` over channels and voxels, in ``[0, 1]``; ConvexAdam's
    Adam stage uses the same quantity times 12 (sum over channels).
    """

    name = "mind"

    def __init__(self, radius: int = 2, dilation: int = 2):
        if not isinstance(radius, int) or radius < 0:
            raise ValueError(f"MIND radius must be an int >= 0 voxels, got {radius!r}")
        if not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"MIND dilation must be an int >= 1 voxels, got {dilation!r}")
        self.radius = radius
        self.dilation = dilation

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S) -> (B, 12 C, *S)`` in 3D (``4 C`` in 2D) MIND-SSC descriptors."""
        return mind_ssc(image, self.radius, self.dilation)

    def __call__(self, fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return _squared_error(fixed, warped, _check_pair(fixed, warped, mask))


# NMI --------------------------------------------------------------------------------------------


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
        mask = _check_pair(fixed, warped, mask)
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


# --- factory ------------------------------------------------------------------------------------

SIMILARITIES: dict[str, type[Similarity]] = {"lncc": LNCC, "ncc": NCC, "mse": MSE, "mind": MINDSSC, "nmi": NMI}


def make_similarity(name: str, **options) -> Similarity:
    """Build a similarity by factory name (``lncc``, ``ncc``, ``mse``, ``mind``, ``nmi``).

    Raises:
        ValueError: unknown name (lists the valid names) or unknown option (lists the valid
            options of that measure), or an invalid option value.
    """
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; valid names: {', '.join(SIMILARITIES)}")
    cls = SIMILARITIES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for similarity {name!r}; valid options: {listed}")
    return cls(**options)
