"""Discrete initialisation: MIND-SSC cost volume + coupled convex optimisation (ConvexAdam's first step).

The method of Siebert, Hansen & Heinrich (ConvexAdam, Learn2Reg 2021; summarised in section 2.1
of the continuous-optimisation paper), written for dirio's conventions:

1. MIND-SSC descriptors (:func:`dirio.losses.mind.mind_ssc`) of both images (full resolution as
   ConvexAdam, or shrunk by ``feature_factor``) are averaged over cells of ``g x g x g`` fine voxels
   (``g`` = ``grid_spacing``). Cell ``c`` covers the fine voxels ``g c .. g c + g - 1`` (incomplete
   cells at the far border are dropped); its centre is the fine position ``g c + (g - 1) / 2``.
2. Cost volume: for every cell ``x`` and every integer cell displacement ``d`` in ``[-r, r]^ndim``,
   ``C(x, d) = sum over channels of (F_fixed(x) - F_moving(x + d))^2`` (sum over the 12 MIND
   channels, as ConvexAdam), then box-smoothed over space (``cost_smoothing`` passes of a 3-cell
   mean: a patch-wise SSD). A fixed mask weights the cost by the fraction of mask voxels in each
   cell, so cells outside it are filled in by the regularization. ``borders`` says what lies beyond
   the cell grid (see :data:`BORDERS`).
3. Coupled convex optimisation of ``E(u, v) = sum_x C(x, u(x)) + theta ||u - v||^2 + smoothness(v)``:
   alternately the *exact* pointwise minimum over the discrete ``u`` (non-convex data term, solved
   globally by search) and the smoothing of ``u`` into ``v`` (the convex part, approximated by
   ``field_smoothing`` passes of a 3-cell mean), with the coupling ``theta`` increasing along
   ``coupling``.
4. Optional symmetrisation: the backward problem (moving to fixed) is solved the same way and both
   fields are made inverse consistent by the fixed-point iteration
   ``f <- (f - b o (id + f)) / 2``, ``b <- (b - f o (id + b)) / 2`` (``consistency_iterations``
   times, both updated from the previous pair; with ConvexAdam's borders the other field is read
   at ``x + f(x) n / (n - 1)`` and is 0 beyond the cell grid, see :data:`BORDERS`).
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

from dirio.core.fields import identity_grid, sample, warp
from dirio.core.filters import box_smooth
from dirio.losses.mind import mind_ssc
from dirio.core.profiling import peak_memory_mb, reset_peak_memory

# ConvexAdam's coupling weights (convex_adam_utils.coupled_convex), applied to a cost summed
# over the 12 MIND channels and to squared displacements in cells.
DEFAULT_COUPLING = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# What lies beyond the cell grid.
# "convexadam" (ConvexAdam's convex_adam_utils, measured to reproduce its cost volume and fields to
# float precision; benchmarks/convexadam_reference.py): the moving features are 0 beyond the grid
# (its F.pad); the box filters of the cost and of the field divide by 3 at the border too (its
# avg_pool3d(padding=1), count_include_pad); in the symmetrisation the other field is 0 beyond the
# grid and is read at x + f(x) n / (n - 1), n cells per axis (its grid_sample on an
# align_corners=False grid of a field normalised by (n - 1) / 2).
# "replicate": moving features repeated beyond the border, averages over the cells inside, the
# other field read at x + f(x) with its border values repeated (dirio's own geometry).
BORDERS = ("convexadam", "replicate")
# Tie-break of the first (uncoupled) step with dirio's own borders: among equal costs (e.g. cells
# outside a mask, whose cost is 0) the smallest displacement wins. Far below any real cost
# difference (costs are sums of 12 squared differences of descriptors in [0, 1]). With ConvexAdam's
# borders there is none: as its torch.argmin, the first displacement of the table wins (-r in every
# component: featureless regions, e.g. the background of a brain, start at the far corner).
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
        borders: ``"convexadam"`` (its conventions at the border of the cell grid) or
            ``"replicate"`` (see :data:`BORDERS`).
        mind_radius, mind_dilation: MIND-SSC patch radius and neighbourhood spacing in voxels of
            the image the features are computed on (ConvexAdam ``mind_r = 1``, ``mind_d = 2`` at full
            resolution).
        feature_factor: the MIND features are computed on the image averaged over blocks of this
            many voxels per axis (1: full resolution, as ConvexAdam; 2: half resolution, 8x fewer
            voxels), then pooled over cells of ``grid_spacing / feature_factor`` of those voxels
            (``grid_spacing`` must be a multiple of it): the cells cover the same fine voxels
            either way.
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
    borders: str = "convexadam"
    mind_radius: int = 1
    mind_dilation: int = 2
    feature_factor: int = 1
    memory_mb: float = 1024.0
    slab_mb: float = 256.0

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
        if not (isinstance(self.feature_factor, int) and self.feature_factor >= 1
                and self.grid_spacing % self.feature_factor == 0):
            raise ValueError(
                f"convex feature factor must be an integer >= 1 dividing the grid spacing {self.grid_spacing}, "
                f"got {self.feature_factor!r}"
            )
        if self.borders not in BORDERS:
            raise ValueError(f"convex borders must be one of {', '.join(BORDERS)}, got {self.borders!r}")
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
        grid_spacing: cell size ``g`` in fine voxels.
    Returns:
        ``(1, ndim, *S)`` displacement in fine voxels.
    """
    ndim = cells.shape[1]
    options = dict(device=cells.device, dtype=cells.dtype)
    kernel = torch.tensor([min(grid_spacing, n) for n in shape], **options).view((1, ndim) + (1,) * ndim)
    coords = (identity_grid(shape, **options).unsqueeze(0) - (kernel - 1) / 2) / kernel
    return sample(cells, coords, padding="border") * kernel


