"""Benchmark: gradient combination rules (sum, pcgrad, surgery) for dense instance optimisation.

Stages (``--stages``, default all):

* ``overhead``: seconds per iteration of each rule against ``sum`` on the voxelmorph brain at half
  resolution (80x96x112 image and parameter grid, LNCC + diffusion, the engine's loop body). The
  machine may be shared, so the rules are interleaved iteration by iteration (sum, pcgrad,
  surgery, ..., sum, pcgrad, ...) and medians are reported.
* ``accuracy``: dense IO with each rule at 50 and 100 iterations per pyramid level on the brain
  pairs (voxelmorph scan vs a known synthetic warp of itself, vs its left-right mirror, and the
  OASIS pair A -> B; all at half resolution) and the lung pair (elastix baseline / follow-up,
  index-crop protocol of benchmarks/lung_pair.py, 10 landmarks): Dice or TRE, HD95, SDlogJ, NDV,
  % det <= 0, time, conflict rate. The block scope (8 voxels) runs at 100 iterations.
* ``earlystop``: the plateau stop against fixed iteration counts on the synthetic brain pair.
* ``sweep``: a Pareto sweep (weights x rules) on the brain-mirror pair (pareto.png, sweep.md).
* ``sweeplung``: a Pareto sweep on the lung pair (TRE against regularity).
* ``sgd``: the three rules with plain SGD instead of Adam (several learning rates) on the synthetic brain pair.
* ``blocksize``: block scope with blocks of 4, 8 and 16 voxels on the two voxelmorph brain pairs.

Half resolution: images are resampled with :func:`dirio.core.fields.resize_image` (anti-aliased,
``align_corners=True``), label maps by nearest-neighbour sampling at the same coordinates, so that
image and labels stay aligned; the brain preset then runs with pyramid levels (2, 1), the same
grids as the preset's (4, 2) on full-resolution images.

    python benchmarks/combine_rules.py [--stages overhead,accuracy,earlystop,sweep] [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import _common as C
from dirio.api import register
from dirio.core.fields import identity_grid, resize_image, sample
from dirio.evaluation.evaluate import evaluate_field
from dirio.testing.synthetic import endpoint_error, warped_pair

NAME = "combine_rules"
STAGES = ("overhead", "accuracy", "earlystop", "sweep", "blocksize", "sweeplung", "sgd")
HALF = 2  # shrink factor of the half-resolution brain pairs
# The synthetic warp of benchmarks/brain_synthetic.py (sigma 14, largest component 8 voxels at full
# resolution), scaled to the half-resolution grid.
SIGMA_VOXELS = 7.0
MAX_DISPLACEMENT_VOXELS = 4.0
NOISE_STD = 0.01
SYNTHETIC_SEED = 1
ITERATIONS = (50, 100)  # per pyramid level, the gradient-projection paper's two IO step counts
BLOCK = 8  # block edge of the block scope, parameter-grid voxels
# Rule variants: name -> (rule, options).
VARIANTS = {
    "sum": ("sum", {}),
    "pcgrad": ("pcgrad", {}),
    "surgery": ("surgery", {}),
    "pcgrad-block": ("pcgrad", {"scope": "block", "block_size": BLOCK}),
    "surgery-block": ("surgery", {"scope": "block", "block_size": BLOCK}),
}
MAIN_VARIANTS = ("sum", "pcgrad", "surgery")
BLOCK_VARIANTS = ("pcgrad-block", "surgery-block")
SWEEP_WEIGHTS = (0.03, 0.1, 0.3, 1.0, 3.0)
LUNG_SWEEP_WEIGHTS = (0.3, 1.0, 3.0, 10.0)
SGD_LEARNING_RATES = (3e4, 1e5, 3e5)


# --- pairs ----------------------------------------------------------------------------------------


def half_resolution(image: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Image and labels on the grid ``round(n / 2)`` covering the same extent (``align_corners=True``)."""
    shape = tuple(max(int(round(n / HALF)), 2) for n in image.shape)
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    small = resize_image(tensor, shape)[0, 0].numpy()
    if labels is None:
        return small, None
    scale = torch.tensor([(n - 1) / (m - 1) for n, m in zip(image.shape, shape)], dtype=torch.float32)
    coords = identity_grid(shape).unsqueeze(0) * scale.view(1, -1, 1, 1, 1)
    source = torch.from_numpy(np.ascontiguousarray(labels).astype(np.float32))[None, None]
    small_labels = sample(source, coords, mode="nearest")[0, 0].numpy().round().astype(labels.dtype)
    return small, small_labels


