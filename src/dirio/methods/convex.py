"""Discrete initialisation: MIND-SSC cost volume + coupled convex optimisation (ConvexAdam's first step).

The method of Siebert, Hansen & Heinrich (ConvexAdam, Learn2Reg 2021; summarised in section 2.1
of the continuous-optimisation paper), written for dirio's conventions:

1. MIND-SSC descriptors (:func:`dirio.similarity.mind_ssc`) of both full-resolution images are
   averaged over cells of ``g x g x g`` voxels (``g`` = ``grid_spacing``). Cell ``c`` covers the fine
   voxels ``g c .. g c + g - 1`` (incomplete cells at the far border are dropped); its centre is the
   fine position ``g c + (g - 1) / 2``.
2. Cost volume: for every cell ``x`` and every integer cell displacement ``d`` in ``[-r, r]^ndim``,
   ``C(x, d) = sum over channels of (F_fixed(x) - F_moving(x + d))^2`` (sum over the 12 MIND
   channels, as ConvexAdam; moving features replicated beyond the border), then box-smoothed over
   space (``cost_smoothing`` passes of a 3-cell mean: a patch-wise SSD). A fixed mask weights the
   cost by the fraction of mask voxels in each cell, so cells outside it are filled in by the
   regularisation.
3. Coupled convex optimisation of ``E(u, v) = sum_x C(x, u(x)) + theta ||u - v||^2 + smoothness(v)``:
   alternately the *exact* pointwise minimum over the discrete ``u`` (non-convex data term, solved
   globally by search) and the smoothing of ``u`` into ``v`` (the convex part, approximated by
   ``field_smoothing`` passes of a 3-cell mean), with the coupling ``theta`` increasing along
   ``coupling``.
4. Optional symmetrisation: the backward problem (moving to fixed) is solved the same way and both
   fields are made inverse consistent by the fixed-point iteration
   ``f <- (f - b o (id + f)) / 2``, ``b <- (b - f o (id + b)) / 2`` (``consistency_iterations``
   times, both updated from the previous pair).
5. The cell field is upsampled to the full grid (trilinear, cell-centre geometry) and becomes the
   initial field of the dense stage.

Memory: the cost volume has ``(2r + 1)^ndim`` values per cell. It is computed in slabs of cells
along the first axis; when its size exceeds ``memory_mb`` it is never stored whole but recomputed
slab by slab for each coupling step (same result, more time). Units: displacements are in cells
inside this module and in fine voxels of the full grid in :class:`ConvexResult.displacement`.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from ..field import identity_grid, sample, warp
from ..similarity import mind_ssc
from .dense import smooth_parameters

# ConvexAdam's coupling weights (convex_adam_utils.coupled_convex), applied to a cost summed
# over the 12 MIND channels and to squared displacements in cells.
DEFAULT_COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# Tie-break of the first (uncoupled) step: among equal costs (e.g. cells outside a mask, whose
# cost is 0) the smallest displacement wins. Far below any real cost difference (costs are sums
# of 12 squared differences of descriptors in [0, 1]).
_TIE_BREAK = 1e-6


@dataclass
class ConvexConfig:
    """Settings of the discrete + coupled convex initialisation (defaults: ConvexAdam's ``convex_adam_MIND.py``).

    Attributes:
        grid_spacing: cell size ``g`` in fine voxels (ConvexAdam ``grid_sp = 6``).
        radius: search radius ``r`` in cells; displacements up to ``r * g`` fine voxels per axis are
            reachable (ConvexAdam ``disp_hw = 4``: +-24 voxels).
        coupling: increasing coupling weights ``theta`` (ConvexAdam's six values).
        cost_smoothing: passes of a 3-cell box filter over the cost volume (ConvexAdam: 2).
        field_smoothing: passes of a 3-cell box filter turning ``u`` into ``v`` (ConvexAdam: 1).
        symmetric: also solve moving -> fixed and make the pair inverse consistent (ConvexAdam ``ic=True``).
        consistency_iterations: fixed-point iterations of the symmetrisation (ConvexAdam: 15).
        mind_radius, mind_dilation: MIND-SSC patch radius and neighbourhood spacing in fine voxels
            (ConvexAdam ``mind_r = 1``, ``mind_d = 2``).
        memory_mb: largest cost volume kept in memory; above it the volume is recomputed per
            coupling step, slab by slab.
        slab_mb: target size of one slab of the cost volume (bounds the temporaries).
    """

    grid_spacing: int = 6
    radius: int = 4
    coupling: Sequence[float] = field(default_factory=lambda: DEFAULT_COUPLING)
    cost_smoothing: int = 2
    field_smoothing: int = 1
    symmetric: bool = True
    consistency_iterations: int = 15
    mind_radius: int = 1
    mind_dilation: int = 2
    memory_mb: float = 1024.0
    slab_mb: float = 64.0

    def validate(self) -> None:
        """Raise ``ValueError`` with a one-line reason when the settings are inconsistent."""
        if not (isinstance(self.grid_spacing, int) and self.grid_spacing >= 1):
            raise ValueError(f"convex grid spacing must be an integer >= 1 voxel, got {self.grid_spacing!r}")
        if not (isinstance(self.radius, int) and self.radius >= 1):
            raise ValueError(f"convex search radius must be an integer >= 1 cell, got {self.radius!r}")
        if any(c < 0 for c in self.coupling) or list(self.coupling) != sorted(self.coupling):
            raise ValueError(f"convex coupling weights must be non-negative and increasing, got {tuple(self.coupling)}")
        if self.cost_smoothing < 0 or self.field_smoothing < 0 or self.consistency_iterations < 0:
            raise ValueError("convex smoothing passes and consistency iterations must be >= 0")
        if not self.memory_mb >= 0 or not self.slab_mb > 0:
            raise ValueError("convex memory_mb must be >= 0 and slab_mb > 0")


@dataclass
class ConvexResult:
    """What the discrete initialisation produces.

    Attributes:
        displacement: ``(1, ndim, *S)`` float32 forward field on the full grid, in fine voxels.
        cells: ``(1, ndim, *C)`` forward field on the cell grid, in cells.
        backward: ``(1, ndim, *C)`` backward field (moving -> fixed) in cells, or ``None``.
        consistency_error: mean ``|f + b o (id + f)|`` in cells before and after symmetrisation
            (``None`` without ``symmetric``).
        seconds: wall time; ``peak_memory_mb``: peak resident memory of the process (CPU) or peak
            allocated CUDA memory during the stage.
        cost_volume_mb: size of one full cost volume; ``cached``: whether it was kept in memory;
        slabs: number of slabs per pass over the volume.
    """

    displacement: torch.Tensor
    cells: torch.Tensor
    backward: torch.Tensor | None
    consistency_error: tuple[float, float] | None
    seconds: float
    peak_memory_mb: float
    cost_volume_mb: float
    cached: bool
    slabs: int


# --- geometry ------------------------------------------------------------------------------------


def cell_shape(shape: Sequence[int], grid_spacing: int) -> tuple[int, ...]:
    """Cells of ``grid_spacing`` voxels covering ``shape`` (incomplete cells dropped, at least 1)."""
    return tuple(max(n // grid_spacing, 1) for n in shape)


def pool_to_cells(features: torch.Tensor, grid_spacing: int) -> torch.Tensor:
    """Mean of ``(B, C, *S)`` features over cells of ``grid_spacing`` voxels -> ``(B, C, *cell_shape)``."""
    ndim = features.dim() - 2
    g = grid_spacing
    kernel = [min(g, n) for n in features.shape[2:]]
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    return pool(features, kernel, stride=kernel)


def cells_to_full(cells: torch.Tensor, shape: Sequence[int], grid_spacing: int) -> torch.Tensor:
    """Upsample a cell-grid field (in cells) to the full grid (in fine voxels), trilinear.

    A fine voxel ``x`` sits at cell coordinate ``(x - (g - 1) / 2) / g`` (cell-centre geometry);
    beyond the outermost cell centres the field is extended with its border values.

    Args:
        cells: ``(1, ndim, *C)`` displacement in cells.
        shape: full spatial shape ``S``.
    Returns:
        ``(1, ndim, *S)`` displacement in fine voxels.
    """
    ndim = cells.shape[1]
    g = float(grid_spacing)
    kernel = [min(grid_spacing, n) for n in shape]
    offsets = torch.tensor([(k - 1) / 2.0 for k in kernel], device=cells.device, dtype=cells.dtype)
    sizes = torch.tensor(kernel, device=cells.device, dtype=cells.dtype)
    view = (1, ndim) + (1,) * ndim
    coords = (identity_grid(shape, device=cells.device, dtype=cells.dtype).unsqueeze(0) - offsets.view(view)) / sizes.view(view)
    return sample(cells, coords, padding="border") * sizes.view(view)


def displacement_table(radius: int, ndim: int, device=None) -> torch.Tensor:
    """``(K, ndim)`` float32 integer displacements of ``[-radius, radius]^ndim``, last axis fastest."""
    steps = range(-radius, radius + 1)
    return torch.tensor(list(itertools.product(steps, repeat=ndim)), dtype=torch.float32, device=device)


# --- cost volume ---------------------------------------------------------------------------------


def _box_smooth(x: torch.Tensor, passes: int) -> torch.Tensor:
    """``passes`` rounds of a separable 3-voxel mean over the spatial axes of ``(B, C, *S)``
    (at the border, the mean of the voxels inside): the same numbers as
    :func:`dirio.methods.dense.smooth_parameters`, with in-place shifted adds, which are several
    times faster than average pooling over the hundreds of channels of a cost volume."""
    ndim = x.dim() - 2
    for _ in range(passes):
        for dim in range(2, 2 + ndim):
            n = x.shape[dim]
            if n == 1:
                continue
            total = x.clone()
            total.narrow(dim, 1, n - 1).add_(x.narrow(dim, 0, n - 1))
            total.narrow(dim, 0, n - 1).add_(x.narrow(dim, 1, n - 1))
            total.mul_(1.0 / 3.0)
            # The two end voxels average 2 values, not 3.
            total.narrow(dim, 0, 1).mul_(1.5)
            total.narrow(dim, n - 1, 1).mul_(1.5)
            x = total
    return x


def cost_slab(fixed_cells: torch.Tensor, moving_padded: torch.Tensor, radius: int, start: int, stop: int,
              smoothing: int, weight: torch.Tensor | None = None, moving_norms: torch.Tensor | None = None
              ) -> torch.Tensor:
    """SSD cost of cells ``start <= x_0 < stop`` (first axis) for every displacement.

    Args:
        fixed_cells: ``(1, C, *Cs)`` fixed features on the cell grid.
        moving_padded: ``(1, C, *(Cs + 2 radius))`` moving features, padded by ``radius`` cells.
        radius: search radius ``r`` in cells.
        start, stop: the slab along the first cell axis.
        smoothing: box-filter passes over space; the slab is computed with a halo of ``smoothing``
            cells so that the result equals slicing the smoothed whole volume.
        weight: optional ``(1, 1, *Cs)`` per-cell weight of the cost (fixed-mask fraction).
        moving_norms: optional ``(*(Cs + 2 radius))`` squared norms of ``moving_padded`` over channels
            (computed when absent).
    Returns:
        ``(K, stop - start, *Cs[1:])`` float32 cost, ``K = (2r + 1)^ndim`` in
        :func:`displacement_table` order.
    """
    ndim = fixed_cells.dim() - 2
    extent = fixed_cells.shape[2]
    lo, hi = max(start - smoothing, 0), min(stop + smoothing, extent)
    rows = hi - lo
    width = 2 * radius + 1
    rest = fixed_cells.shape[3:]
    fixed = fixed_cells[0, :, lo:hi]  # (C, rows, *rest)
    fixed_sq = fixed.square().sum(0)  # (rows, *rest)
    if moving_norms is None:
        moving_norms = moving_padded[0].square().sum(0)
    cost = torch.empty((width**ndim, rows) + tuple(rest), device=fixed.device, dtype=torch.float32)
    k = 0
    for leading in itertools.product(range(width), repeat=ndim - 1):
        window = moving_padded[0, :, lo + leading[0] : hi + leading[0]]
        norms = moving_norms[lo + leading[0] : hi + leading[0]]
        for axis, shift in enumerate(leading[1:], start=1):
            window = window.narrow(1 + axis, shift, rest[axis - 1])
            norms = norms.narrow(axis, shift, rest[axis - 1])
        # The last axis: every shift at once as an unfolded view (C, rows, *rest, width).
        window = window.unfold(-1, width, 1)
        # Channel by channel: one fused multiply-add per channel over (rows, *rest, width); an
        # einsum here becomes thousands of tiny batched matrix products.
        cross = fixed[0].unsqueeze(-1) * window[0]
        for channel in range(1, fixed.shape[0]):
            cross.addcmul_(fixed[channel].unsqueeze(-1), window[channel])
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, summed over channels.
        block = fixed_sq.unsqueeze(-1) + norms.unfold(-1, width, 1) - 2.0 * cross
        cost[k : k + width] = block.clamp_min(0).movedim(-1, 0)
        k += width
    if weight is not None:
        cost = cost * weight[0, :, lo:hi]
    cost = _box_smooth(cost.unsqueeze(0), smoothing)[0]
    return cost[:, start - lo : start - lo + (stop - start)]


class CostVolume:
    """The SSD cost volume of a pair of cell feature maps, cached whole or recomputed per slab.

    Args:
        fixed_cells, moving_cells: ``(1, C, *Cs)`` features on the cell grid.
        radius: search radius in cells.
        smoothing: box-filter passes over space.
        weight: optional ``(1, 1, *Cs)`` cost weight.
        memory_mb: cache the whole volume when it is at most this size.
        slab_mb: target size of one slab.
    """

    def __init__(self, fixed_cells, moving_cells, radius: int, smoothing: int, weight=None,
                 memory_mb: float = 1024.0, slab_mb: float = 64.0):
        ndim = fixed_cells.dim() - 2
        self.radius = radius
        self.smoothing = smoothing
        self.weight = weight
        self.fixed = fixed_cells
        self.moving_padded = F.pad(moving_cells, [radius] * (2 * ndim), mode="replicate")
        self.moving_norms = self.moving_padded[0].square().sum(0)
        self.shape = tuple(fixed_cells.shape[2:])
        self.displacements = (2 * radius + 1) ** ndim
        row_bytes = 4 * self.displacements * math.prod(self.shape[1:])
        # The einsum/unfold temporaries of a slab are a few times one slab's cost.
        self.rows = max(1, min(self.shape[0], int(slab_mb * 2**20 // max(row_bytes * 4, 1))))
        self.megabytes = row_bytes * self.shape[0] / 2**20
        self.cached = self.megabytes <= memory_mb
        self.slabs = math.ceil(self.shape[0] / self.rows)
        self._volume = None
        if self.cached:
            self._volume = torch.empty((self.displacements,) + self.shape, device=fixed_cells.device)
            for start, stop in self.ranges():
                self._volume[:, start:stop] = self._compute(start, stop)

    def ranges(self):
        """``(start, stop)`` of every slab along the first cell axis."""
        for start in range(0, self.shape[0], self.rows):
            yield start, min(start + self.rows, self.shape[0])

    def _compute(self, start: int, stop: int) -> torch.Tensor:
        return cost_slab(self.fixed, self.moving_padded, self.radius, start, stop, self.smoothing, self.weight,
                         self.moving_norms)

    def slab(self, start: int, stop: int) -> torch.Tensor:
        """``(K, stop - start, *Cs[1:])`` cost of a slab (from the cache or recomputed)."""
        if self._volume is not None:
            return self._volume[:, start:stop]
        return self._compute(start, stop)


# --- coupled convex optimisation -----------------------------------------------------------------


def coupled_argmin(volume: CostVolume, table: torch.Tensor, target: torch.Tensor | None, coupling: float
                   ) -> torch.Tensor:
    """Per cell, the displacement minimising ``C(x, d) + coupling * ||d - target(x)||^2``.

    Args:
        volume: the cost volume.
        table: ``(K, ndim)`` displacements (cells).
        target: ``(1, ndim, *Cs)`` current smooth field ``v`` (cells), or ``None`` for the first
            step (pure cost plus a negligible pull towards 0 to break ties).
        coupling: ``theta``.
    Returns:
        ``(1, ndim, *Cs)`` float32 field of discrete displacements (cells).
    """
    ndim = table.shape[1]
    out = torch.empty((1, ndim) + volume.shape, device=table.device, dtype=torch.float32)
    norms = table.square().sum(1)  # (K,)
    view = (-1,) + (1,) * ndim
    for start, stop in volume.ranges():
        cost = volume.slab(start, stop)
        if target is None:
            coupled = cost + _TIE_BREAK * norms.view(view)
        else:
            # ||d - v||^2 = |d|^2 - 2 d.v + |v|^2; the last term does not change the minimiser.
            dot = torch.einsum("kd,d...->k...", table, target[0, :, start:stop])
            coupled = cost + coupling * (norms.view(view) - 2.0 * dot)
        best = coupled.argmin(0)
        out[0, :, start:stop] = table[best].movedim(-1, 0)
    return out


def coupled_convex(volume: CostVolume, table: torch.Tensor, coupling: Sequence[float], smoothing: int
                   ) -> torch.Tensor:
    """Coupled convex optimisation over a cost volume -> ``(1, ndim, *Cs)`` smooth field in cells.

    Starts from the smoothed pointwise minimum, then for each ``theta`` in ``coupling``: discrete
    minimum of cost + ``theta ||d - v||^2`` per cell, smoothed into the new ``v``.
    """
    smooth = _box_smooth(coupled_argmin(volume, table, None, 0.0), smoothing)
    for theta in coupling:
        smooth = _box_smooth(coupled_argmin(volume, table, smooth, float(theta)), smoothing)
    return smooth


def consistency_error(forward: torch.Tensor, backward: torch.Tensor) -> float:
    """Mean ``|f(x) + b(x + f(x))|`` over the grid (same units as the fields): 0 for exact inverses."""
    return float((forward + warp(backward, forward)).norm(dim=1).mean())


def symmetrise(forward: torch.Tensor, backward: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Make two opposite pull fields inverse consistent by the averaging fixed-point iteration.

    Each iteration sets ``f <- (f - b o (id + f)) / 2`` and ``b <- (b - f o (id + b)) / 2`` from
    the previous pair; a pair of exact inverses is a fixed point.
    """
    for _ in range(iterations):
        forward, backward = 0.5 * (forward - warp(backward, forward)), 0.5 * (backward - warp(forward, backward))
    return forward, backward


def _peak_memory_mb(device: torch.device) -> float:
    from ..optim.engine import peak_memory_mb

    return peak_memory_mb(device)


def convex_initialisation(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    config: ConvexConfig | None = None,
    *,
    fixed_mask: torch.Tensor | None = None,
    moving_mask: torch.Tensor | None = None,
) -> ConvexResult:
    """Discrete + coupled convex registration of ``moving`` to ``fixed`` (ConvexAdam's first step).

    Args:
        fixed, moving: ``(1, 1, *S)`` float images on the same grid (2D or 3D), the moving one
            already pre-aligned when an affine stage ran.
        config: the stage's settings (default :class:`ConvexConfig`).
        fixed_mask, moving_mask: optional ``(1, 1, *S)`` masks in [0, 1]: the fixed mask weights the
            forward cost, the moving mask the backward one.
    Returns:
        A :class:`ConvexResult` whose ``displacement`` initialises the dense stage.
    """
    config = config or ConvexConfig()
    config.validate()
    start_time = time.perf_counter()
    device = fixed.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    shape = tuple(fixed.shape[2:])
    ndim = len(shape)
    g = config.grid_spacing
    with torch.no_grad():
        fixed_cells = pool_to_cells(mind_ssc(fixed, config.mind_radius, config.mind_dilation), g)
        moving_cells = pool_to_cells(mind_ssc(moving, config.mind_radius, config.mind_dilation), g)
        weights = [None if m is None else pool_to_cells(m.to(fixed.dtype), g) for m in (fixed_mask, moving_mask)]
        table = displacement_table(config.radius, ndim, device=device)

        def solve(a, b, weight):
            volume = CostVolume(a, b, config.radius, config.cost_smoothing, weight, config.memory_mb, config.slab_mb)
            return coupled_convex(volume, table, config.coupling, config.field_smoothing), volume

        forward, volume = solve(fixed_cells, moving_cells, weights[0])
        backward = None
        errors = None
        if config.symmetric:
            backward, _ = solve(moving_cells, fixed_cells, weights[1])
            before = consistency_error(forward, backward)
            forward, backward = symmetrise(forward, backward, config.consistency_iterations)
            errors = (before, consistency_error(forward, backward))
        full = cells_to_full(forward, shape, g)
    return ConvexResult(
        displacement=full,
        cells=forward,
        backward=backward,
        consistency_error=errors,
        seconds=time.perf_counter() - start_time,
        peak_memory_mb=_peak_memory_mb(device),
        cost_volume_mb=volume.megabytes,
        cached=volume.cached,
        slabs=volume.slabs,
    )
