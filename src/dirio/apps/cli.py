"""Command line: a thin layer over :mod:`dirio.apps.workflow` and :mod:`dirio.api`.

``dirio register FIXED MOVING -o OUT``, ``dirio warp``, ``dirio evaluate``, ``dirio demo``,
``dirio sweep`` (weights x combination rules on one pair, Pareto front; :mod:`dirio.apps.sweep`) and
``dirio run`` (every pair of a Learn2Reg dataset split; :mod:`dirio.apps.runner`), ``dirio train`` (train
a registration network; :mod:`dirio.apps.train`), ``dirio report`` (rebuild a run's HTML page;
:mod:`dirio.viz.html_report`) and ``dirio transform-points`` (map point files through a field;
:mod:`dirio.apps.transform_points`).
User errors print one line ``dirio: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

from dirio.config import schema
from dirio.config.schema import REGISTRATION_OPTIONS, Option, OptionError, settings_from_values
from dirio.errors import DirioError


def _argument_type(option: Option):
    """The argparse ``type`` of a schema option: its parser, with argparse's wording of errors."""
    name = {schema.integer: "int", schema.number: "float"}.get(option.parse)

    def convert(text: str):
        try:
            return option.parse(text)
        except ValueError as error:
            if name is not None:
                raise  # argparse: "invalid int value: 'x'"
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name or option.parse.__name__
    return convert


def flag(key: str) -> str:
    """The command-line flag of a schema key: ``similarity_options`` -> ``--similarity-options``."""
    return "--" + key.replace("_", "-")