def brain_pairs() -> dict:
    """The half-resolution brain pairs: ``{name: dict(fixed, moving, fixed_labels, moving_labels, ...)}``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from brain_mirror import left_right_axis, swap_left_right_labels
    from oasis_pair import load_subject

    image, seg, label_ids, _ = C.load_voxelmorph_brain(NAME)
    image, seg = half_resolution(image, seg)
    labels = [int(v) for v in label_ids]
    pair = warped_pair(image, seg, sigma=SIGMA_VOXELS, max_displacement=MAX_DISPLACEMENT_VOXELS,
                       noise_std=NOISE_STD, seed=SYNTHETIC_SEED)
    pairs = {
        "brain-synthetic": dict(fixed=pair.fixed, moving=pair.moving, fixed_labels=pair.fixed_labels,
                                moving_labels=pair.moving_labels, labels=labels, true_disp=pair.true_disp,
                                preset="brain-mri"),
    }
    axis, _ = left_right_axis(seg)
    pairs["brain-mirror"] = dict(
        fixed=image, moving=np.ascontiguousarray(np.flip(image, axis=axis)), fixed_labels=seg,
        moving_labels=swap_left_right_labels(np.ascontiguousarray(np.flip(seg, axis=axis))), labels=labels,
        preset="brain-mri")
    fixed, fixed_labels = (half_resolution(*load_subject("B")))
    moving, moving_labels = (half_resolution(*load_subject("A")))
    pairs["oasis-A-to-B"] = dict(fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                                 labels=[1, 2], preset="brain-mri")
    return pairs


def lung_pair() -> dict:
    """The elastix lung pair, index-crop protocol (benchmarks/lung_pair.py), with both lung masks."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from lung_pair import load_lung_data, index_crop_inputs

    data = load_lung_data()
    inputs = index_crop_inputs(data)
    return dict(fixed=data["baseline"].data, moving=inputs["moving"], fixed_mask=data["baseline_mask"].data,
                moving_mask=inputs["moving_mask"], fixed_points=data["baseline_points"],
                moving_points=inputs["moving_points"], spacing=data["baseline"].spacing, preset="lung-ct")


# --- one run ----------------------------------------------------------------------------------------


def levels_for(pair: dict) -> tuple[int, ...]:
    """Pyramid: (2, 1) for the half-resolution brains (the preset's grids), the preset's (4, 2) for the lung."""
    return (2, 1) if pair["preset"] == "brain-mri" else (4, 2)


def run(pair: dict, variant: str, iterations: tuple[int, ...], device: str, **extra) -> dict:
    """Register a pair with one rule variant; score the field."""
    rule, options = VARIANTS[variant]
    result = register(pair["fixed"], pair["moving"], preset=pair["preset"], device=device, progress=False,
                      levels=levels_for(pair), iterations=iterations, combine=rule, combine_options=dict(options),
                      fixed_mask=pair.get("fixed_mask"), moving_mask=pair.get("moving_mask"), **extra)
    metrics = evaluate_field(
        result.disp, fixed_labels=pair.get("fixed_labels"), moving_labels=pair.get("moving_labels"),
        labels=pair.get("labels"), fixed_points=pair.get("fixed_points"), moving_points=pair.get("moving_points"),
        spacing=pair.get("spacing"),
    )
    fine = result.levels[-1]
    row = {
        "variant": variant,
        "iterations": list(iterations),
        "iterations_run": [lv.get("iterations_run", lv["iterations"]) for lv in result.levels],
        "seconds": result.seconds,
        "fine_seconds_per_iteration": fine["seconds_per_iteration"],
        "conflict_rate": result.history[-1].get("conflict_rate", float("nan")) if result.history else float("nan"),
        "conflict_rate_fine_level": _mean([h.get("conflict") for h in result.history if h["level"] == len(result.levels) - 1]),
        "cosine_fine_level_median": _median([h.get("cosine") for h in result.history if h["level"] == len(result.levels) - 1]),
        **{k: v for k, v in metrics.items() if isinstance(v, (int, float))},
    }
    if "true_disp" in pair:
        brain = pair["fixed_labels"] > 0
        row["epe_voxels"] = endpoint_error(result.disp, pair["true_disp"], brain)
    return row


