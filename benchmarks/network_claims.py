"""The network papers' claims, measured with their own schedules (at half or full resolution).

Claims tested (``../shared/papers``):

* NIO (neural instance optimisation): optimising LapIRN's weights level by level, [100, 60, 30]
  Adam steps at 1e-4 on ``(1 - lambda) LNCC + lambda diffusion`` (lambda 0.4), beats direct
  inference, most of all under distribution shifts (contrast changes, another data set).
* IO / IO-GP (gradient-projection instance optimisation): tuning every weight for 50-100 steps
  helps; projecting conflicting gradients (``--combine pcgrad``) helps more than the sum.

Modes (``--modes``; each a set of :func:`dirio.api.register` overrides):

* ``direct`` (one forward pass), ``dense`` and ``network+dense`` (the ``brain-mri`` preset);
* ``io-sum`` / ``io-pcgrad``: ``--method network-io`` for ``--io-steps`` steps at ``--io-lr``,
  with the sum or the projection of the two gradients;
* ``nio``: ``--method nio`` with the paper's schedule (every default);
* ``nio-cpu``, ``network-io-cpu``: the ``--network-budget cpu`` settings
  (:data:`dirio.methods.network.NETWORK_BUDGETS`; IO with the sum);
* ``nio-budget``: NIO with ``--budget-iterations``, ``--budget-levels``, ``--budget-resolution``,
  ``--budget-lr`` and ``--budget-refine`` (candidates for the CPU setting; probes at ``--io-probes`` steps of each level).

Probes: the optimising modes are also scored part way (``--probes``, e.g. IO after 10, 25 and 50
of 100 steps; NIO at the end of each level), which is exactly what a run stopped there returns
(constant learning rate; NIO's final field always runs every level). The probe's scoring time is
left out of its ``seconds`` and ``cpu_seconds``. This gives the accuracy-against-time curves from
one run, and IO-50 from the IO-100 run.

Pairs (fixed <- moving; ``benchmarks/network_io.py`` builds the first three):

* ``oasisA``: the voxelmorph scan <- OASIS subject A on its grid (13 classes; out of LapIRN's
  training domain: another data set's preprocessing and axis order, ``--network-axes voxelmorph-grid``);
* ``oasisA-gamma0.5``, ``oasisA-gamma2``, ``oasisA-inverted``: the same with the moving contrast changed;
* ``oasisA-reverse``: OASIS subject A <- the voxelmorph scan (the other direction of ``oasisA``);
* ``synthetic``: the voxelmorph scan warped by a smooth random field <- the scan (30 labels);
* ``lapirnAB``: LapIRN's own OASIS demo subjects, B <- A (in domain; 2 coarse labels that are
  shifted against their images, so Dice is weak there: ``benchmarks/oasis_pair.py``).

``--scale half`` halves every axis (2x2x2 mean of the images, majority of the labels):
160x192x224 -> 80x96x112, where a LapIRN step costs about an eighth of a full-resolution one.

Every finished run (and probe) is appended at once as one JSON line to ``OUT/results.jsonl``, so
partial results survive a stopped run; ``--summary FILE`` prints the Markdown table.

Resuming (IO modes): with ``--checkpoint-every K`` an IO run saves the network's weights, the
optimiser's state (AMSGrad's moments and step count), the state of pcgrad's random generator (it
draws which gradient of a conflicting pair is projected) and its elapsed time every ``K`` steps to
``OUT/checkpoints/``. Started again with the same arguments, it goes on from the last of them, so a
full-resolution run of hours (a step costs several CPU minutes there) may span several stopped
sessions. IO's learning rate is constant, so the resumed run takes the same steps as an unbroken one; its times add the stopped parts' times (each part's setup
included) and its row says where it resumed (``resumed_at``).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/network_claims.py --scale half \\
        --plan oasisA:direct,oasisA:nio,oasisA:io-pcgrad --threads 1

With ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=268435456`` in the environment, glibc keeps freed
memory for reuse as the command line does (:mod:`dirio.apps.allocator`): 15-20 % of a run's CPU time
is the kernel zeroing fresh pages otherwise, at about a fifth more peak memory. Each row records the
``MALLOC_*`` settings it ran with (``malloc``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import _common as C
import network_io as NIO_PAIRS
from dirio.api import register
from dirio.core.context import LevelContext
from dirio.core.fields import field_to_numpy
from dirio.methods import network as network_methods
from dirio.optim import pyramid as pyramid_module
from dirio.transforms.network import NETWORK_FIXED, NETWORK_MOVING

NAME = "network_claims"
LAPIRN_DATA = C.DATA / "lapirn-oasis-brain"

MODES = {
    "direct": {"method": "network"},
    "dense": {"method": "dense", "preset": "brain-mri"},
    "network+dense": {"method": "network+dense", "preset": "brain-mri"},
    "io-sum": {"method": "network-io", "combine": "sum"},
    "io-pcgrad": {"method": "network-io", "combine": "pcgrad"},
    "nio": {"method": "nio"},
    "nio-cpu": {"method": "nio", "network_budget": "cpu"},
    "network-io-cpu": {"method": "network-io", "network_budget": "cpu"},
    "nio-budget": {"method": "nio"},  # --budget-iterations / --budget-levels / --budget-resolution
}
#: Default probes: IO after these many steps; NIO at these (level, steps) points.
IO_PROBES = (1, 10, 25, 50)
NIO_PROBES = ((0, 25), (0, 50), (0, 100), (1, 20), (1, 60), (2, 10))


def downsample_image(image: np.ndarray) -> np.ndarray:
    """Half resolution: the mean of each 2x2x2 block (odd sizes lose their last slice)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    return F.avg_pool3d(tensor, 2)[0, 0].numpy()