def displacement_table(radius: int, ndim: int, device=None) -> torch.Tensor:
    """``(K, ndim)`` float32 integer displacements of ``[-radius, radius]^ndim``, last axis fastest."""
    steps = range(-radius, radius + 1)
    return torch.tensor(list(itertools.product(steps, repeat=ndim)), dtype=torch.float32, device=device)


# --- cost volume ---------------------------------------------------------------------------------


def cost_slab(fixed_cells: torch.Tensor, moving_padded: torch.Tensor, radius: int, start: int, stop: int,
              smoothing: int, weight: torch.Tensor | None = None, moving_norms: torch.Tensor | None = None,
              border: str = "inside") -> torch.Tensor:
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
        border: the box filter's border (:func:`dirio.core.filters.box_smooth`): ``"inside"`` or
            ``"zeros"`` (the cost is 0 beyond the grid at every pass).
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
    channels = fixed.shape[0]
    # One displacement at a time over plain slices, channel by channel: |a - b|^2 summed over
    # channels = |a|^2 + |b|^2 - 2 a.b with a fused multiply-add per channel. (Unfolded
    # overlapping views, einsum and the per-line banded matrix products were 10-30x slower on the
    # CPU, and reductions over the channel axis slow down badly on a busy multi-threaded CPU.)
    for k, offset in enumerate(itertools.product(range(width), repeat=ndim)):
        index = (slice(lo + offset[0], hi + offset[0]),) + tuple(
            slice(shift, shift + n) for shift, n in zip(offset[1:], rest))
        window = moving_padded[0][(slice(None),) + index]
        out = cost[k]
        torch.mul(fixed[0], window[0], out=out)
        for channel in range(1, channels):
            out.addcmul_(fixed[channel], window[channel])
        out.mul_(-2.0).add_(fixed_sq).add_(moving_norms[index])
    cost.clamp_min_(0)
    if weight is not None:
        cost = cost * weight[0, :, lo:hi]
    # (with zeros, the halo's far rows are wrong where the slab's edge is not the grid's; the errors
    # move one row per pass and never reach the slab's own rows)
    cost = box_smooth(cost.unsqueeze(0), smoothing, border)[0]
    return cost[:, start - lo : start - lo + (stop - start)]


