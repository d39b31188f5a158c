"""Displacement fields: identity grids, warping, composition, resizing, Jacobians, conversions.

Conventions (binding, see DESIGN.md):

* A displacement field ``u`` has shape ``(B, ndim, *S)`` with ``S = (D, H, W)`` in 3D or
  ``(H, W)`` in 2D, float32, in **voxel units of the fixed grid**, component order = axis order
  ``(i, j, k)``. It means ``warped(x) = moving(x + u(x))`` (backward / pull warping), the
  Learn2Reg convention.
* This module is the only place that converts voxel coordinates into the normalised, reversed
  ``(x, y, z)`` coordinates of :func:`torch.nn.functional.grid_sample` (``align_corners=True``).
* Resampling between grids of different sizes uses ``align_corners=True`` semantics: the first
  and last voxel centres of both grids coincide, so a grid of ``n'`` voxels covering a grid of
  ``n`` voxels has spacing ``(n - 1) / (n' - 1)`` fine voxels.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from dirio.core.filters import gaussian_smooth

_INTERPOLATION_MODES = ("linear", "nearest")
_PADDING_MODES = ("border", "zeros", "reflection")


def identity_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel coordinates of every voxel of a grid.

    Args:
        shape: spatial shape ``S`` (2 or 3 ints).
    Returns:
        ``(ndim, *S)`` tensor whose component ``d`` at voxel ``x`` is ``x[d]`` (voxel units).
    """
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def voxel_to_grid_sample(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Convert voxel coordinates to ``grid_sample`` coordinates (the one conversion of dirio).

    Args:
        coords: ``(B, ndim, *S_out)`` voxel coordinates ``(i, j, k)`` into an image of spatial
            shape ``shape``.
        shape: spatial shape of the image that will be sampled.
    Returns:
        ``(B, *S_out, ndim)`` coordinates in ``[-1, 1]`` (``align_corners=True``), last axis in
        reversed order ``(x, y, z) = (k, j, i)``.
    """
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=coords.device, dtype=coords.dtype)
    return _GridCoordinates.apply(coords, scale)


class _GridCoordinates(torch.autograd.Function):
    """``(coords * scale - 1)`` with the components reversed and moved last, in two passes.

    Each component is scaled straight into its reversed place of a channel-first buffer, then 1 is
    subtracted in place; the result is the buffer viewed channel-last (``grid_sample`` reads any
    strides). Backward writes ``grad * scale`` per component into its reversed place. The same
    operations per element as ``(coords * scale - 1).movedim(1, -1).flip(-1)`` (bit for bit), without
    the copy that ``flip`` makes in both directions. The gradient keeps the memory layout autograd
    gave that expression (channel-last): sums over it downstream (an affine's gradient, the dot
    products of gradient projection) then add in the same order, so whole registrations stay
    bitwise equal.
    """

    @staticmethod
    def forward(ctx, coords: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ndim = coords.shape[1]
        ctx.save_for_backward(scale)
        out = torch.empty_like(coords, memory_format=torch.contiguous_format)
        for c in range(ndim):
            torch.mul(coords[:, c], scale[c], out=out[:, ndim - 1 - c])
        return out.sub_(1.0).movedim(1, -1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        ndim = grad.shape[-1]
        grad_coords = torch.empty_like(grad, memory_format=torch.contiguous_format).movedim(-1, 1)
        for c in range(ndim):
            torch.mul(grad[..., ndim - 1 - c], scale[c], out=grad_coords[:, c])
        return grad_coords, None


def sample(image: torch.Tensor, coords: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    """Sample ``image`` at voxel coordinates ``coords``.

    Args:
        image: ``(B, C, *S_in)`` image.
        coords: ``(B, ndim, *S_out)`` voxel coordinates into ``image`` (``B`` may be 1 and broadcast).
        mode: ``"linear"`` (bi/trilinear) or ``"nearest"``.
        padding: ``"border"`` (repeat edge values), ``"zeros"`` or ``"reflection"``.
    Returns:
        ``(B, C, *S_out)`` sampled values.
    """
    if mode not in _INTERPOLATION_MODES:
        raise ValueError(f"interpolation mode must be one of {_INTERPOLATION_MODES}, got {mode!r}")
    if padding not in _PADDING_MODES:
        raise ValueError(f"padding must be one of {_PADDING_MODES}, got {padding!r}")
    grid = voxel_to_grid_sample(coords, image.shape[2:])
    torch_mode = "bilinear" if mode == "linear" else "nearest"
    chunks = _cpu_chunks(image, grid)
    if chunks > 1:
        return _chunked_grid_sample(image, grid, torch_mode, padding, chunks)
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid, mode=torch_mode, padding_mode=padding, align_corners=True)


# Output voxels below which a 3D CPU sample stays in one piece (splitting costs a few small copies).
_CHUNK_MIN_VOXELS = 1 << 16


def _cpu_chunks(image: torch.Tensor, grid: torch.Tensor) -> int:
    """Pieces to split a 3D CPU ``grid_sample`` of one image into (1: do not split).

    PyTorch's 3D CPU ``grid_sample`` (forward and backward) runs its batch items in parallel and
    each item on one thread, so one image uses one core whatever ``torch.get_num_threads()`` says.
    Splitting the output voxels into one batch item per thread (the image broadcast, not copied)
    computes every voxel with the same arithmetic on all threads: the values are bitwise equal.
    Not used when the image itself needs a gradient (its gradient would be one full-size tensor per
    piece) or off the CPU.
    """
    if image.device.type != "cpu" or image.dim() != 5 or image.shape[0] != 1 or grid.shape[0] != 1:
        return 1
    if image.requires_grad and torch.is_grad_enabled():
        return 1
    voxels = grid[..., 0].numel()
    if voxels < _CHUNK_MIN_VOXELS:
        return 1
    return max(1, min(torch.get_num_threads(), voxels // _CHUNK_MIN_VOXELS))


def _chunked_grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding: str, chunks: int) -> torch.Tensor:
    """``grid_sample`` of a ``(1, C, *S_in)`` image at a ``(1, *S_out, 3)`` grid as ``chunks`` batch items.

    When ``chunks`` divides the first output axis, the grid is viewed (not copied) as ``chunks``
    slabs of that axis; otherwise the output voxels, in memory order, are cut into ``chunks`` runs
    of equal length (the grid copied and padded by a few voxels). Same values as one call,
    computed on ``chunks`` threads.
    """
    out_shape = tuple(grid.shape[1:-1])
    channels = image.shape[1]
    images = image.expand(chunks, *image.shape[1:])
    if out_shape[0] % chunks == 0:
        pieces = F.grid_sample(images, grid.reshape(chunks, out_shape[0] // chunks, *grid.shape[2:]), mode=mode,
                               padding_mode=padding, align_corners=True)
        if channels == 1:
            return pieces.reshape(1, 1, *out_shape)
        return pieces.transpose(0, 1).reshape(1, channels, *out_shape)
    voxels = math.prod(out_shape)
    run = -(-voxels // chunks)
    flat = grid.reshape(voxels, grid.shape[-1])
    flat = torch.cat([flat, flat.new_zeros(run * chunks - voxels, flat.shape[1])])
    pieces = F.grid_sample(images, flat.view(chunks, run, 1, 1, flat.shape[1]), mode=mode, padding_mode=padding,
                           align_corners=True)
    values = pieces.view(chunks, channels, run).transpose(0, 1).reshape(channels, chunks * run)
    return values[:, :voxels].reshape(1, channels, *out_shape)


def warp(image: torch.Tensor, disp: torch.Tensor, mode: str = "linear", padding: str = "border") -> torch.Tensor:
    """Pull-warp an image: ``out(x) = image(x + disp(x))``.

    Args:
        image: ``(B, C, *S)`` image on the moving grid (same spatial shape as ``disp``).
        disp: ``(B, ndim, *S)`` displacement in voxels of that grid.
        mode: ``"linear"`` for intensities, ``"nearest"`` for label maps.
    Returns:
        ``(B, C, *S)`` warped image, same dtype as a float ``image``. Integer label maps are
        warped with nearest neighbour whatever ``mode`` says and keep their dtype.
    """
    if image.shape[2:] != disp.shape[2:]:
        raise ValueError(f"image grid {tuple(image.shape[2:])} differs from field grid {tuple(disp.shape[2:])}")
    coords = identity_grid(disp.shape[2:], device=disp.device, dtype=disp.dtype).unsqueeze(0) + disp
    if not torch.is_floating_point(image):
        warped = sample(image.to(disp.dtype), coords, mode="nearest", padding=padding)
        return warped.round().to(image.dtype)
    return sample(image.to(disp.dtype), coords, mode=mode, padding=padding)


def compose(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Displacement of warping by ``first`` and then warping the result by ``second``.

    With pull warps, ``warp(warp(m, first), second)(x) = m(x + second(x) + first(x + second(x)))``,
    so the composite field is ``second + first ∘ (id + second)``.

    Args:
        first, second: ``(B, ndim, *S)`` fields on the same grid.
    Returns:
        ``(B, ndim, *S)`` composite field.
    """
    return second + warp(first, second, mode="linear", padding="border")


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Exponentiate a stationary velocity field by scaling and squaring.

    Args:
        velocity: ``(B, ndim, *S)`` velocity in voxels per unit time.
        steps: number of squarings ``N``; the field is scaled by ``2**-N`` first.
    Returns:
        ``(B, ndim, *S)`` displacement of the time-1 flow (diffeomorphic for smooth velocities).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    disp = velocity / (2.0**steps)
    for _ in range(steps):
        disp = compose(disp, disp)
    return disp


def resize_field(disp: torch.Tensor, shape: Sequence[int], align_corners: bool = True) -> torch.Tensor:
    """Resample a field to another grid covering the same extent, rescaling its values.

    Uses (bi/tri)linear interpolation with ``align_corners=True`` (the outermost voxel centres of
    both grids coincide); component ``d`` is multiplied by ``(shape[d] - 1) / (S[d] - 1)`` so that
    displacements stay in voxels of the new grid. With ``align_corners=False`` the grids' outer
    voxel *edges* coincide instead (voxel ``y`` of the new grid sits at ``(y + 0.5) S / shape - 0.5``,
    positions beyond the outermost centres take the border values; ConvexAdam's ``F.interpolate``
    between its full and half grids) and the factor is ``shape[d] / S[d]``.

    Args:
        disp: ``(B, ndim, *S)`` field.
        shape: new spatial shape.
        align_corners: the grid geometry (see above).
    Returns:
        ``(B, ndim, *shape)`` field.
    """
    old = disp.shape[2:]
    ndim = len(old)
    if tuple(old) == tuple(shape):
        return disp
    mode = "trilinear" if ndim == 3 else "bilinear"
    resized = F.interpolate(disp, size=tuple(shape), mode=mode, align_corners=align_corners)
    if align_corners:
        ratios = [(n_new - 1) / max(n_old - 1, 1) for n_new, n_old in zip(shape, old)]
    else:
        ratios = [n_new / n_old for n_new, n_old in zip(shape, old)]
    factors = torch.tensor(ratios, device=disp.device, dtype=disp.dtype
    )
    return resized * factors.view(1, ndim, *([1] * ndim))


def resize_image(image: torch.Tensor, shape: Sequence[int], antialias: bool = True) -> torch.Tensor:
    """Resample an image to another grid covering the same extent (``align_corners=True``).

    When shrinking and ``antialias`` is true, a Gaussian of standard deviation
    ``0.5 * factor`` (in fine voxels, per axis) is applied first, the usual anti-aliasing choice
    of image pyramids.

    Args:
        image: ``(B, C, *S)`` float image.
        shape: new spatial shape.
    Returns:
        ``(B, C, *shape)`` image.
    """
    old = image.shape[2:]
    if tuple(old) == tuple(shape):
        return image
    ndim = len(old)
    if antialias:
        sigmas = [0.5 * (n_old - 1) / max(n_new - 1, 1) for n_new, n_old in zip(shape, old)]
        if any(s > 0.5 for s in sigmas):
            image = gaussian_smooth(image, [s if s > 0.5 else 0.0 for s in sigmas])
    mode = "trilinear" if ndim == 3 else "bilinear"
    return F.interpolate(image, size=tuple(shape), mode=mode, align_corners=True)


def spatial_gradient(field: torch.Tensor) -> torch.Tensor:
    """Central-difference derivatives of every channel along every axis (one-sided at the border).

    Args:
        field: ``(B, C, *S)``.
    Returns:
        ``(B, C, ndim, *S)`` where ``[:, c, a]`` is ``d field_c / d x_a`` in voxel units.
    """
    ndim = field.dim() - 2
    grads = torch.gradient(field, dim=tuple(range(2, 2 + ndim)))
    return torch.stack(grads, dim=2)


def jacobian_matrix(disp: torch.Tensor) -> torch.Tensor:
    """Jacobian of the transformation ``x -> x + u(x)`` by central differences.

    Args:
        disp: ``(B, ndim, *S)`` displacement in voxels.
    Returns:
        ``(B, ndim, ndim, *S)`` with ``[:, c, a] = delta_ca + d u_c / d x_a``.
    """
    ndim = disp.shape[1]
    jac = spatial_gradient(disp)
    eye = torch.eye(ndim, device=disp.device, dtype=disp.dtype).view(1, ndim, ndim, *([1] * ndim))
    return jac + eye


def determinant_of_entries(matrix):
    """Determinant of a 2x2 or 3x3 matrix given entry by entry, ``matrix[row][column]``, each entry an
    array or tensor of one shape (voxelwise determinants; numpy or torch, the same arithmetic)."""
    if len(matrix) == 2:
        return matrix[0][0] * matrix[1][1] - matrix[0][1] * matrix[1][0]
    (a, b, c), (d, e, f), (g, h, i) = matrix
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def adjugate_of_entries(matrix):
    """Adjugate (transposed cofactor matrix) of a 2x2 or 3x3 matrix given entry by entry, as
    :func:`determinant_of_entries`: ``adj[r][c] = d det / d matrix[c][r]``, and ``matrix^-1 = adj / det``."""
    if len(matrix) == 2:
        (a, b), (c, d) = matrix
        return [[d, -b], [-c, a]]
    (a, b, c), (d, e, f), (g, h, i) = matrix
    return [[e * i - f * h, c * h - b * i, b * f - c * e],
            [f * g - d * i, a * i - c * g, c * d - a * f],
            [d * h - e * g, b * g - a * h, a * e - b * d]]


def determinant(jac: torch.Tensor) -> torch.Tensor:
    """Determinant of ``(B, n, n, *S)`` matrices, returned as ``(B, *S)`` (n = 2 or 3)."""
    n = jac.shape[1]
    return determinant_of_entries([[jac[:, r, c] for c in range(n)] for r in range(n)])


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant of ``x -> x + u(x)`` by central differences: ``(B, ndim, *S) -> (B, *S)``."""
    return determinant(jacobian_matrix(disp))


# --- numpy / on-disk layouts -------------------------------------------------------------------


def field_to_numpy(disp: torch.Tensor) -> np.ndarray:
    """``(1, ndim, *S)`` or ``(ndim, *S)`` tensor -> Learn2Reg on-disk array ``(*S, ndim)`` float32."""
    if disp.dim() in (4, 5) and disp.shape[0] == 1 and disp.shape[1] == disp.dim() - 2:
        disp = disp[0]
    return np.ascontiguousarray(disp.detach().cpu().float().numpy().transpose(*range(1, disp.dim()), 0))


def field_from_numpy(array: np.ndarray) -> torch.Tensor:
    """Learn2Reg on-disk array ``(*S, ndim)`` -> ``(1, ndim, *S)`` float32 tensor."""
    ndim = array.shape[-1]
    if array.ndim != ndim + 1:
        raise ValueError(f"expected a field of shape (*S, {ndim}) with {ndim} spatial axes, got {array.shape}")
    moved = np.moveaxis(np.asarray(array, dtype=np.float32), -1, 0)
    return torch.from_numpy(np.ascontiguousarray(moved)).unsqueeze(0)


def field_to_world(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxel displacement ``(*S, 3)`` -> world (scanner RAS, mm) displacement ``(*S, 3)``.

    A voxel step ``u`` is the world vector ``A[:3, :3] @ u`` for the image affine ``A``.
    """
    return np.einsum("ij,...j->...i", np.asarray(affine, dtype=np.float64)[:3, :3], disp).astype(np.float32)


def world_to_itk_lps(disp_world_ras: np.ndarray) -> np.ndarray:
    """World RAS displacement -> ITK/LPS displacement (x and y flip sign), for ITK displacement-field transforms."""
    out = np.array(disp_world_ras, dtype=np.float32, copy=True)
    out[..., 0] *= -1.0
    out[..., 1] *= -1.0
    return out


def voxel_to_itk_displacement(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Learn2Reg voxel displacement ``(*S, 3)`` -> ITK displacement ``(*S, 3)`` in physical LPS mm.

    ``u`` in voxels of the grid with voxel -> RAS affine ``A`` is the RAS vector ``A[:3, :3] @ u``
    (:func:`field_to_world`); ITK's physical space is LPS, so x and y change sign
    (:func:`world_to_itk_lps`). With the grid's geometry this is ITK's
    ``DisplacementFieldTransform``: a fixed point ``p`` (LPS) maps to ``p + d(p)`` in the moving image.
    """
    return world_to_itk_lps(field_to_world(disp, affine))


def itk_to_voxel_displacement(disp_lps: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`voxel_to_itk_displacement`: LPS mm ``(*S, 3)`` -> voxels of the grid ``(*S, 3)``."""
    ras = world_to_itk_lps(disp_lps)  # the same sign flip turns LPS back into RAS
    inverse = np.linalg.inv(np.asarray(affine, dtype=np.float64)[:3, :3])
    return np.einsum("ij,...j->...i", inverse, ras).astype(np.float32)
