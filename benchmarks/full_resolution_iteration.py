"""Cost of ONE full-resolution iteration of the ``brain-mri`` dense stage, part by part, against a
memory-traffic lower bound (issue 12).

The pair is the 160 x 192 x 224 voxelmorph brain and a smooth known warp of itself (the same kind of
warp as ``benchmarks/engine_identity.py``, at full resolution: three Gaussian-smoothed noise
components, sigma 12 voxels, at most 6 voxels). The iteration is the preset's dense stage at a
full-resolution level (``--levels ...,1``): parameter smoothing (2 passes) and resize to the level
grid, the warp of the moving image (``sample``), LNCC (box 5), diffusion (weight 0.3), the backward
pass and Adam.

Printed, median of ``--repeats`` runs of each part (CPU time = user + sys of the whole process, all
threads; wall clock beside it): every forward part, every backward part (timed on its own with the
upstream gradient the step would give it), the optimiser step, then the whole step as the engine
calls it (``Step.__call__``). Then the machine's memory bandwidth (a large ``torch`` copy: bytes
read + bytes written per second) and the iteration's ratio to the lower bound
``bytes that must cross memory once per iteration / bandwidth`` (what the bound counts is printed).

Run: ``python benchmarks/full_resolution_iteration.py [--repeats 7] [--threads 2]``. On a shared
machine quote CPU times and medians; wall times include waiting for a core. On an oversubscribed
machine set ``OMP_WAIT_POLICY=PASSIVE``: otherwise a thread that waits at the end of each parallel
region for its descheduled partner spins, and the CPU time counts the spinning (the cache-blocked
parts, with many small parallel regions, then look 2x slower than they are).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def brain_pair() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Fixed brain in [0, 1], the brain pulled through a smooth known warp, and that warp (voxels)."""
    from dirio.core.intensity import normalise_intensity

    volume = np.asarray(nib.load(DATA / "voxelmorph-brain" / "test_scan_vol.nii.gz").dataobj, dtype=np.float32)
    fixed = normalise_intensity(volume, "percentile")
    rng = np.random.default_rng(1)
    field = np.stack([gaussian_filter(rng.standard_normal(fixed.shape), 12) for _ in range(3)])
    field *= 6.0 / np.abs(field).max()
    moving = map_coordinates(fixed, np.indices(fixed.shape, dtype=np.float64) + field, order=1, mode="nearest")
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return as_tensor(fixed), as_tensor(moving), field.astype(np.float32)


def timed(function, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median (CPU seconds of the process, wall seconds) of ``repeats`` calls after ``warmup``."""
    cpu, wall = [], []
    for index in range(warmup + repeats):
        c, w = time.process_time(), time.perf_counter()
        function()
        if index >= warmup:
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
    return statistics.median(cpu), statistics.median(wall)


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of a 1 GiB float32 copy (512 MiB read + 512 MiB written), best of ``repeats``."""
    source = torch.rand(1 << 27)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats + 1):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / best


