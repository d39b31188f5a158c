"""Command line: a thin layer over :mod:`dirio.apps.workflow` and :mod:`dirio.api`.

``dirio register FIXED MOVING -o OUT``, ``dirio warp``, ``dirio evaluate``, ``dirio demo``,
``dirio sweep`` (weights x combination rules on one pair, Pareto front; :mod:`dirio.apps.sweep`) and
``dirio run`` (every pair of a Learn2Reg dataset split; :mod:`dirio.apps.runner`) and ``dirio report``
(rebuild a run's HTML page; :mod:`dirio.viz.html_report`).
User errors print one line ``dirio: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dirio.errors import DirioError


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _key_values(text: str) -> dict:
    """``"window=7,kernel=gaussian"`` -> ``{"window": 7, "kernel": "gaussian"}`` (numbers parsed)."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected key=value pairs, got {item!r}")
        key, value = item.split("=", 1)
        result[key.strip()] = _parse_scalar(value.strip())
    return result


def _parse_scalar(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value


def _regularizers(text: str) -> dict:
    """``"diffusion"`` or ``"diffusion=2,bending=0.5"`` -> ``{name: weight}`` (weight 1 when omitted)."""
    result = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition("=")
        try:
            result[name.strip()] = float(weight) if weight else None
        except ValueError:
            raise argparse.ArgumentTypeError(f"regularizer weight must be a number, got {item!r}") from None
    return result


def _label_ids(text: str) -> list[int]:
    """Comma-separated label ids, or a file: ``.npz`` (first array), ``.txt``/``.csv`` of integers."""
    path = Path(text)
    if path.exists():
        import numpy as np

        try:
            if path.suffix == ".npz":
                with np.load(path) as archive:
                    values = archive[archive.files[0]]
            else:
                values = np.loadtxt(path, delimiter="," if path.suffix == ".csv" else None)
        except Exception as error:  # noqa: BLE001 - any parse failure is a user error here
            raise argparse.ArgumentTypeError(f"cannot read label ids from {text}: {error}") from None
        return [int(v) for v in np.ravel(values)]
    return list(_int_list(text))


def add_registration_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that registers (same names as the settings keys)."""
    group = parser.add_argument_group("method")
    group.add_argument("--preset", choices=["brain-mri", "lung-ct", "convex-adam", "continuous"],
                       help="named defaults (see README)")
    group.add_argument("--similarity", choices=["lncc", "ncc", "mse", "mind", "nmi"])
    group.add_argument("--similarity-options", type=_key_values, metavar="K=V,...",
                       help="e.g. window=7,kernel=gaussian (LNCC) or radius=1,dilation=2 (MIND)")
    group.add_argument("--regularizer", type=_regularizers, metavar="NAME[=W],...",
                       help="diffusion, l1, tv or bending, each with an optional weight")
    group.add_argument("--weight", type=float, help="weight of the regularizer(s) given without one")
    group.add_argument("--normalise", choices=["none", "minmax", "percentile", "clip"])
    group.add_argument("--clip-range", type=_float_list, metavar="LO,HI", help="window of --normalise clip")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--levels", type=_int_list, metavar="F,...", help="pyramid shrink factors, coarse to fine")
    opt.add_argument("--iterations", type=_int_list, metavar="N,...", help="iterations per level")
    opt.add_argument("--grid-spacing", type=_float_list, metavar="S[,...]",
                     help="parameter grid spacing in voxels of each level (one value or one per level)")
    opt.add_argument("--lr", type=float, help="learning rate, voxels of the level grid per step")
    opt.add_argument("--optimizer", choices=["adam", "amsgrad", "sgd"])
    opt.add_argument("--schedule", choices=["constant", "cosine", "piecewise"])
    opt.add_argument("--schedule-options", type=_key_values, metavar="K=V,...",
                     help="e.g. constant_until=0.26,cosine_until=0.67 for piecewise")
    opt.add_argument("--diffeomorphic", action="store_true", default=None,
                     help="optimise a stationary velocity field (scaling and squaring)")
    opt.add_argument("--combine", choices=["sum", "pcgrad", "surgery"],
                     help="how similarity and regulariser gradients are combined (default sum)")
    opt.add_argument("--combine-options", type=_key_values, metavar="K=V,...",
                     help="e.g. scope=block,block_size=8 (pcgrad, surgery); project=random|similarity|regularizer|all "
                          "(pcgrad); diagnose=true (sum)")
    opt.add_argument("--early-stop", choices=["none", "plateau"],
                     help="stop a level when the similarity plateaus (default none: fixed iteration counts)")
    opt.add_argument("--early-stop-options", type=_key_values, metavar="K=V,...",
                     help="e.g. window=10,tolerance=0.01,min_iterations=20 for plateau")
    opt.add_argument("--seed", type=int)
    opt.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    stages = parser.add_argument_group("stages before the dense optimisation")
    stages.add_argument("--affine", choices=["none", "translation", "rigid", "similarity", "affine"],
                        help="pre-alignment model (default: the preset's, else none); the written field is the "
                             "composition, the matrix is written as affine_*.json (and .tfm with SimpleITK)")
    stages.add_argument("--affine-levels", type=_int_list, metavar="F,...", help="pyramid of the affine stage")
    stages.add_argument("--affine-iterations", type=_int_list, metavar="N,...", help="iterations per affine level")
    stages.add_argument("--affine-lr", type=float, help="Adam step of the affine stage, voxels per iteration")
    stages.add_argument("--init", choices=["none", "convex"],
                        help="initial field of the dense stage: none, or convex (discrete + coupled convex step)")
    stages.add_argument("--convex-spacing", type=int, metavar="G", help="cell size of the discrete step, voxels")
    stages.add_argument("--convex-radius", type=int, metavar="R",
                        help="search radius of the discrete step in cells (displacements up to R*G voxels)")
    stages.add_argument("--convex-coupling", type=_float_list, metavar="W,...",
                        help="increasing coupling weights of the convex step")
    stages.add_argument("--convex-symmetric", choices=["true", "false"],
                        help="also solve moving->fixed and make the two fields inverse consistent")
    stages.add_argument("--convex-memory", type=float, metavar="MB",
                        help="largest cost volume kept in memory; larger ones are recomputed slab by slab")


def settings_from_args(args: argparse.Namespace):
    """Build :class:`dirio.config.settings.Settings` from parsed options over the chosen preset."""
    from dirio.config.settings import make_settings

    regularizers = args.regularizer
    if regularizers is not None:
        default = 1.0 if args.weight is None else args.weight
        regularizers = {name: (default if weight is None else weight) for name, weight in regularizers.items()}
    elif args.weight is not None:
        from dirio.config.settings import PRESETS

        base = PRESETS.get(args.preset, {}).get("regularizers", {"diffusion": 1.0})
        regularizers = {name: args.weight for name in base}
    grid_spacing = args.grid_spacing
    if grid_spacing is not None and len(grid_spacing) == 1:
        grid_spacing = grid_spacing[0]
    try:
        settings = make_settings(
            args.preset,
            similarity=args.similarity,
            similarity_options=args.similarity_options,
            regularizers=regularizers,
            normalise=args.normalise,
            clip_range=args.clip_range,
            levels=args.levels,
            iterations=args.iterations,
            grid_spacing=grid_spacing,
            lr=args.lr,
            optimizer=args.optimizer,
            schedule=args.schedule,
            schedule_options=args.schedule_options,
            diffeomorphic=args.diffeomorphic,
            combine=args.combine,
            combine_options=args.combine_options,
            early_stop=args.early_stop,
            early_stop_options=args.early_stop_options,
            seed=args.seed,
            progress=not args.quiet,
            **stage_overrides(args),
        )
    except (ValueError, TypeError) as error:
        raise DirioError(str(error)) from None
    check_settings(settings)
    return settings


def registration_actions() -> list[argparse.Action]:
    """The argparse actions of :func:`add_registration_options` (one per option, ``dest`` = key)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_registration_options(parser)
    return list(parser._actions)


def settings_from_options(options: dict, quiet: bool = True):
    """:func:`settings_from_args` from a dict ``{dest: parsed value}`` of registration options.

    Keys are the ``dest`` names of :func:`add_registration_options` (``similarity_options``,
    ``levels``...) with values as argparse would give them; options not given take their defaults.
    Used by ``dirio run`` for its config file (:mod:`dirio.config.files`).
    """
    values = {action.dest: action.default for action in registration_actions()}
    unknown = sorted(set(options) - set(values))
    if unknown:
        raise DirioError(f"unknown registration option {unknown[0]!r}")
    values.update(options)
    return settings_from_args(argparse.Namespace(**values, quiet=quiet))


def stage_overrides(args: argparse.Namespace) -> dict:
    """Settings overrides of the affine and convex stages from ``--affine*``, ``--init``, ``--convex-*``."""
    symmetric = None if args.convex_symmetric is None else args.convex_symmetric == "true"
    return {
        "affine": args.affine,
        "affine_options": {"levels": args.affine_levels, "iterations": args.affine_iterations, "lr": args.affine_lr},
        "init": args.init,
        "convex": {"grid_spacing": args.convex_spacing, "radius": args.convex_radius,
                   "coupling": args.convex_coupling, "symmetric": symmetric, "memory_mb": args.convex_memory},
    }


def check_settings(settings) -> None:
    """Reject, before any file is read, settings the run would fail on (see :func:`dirio.api.check_settings`)."""
    from dirio.api import check_settings as check

    check(settings)


class _Parser(argparse.ArgumentParser):
    """argparse with dirio's one-line error format (``dirio: error: ...``, exit status 2)."""

    def error(self, message):
        command = self.prog.split()[-1]
        where = "" if command == "dirio" else f"{command}: "
        self.exit(2, f"dirio: error: {where}{message} (see dirio {'' if not where else command + ' '}--help)\n")


def add_pair_inputs(parser: argparse.ArgumentParser) -> None:
    """The optional inputs of one registration pair (labels, masks, keypoints, label ids, grid
    handling) as an "inputs" group: shared by ``dirio register`` and ``dirio sweep``."""
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--fixed-labels")
    inputs.add_argument("--moving-labels")
    inputs.add_argument("--fixed-mask")
    inputs.add_argument("--moving-mask")
    inputs.add_argument("--fixed-keypoints", help="CSV of voxel coordinates (i,j,k), one point per row")
    inputs.add_argument("--moving-keypoints")
    inputs.add_argument("--label-ids", type=_label_ids, help="labels scored by Dice/HD95: 2,3,4 or a .npz/.txt file")
    inputs.add_argument("--resample", action="store_true", help="resample moving-side inputs onto the fixed grid")
    inputs.add_argument("--ndim", type=int, choices=[2, 3], default=3, help="spatial dimensions of the images")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dirio", description="Deformable image registration by instance optimisation.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)

    reg = commands.add_parser("register", help="register MOVING to FIXED and write field, warped image, metrics, figure")
    reg.add_argument("fixed")
    reg.add_argument("moving")
    reg.add_argument("-o", "--output", required=True, help="output directory")
    add_pair_inputs(reg)
    add_registration_options(reg)
    out = reg.add_argument_group("output")
    out.add_argument("--overwrite", action="store_true", help="replace existing output files")
    out.add_argument("--no-figure", action="store_true", help="skip the PNG figure")
    out.add_argument("--tre-order", type=int, choices=[1, 3], default=3, help="interpolation of u at keypoints")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    warp = commands.add_parser("warp", help="apply a displacement field to an image or label map")
    warp.add_argument("image")
    warp.add_argument("field", help="disp_*.nii.gz in the Learn2Reg layout")
    warp.add_argument("-o", "--output", required=True, help="output image file")
    warp.add_argument("--labels", action="store_true", help="nearest-neighbour warping of a label map")
    warp.add_argument("--ndim", type=int, choices=[2, 3], default=3)
    warp.add_argument("--overwrite", action="store_true")

    ev = commands.add_parser("evaluate", help="score an existing displacement field")
    ev.add_argument("field")
    ev.add_argument("fixed", help="fixed image (grid and spacing)")
    ev.add_argument("--fixed-labels")
    ev.add_argument("--moving-labels")
    ev.add_argument("--fixed-keypoints")
    ev.add_argument("--moving-keypoints")
    ev.add_argument("--label-ids", type=_label_ids)
    ev.add_argument("--ndim", type=int, choices=[2, 3], default=3)
    ev.add_argument("--tre-order", type=int, choices=[1, 3], default=3)
    ev.add_argument("-o", "--output", help="write the metrics JSON here (else print it)")
    ev.add_argument("--overwrite", action="store_true")

    demo = commands.add_parser("demo", help="register a known synthetic warp of the MNI152 template (shipped with nilearn)")
    demo.add_argument("-o", "--output", default="demo-out", help="output directory (default demo-out)")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--device", default="auto")
    demo.add_argument("-q", "--quiet", action="store_true")

    sweep = commands.add_parser("sweep", help="register one pair with several weights and combination rules; "
                                              "plot the Pareto front and write the table")
    sweep.add_argument("fixed")
    sweep.add_argument("moving")
    sweep.add_argument("-o", "--output", required=True, help="output directory (sweep.json, sweep.csv, sweep.md, pareto.png)")
    sweep.add_argument("--weights", type=_float_list, required=True, metavar="W,...",
                       help="regulariser weights to try (every regulariser gets the weight)")
    sweep.add_argument("--rules", default="sum,pcgrad,surgery", metavar="RULE,...",
                       type=lambda text: [r.strip() for r in text.split(",") if r.strip()],
                       help="combination rules to try (default sum,pcgrad,surgery; surgery runs once)")
    add_pair_inputs(sweep)
    add_registration_options(sweep)
    sweep.add_argument("--overwrite", action="store_true", help="replace existing output files")
    sweep.add_argument("-q", "--quiet", action="store_true", help="no progress lines or table")

    run = commands.add_parser("run", help="register every pair of a Learn2Reg dataset split: official-format "
                                          "fields, metrics tables, report; resumable; torchrun shards it")
    run.add_argument("dataset", help="Learn2Reg dataset JSON (e.g. OASIS_dataset.json)")
    run.add_argument("--split", choices=["val", "test", "train"], default="val",
                     help="registration_val (default), registration_test, or training pairs (see README)")
    run.add_argument("-o", "--output", required=True, help="run folder (fields, tables, report, status)")
    run.add_argument("--config", help="TOML or YAML file with the keys of the dirio register options")
    run.add_argument("--overwrite", action="store_true",
                     help="start again in OUT, replacing a previous run (also one with another configuration)")
    run.add_argument("--threads", type=int, metavar="N", help="CPU threads per process (torch.set_num_threads)")
    run.add_argument("--limit", type=int, metavar="N", help="only the first N pairs of the split")
    run.add_argument("--no-report", action="store_true", help="no thumbnails and no HTML report")
    run.add_argument("--label-ids", type=_label_ids, help="labels scored by Dice/HD95 (default: the dataset's)")
    run.add_argument("--resample", action="store_true", default=None,
                     help="resample moving-side inputs onto the fixed grid")
    run.add_argument("--no-masks", action="store_true", help="do not pass the dataset's masks to the registration")
    run.add_argument("--tre-order", type=int, choices=[1, 3], help="interpolation of u at keypoints (default 3)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines (the log file has them)")
    add_registration_options(run)

    report = commands.add_parser("report", help="rebuild the HTML report of a dirio run folder")
    report.add_argument("run_folder", help="the -o OUT folder of a dirio run")
    return parser