def add_option(group, option: Option, **changes) -> None:
    """Add a schema option to an argparse group (``changes``: other help, default... for one command)."""
    kwargs = {"help": option.help_text(flag)}
    if option.is_switch:
        kwargs.update(action="store_true", default=option.default)
    else:
        kwargs.update(default=option.default, choices=option.choices, metavar=option.metavar)
        if option.parse is not schema.text:
            kwargs["type"] = _argument_type(option)
    kwargs.update(changes)
    group.add_argument(flag(option.key), **kwargs)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return schema.numbers(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_registration_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that registers: the schema's (:mod:`dirio.config.schema`), by group."""
    groups = {}
    for option in REGISTRATION_OPTIONS:
        if option.group not in groups:
            groups[option.group] = parser.add_argument_group(option.group)
        add_option(groups[option.group], option)


def registration_values(args: argparse.Namespace) -> dict:
    """``{key: value}`` of the registration options (and ``quiet``) in parsed arguments."""
    keys = [option.key for option in REGISTRATION_OPTIONS] + ["quiet"]
    return {key: getattr(args, key) for key in keys if hasattr(args, key)}


# Coordinate spaces of ``dirio transform-points`` (:data:`dirio.io.points.SPACES`, kept here: the parser
# is built without importing the I/O modules).
POINT_SPACES = ("voxel", "ras", "lps")

# Keys that lower layers name in messages (as `key`) whose flag is not --key.
FLAG_ALIASES = {"allow_outside": "--allow-outside-paths"}


def with_flags(error: DirioError, args: argparse.Namespace) -> str:
    """A user error's message with its options written as the command's flags: an
    :class:`~dirio.config.schema.OptionError` names its flag instead of its key, and each option named
    `key` (see :class:`dirio.errors.DirioError`) becomes its flag when the command has it."""
    if isinstance(error, OptionError):
        return error.describe(flag(error.key))

    def replace(match: re.Match) -> str:
        key = match.group(1)
        if key in FLAG_ALIASES:
            return FLAG_ALIASES[key]
        return flag(key) if key in vars(args) else match.group(0)

    return re.sub(r"`([a-z][a-z0-9_]*)`", replace, str(error))


def settings_from_args(args: argparse.Namespace):
    """:class:`dirio.config.settings.Settings` from parsed options over the chosen preset
    (:func:`dirio.config.schema.settings_from_values`), checked before any file is read."""
    return settings_from_values(registration_values(args))


# A negative number or a comma-separated list starting with one (``-1``, ``-1e-3``, ``-1,2,3``): an
# option's value, never a flag (argparse's own pattern knows single numbers only, so ``-1,2,3`` failed
# as "expected one argument" instead of reaching the option's range check).
_NUMBER = r"(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"
NEGATIVE_VALUE = re.compile(rf"^-{_NUMBER}(,-?{_NUMBER})*,?$")


class _Parser(argparse.ArgumentParser):
    """argparse with dirio's one-line error format (``dirio: error: ...``, exit status 2); a value
    that starts with a negative number (:data:`NEGATIVE_VALUE`) is an option's value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_VALUE

    def error(self, message):
        command = self.prog.split()[-1]
        where = "" if command == "dirio" else f"{command}: "
        self.exit(2, f"dirio: error: {where}{message} (see dirio {'' if not where else command + ' '}--help)\n")


def add_pair_inputs(parser: argparse.ArgumentParser) -> None:
    """The optional inputs of one registration pair (labels, masks, keypoints, label ids, grid
    handling) as an "inputs" group: shared by ``dirio register`` and ``dirio sweep``."""
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--fixed-labels", help="label map of the fixed image: Dice and HD95")
    inputs.add_argument("--moving-labels", help="label map of the moving image (warped with nearest neighbour)")
    inputs.add_argument("--fixed-mask", help="the similarity counts inside the masks (see --mask-use)")
    inputs.add_argument("--moving-mask", help="mask of the moving image (pulled into fixed space)")
    inputs.add_argument("--fixed-keypoints", help="CSV of voxel coordinates (i,j,k), one point per row")
    inputs.add_argument("--moving-keypoints", help="the corresponding points of the moving image: TRE in mm")
    add_option(inputs, schema.option("label_ids"))
    add_option(inputs, schema.option("resample"), default=False)
    inputs.add_argument("--ndim", type=int, choices=[2, 3], default=3, help="spatial dimensions of the images")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dirio", description="Deformable image registration by instance optimisation.")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True)

    reg = commands.add_parser("register", help="register MOVING to FIXED and write field, warped image, metrics, figure")
    reg.add_argument("fixed", help="fixed image (the field is on its grid)")
    reg.add_argument("moving", help="moving image, on the fixed grid (or --resample)")
    reg.add_argument("-o", "--output", required=True, help="output directory")
    add_pair_inputs(reg)
    add_registration_options(reg)
    out = reg.add_argument_group("output")
    out.add_argument("--overwrite", action="store_true", help="replace existing output files")
    out.add_argument("--no-figure", action="store_true", help="skip the PNG figure")
    add_option(out, schema.option("tre_order"), default=3)
    add_option(out, schema.option("inverse"), default=False)
    out.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")

    warp = commands.add_parser("warp", help="apply a displacement field to an image or label map")
    warp.add_argument("image")
    warp.add_argument("field", help="disp_*.nii.gz in the Learn2Reg layout")
    warp.add_argument("-o", "--output", required=True, help="output image file")
    warp.add_argument("--labels", action="store_true", help="nearest-neighbour warping of a label map")
    warp.add_argument("--ndim", type=int, choices=[2, 3], default=3)
    warp.add_argument("--overwrite", action="store_true")
    warp.add_argument("--resample", action="store_true",
                      help="resample an image on another grid onto the field's grid first (else an error)")
    warp.add_argument("--inverse", action="store_true",
                      help="IMAGE is on the fixed grid: warp it into the moving space by the inverse of FIELD "
                           "(inverted iteratively); an inverse_disp_*.nii.gz file warps that way without it")

    points = commands.add_parser("transform-points", help="map points through a displacement field: fixed -> moving, "
                                                          "or moving -> fixed with --inverse")
    points.add_argument("points", help=".csv (voxel indices, or world mm with --space), .fcsv or .mrk.json "
                                       "(3D Slicer markups: the file states RAS or LPS)")
    points.add_argument("field", help="disp_*.nii.gz in the Learn2Reg layout")
    points.add_argument("-o", "--output", required=True, help=".csv, .fcsv or .mrk.json (the format by the name)")
    points.add_argument("--inverse", action="store_true",
                        help="map moving-space points into the fixed space (solves x + u(x) = y per point)")
    points.add_argument("--space", choices=POINT_SPACES,
                        help="coordinates of a CSV input: voxel (default), ras or lps (world mm through the field's "
                             "affine); Slicer markups state theirs")
    points.add_argument("--output-space", choices=POINT_SPACES,
                        help="coordinates written (default: the input's; lps for markups from voxel input)")
    points.add_argument("--order", type=int, choices=[1, 3], default=3,
                        help="interpolation of u at the points: 3 = cubic B-spline (dirio evaluate's TRE default), "
                             "1 = trilinear")
    points.add_argument("--ndim", type=int, choices=[2, 3], default=3)
    points.add_argument("--overwrite", action="store_true")

    ev = commands.add_parser("evaluate", help="score an existing displacement field")
    ev.add_argument("field")
    ev.add_argument("fixed", help="fixed image (grid and spacing)")
    ev.add_argument("--fixed-labels", help="label map of the fixed image: Dice and HD95")
    ev.add_argument("--moving-labels", help="label map of the moving image, warped by the field")
    ev.add_argument("--fixed-keypoints", help="CSV of voxel coordinates (i,j,k), one point per row")
    ev.add_argument("--moving-keypoints", help="the corresponding points of the moving image: TRE in mm")
    add_option(ev, schema.option("label_ids"), help=None)
    ev.add_argument("--ndim", type=int, choices=[2, 3], default=3)
    add_option(ev, schema.option("tre_order"), help=None, default=3)
    ev.add_argument("-o", "--output", help="write the metrics JSON here (else print it)")
    ev.add_argument("--overwrite", action="store_true")
    ev.add_argument("--resample", action="store_true",
                    help="accept a field whose affine differs from the fixed image's; resample moving labels")

    convert = commands.add_parser("convert", help="convert a Learn2Reg field to an ITK displacement field "
                                                  "(LPS mm) or back")
    convert.add_argument("field", help="disp_*.nii.gz (Learn2Reg) or an ITK field (.nii.gz vector intent, .mha, .h5)")
    convert.add_argument("-o", "--output", required=True,
                         help="ITK: .nii.gz, .mha, .h5; Learn2Reg: .nii.gz (the kind is the other one than the input's)")
    convert.add_argument("--to", choices=["itk", "learn2reg"], help="output kind (default: the other one)")
    convert.add_argument("--overwrite", action="store_true")

    demo = commands.add_parser("demo", help="register a known synthetic warp of the MNI152 template (shipped with nilearn)")
    demo.add_argument("-o", "--output", default="demo-out", help="output directory (default demo-out)")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--device", default="auto")
    demo.add_argument("-q", "--quiet", action="store_true")

    sweep = commands.add_parser("sweep", help="register one pair with several weights and combination rules; "
                                              "plot the Pareto front and write the table")
    sweep.add_argument("fixed", help="fixed image")
    sweep.add_argument("moving", help="moving image")
    sweep.add_argument("-o", "--output", required=True, help="output directory (sweep.json, sweep.csv, sweep.md, pareto.png)")
    sweep.add_argument("--weights", type=_float_list, required=True, metavar="W,...",
                       help="regularizer weights to try (every regularizer gets the weight)")
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
                     help="registration_val (default), registration_test, or training pairs (documentation: A whole Learn2Reg dataset)")
    run.add_argument("-o", "--output", required=True, help="run folder (fields, tables, report, status)")
    run.add_argument("--config", help="TOML or YAML file with the keys of the dirio register options")
    run.add_argument("--overwrite", action="store_true",
                     help="start again in OUT, replacing a previous run (also one with another configuration)")
    run.add_argument("--threads", type=int, metavar="N", help="CPU threads per process (torch.set_num_threads)")
    run.add_argument("--limit", type=int, metavar="N", help="only the first N pairs of the split")
    run.add_argument("--no-report", action="store_true", help="no thumbnails and no HTML report")
    add_option(run, schema.option("label_ids"), help="labels scored by Dice/HD95 (default: the dataset's)")
    add_option(run, schema.option("resample"))
    run.add_argument("--no-masks", action="store_true", help="do not pass the dataset's masks to the registration")
    add_option(run, schema.option("tre_order"), help="interpolation of u at keypoints (default 3)")
    run.add_argument("--allow-outside-paths", action="store_true",
                     help="accept dataset paths that lead outside the dataset JSON's folder")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress lines (the log file has them)")
    add_registration_options(run)

    add_train_parser(commands)

    report = commands.add_parser("report", help="rebuild the HTML report of a dirio run folder")
    report.add_argument("run_folder", help="the -o OUT folder of a dirio run")
    return parser


def add_train_parser(commands) -> None:
    """``dirio train``: file lists here, every other option from :data:`dirio.config.training.TRAIN_OPTIONS`."""
    from dirio.config.training import TRAIN_OPTIONS

    train = commands.add_parser("train", help="train a registration network (U-Net, LapIRN) on images; "
                                              "checkpoints, history, loss curves; torchrun shards each batch")
    train.add_argument("images", nargs="+", help="image files, globs, or one Learn2Reg dataset JSON")
    train.add_argument("-o", "--output", required=True,
                       help="run folder (checkpoint_last.pt, checkpoint_best.pt, history.csv, train.json)")
    train.add_argument("--labels", nargs="+", metavar="FILE", help="label maps of the images (same order)")
    train.add_argument("--val-images", nargs="+", metavar="FILE", help="validation images (files or globs)")
    train.add_argument("--val-labels", nargs="+", metavar="FILE", help="label maps of the validation images")
    train.add_argument("--overwrite", action="store_true", help="start again in a folder that holds a run")
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar or epoch lines")
    groups = {}
    for option in TRAIN_OPTIONS:
        if option.group not in groups:
            groups[option.group] = train.add_argument_group(option.group)
        add_option(groups[option.group], option)


def run_train(args) -> int:
    from dirio.apps.train import train_files
    from dirio.config.training import TRAIN_OPTIONS

    options = {option.key: getattr(args, option.key) for option in TRAIN_OPTIONS}
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    record = train_files(args.images, args.output, options, labels=args.labels, val_images=args.val_images,
                         val_labels=args.val_labels, overwrite=args.overwrite, quiet=args.quiet, log=log)
    if not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        best = {k: v for k, v in record.items() if k.startswith("best_") and k != "best_epoch"}
        shown = ", ".join(f"{k[5:]} {v:.4f}" for k, v in best.items() if v is not None)
        print(f"trained {record['config']['epochs']} epochs in {record['seconds']:.1f} s; best epoch "
              f"{record['best_epoch']} ({shown}); outputs in {args.output}")
    return 0


def _version() -> str:
    from dirio import __version__

    return f"dirio {__version__}"


def keep_freed_memory_for(settings) -> None:
    """Keep freed memory in the process (:mod:`dirio.apps.allocator`) for a dense registration and
    for the network stages under ``--network-budget cpu``; the papers' network schedules keep
    glibc's defaults (their full-resolution steps hold 13-15 GB, and kept memory adds about a fifth:
    measured on the cpu budget, 5.7 -> 6.8 GB for NIO and 10.9 -> 13.0 GB for IO, for 14 % and
    10 % less time)."""
    from dirio.apps.allocator import keep_freed_memory
    from dirio.methods.network import NETWORK_STAGES

    if not set(settings.stages) & set(NETWORK_STAGES) or settings.network.network_budget == "cpu":
        keep_freed_memory()


def run_register(args) -> int:
    from dirio.apps.preload import preload_slow_imports
    from dirio.apps.workflow import register_files

    settings = settings_from_args(args)
    keep_freed_memory_for(settings)
    preload_slow_imports(figure=not args.no_figure)
    record = register_files(
        args.fixed, args.moving, args.output,
        settings=settings,
        fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
        fixed_mask=args.fixed_mask, moving_mask=args.moving_mask,
        fixed_keypoints=args.fixed_keypoints, moving_keypoints=args.moving_keypoints,
        label_ids=args.label_ids, resample=args.resample, overwrite=args.overwrite,
        figure=not args.no_figure, device=args.device, ndim=args.ndim, tre_order=args.tre_order,
        itk_field=bool(args.itk_field), inverse=bool(args.inverse),
    )
    for line in kept_lines(record):
        print(f"dirio: {line}", file=sys.stderr)
    if not args.quiet:
        print(summary_line(record))
    return 0


def kept_lines(record: dict) -> list[str]:
    """What ``register --overwrite`` left in the folder (files dirio did not write, or that changed), one
    line per kind; none without ``--overwrite`` or when nothing was kept."""
    from dirio.io.manifest import Replacement

    replaced = record.get("overwrite")
    if not replaced:
        return []
    return Replacement(replaced["removed"], replaced["kept_changed"], replaced["kept_foreign"]).kept_lines()


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
    if record.get("inverse"):
        parts.append(f"inverse consistency {record['inverse']['inverse_consistency_mm_mean']:.3f} mm")
    parts.append(f"{record['optimisation_seconds']:.1f} s optimisation, {record['total_seconds']:.1f} s total")
    return "; ".join(parts) + f"; outputs in {Path(record['outputs']['disp']).parent}"


def run_warp(args) -> int:
    from dirio.apps.workflow import warp_file

    record = warp_file(args.image, args.field, args.output, labels=args.labels, overwrite=args.overwrite,
                       ndim=args.ndim, resample=args.resample, inverse=args.inverse)
    if record is not None:
        print(f"{args.output}: warped by the inverse field ({record['method']}, {record['iterations']} iterations; "
              f"residual mean {record['residual_voxels_mean']:.2g} / max {record['residual_voxels_max']:.2g} voxels)")
    return 0


def run_transform_points(args) -> int:
    from dirio.apps.transform_points import transform_points_file

    record = transform_points_file(args.points, args.field, args.output, inverse=args.inverse, space=args.space,
                                   out_space=args.output_space, order=args.order, overwrite=args.overwrite,
                                   ndim=args.ndim)
    line = (f"{args.output}: {record['points']} points mapped {record['direction']} "
            f"({record['space_in']} -> {record['space_out']})")
    if args.inverse:
        line += f"; largest residual {record['residual_voxels_max']:.2g} voxels"
        if record["not_inverted"]:
            line += f"; {record['not_inverted']} points not inverted (a fold or the grid's edge)"
    print(line)
    return 0


def run_convert(args) -> int:
    from dirio.apps.workflow import convert_file

    kind = convert_file(args.field, args.output, to=args.to, overwrite=args.overwrite)
    print(f"{args.output}: {'ITK displacement field (LPS mm)' if kind == 'itk' else 'Learn2Reg field (voxels)'}")
    return 0


def run_evaluate(args) -> int:
    from dirio.io.atomic import check_writable, write_json
    from dirio.apps.workflow import evaluate_files

    if args.output:
        check_writable([args.output], args.overwrite)
    metrics = evaluate_files(
        args.field, args.fixed, fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
        fixed_keypoints=args.fixed_keypoints, moving_keypoints=args.moving_keypoints,
        label_ids=args.label_ids, ndim=args.ndim, tre_order=args.tre_order, resample=args.resample,
    )
    if args.output:
        write_json(args.output, metrics, overwrite=args.overwrite)
    else:
        print(json.dumps(metrics, indent=2))
    return 0


def run_demo(args) -> int:
    from dirio.apps.allocator import keep_freed_memory
    from dirio.apps.demo import run_demo as demo

    keep_freed_memory()  # the demo is a dense registration
    demo(args.output, overwrite=args.overwrite, device=args.device, quiet=args.quiet)
    return 0


def run_sweep(args) -> int:
    from dirio.apps.sweep import sweep_files

    # --combine-options are shared by the sweep's rules, each taking the ones it accepts (checked
    # per rule by sweep_files), so they are not validated against the single --combine rule here
    options, args.combine_options = args.combine_options or {}, None
    settings = settings_from_args(args)
    settings.optimization.combine_options = options
    settings.progress = False  # one line per run instead of a bar per run
    keep_freed_memory_for(settings)
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

    explicit = {option.key: getattr(args, option.key) for option in REGISTRATION_OPTIONS
                if getattr(args, option.key) != option.default}
    run_values = {"label_ids": args.label_ids, "resample": args.resample, "tre_order": args.tre_order,
                  "use_masks": False if args.no_masks else None}
    configuration = run_configuration(args.config, explicit, run_values)
    keep_freed_memory_for(configuration.settings)
    if args.threads is not None and args.threads < 1:
        raise DirioError(f"--threads must be at least 1, got {args.threads}")
    if args.limit is not None and args.limit < 1:
        raise DirioError(f"--limit must be at least 1, got {args.limit}")
    result = run_dataset(
        args.dataset, args.split, args.output, configuration,
        overwrite=args.overwrite, threads=args.threads, limit=args.limit, report=not args.no_report,
        quiet=args.quiet, itk_field=args.itk_field, allow_outside=args.allow_outside_paths,
    )
    return result.exit_code


def run_report(args) -> int:
    from dirio.viz.html_report import write_report

    from dirio.apps.runner import record_report

    page = write_report(args.run_folder)
    record_report(args.run_folder)
    print(f"report written to {page}")
    return 0


class _WarningLines(logging.Handler):
    """Warnings of dirio's modules (logger ``dirio``) as ``dirio: warning: ...`` lines on the current
    stderr, options written as this command's flags (:func:`with_flags`)."""

    def __init__(self, args: argparse.Namespace):
        super().__init__(logging.WARNING)
        self.args = args

    def emit(self, record: logging.LogRecord) -> None:
        print(f"dirio: warning: {with_flags(DirioError(record.getMessage()), self.args)}", file=sys.stderr)


def show_warnings(args: argparse.Namespace) -> None:
    """Print the warnings of this command's run on the terminal (one handler, replaced per call)."""
    logger = logging.getLogger("dirio")
    for handler in [h for h in logger.handlers if isinstance(h, _WarningLines)]:
        logger.removeHandler(handler)
    logger.addHandler(_WarningLines(args))


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    show_warnings(args)
    handlers = {"register": run_register, "warp": run_warp, "evaluate": run_evaluate, "demo": run_demo,
                "sweep": run_sweep, "run": run_dataset_command, "report": run_report, "convert": run_convert,
                "train": run_train, "transform-points": run_transform_points}
    try:
        code = handlers[args.command](args)
    except DirioError as error:
        print(f"dirio: error: {with_flags(error, args)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("dirio: interrupted; no partial output was left under a final name", file=sys.stderr)
        code = 130
    if args.command in ("run", "train") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
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