class CostVolume:
    """The SSD cost volume of a pair of cell feature maps, cached whole or recomputed per slab.

    Args:
        fixed_cells, moving_cells: ``(1, C, *Cs)`` features on the cell grid.
        radius: search radius in cells.
        smoothing: box-filter passes over space.
        weight: optional ``(1, 1, *Cs)`` cost weight.
        borders: :data:`BORDERS` (``"replicate"`` here by default; :class:`ConvexConfig` chooses).
        memory_mb: cache the whole volume when it is at most this size.
        slab_mb: target size of one slab.
    """

    def __init__(self, fixed_cells, moving_cells, radius: int, smoothing: int, weight=None,
                 memory_mb: float = 1024.0, slab_mb: float = 256.0, borders: str = "replicate"):
        ndim = fixed_cells.dim() - 2
        self.radius = radius
        self.smoothing = smoothing
        self.weight = weight
        self.fixed = fixed_cells
        self.border = "zeros" if borders == "convexadam" else "inside"
        if borders == "convexadam":
            self.moving_padded = F.pad(moving_cells, [radius] * (2 * ndim))
        else:
            self.moving_padded = F.pad(moving_cells, [radius] * (2 * ndim), mode="replicate")
        self.moving_norms = self.moving_padded[0].square().sum(0)
        self.shape = tuple(fixed_cells.shape[2:])
        self.displacements = (2 * radius + 1) ** ndim
        row_bytes = 4 * self.displacements * math.prod(self.shape[1:])
        # A slab's temporaries (its halo rows, the smoothing copies, the cell-major copy and the
        # coupled cost) are up to ~4 times its own cost values.
        self.rows = max(1, min(self.shape[0], int(slab_mb * 2**20 // max(row_bytes * 4, 1))))
        self.megabytes = row_bytes * self.shape[0] / 2**20
        self.cached = self.megabytes <= memory_mb
        self.slabs = math.ceil(self.shape[0] / self.rows)
        self.plane = math.prod(self.shape[1:])
        self._volume = None
        if self.cached:
            self._volume = torch.empty((math.prod(self.shape), self.displacements), device=fixed_cells.device)
            for start, stop in self.ranges():
                self._volume[start * self.plane : stop * self.plane] = self._compute(start, stop)

    def ranges(self):
        """``(start, stop)`` of every slab along the first cell axis."""
        for start in range(0, self.shape[0], self.rows):
            yield start, min(start + self.rows, self.shape[0])

    def _compute(self, start: int, stop: int) -> torch.Tensor:
        cost = cost_slab(self.fixed, self.moving_padded, self.radius, start, stop, self.smoothing, self.weight,
                         self.moving_norms, self.border)
        # Cell-major (cells, K): the coupled minimum is then a contiguous reduction per cell,
        # about 3x faster than reducing over the leading axis of (K, cells).
        return cost.reshape(self.displacements, -1).t().contiguous()

    def slab(self, start: int, stop: int) -> torch.Tensor:
        """``(cells of the slab, K)`` cost of cells ``start <= x_0 < stop`` (row-major cell order)."""
        if self._volume is not None:
            return self._volume[start * self.plane : stop * self.plane]
        return self._compute(start, stop)


# --- coupled convex optimisation -----------------------------------------------------------------


def coupled_argmin(volume: CostVolume, table: torch.Tensor, target: torch.Tensor | None, coupling: float,
                   tie_break: float = _TIE_BREAK) -> torch.Tensor:
    """Per cell, the displacement minimising ``C(x, d) + coupling * ||d - target(x)||^2``.

    Args:
        volume: the cost volume.
        table: ``(K, ndim)`` displacements (cells).
        target: ``(1, ndim, *Cs)`` current smooth field ``v`` (cells), or ``None`` for the first
            step (pure cost plus ``tie_break * |d|^2``, a negligible pull towards 0 to break ties).
        coupling: ``theta``.
        tie_break: see above (0: the first displacement of ``table`` wins ties).
    Returns:
        ``(1, ndim, *Cs)`` float32 field of discrete displacements (cells).
    """
    ndim = table.shape[1]
    out = torch.empty((1, ndim) + volume.shape, device=table.device, dtype=torch.float32)
    norms = table.square().sum(1)  # (K,)
    for start, stop in volume.ranges():
        cost = volume.slab(start, stop)  # (n, K)
        if target is None:
            coupled = cost + tie_break * norms if tie_break else cost
        else:
            # ||d - v||^2 = |d|^2 - 2 d.v + |v|^2; the last term does not change the minimiser.
            # One matrix product adds -2 theta d.v to cost + theta |d|^2.
            v = target[0, :, start:stop].reshape(ndim, -1).t()  # (n, ndim)
            coupled = torch.addmm(cost + coupling * norms, v, table.t(), alpha=-2.0 * coupling)
        best = coupled.argmin(1)
        out[0, :, start:stop] = table[best].t().reshape((ndim, stop - start) + volume.shape[1:])
    return out


def coupled_convex(volume: CostVolume, table: torch.Tensor, coupling: Sequence[float], smoothing: int,
                   border: str = "inside") -> torch.Tensor:
    """Coupled convex optimisation over a cost volume -> ``(1, ndim, *Cs)`` smooth field in cells.

    Starts from the smoothed pointwise minimum, then for each ``theta`` in ``coupling``: discrete
    minimum of cost + ``theta ||d - v||^2`` per cell, smoothed into the new ``v`` (box filter with
    ``border`` ``"inside"`` or ``"zeros"``, :func:`dirio.core.filters.box_smooth`).
    """
    tie_break = _TIE_BREAK if border == "inside" else 0.0
    smooth = box_smooth(coupled_argmin(volume, table, None, 0.0, tie_break), smoothing, border)
    for theta in coupling:
        smooth = box_smooth(coupled_argmin(volume, table, smooth, float(theta)), smoothing, border)
    return smooth


def consistency_error(forward: torch.Tensor, backward: torch.Tensor) -> float:
    """Mean ``|f(x) + b(x + f(x))|`` over the grid (same units as the fields): 0 for exact inverses."""
    return float((forward + warp(backward, forward)).norm(dim=1).mean())


def symmetrise(forward: torch.Tensor, backward: torch.Tensor, iterations: int, borders: str = "replicate"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Make two opposite pull fields inverse consistent by the averaging fixed-point iteration.

    Each iteration sets ``f <- (f - b o (id + f)) / 2`` and ``b <- (b - f o (id + b)) / 2`` from
    the previous pair; a pair of exact inverses is a fixed point. With ``borders="replicate"`` the
    other field is read at ``x + f(x)`` with its border values beyond the grid; with
    ``"convexadam"`` at ``x + f(x) n / (n - 1)`` (``n`` cells per axis) and 0 beyond the grid
    (bilinear weights of outside cells dropped), as ConvexAdam's ``inverse_consistency``.
    """
    ndim = forward.shape[1]
    if borders == "convexadam":
        n = torch.tensor(forward.shape[2:], dtype=forward.dtype, device=forward.device).view((1, ndim) + (1,) * ndim)
        stretch, padding = n / (n - 1).clamp_min(1), "zeros"
    else:
        stretch, padding = 1.0, "border"
    for _ in range(iterations):
        forward, backward = (0.5 * (forward - warp(backward, forward * stretch, padding=padding)),
                             0.5 * (backward - warp(forward, backward * stretch, padding=padding)))
    return forward, backward


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
    reset_peak_memory(device)
    shape = tuple(fixed.shape[2:])
    ndim = len(shape)
    g = config.grid_spacing
    factor = config.feature_factor
    cell = g // factor  # cell size in voxels of the feature grid
    with torch.no_grad():
        # Block averages: feature voxel h covers fine voxels f h .. f h + f - 1, so cells of
        # ``cell`` feature voxels cover exactly the fine cells of g voxels (no resampling).
        images = [pool_to_cells(image, factor) for image in (fixed, moving)]
        masks = [None if m is None else pool_to_cells(m.to(fixed.dtype), factor) for m in (fixed_mask, moving_mask)]
        fixed_cells, moving_cells = (pool_to_cells(mind_ssc(image, config.mind_radius, config.mind_dilation), cell)
                                     for image in images)
        weights = [None if m is None else pool_to_cells(m, cell) for m in masks]
        table = displacement_table(config.radius, ndim, device=device)

        def solve(a, b, weight):
            volume = CostVolume(a, b, config.radius, config.cost_smoothing, weight, config.memory_mb, config.slab_mb,
                                config.borders)
            return coupled_convex(volume, table, config.coupling, config.field_smoothing, volume.border), volume

        forward, volume = solve(fixed_cells, moving_cells, weights[0])
        backward = None
        errors = None
        if config.symmetric:
            backward, _ = solve(moving_cells, fixed_cells, weights[1])
            before = consistency_error(forward, backward)
            forward, backward = symmetrise(forward, backward, config.consistency_iterations, config.borders)
            errors = (before, consistency_error(forward, backward))
        full = cells_to_full(forward, shape, g)
    return ConvexResult(
        displacement=full,
        cells=forward,
        backward=backward,
        consistency_error=errors,
        seconds=time.perf_counter() - start_time,
        peak_memory_mb=peak_memory_mb(device),
        cost_volume_mb=volume.megabytes,
        cached=volume.cached,
        slabs=volume.slabs,
    )