def downsample_labels(labels: np.ndarray, label_ids) -> np.ndarray:
    """Half resolution: the most frequent label of each 2x2x2 block (0 = background included)."""
    ids = [0, *[int(i) for i in label_ids]]
    votes = torch.stack([F.avg_pool3d(torch.from_numpy((labels == i).astype(np.float32))[None, None], 2)[0, 0]
                         for i in ids])
    return np.asarray(ids, dtype=np.int16)[votes.argmax(0).numpy()]


def lapirn_pair():
    """LapIRN's demo subjects: fixed B <- moving A (160x192x144), labels 1, 2."""
    import nibabel as nib

    def load(name, labels=False):
        data = np.asarray(nib.load(C.require(LAPIRN_DATA / name, NAME)).dataobj)
        return data.astype(np.int16) if labels else data.astype(np.float32)

    return (load("image_B_160x192x144.nii.gz"), load("image_A_160x192x144.nii.gz"),
            load("image_B_160x192x144_seg.nii.gz", True), load("image_A_160x192x144_seg.nii.gz", True), [1, 2])


def load_pairs(names, scale: str) -> dict:
    """``name -> (fixed, moving, fixed labels, moving labels, label ids, network axes)``."""
    out = {}
    wanted = sorted({"oasisA" if n == "oasisA-reverse" else n for n in names if n != "lapirnAB"})
    for name, pair in NIO_PAIRS.pairs(wanted).items():
        out[name] = (*pair, NIO_PAIRS.AXES)
    if "oasisA-reverse" in names:  # OASIS A fixed <- the voxelmorph scan moving
        fixed, moving, fixed_seg, moving_seg, ids, axes = out["oasisA"]
        out["oasisA-reverse"] = (moving, fixed, moving_seg, fixed_seg, ids, axes)
    out = {name: pair for name, pair in out.items() if name in names}
    if "lapirnAB" in names:
        out["lapirnAB"] = (*lapirn_pair(), "identity")
    if scale == "half":
        out = {name: (downsample_image(f), downsample_image(m), downsample_labels(fs, ids),
                      downsample_labels(ms, ids), ids, axes)
               for name, (f, m, fs, ms, ids, axes) in out.items()}
    return out