def _mean(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def _median(values):
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.median(values)) if values else float("nan")


def before_metrics(pair: dict) -> dict:
    zero = np.zeros(pair["fixed"].shape + (pair["fixed"].ndim,), dtype=np.float32)
    metrics = evaluate_field(
        zero, fixed_labels=pair.get("fixed_labels"), moving_labels=pair.get("moving_labels"),
        labels=pair.get("labels"), fixed_points=pair.get("fixed_points"), moving_points=pair.get("moving_points"),
        spacing=pair.get("spacing"),
    )
    out = {k: metrics[k] for k in ("dice_mean", "hd95_voxels", "tre_mm_mean") if k in metrics}
    if "true_disp" in pair:
        out["epe_voxels"] = endpoint_error(zero, pair["true_disp"], pair["fixed_labels"] > 0)
    return out


# --- stages ----------------------------------------------------------------------------------------


class IterationLoop:
    """One rule's optimisation state and the engine's step (dirio.optim.step.Step), timed.

    Every rule keeps its own field and optimiser, so each follows its own trajectory; the step is
    the engine's: field from the parameters, warp the moving image, LNCC + diffusion,
    ``rule.backward``, Adam step.
    """

    def __init__(self, variant: str, fixed: torch.Tensor, moving: torch.Tensor, settings):
        from dirio.api import build_terms
        from dirio.core.context import LevelContext
        from dirio.optim.combine import make_combine_rule
        from dirio.optim.optimizers import make_optimizer
        from dirio.optim.step import Step
        from dirio.transforms.dense import make_dense_model

        rule, options = VARIANTS[variant]
        self.shape = tuple(fixed.shape[2:])
        self.model = make_dense_model(False, self.shape, smoothing=settings.transform.smoothing)
        options = dict(options)
        if rule != "sum":
            options["generator"] = torch.Generator().manual_seed(0)
        self.step_function = Step(build_terms(settings), make_combine_rule(rule, **options))
        self.ctx = LevelContext(level=0, shape=self.shape, full_shape=self.shape, fixed=fixed, moving=moving)
        self.step_function.prepare(self.ctx)
        self.optimizer = make_optimizer("adam", [self.model.param], settings.optimization.lr)

    def step(self) -> float:
        """One iteration; its wall time in seconds."""
        start = time.perf_counter()
        self.step_function(self.model, self.ctx, self.optimizer, [self.model.param])
        return time.perf_counter() - start


def stage_overhead(args, pairs) -> dict:
    from dirio.api import normalised
    from dirio.config.settings import make_settings

    pair = pairs["brain-synthetic"]
    settings = make_settings("brain-mri")
    fixed = torch.from_numpy(normalised(pair["fixed"], settings))[None, None]
    moving = torch.from_numpy(normalised(pair["moving"], settings))[None, None]
    variants = ("sum", "pcgrad", "surgery", "pcgrad-block", "surgery-block")
    loops = {v: IterationLoop(v, fixed, moving, settings) for v in variants}
    iterations = 3 if args.quick else args.overhead_iterations
    times: dict[str, list[float]] = {v: [] for v in variants}
    warmup = 2  # first iterations (allocations, the regulariser gradient is still zero) are not timed
    for iteration in range(iterations + warmup):
        for variant in variants:  # interleaved iteration by iteration: load changes hit every rule alike
            seconds = loops[variant].step()
            if iteration >= warmup:
                times[variant].append(seconds)
        if iteration % 10 == 0:
            print(f"[{NAME}] overhead iteration {iteration}", file=sys.stderr, flush=True)
    base = statistics.median(times["sum"])
    rows = []
    for variant, values in times.items():
        # paired ratio: each iteration against the sum iteration of the same round
        ratios = [v / s for v, s in zip(values, times["sum"])]
        rows.append({"variant": variant, "median_seconds_per_iteration": statistics.median(values),
                     "min_seconds_per_iteration": min(values),
                     "overhead_percent_of_medians": 100.0 * (statistics.median(values) / base - 1.0),
                     "overhead_percent_paired_median": 100.0 * (statistics.median(ratios) - 1.0),
                     "all": values})
    table = C.markdown_table(
        ["rule", "median s/it", "min s/it", "overhead (ratio of medians)", "overhead (median of paired ratios)"],
        [[r["variant"], C.fmt(r["median_seconds_per_iteration"], 3), C.fmt(r["min_seconds_per_iteration"], 3),
          f"{r['overhead_percent_of_medians']:+.1f} %", f"{r['overhead_percent_paired_median']:+.1f} %"]
         for r in rows])
    notes = [f"voxelmorph brain at half resolution {tuple(fixed.shape[2:])}, parameters on the same grid, LNCC window "
             f"5 + diffusion 0.3, Adam lr 0.5, parameter smoothing 2 (the brain preset's finest level); {iterations} "
             f"timed iterations per rule after {warmup} warm-up ones, the rules interleaved iteration by iteration; "
             "an iteration = the engine's loop body (field, warp, losses, rule.backward, Adam step).",
             f"machine: {C.machine_info(args.device)}; shared with other jobs while measured."]
    return {"rows": rows, "table": table, "notes": notes}