def _version() -> str:
    from dirio import __version__

    return f"dirio {__version__}"


def run_register(args) -> int:
    from dirio.apps.workflow import register_files

    settings = settings_from_args(args)
    record = register_files(
        args.fixed, args.moving, args.output,
        settings=settings,
        fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
        fixed_mask=args.fixed_mask, moving_mask=args.moving_mask,
        fixed_keypoints=args.fixed_keypoints, moving_keypoints=args.moving_keypoints,
        label_ids=args.label_ids, resample=args.resample, overwrite=args.overwrite,
        figure=not args.no_figure, device=args.device, ndim=args.ndim, tre_order=args.tre_order,
    )
    if not args.quiet:
        print(summary_line(record))
    return 0


def summary_line(record: dict) -> str:
    """One human line: metrics before -> after, folding and time."""
    before, after = record["before"], record["after"]
    parts = []
    if "dice_mean" in after:
        parts.append(f"Dice {before['dice_mean']:.3f} -> {after['dice_mean']:.3f}")
    if "tre_mm_mean" in after:
        parts.append(f"TRE {before['tre_mm_mean']:.2f} -> {after['tre_mm_mean']:.2f} mm")
    parts.append(f"det<=0 {after['percent_nonpositive_jacobian']:.4f}%")
    parts.append(f"SDlogJ {after['sdlogj_l2r']:.3f}")
    parts.append(f"{record['optimisation_seconds']:.1f} s optimisation, {record['total_seconds']:.1f} s total")
    return "; ".join(parts) + f"; outputs in {Path(record['outputs']['disp']).parent}"