class Probe:
    """Scores the network's full-grid field at given (level, step) points of a run, off the clock.

    Installed by wrapping :func:`dirio.methods.network.make_transform`: the transform's
    ``after_step`` counts steps per pyramid level and, at a probe point, computes the field a run
    stopped there would return (the last level's network levels, on the network's own inputs).
    ``offset`` steps of level 0 ran before (a resumed run); ``on_step(transform, steps)`` is called
    after every step (a checkpoint).
    """

    def __init__(self, points, on_probe, offset=0, on_step=None):
        self.points = set(points)
        self.on_probe = on_probe
        self.on_step = on_step
        self.paused_wall = 0.0
        self.paused_cpu = 0.0
        self.steps: dict[int, int] = {0: offset} if offset else {}
        self.transform = None  # the run's transform, once made
        self._original = network_methods.make_transform

    def __enter__(self):
        def make(model, options):
            transform = self._original(model, options)
            self.transform = transform
            after_step = transform.after_step

            def counted(ctx):
                after_step(ctx)
                self.steps[ctx.level] = self.steps.get(ctx.level, 0) + 1
                if (ctx.level, self.steps[ctx.level]) in self.points:
                    self._probe(transform, ctx)
                if self.on_step is not None:
                    self._paused(self.on_step, transform, dict(self.steps))

            transform.after_step = counted
            return transform

        network_methods.make_transform = make
        return self

    def __exit__(self, *exc):
        network_methods.make_transform = self._original

    def _paused(self, call, *args):
        """Run ``call(*args)`` off the clock."""
        wall, cpu = time.perf_counter(), time.process_time()
        call(*args)
        self.paused_wall += time.perf_counter() - wall
        self.paused_cpu += time.process_time() - cpu

    def _probe(self, transform, ctx):
        def score():
            fixed, moving = ctx.extra[NETWORK_FIXED], ctx.extra[NETWORK_MOVING]
            final = LevelContext(level=99, shape=tuple(fixed.shape[2:]), full_shape=tuple(fixed.shape[2:]),
                                 fixed=fixed, moving=moving, extra=ctx.extra)
            with torch.no_grad():
                disp = field_to_numpy(transform.field(final))
            self.on_probe(disp, dict(self.steps), self.paused_wall, self.paused_cpu)

        self._paused(score)