def accuracy_table(rows: list[dict], befores: dict) -> str:
    header = ["pair", "rule", "it/level", "Dice", "TRE mm", "EPE vox", "HD95", "SDlogJ", "NDV %", "% det<=0",
              "conflict (fine level)", "opt s", "fine s/it"]
    body = []
    for pair_name, before in befores.items():
        body.append([pair_name, "before", "-", C.fmt(before.get("dice_mean")), C.fmt(before.get("tre_mm_mean"), 2),
                     C.fmt(before.get("epe_voxels"), 2), C.fmt(before.get("hd95_voxels"), 2), "", "", "", "", "", ""])
        for r in (r for r in rows if r["pair"] == pair_name):
            body.append([
                pair_name, r["variant"], str(r["iterations"][0]), C.fmt(r.get("dice_mean")),
                C.fmt(r.get("tre_mm_mean"), 2), C.fmt(r.get("epe_voxels"), 2),
                C.fmt(r.get("hd95_voxels") if "dice_mean" in r else r.get("hd95_mm"), 2), C.fmt(r["sdlogj_l2r"], 4),
                C.fmt(r["ndv_percent"], 4), C.fmt(r["percent_nonpositive_jacobian"], 4),
                C.fmt(r["conflict_rate_fine_level"], 2), C.fmt(r["seconds"], 1), C.fmt(r["fine_seconds_per_iteration"], 3),
            ])
    return C.markdown_table(header, body)


def stage_accuracy(args, pairs) -> dict:
    rows, befores = [], {}
    counts = (2,) if args.quick else ITERATIONS
    for pair_name, pair in pairs.items():
        befores[pair_name] = before_metrics(pair)
        for n in counts:
            variants = MAIN_VARIANTS + (BLOCK_VARIANTS if n == counts[-1] else ())
            for variant in variants:
                start = time.perf_counter()
                row = {"pair": pair_name, **run(pair, variant, (n, n), args.device)}
                rows.append(row)
                print(f"[{NAME}] {pair_name} {variant} {n}: {time.perf_counter() - start:.0f} s", file=sys.stderr,
                      flush=True)
                save_partial(args, "accuracy", {"rows": rows, "before": befores})
    notes = ["Brain pairs at half resolution (pyramid (2, 1) = the brain preset's grids), lung pair at full "
             "resolution with the lung preset (MIND, pyramid (4, 2)) and both lung masks (index-crop protocol).",
             "Dice: brain-synthetic and brain-mirror over the 30 VoxelMorph labels, OASIS over its 2 coarse labels "
             "(shifted against the images: not for ranking, see its README). TRE: 10 lung landmarks, cubic. "
             "EPE: mean |u - u_true| in the brain (synthetic pair). HD95: voxels, brain pairs only.",
             "conflict: mean over the fine level's iterations of the fraction of conflicting units (global scope: "
             "steps) -- for sum it is not measured (one backward pass).",
             "pcgrad: random choice of the projected gradient every step (seed 0); surgery: GSMorph (no weight); "
             f"-block: inner products per {BLOCK}^3 block of the parameter grid."]
    return {"rows": rows, "before": befores, "table": accuracy_table(rows, befores), "notes": notes}