def run_warp(args) -> int:
    from dirio.apps.workflow import warp_file

    warp_file(args.image, args.field, args.output, labels=args.labels, overwrite=args.overwrite, ndim=args.ndim)
    return 0


def run_evaluate(args) -> int:
    from dirio.io.atomic import check_writable, write_json
    from dirio.apps.workflow import evaluate_files

    if args.output:
        check_writable([args.output], args.overwrite)
    metrics = evaluate_files(
        args.field, args.fixed, fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
        fixed_keypoints=args.fixed_keypoints, moving_keypoints=args.moving_keypoints,
        label_ids=args.label_ids, ndim=args.ndim, tre_order=args.tre_order,
    )
    if args.output:
        write_json(args.output, metrics, overwrite=args.overwrite)
    else:
        print(json.dumps(metrics, indent=2))
    return 0


def run_demo(args) -> int:
    from dirio.apps.demo import run_demo as demo

    demo(args.output, overwrite=args.overwrite, device=args.device, quiet=args.quiet)
    return 0


def run_sweep(args) -> int:
    from dirio.apps.sweep import sweep_files

    # --combine-options are shared by the sweep's rules, each taking the ones it accepts (checked
    # per rule by sweep_files), so they are not validated against the single --combine rule here
    options, args.combine_options = args.combine_options or {}, None
    settings = settings_from_args(args)
    settings.engine.combine_options = options
    settings.engine.progress = False  # one line per run instead of a bar per run
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    record = sweep_files(
        args.fixed, args.moving, args.output, settings=settings, weights=args.weights, rules=args.rules,
        fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
        fixed_mask=args.fixed_mask, moving_mask=args.moving_mask,
        fixed_keypoints=args.fixed_keypoints, moving_keypoints=args.moving_keypoints,
        label_ids=args.label_ids, resample=args.resample, overwrite=args.overwrite,
        device=args.device, ndim=args.ndim, log=log,
    )
    if not args.quiet:
        print(record["table"], end="")
        print(f"outputs in {args.output}")
    return 0