class Resume:
    """Saves and restores an IO run's state, so that a stopped run goes on where it was.

    A checkpoint holds the transform's weights, the optimiser's state, the steps done and the time
    spent (wall and CPU seconds, off-the-clock work left out). Used as a context, it patches the
    engine's optimiser factory: when the run's optimiser is made (inside the network stage, after
    the pretrained weights were saved for restoring), the checkpoint's weights and optimiser state
    are loaded into the run's transform (``probe.transform``: the run's :class:`Probe`, given
    before the context is entered). ``load``: go on from an existing checkpoint.
    """

    def __init__(self, path: Path, load: bool):
        self.path = path
        self.probe: Probe | None = None
        self.state = None
        if load and path.exists():
            try:
                self.state = torch.load(path, weights_only=False)
            except Exception as error:  # noqa: BLE001  one line naming the file, not a traceback
                raise SystemExit(f"{NAME}: {path}: unreadable checkpoint ({type(error).__name__}); remove it "
                                 "to start the run again") from None
        self.done = self.state["steps"] if self.state else 0
        self.optimizer = None
        self.generator = None  # the combination rule's (pcgrad draws which gradient it projects)
        self._originals = pyramid_module.make_optimizer, pyramid_module.make_combine_rule

    def __enter__(self):
        make_optimizer, make_rule = self._originals

        def optimizer(name, groups, lr, **options):
            self.optimizer = make_optimizer(name, groups, lr, **options)
            if self.state is not None:
                self.probe.transform.load_state_dict(self.state["transform"])
                self.optimizer.load_state_dict(self.state["optimizer"])
            return self.optimizer

        def rule(name, **options):
            self.generator = options.get("generator")
            if self.state is not None and self.generator is not None and self.state.get("generator") is not None:
                self.generator.set_state(self.state["generator"])  # absent: a checkpoint of an older version
            return make_rule(name, **options)

        pyramid_module.make_optimizer, pyramid_module.make_combine_rule = optimizer, rule
        return self

    def __exit__(self, *exc):
        pyramid_module.make_optimizer, pyramid_module.make_combine_rule = self._originals

    def save(self, transform, steps: int, seconds: float, cpu_seconds: float) -> None:
        """Write the checkpoint atomically (a stopped write leaves the previous one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save({"transform": transform.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "generator": None if self.generator is None else self.generator.get_state(),
                    "steps": steps, "seconds": seconds, "cpu_seconds": cpu_seconds}, partial)
        partial.replace(self.path)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def steps_run(history: list[dict]) -> tuple[list[int], int]:
    """The optimising steps of a run, counted in its history rows: per level of the optimising stage
    (the network's, for the network modes), and the steps of the refinement that ends a network
    stage (0 without one). A run with no history (direct): ``([0], 0)``."""
    refine = sum(1 for row in history if row.get("stage") == "refine")
    rows = [row for row in history if row.get("stage") != "refine"]
    if not rows:
        return [0], refine
    last = max(row["level"] for row in rows)
    return [sum(1 for row in rows if row["level"] == level) for level in range(last + 1)], refine


def run_one(pair_name, pair, mode, args, write) -> None:
    fixed, moving, fixed_seg, moving_seg, label_ids, axes = pair
    overrides = dict(MODES[mode])
    preset = overrides.pop("preset", None)
    if overrides["method"] != "dense":
        overrides["network_axes"] = axes
    if mode.startswith("io-"):
        overrides["network_iterations"] = (args.io_steps,)
        overrides["network_lr"] = args.io_lr
    if mode == "nio-budget":
        overrides.update(network_iterations=args.budget_iterations, network_levels=args.budget_levels,
                         network_resolution=args.budget_resolution, network_refine=args.budget_refine)
        if args.budget_lr is not None:
            overrides["network_lr"] = args.budget_lr
    if args.network_lambda is not None and overrides["method"] in ("nio", "network-io"):
        overrides["network_lambda"] = args.network_lambda
    before = NIO_PAIRS.score(np.zeros(fixed.shape + (3,), np.float32), fixed_seg, moving_seg, label_ids)["dice"]
    base = {"pair": pair_name, "scale": args.scale, "mode": mode, "shape": list(fixed.shape), "axes": axes,
            "dice_before": before, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in overrides.items()},
            "threads": torch.get_num_threads(),
            # glibc's allocator settings, when set (they change the system time: dirio.apps.allocator)
            "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}
    io = mode.startswith("io-")
    points = ([(0, n) for n in args.io_probes if n < args.io_steps] if io
              else list(NIO_PROBES) if mode == "nio"
              else [(level, n) for level in range(len(args.budget_iterations)) for n in args.io_probes
                    if n < args.budget_iterations[level]] if mode == "nio-budget" else [])
    every = args.checkpoint_every if io else 0
    lam = "" if args.network_lambda is None else f"-lambda{args.network_lambda:g}"  # a run of another loss
    resume = Resume(Path(args.out) / "checkpoints" / f"{args.scale}-{pair_name}-{mode}-{args.io_steps}-"
                    f"{args.io_lr:g}{lam}.pt", load=bool(every))
    if resume.done:
        if resume.done >= args.io_steps:
            raise SystemExit(f"{NAME}: {resume.path} has {resume.done} steps, not fewer than --io-steps")
        overrides["network_iterations"] = (args.io_steps - resume.done,)
        base["resumed_at"] = resume.done
        print(f"[{NAME}] resuming at step {resume.done} from {resume.path}", file=sys.stderr, flush=True)
    before_wall = resume.state["seconds"] if resume.state else 0.0
    before_cpu = resume.state["cpu_seconds"] if resume.state else 0.0
    rss = C.reset_peak_rss()
    start_wall, start_cpu = time.perf_counter(), time.process_time()

    def elapsed(paused_wall, paused_cpu):
        return (before_wall + time.perf_counter() - start_wall - paused_wall,
                before_cpu + time.process_time() - start_cpu - paused_cpu)

    def on_probe(disp, steps, paused_wall, paused_cpu):
        seconds, cpu_seconds = elapsed(paused_wall, paused_cpu)
        row = {**base, "probe": True, "steps": [steps.get(k, 0) for k in range(max(steps) + 1)],
               **NIO_PAIRS.score(disp, fixed_seg, moving_seg, label_ids),
               "seconds": seconds, "cpu_seconds": cpu_seconds, "peak_memory_mb": C.process_peak_rss_mb()}
        write(row)

    def checkpoint(transform, steps):
        if steps[0] % every == 0 and steps[0] < args.io_steps:
            resume.save(transform, steps[0], *elapsed(probe.paused_wall, probe.paused_cpu))

    with Probe(points, on_probe, offset=resume.done, on_step=checkpoint if every else None) as probe:
        resume.probe = probe
        with resume:
            result = register(fixed, moving, preset=preset, device=args.device, progress=False, **overrides)
    steps, refine_steps = steps_run(result.history)
    if resume.done:
        steps[0] += resume.done
    seconds, cpu_seconds = elapsed(probe.paused_wall, probe.paused_cpu)
    write({**base, "probe": False, "steps": steps, "refine_steps": refine_steps,
           **NIO_PAIRS.score(result.disp, fixed_seg, moving_seg, label_ids),
           "seconds": seconds, "cpu_seconds": cpu_seconds,
           "optimisation_seconds": result.seconds, "peak_memory_mb": result.peak_memory_mb,
           "rss_at_start_mb": rss, "device": result.device})
    resume.finish()


def parse_plan(text: str) -> list[tuple[str, str]]:
    plan = []
    for item in text.split(","):
        pair, _, mode = item.strip().partition(":")
        if mode not in MODES:
            raise SystemExit(f"{NAME}: unknown mode {mode!r} in --plan; choose from {', '.join(MODES)}")
        plan.append((pair, mode))
    return plan


def run(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"

    def write(row):
        print(json.dumps(row), flush=True)
        with results.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    plan = parse_plan(args.plan)
    pairs = load_pairs(sorted({p for p, _ in plan}), args.scale)
    for pair_name, mode in plan:
        print(f"[{NAME}] {args.scale} {pair_name} {mode} ...", file=sys.stderr, flush=True)
        try:
            run_one(pair_name, pairs[pair_name], mode, args, write)
        except Exception as error:  # one failed run must not lose the others
            write({"pair": pair_name, "scale": args.scale, "mode": mode, "error": f"{type(error).__name__}: {error}"})


def summary(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = ["scale", "pair", "mode", "steps", "Dice (before)", "NDV %", "SDlogJ", "% det<=0", "wall s", "CPU s",
              "peak MB"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["scale"], r["pair"], r["mode"], "error", r["error"], *[""] * 6])
            continue
        steps = ",".join(str(s) for s in r["steps"])
        if r.get("refine_steps"):  # rows before refine_steps was recorded counted the refinement's steps
            steps += f" + refine {r['refine_steps']}"
        if r["mode"] == "nio-budget" and "network_lr" in r["overrides"]:
            steps += f", lr {r['overrides']['network_lr']:g}"
        steps += " (probe)" if r["probe"] else ""
        body.append([r["scale"], r["pair"], r["mode"], steps, f"{r['dice']:.3f} ({r['dice_before']:.3f})",
                     f"{r['ndv_percent']:.3f}", f"{r['sdlogj']:.3f}", f"{r['det_nonpositive_percent']:.3f}",
                     f"{r['seconds']:.0f}", f"{r['cpu_seconds']:.0f}", f"{r['peak_memory_mb']:.0f}"])
    return C.markdown_table(header, body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog=f"benchmarks/{NAME}.py", description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="oasisA:direct,oasisA-inverted:direct,oasisA:nio,oasisA-inverted:nio,"
                        "oasisA:io-pcgrad,oasisA-inverted:io-pcgrad",
                        help="comma-separated PAIR:MODE runs, in order (pairs: oasisA, oasisA-gamma0.5, "
                        f"oasisA-gamma2, oasisA-inverted, synthetic, lapirnAB; modes: {', '.join(MODES)})")
    parser.add_argument("--scale", choices=("half", "full"), default="half")
    parser.add_argument("--io-steps", type=int, default=100)
    parser.add_argument("--io-probes", type=C.int_list, default=IO_PROBES, help="IO steps scored part way")
    parser.add_argument("--io-lr", type=float, default=2e-5, help="--network-lr of the IO modes")
    parser.add_argument("--network-lambda", type=float, help="override lambda of the optimising modes")
    parser.add_argument("--budget-iterations", type=C.int_list, default=(100, 0, 0), help="nio-budget: steps per level")
    parser.add_argument("--budget-levels", type=C.int_list, default=(1,), help="nio-budget: optimised LapIRN levels")
    parser.add_argument("--budget-refine", type=int, default=0, help="nio-budget: --network-refine steps")
    parser.add_argument("--budget-resolution", type=C.int_list, default=(2, 2, 1),
                        help="nio-budget: loss grid shrink factor per level")
    parser.add_argument("--budget-lr", type=float, default=None, help="nio-budget: --network-lr (default: NIO's)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="IO modes: save the run's state every K steps and resume from it when started again")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(C.OUT_ROOT / NAME))
    parser.add_argument("--summary", metavar="RESULTS_JSONL", help="print the table of a results file and exit")
    args = parser.parse_args(argv)
    if args.checkpoint_every < 0:
        parser.error(f"--checkpoint-every must be 0 (off) or a positive number of steps, got {args.checkpoint_every}")
    if args.summary:
        print(summary(Path(args.summary)))
        return
    run(args)


if __name__ == "__main__":
    main()