def stage_earlystop(args, pairs) -> dict:
    pair = pairs["brain-synthetic"]
    budgets = (3,) if args.quick else (100, 200)
    rows = []
    for variant in ("sum", "pcgrad"):
        for budget in budgets:
            row = {"pair": "brain-synthetic", "stop": "plateau",
                   **run(pair, variant, (budget, budget), args.device, early_stop="plateau")}
            rows.append(row)
            print(f"[{NAME}] early stop {variant} budget {budget}: {row['iterations_run']}", file=sys.stderr, flush=True)
            save_partial(args, "earlystop", {"rows": rows})
    header = ["rule", "budget/level", "iterations run", "Dice", "EPE vox", "SDlogJ", "% det<=0", "opt s"]
    body = [[r["variant"], str(r["iterations"][0]), ", ".join(map(str, r["iterations_run"])), C.fmt(r["dice_mean"]),
             C.fmt(r["epe_voxels"], 2), C.fmt(r["sdlogj_l2r"], 4), C.fmt(r["percent_nonpositive_jacobian"], 4),
             C.fmt(r["seconds"], 1)] for r in rows]
    notes = ["plateau defaults: window 10, tolerance 0.01, min 20 iterations per level; compare with the fixed "
             "50 / 100 rows of the accuracy table (same pair, same preset)."]
    return {"rows": rows, "table": C.markdown_table(header, body), "notes": notes}


def stage_sweep(args, pairs) -> dict:
    from dirio.config.settings import make_settings
    from dirio.apps.sweep import pareto_figure, rows_markdown, run_sweep

    pair = pairs["brain-mirror"]
    iterations = (2, 2) if args.quick else (80, 40)
    settings = make_settings("brain-mri", levels=(2, 1), iterations=iterations, progress=False)
    rows = run_sweep(pair["fixed"], pair["moving"], settings=settings, weights=SWEEP_WEIGHTS,
                     fixed_labels=pair["fixed_labels"], moving_labels=pair["moving_labels"],
                     label_ids=pair["labels"], device=args.device,
                     log=lambda line: print(f"[{NAME}] {line}", file=sys.stderr, flush=True))
    out = Path(args.out)
    pareto_figure(out / "sweep_brain_mirror_pareto.png", rows, title="brain vs mirror, half resolution",
                  overwrite=True)
    notes = [f"brain-mirror pair at half resolution, brain preset with pyramid (2, 1) and {iterations} iterations; "
             f"weights {SWEEP_WEIGHTS}; figure sweep_brain_mirror_pareto.png."]
    return {"rows": rows, "table": rows_markdown(rows), "notes": notes}


def stage_sweeplung(args, pairs) -> dict:
    from dirio.config.settings import make_settings
    from dirio.apps.sweep import pareto_figure, rows_markdown, run_sweep

    pair = pairs["lung-index-crop"]
    iterations = (2, 2) if args.quick else (100, 100)
    settings = make_settings("lung-ct", iterations=iterations, progress=False)
    rows = run_sweep(pair["fixed"], pair["moving"], settings=settings, weights=LUNG_SWEEP_WEIGHTS,
                     fixed_points=pair["fixed_points"], moving_points=pair["moving_points"], spacing=pair["spacing"],
                     fixed_mask=pair["fixed_mask"], moving_mask=pair["moving_mask"], device=args.device,
                     log=lambda line: print(f"[{NAME}] {line}", file=sys.stderr, flush=True))
    pareto_figure(Path(args.out) / "sweep_lung_pareto.png", rows, title="lung pair (index-crop), TRE", overwrite=True)
    notes = [f"lung pair, lung preset with {iterations} iterations and both masks; weights {LUNG_SWEEP_WEIGHTS}; "
             "figure sweep_lung_pareto.png."]
    return {"rows": rows, "table": rows_markdown(rows), "notes": notes}