def run_dataset_command(args) -> int:
    from dirio.config.files import run_configuration
    from dirio.apps.runner import run_dataset

    explicit = {action.dest: getattr(args, action.dest) for action in registration_actions()
                if getattr(args, action.dest) != action.default}
    run_values = {"label_ids": args.label_ids, "resample": args.resample, "tre_order": args.tre_order,
                  "use_masks": False if args.no_masks else None}
    configuration = run_configuration(args.config, explicit, run_values)
    if args.threads is not None and args.threads < 1:
        raise DirioError(f"--threads must be at least 1, got {args.threads}")
    if args.limit is not None and args.limit < 1:
        raise DirioError(f"--limit must be at least 1, got {args.limit}")
    result = run_dataset(
        args.dataset, args.split, args.output, configuration,
        overwrite=args.overwrite, threads=args.threads, limit=args.limit, report=not args.no_report,
        quiet=args.quiet,
    )
    return result.exit_code


def run_report(args) -> int:
    from dirio.viz.html_report import write_report

    page = write_report(args.run_folder)
    print(f"report written to {page}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"register": run_register, "warp": run_warp, "evaluate": run_evaluate, "demo": run_demo,
                "sweep": run_sweep, "run": run_dataset_command, "report": run_report}
    try:
        code = handlers[args.command](args)
    except DirioError as error:
        print(f"dirio: error: {error}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("dirio: interrupted; no partial output was left under a final name", file=sys.stderr)
        code = 130
    if args.command == "run" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_process(code)
    return code


def _exit_process(code: int) -> None:
    """End a torchrun worker at once, after flushing its output and logs.

    With torch 2.13 on the CPU, a worker that used the gloo process group and autograd aborts during
    interpreter teardown in about one run of three ("terminate called without an active exception",
    SIGABRT), after all its work and the process group's destruction; torchrun then reports the run
    as failed. Skipping the teardown with ``os._exit`` avoids it; every file is closed by then.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