def traffic_bytes(voxels: int) -> tuple[int, str]:
    """Compulsory memory traffic of one iteration (float32), and what it counts.

    A perfectly fused iteration still has to read the parameters, the Adam moments, the moving
    image, the fixed image and its two cached local statistics once, and write the parameters and
    the two moments back: every other intermediate (smoothed field, coordinates, warped image,
    window statistics, gradients) could live in cache. Reads of the moving image at warped
    positions are counted once (the warp is smooth, so neighbouring voxels share cache lines).
    """
    reads = 3 + 3 + 3 + 1 + 3  # parameters, Adam m and v (3 components each), moving, fixed + <I> + var(I)
    writes = 3 + 3 + 3  # parameters, m, v
    text = (f"{reads} float32 volumes read (parameters, Adam m and v: 3 each; moving; fixed, its local mean and "
            f"variance) + {writes} written (parameters, m, v) = {reads + writes} x {voxels} voxels x 4 bytes")
    return (reads + writes) * voxels * 4, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each part (median quoted)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dirio.config.settings import make_settings
    from dirio.core.fields import resize_field, sample
    from dirio.losses.by_level import at_level
    from dirio.optim.combine import make_combine_rule
    from dirio.optim.optimizers import make_optimizer
    from dirio.optim.pyramid import level_context
    from dirio.optim.step import Step
    from dirio.transforms.dense import smooth_parameters

    fixed, moving, true_field = brain_pair()
    settings = make_settings("brain-mri")
    stage = settings.dense_stage()
    terms = settings.terms.build()
    similarity_term, diffusion_term = terms[0], terms[1]
    # a mid-optimisation state: the parameters hold half the true warp (coordinates are not the identity)
    transform = stage.transform.build(init=torch.from_numpy(true_field)[None] * 0.5)
    # the preset's full-resolution level: its last (index 2; the LNCC window of that level, 9)
    ctx = level_context(fixed, moving, len(stage.pyramid.levels) - 1, 1.0)
    transform.start_level(ctx)
    step = Step(terms, make_combine_rule("sum"))
    step.prepare(ctx)
    groups = transform.parameter_groups()
    for group in groups:
        group["lr"] = stage.optimizer.lr / group["lr_divisor"]
    optimizer = make_optimizer(stage.optimizer.optimizer, groups, stage.optimizer.lr)
    # The preset's transform composes an optimised increment into its field (dirio.transforms.composed):
    # the optimised tensor is the increment's.
    optimised = getattr(transform, "increment", transform)
    params = [optimised.param]
    fixed_features, moving_features = ctx.cache[similarity_term.name]
    similarity = at_level(similarity_term.function.similarity, ctx.level)
    regularizer = diffusion_term.function.regularizer
    weight = diffusion_term.weight
    repeats = args.repeats

    # Inputs of each part, with the gradients the step would hand it.
    param = optimised.param
    field = transform.field(ctx).detach()
    coords = (ctx.identity + field).detach()
    warped = sample(moving_features, coords).detach()

    leaf = warped.clone().requires_grad_(True)
    grad_warped = torch.autograd.grad(similarity(fixed_features, leaf, None), leaf)[0]

    rows: list[tuple[str, float, float]] = []

    def part(name, function):
        cpu, wall = timed(function, repeats)
        rows.append((name, cpu, wall))

    with torch.no_grad():
        part("forward: field (smoothing + resize)", lambda: transform.field(ctx))
        part("forward: coordinates x + u", lambda: ctx.identity + field)
        part("forward: warp (sample / grid_sample)", lambda: sample(moving_features, coords))
    part("forward: LNCC (fast path)", lambda: similarity(fixed_features, warped, None))
    with torch.no_grad():
        part("forward: diffusion", lambda: regularizer(param, (1.0, 1.0, 1.0)))

    def lncc_fb():
        w = warped.detach().requires_grad_(True)
        torch.autograd.grad(similarity(fixed_features, w, None), w)

    lncc_cpu, lncc_wall = timed(lncc_fb, repeats)
    lncc_f = next(r for r in rows if r[0].startswith("forward: LNCC"))
    rows.append(("backward: LNCC (fwd+bwd minus fwd)", lncc_cpu - lncc_f[1], lncc_wall - lncc_f[2]))

    def warp_backward():
        c = coords.detach().requires_grad_(True)
        out = sample(moving_features, c)
        torch.autograd.grad(out, c, grad_warped)

    warp_cpu, warp_wall = timed(warp_backward, repeats)
    warp_f = next(r for r in rows if r[0].startswith("forward: warp"))
    rows.append(("backward: warp (fwd+bwd minus fwd)", warp_cpu - warp_f[1], warp_wall - warp_f[2]))

    grad_field = torch.randn_like(field) * 1e-8

    def smoothing_backward():
        p = param.detach().requires_grad_(True)
        out = resize_field(smooth_parameters(p, optimised.smoothing), ctx.shape)
        torch.autograd.grad(out, p, grad_field)

    sm_cpu, sm_wall = timed(smoothing_backward, repeats)
    sm_f = next(r for r in rows if r[0].startswith("forward: field"))
    rows.append(("backward: field (fwd+bwd minus fwd)", sm_cpu - sm_f[1], sm_wall - sm_f[2]))

    def diffusion_backward():
        p = param.detach().requires_grad_(True)
        torch.autograd.grad(regularizer(p, (1.0, 1.0, 1.0)) * weight, p)

    d_cpu, d_wall = timed(diffusion_backward, repeats)
    d_f = next(r for r in rows if r[0].startswith("forward: diffusion"))
    rows.append(("backward: diffusion (fwd+bwd minus fwd)", d_cpu - d_f[1], d_wall - d_f[2]))

    param.grad = torch.randn_like(param) * 1e-6
    part("optimiser: Adam step", optimizer.step)

    whole_cpu, whole_wall = timed(lambda: step(transform, ctx, optimizer, params), repeats)
    parts_cpu = sum(r[1] for r in rows)
    parts_wall = sum(r[2] for r in rows)

    voxels = fixed.numel()
    bandwidth = copy_bandwidth(repeats)
    traffic, counted = traffic_bytes(voxels)
    bound = traffic / bandwidth

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, grid {tuple(fixed.shape[2:])}, "
          f"median of {repeats}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"{'part':44s} {'CPU s':>8s} {'wall s':>8s}")
    for name, cpu, wall in rows:
        print(f"{name:44s} {cpu:8.3f} {wall:8.3f}")
    print(f"{'sum of the parts':44s} {parts_cpu:8.3f} {parts_wall:8.3f}")
    print(f"{'whole step (Step.__call__)':44s} {whole_cpu:8.3f} {whole_wall:8.3f}")
    print(f"memory bandwidth (1 GiB torch copy, read + write): {bandwidth / 1e9:.1f} GB/s")
    print(f"lower bound: {counted} = {traffic / 1e6:.0f} MB -> {bound * 1e3:.0f} ms")
    print(f"whole step / lower bound: {whole_wall / bound:.0f}x (wall), {whole_cpu / bound:.0f}x (CPU time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