def stage_sgd(args, pairs) -> dict:
    from dirio.errors import DirioError

    pair = pairs["brain-synthetic"]
    n = 2 if args.quick else ITERATIONS[0]
    rows = []
    for lr in SGD_LEARNING_RATES:
        for variant in MAIN_VARIANTS:
            try:
                row = run(pair, variant, (n, n), args.device, optimizer="sgd", lr=lr)
            except DirioError as error:  # a loss became infinite: the step size is unstable for this rule
                row = {"variant": variant, "diverged": str(error)}
            rows.append({"pair": "brain-synthetic", "optimizer": "sgd", "lr": lr, **row})
            print(f"[{NAME}] sgd lr {lr:g} {variant}: {row.get('dice_mean', 'diverged')}", file=sys.stderr, flush=True)
            save_partial(args, "sgd", {"rows": rows})
    header = ["lr", "rule", "Dice", "EPE vox", "SDlogJ", "% det<=0", "conflict (fine level)"]
    body = [[f"{r['lr']:g}", r["variant"], C.fmt(r.get("dice_mean")), C.fmt(r.get("epe_voxels"), 2),
             C.fmt(r.get("sdlogj_l2r"), 4), C.fmt(r.get("percent_nonpositive_jacobian"), 4),
             C.fmt(r.get("conflict_rate_fine_level"), 2)] if "diverged" not in r else
            [f"{r['lr']:g}", r["variant"], "diverged", "", "", "", ""] for r in rows]
    notes = [f"plain SGD with the brain preset's cosine learning-rate schedule, {n} iterations per level, "
             "pyramid (2, 1); lr is in the engine's units (voxels per unit gradient: the LNCC gradient per voxel is "
             "~1e-7, hence the large values). Adam rows: see the accuracy table."]
    return {"rows": rows, "table": C.markdown_table(header, body), "notes": notes}


def stage_blocksize(args, pairs) -> dict:
    sizes = (4, 8, 16)
    n = 2 if args.quick else ITERATIONS[-1]
    rows = []
    for pair_name in ("brain-synthetic", "brain-mirror"):
        for rule in ("pcgrad", "surgery"):
            for size in sizes:
                variant = f"{rule}-block{size}"
                VARIANTS[variant] = (rule, {"scope": "block", "block_size": size})
                rows.append({"pair": pair_name, "block": size, **run(pairs[pair_name], variant, (n, n), args.device)})
                print(f"[{NAME}] block size {pair_name} {variant}", file=sys.stderr, flush=True)
                save_partial(args, "blocksize", {"rows": rows})
    header = ["pair", "rule", "block", "Dice", "EPE vox", "HD95", "SDlogJ", "% det<=0", "conflict (fine level)"]
    body = [[r["pair"], r["variant"].split("-")[0], str(r["block"]), C.fmt(r["dice_mean"]), C.fmt(r.get("epe_voxels"), 2),
             C.fmt(r["hd95_voxels"], 2), C.fmt(r["sdlogj_l2r"], 4), C.fmt(r["percent_nonpositive_jacobian"], 4),
             C.fmt(r["conflict_rate_fine_level"], 2)] for r in rows]
    notes = [f"{n} iterations per level, pyramid (2, 1), half-resolution pairs; block edge in parameter-grid voxels "
             "(= level voxels, grid spacing 1)."]
    return {"rows": rows, "table": C.markdown_table(header, body), "notes": notes}


def save_partial(args, stage: str, record: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stage}.partial.json").write_text(json.dumps(record, indent=1, default=float))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES),
                        type=lambda t: tuple(s.strip() for s in t.split(",") if s.strip()))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--quick", action="store_true", help="smoke test (numbers are NOT results)")
    parser.add_argument("--overhead-iterations", type=int, default=60, help="timed iterations per rule")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); on a "
                        "machine shared with other jobs, 1 avoids the collapse of oversubscribed OpenMP threads")
    parser.add_argument("--out", type=Path, default=C.OUT_ROOT / NAME)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    pairs = brain_pairs()
    if "accuracy" in args.stages or "sweeplung" in args.stages:
        pairs["lung-index-crop"] = lung_pair()
    stages = {"overhead": stage_overhead, "accuracy": stage_accuracy, "earlystop": stage_earlystop,
              "sweep": stage_sweep, "blocksize": stage_blocksize, "sweeplung": stage_sweeplung, "sgd": stage_sgd}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        print(f"[{NAME}] stage {stage} ...", file=sys.stderr, flush=True)
        record = stages[stage](args, pairs)
        heading = f"## combine rules: {stage}" + ("  (--quick smoke test: NOT results)" if args.quick else "")
        section = "\n\n".join([heading, record["table"], "\n".join(f"- {n}" for n in record["notes"])]) + "\n"
        print(section, flush=True)
        C.write_json(out / f"{stage}.json", {"stage": stage, "quick": args.quick,
                                             "machine": C.machine_info(args.device), **record}, overwrite=True)
        (out / f"{stage}.md").write_text(section)


if __name__ == "__main__":
    main()
