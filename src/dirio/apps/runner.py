"""Register a whole Learn2Reg dataset split: sharded over processes and nodes, resumable, atomic.

``dirio run DATASET.json --split val -o OUT`` is one call of :func:`run_dataset`. Per pair it
registers with the run's settings, writes ``OUT/disp_<pair>.nii.gz`` (Learn2Reg layout, read back
and checked against the fixed grid), scores it with dirio's metrics, draws a thumbnail, and only
then writes ``OUT/status/<pair>.json``: a pair is finished exactly when its status record says
``done`` and its field file is the one the record names (same SHA-256, same shape). Every file goes
through :func:`dirio.io.atomic.atomic_output`, so a crash (even SIGKILL) leaves whole files or
``.tmp-*`` leftovers, which the next run deletes before it starts. The status records and
``run.json`` are signed manifests of the files they name (:mod:`dirio.io.manifest`): ``--overwrite``
deletes exactly those, unchanged, and keeps every other file in OUT.

Scale-out: under ``torchrun`` (``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in the environment) every
process joins a ``gloo`` process group, takes the pairs ``i`` with ``i % WORLD_SIZE == RANK`` and,
with GPUs, the device ``cuda:LOCAL_RANK``. The ranks exchange nothing but a few small objects
(rank 0's start-up verdict, the failure count), so gloo serves GPU runs too and NCCL is never
needed. After a barrier rank 0 reads every status record (the run folder must be shared between
nodes) and writes ``cases.csv``, ``labels.csv``, ``summary.json``, ``run.json`` and the report.
A failing pair is caught and recorded on the rank that ran it, so it cannot leave the other ranks
waiting.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dirio.evaluation import aggregate
from dirio.api import check_settings, resolve_device
from dirio.core.distributed import (
    Ranks,
    barrier,
    broadcast_object,
    destroy_process_group,
    init_process_group,
    ranks_from_environment,
)
from dirio.config.files import RunConfiguration
from dirio.io.dataset import Pair, load_dataset
from dirio.errors import DirioError
from dirio.io.atomic import check_output_folder, LOCK_NAME, OutputLock, remove_temporaries, sha256_of, write_json, write_text
from dirio.io.fields import load_field, save_field
from dirio.io.manifest import (REGISTER_MANIFEST, RUN_LOG, RUN_MANIFEST, Replacement, files_with_checksums,
                               read_signed_record, replace_earlier_outputs, sign_record, unchanged)
from dirio.apps.workflow import Inputs, evaluate, load_inputs, register_inputs, software_versions

CASES_COLUMNS = ("pair", "fixed", "moving", "status", "seconds", "dice", "hd95", "sdlogj", "fold_percent",
                 "ndv_percent", "tre_mm", "dice_before", "tre_mm_before", "error")
LABELS_COLUMNS = ("pair", "label", "dice", "hd95")
LOGGER = "dirio.run"
# --itk-field: OUT/itk/disp_<pair>.nii.gz (NIfTI vector intent) and .h5 (with SimpleITK), LPS mm.
ITK_FOLDER = "itk"


@dataclass
class RunResult:
    """What :func:`run_dataset` did (the same on every rank).

    Attributes:
        exit_code: 0 when every pair is done, 1 when some failed.
        pairs, done, failed: counts over the pairs of the run.
        out_dir: the run folder.
    """

    exit_code: int
    pairs: int
    done: int
    failed: int
    out_dir: Path


# --- distributed -------------------------------------------------------------------------------


def pick_device(device: str, ranks: Ranks) -> torch.device:
    """The rank's device: ``auto``/``cuda`` take ``cuda:LOCAL_RANK`` (modulo the GPUs) under torchrun."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", ranks.local_rank % torch.cuda.device_count())
    return resolve_device(device)


# --- the run folder ----------------------------------------------------------------------------


def config_hash(dataset: Path, split: str, configuration: RunConfiguration) -> str:
    """SHA-256 of what makes a run folder's results: dataset file, split, settings and run options."""
    record = {"dataset": str(dataset), "split": split, "settings": configuration.settings.to_dict(),
              "run_options": configuration.run_options()}
    text = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")


def _remove_temporaries(out_dir: Path) -> int:
    """Delete ``.tmp-*`` files an interrupted run left in OUT, OUT/status, OUT/thumbnails and OUT/itk."""
    return sum(remove_temporaries(folder) for folder in
               (out_dir, out_dir / "status", out_dir / "thumbnails", out_dir / ITK_FOLDER))


TABLES = ("cases.csv", "labels.csv", "summary.json")


def report_names() -> list[str]:
    """The files of ``OUT/report/`` that :func:`dirio.viz.html_report.write_report` writes (relative to OUT)."""
    from dirio.viz.html_report import LABELS_PNG, METRICS_PNG, PAGE_NAME, REPORT_DIR

    return [f"{REPORT_DIR}/{name}" for name in (PAGE_NAME, METRICS_PNG, LABELS_PNG)]


def record_report(out_dir: str | Path) -> None:
    """After ``dirio report`` rebuilt a run folder's report: name its files, with their new checksums, in
    the run's manifest ``run.json`` (so that a later ``--overwrite`` knows them as the run's). Nothing
    when ``run.json`` is not a signed dirio record, or while a run holds the folder (it rewrites both)."""
    out_dir = Path(out_dir)
    if read_signed_record(out_dir / RUN_MANIFEST) is None:
        return
    try:
        with OutputLock(out_dir):
            record = read_signed_record(out_dir / RUN_MANIFEST)
            if record is not None:
                record["files"] = {**(record.get("files") or {}), **files_with_checksums(out_dir, report_names())}
                write_json(out_dir / RUN_MANIFEST, sign_record(record), overwrite=True)
    except DirioError:  # the folder is being written by a run
        pass


def run_output_names(pairs: Sequence[Pair], report: bool, itk_field: bool) -> list[str]:
    """Every file a run of ``pairs`` may write into OUT (relative to OUT), besides the appended ``run.log``."""
    names = [RUN_MANIFEST, *TABLES, *(report_names() if report else [])]
    for pair in pairs:
        names += [pair.disp_name, f"status/{pair.name}.json"]
        if report:
            names.append(f"thumbnails/{pair.name}.png")
        if itk_field:
            names += [f"{ITK_FOLDER}/{path.name}" for path in itk_paths(Path("."), pair)]
    return names


def prepare_out_dir(out_dir: Path, run_record: dict, overwrite: bool,
                    will_write: Sequence[str] = ()) -> Replacement | None:
    """Rank 0: check that OUT is this run's folder (or new), clean leftovers, write ``run.json``.

    With ``overwrite`` the earlier outputs in OUT are replaced as :mod:`dirio.io.manifest` says:
    the files an earlier ``dirio run`` or ``dirio register`` recorded writing, unchanged since, are
    deleted; every other file stays (``run.log`` is appended to). Without it, a resumed run keeps
    the earlier run's record of its tables and report (``run.json``'s ``files``).

    Args:
        will_write: the files this run writes (:func:`run_output_names`), which ``overwrite`` may
            replace only where an earlier run wrote them.
    Returns:
        What ``overwrite`` removed and kept, or ``None`` without ``overwrite``.
    Raises:
        DirioError: OUT holds a run made with another configuration or dataset, or OUT holds files
            but is not a dirio run folder; both unless ``overwrite``. With ``overwrite``: a file
            this run writes exists but an earlier run did not write it or it changed since.
    """
    run_json = out_dir / RUN_MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise DirioError(f"{out_dir} exists and is not a folder")
    ours = {LOCK_NAME}  # the lock of this run (see run_dataset) does not make OUT "not empty"
    if run_json.is_file() and not overwrite:
        try:
            previous = json.loads(run_json.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            previous = {}
        if previous.get("config_hash") != run_record["config_hash"]:
            raise DirioError(
                f"{out_dir} holds a run made with another configuration or dataset "
                f"(config_hash {str(previous.get('config_hash'))[:12]} in run.json, this run "
                f"{run_record['config_hash'][:12]}); pass --overwrite to start again there, or choose another -o"
            )
    elif (out_dir.is_dir() and not run_json.is_file() and any(p.name not in ours for p in out_dir.iterdir())
          and not overwrite):
        holds = (f" (it holds the outputs of dirio register: {REGISTER_MANIFEST})"
                 if (out_dir / REGISTER_MANIFEST).is_file() else "")
        raise DirioError(f"{out_dir} is not empty and holds no run.json (not a dirio run folder){holds}; "
                         f"choose an empty or new folder, or pass --overwrite")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(out_dir)
    replaced = None
    if overwrite:
        replaced = replace_earlier_outputs(out_dir, will_write)
        run_record["files"] = {}
    else:  # resuming: the tables and report of the earlier run stay its outputs until rewritten
        previous = read_signed_record(run_json) or {}
        run_record["files"] = {name: digest for name, digest in (previous.get("files") or {}).items()
                               if unchanged(out_dir, name, digest)}
    (out_dir / "status").mkdir(exist_ok=True)
    write_json(run_json, sign_record(run_record), overwrite=True)
    return replaced


# --- logging and progress ----------------------------------------------------------------------


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def _open_log(out_dir: Path, ranks: Ranks, quiet: bool) -> logging.Logger:
    """Logger ``dirio.run.rank<r>``: every line to OUT/run.log (appended, with the tracebacks of failed
    pairs), progress lines to stderr (with ``quiet`` only warnings: failed pairs, kept files)."""
    logger = logging.getLogger(f"{LOGGER}.rank{ranks.rank}")
    logger.setLevel(logging.DEBUG)  # tracebacks of failed pairs go to the file only
    logger.propagate = False
    _close_log(logger)
    file_handler = logging.FileHandler(out_dir / RUN_LOG, mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s rank%(rank)d %(levelname)s %(message)s"))
    file_handler.addFilter(_RankFilter(ranks.rank))
    logger.addHandler(file_handler)
    console = logging.StreamHandler()
    prefix = f"rank {ranks.rank}: " if ranks.distributed else ""
    console.setFormatter(logging.Formatter(prefix + "%(message)s"))
    console.setLevel(logging.WARNING if quiet else logging.INFO)  # -q: failures and warnings only
    logger.addHandler(console)
    return logger


def _close_log(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# --- one pair ----------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, DirioError) else f"{type(error).__name__}: {text}"


def status_path(out_dir: Path, pair: Pair) -> Path:
    return out_dir / "status" / f"{pair.name}.json"


def read_status(out_dir: Path, pair: Pair) -> dict | None:
    """The pair's status record, or ``None`` when missing or unreadable."""
    try:
        record = json.loads(status_path(out_dir, pair).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def finished(out_dir: Path, pair: Pair) -> bool:
    """True when the pair's record says done and its field file is the one recorded (hash and shape)."""
    record = read_status(out_dir, pair)
    if record is None or record.get("status") != "done":
        return False
    path = out_dir / pair.disp_name
    if not path.is_file() or sha256_of(path) != record.get("disp_sha256"):
        return False
    import nibabel

    try:
        shape = list(nibabel.load(path).shape)
    except Exception:  # noqa: BLE001 - any unreadable header means "not finished"
        return False
    return shape == record.get("shape")


def _load_pair(pair: Pair, configuration: RunConfiguration) -> Inputs:
    """The pair's inputs: labels and keypoints when both images have them, masks when asked."""
    f, m = pair.fixed, pair.moving
    both = lambda a, b: (a, b) if a is not None and b is not None else (None, None)  # noqa: E731
    fixed_labels, moving_labels = both(f.labels, m.labels)
    fixed_points, moving_points = both(f.keypoints, m.keypoints)
    masks = (f.mask, m.mask) if configuration.use_masks else (None, None)
    return load_inputs(
        f.image, m.image, fixed_labels=fixed_labels, moving_labels=moving_labels,
        fixed_mask=masks[0], moving_mask=masks[1], fixed_keypoints=fixed_points, moving_keypoints=moving_points,
        resample=configuration.resample,
    )


def itk_paths(out_dir: Path, pair: Pair) -> list[Path]:
    """The ``--itk-field`` files of a pair: ``OUT/itk/disp_<pair>.nii.gz`` and, with SimpleITK, ``.h5``."""
    paths = [out_dir / ITK_FOLDER / f"disp_{pair.name}.nii.gz"]
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return paths
    return paths + [out_dir / ITK_FOLDER / f"disp_{pair.name}.h5"]


def write_itk_fields(out_dir: Path, pair: Pair, disp: np.ndarray, affine: np.ndarray) -> None:
    """Write the pair's field as ITK displacement fields (:mod:`dirio.io.itk_fields`)."""
    from dirio.io.itk_fields import save_itk_field

    for path in itk_paths(out_dir, pair):
        save_itk_field(path, disp, affine, overwrite=True)


def register_pair(pair: Pair, out_dir: Path, configuration: RunConfiguration, label_ids: Sequence[int] | None,
                  device: torch.device, ranks: Ranks, report: bool, logger: logging.Logger,
                  itk_field: bool = False) -> dict:
    """Register, write, check and score one pair; return its status record (never raises for the pair).

    The record is written last (atomically) by the caller's :func:`_write_status`; a failure leaves
    no field file behind.
    """
    start = time.perf_counter()
    disp_path = out_dir / pair.disp_name
    record: dict = {
        "pair": pair.name, "index": pair.index, "fixed": pair.fixed.entry, "moving": pair.moving.entry,
        "case_key": pair.case_key, "disp": pair.disp_name, "rank": ranks.rank, "device": str(device),
    }
    try:
        inputs = _load_pair(pair, configuration)
        result = register_inputs(inputs, configuration.settings, device)
        expected = list(inputs.fixed.shape) + [inputs.fixed.ndim]
        save_field(disp_path, result.disp, inputs.fixed.affine, overwrite=True)
        disp = load_field(disp_path)  # what the evaluator will read: shape and values as on disk
        if list(disp.shape) != expected:
            raise DirioError(f"{disp_path}: written with shape {list(disp.shape)}, expected {expected}")
        if itk_field:
            write_itk_fields(out_dir, pair, disp, inputs.fixed.affine)
        before = _identity_metrics(inputs, label_ids, configuration.tre_order)
        after = evaluate(inputs, disp, label_ids, configuration.tre_order)
        if report:
            _thumbnail(out_dir, pair, inputs.fixed.data, result.warped, disp, logger)
        written = [pair.disp_name, *(path.relative_to(out_dir).as_posix() for path in itk_paths(out_dir, pair)
                                     if itk_field), f"thumbnails/{pair.name}.png" if report else None]
        files = files_with_checksums(out_dir, [name for name in written if name])
        record.update({
            "status": "done", "error": None, "shape": expected, "disp_sha256": files[pair.disp_name], "files": files,
            "label_ids": [int(label) for label in after.get("dice_per_label", {})] or None,
            "before": before, "after": after,
            "optimisation_seconds": result.seconds, "peak_memory_mb": result.peak_memory_mb,
        })
        warnings = [stage["warning"] for stage in result.stages if "warning" in stage]  # e.g. no lungs found
        if warnings:
            record["warnings"] = warnings
    except Exception as error:  # noqa: BLE001 - a failing pair is recorded, the run goes on
        logger.debug("pair %s failed:\n%s", pair.name, traceback.format_exc())
        disp_path.unlink(missing_ok=True)
        for path in itk_paths(out_dir, pair):
            path.unlink(missing_ok=True)
        record.update({"status": "failed", "error": _one_line(error), "files": {}})
    record["seconds"] = time.perf_counter() - start
    record["finished"] = _now()
    return record


def _identity_metrics(inputs: Inputs, label_ids: Sequence[int] | None, tre_order: int) -> dict:
    """Dice and TRE of the identity field ("before"): the tables report no HD95 or regularity before."""
    identity = np.zeros(inputs.fixed.shape + (inputs.fixed.ndim,), dtype=np.float32)
    return evaluate(inputs, identity, label_ids, tre_order, regularity=False, hd95=False)


def _thumbnail(out_dir: Path, pair: Pair, fixed: np.ndarray, warped: np.ndarray, disp: np.ndarray,
               logger: logging.Logger) -> None:
    from dirio.viz.html_report import pair_thumbnail

    try:
        pair_thumbnail(out_dir / "thumbnails" / f"{pair.name}.png", fixed, warped, disp)
    except Exception as error:  # noqa: BLE001 - a missing picture does not undo a registered pair
        logger.warning("%s: no thumbnail (%s)", pair.name, _one_line(error))


def _write_status(out_dir: Path, record: dict) -> None:
    """The pair's status record, signed (:func:`dirio.io.manifest.sign_record`): it is the manifest of
    the pair's files, which ``--overwrite`` reads."""
    write_json(out_dir / "status" / f"{record['pair']}.json", sign_record(record), overwrite=True)


# --- tables ------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    return str(value)


def case_row(pair: Pair, record: dict | None) -> dict:
    """One ``cases.csv`` row (see docs/how-to/datasets.md); empty cells for missing metrics."""
    row = {column: None for column in CASES_COLUMNS}
    row.update({"pair": pair.name, "fixed": pair.fixed.entry, "moving": pair.moving.entry})
    if record is None:
        row.update({"status": "failed", "error": "no status record: the process that owned this pair stopped"})
        return row
    row.update({"status": record.get("status"), "seconds": record.get("seconds"), "error": record.get("error")})
    if record.get("status") == "done":
        after, before = record.get("after", {}), record.get("before", {})
        row.update({
            "dice": after.get("dice_mean"), "hd95": after.get("hd95_voxels"), "sdlogj": after.get("sdlogj_l2r"),
            "fold_percent": after.get("percent_nonpositive_jacobian"), "ndv_percent": after.get("ndv_percent"),
            "tre_mm": after.get("tre_mm_mean"), "dice_before": before.get("dice_mean"),
            "tre_mm_before": before.get("tre_mm_mean"),
        })
    return row


def _csv_text(columns: Sequence[str], rows: Sequence[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    return buffer.getvalue()


def write_tables(out_dir: Path, name: str, pairs: Sequence[Pair], records: dict[str, dict | None]) -> dict:
    """Rank 0: ``cases.csv``, ``labels.csv`` and ``summary.json`` from the status records; returns the summary."""
    case_rows, label_rows, cases, failed = [], [], {}, []
    for pair in pairs:
        record = records.get(pair.name)
        row = case_row(pair, record)
        case_rows.append(row)
        if row["status"] != "done":
            failed.append({"pair": pair.name, "fixed": pair.fixed.entry, "moving": pair.moving.entry,
                           "error": row["error"]})
            continue
        after = record["after"]
        for label, dice in after.get("dice_per_label", {}).items():
            label_rows.append({"pair": pair.name, "label": label, "dice": float(dice),
                               "hd95": after.get("hd95_voxels_per_label", {}).get(label)})
        cases[pair.case_key] = aggregate.case_result(
            after, record.get("before"), seconds=record.get("seconds"), grid_shape=record["shape"][:-1],
            label_ids=record.get("label_ids"))
    write_text(out_dir / "cases.csv", _csv_text(CASES_COLUMNS, case_rows), overwrite=True)
    write_text(out_dir / "labels.csv", _csv_text(LABELS_COLUMNS, label_rows), overwrite=True)
    result = aggregate.summary(name, cases, failed)
    write_json(out_dir / "summary.json", result, overwrite=True)
    return result


# --- the run -----------------------------------------------------------------------------------


def run_dataset(
    dataset: str | Path,
    split: str,
    out_dir: str | Path,
    configuration: RunConfiguration,
    *,
    overwrite: bool = False,
    threads: int | None = None,
    limit: int | None = None,
    report: bool = True,
    quiet: bool = False,
    itk_field: bool | None = None,
    allow_outside: bool = False,
) -> RunResult:
    """Register every pair of a dataset split into ``out_dir`` (see the module docstring).

    Args:
        dataset: the Learn2Reg dataset JSON.
        split: ``val``, ``test`` or ``train`` (:meth:`dirio.io.dataset.Dataset.pairs`).
        out_dir: the run folder; an existing run folder of the same configuration is resumed.
        configuration: settings and run options (:func:`dirio.config.files.run_configuration`).
        overwrite: start again, deleting an earlier run's outputs in ``out_dir`` (whatever its configuration).
        threads: ``torch.set_num_threads`` for this process.
        limit: only the first ``limit`` pairs of the split.
        report: draw a thumbnail per pair and write ``report/index.html`` (:mod:`dirio.viz.html_report`).
        quiet: no progress lines on stderr (``run.log`` has them).
        itk_field: also write every field as an ITK displacement field into ``OUT/itk/``
            (:func:`write_itk_fields`); the configuration's ``itk_field`` (config file key) does too.
        allow_outside: accept dataset paths that lead outside the dataset JSON's folder.
    Returns:
        A :class:`RunResult`; ``exit_code`` 1 when some pair failed.
    Raises:
        DirioError: unreadable dataset, dataset paths outside its folder, unusable weights or learning
            rate, an output folder that cannot be written or is in use by another run, or a run folder
            that belongs to another run (all before any work).
    """
    wall = time.perf_counter()
    ranks = ranks_from_environment()
    check_settings(configuration.settings)
    itk_field = bool(itk_field) or bool(getattr(configuration, "itk_field", False))
    data = load_dataset(dataset, allow_outside=allow_outside)
    pairs = data.pairs(split)
    if limit is not None:
        pairs = pairs[:limit]
    out_dir = Path(out_dir).resolve()
    configuration = dataclasses.replace(
        configuration,
        settings=dataclasses.replace(configuration.settings, progress=False))
    if threads is not None:
        torch.set_num_threads(threads)
    device = pick_device(configuration.device, ranks)
    label_ids = configuration.label_ids if configuration.label_ids is not None else data.label_ids
    run_record = {
        "dataset": str(data.path), "split": split, "config": configuration.settings.to_dict(),
        "config_file": configuration.config_file, "config_hash": config_hash(data.path, split, configuration),
        "run_options": configuration.run_options(), "versions": software_versions(),
        "world_size": ranks.world_size, "started": _now(), "finished": None, "seconds": None,
        "pairs": len(pairs), "done": None, "failed": None, "device": str(device), "threads": threads,
    }
    init_process_group(ranks)
    logger = None
    lock = OutputLock(out_dir)
    try:
        problem, replaced = None, None
        if ranks.main:
            try:
                check_output_folder(out_dir)  # first: also a name the system refuses (too long) is one line
                if out_dir.exists() and not out_dir.is_dir():
                    raise DirioError(f"{out_dir} exists and is not a folder")
                lock.acquire()  # held by rank 0 until the end: a second run into OUT fails at once
                replaced = prepare_out_dir(out_dir, run_record, overwrite,
                                           run_output_names(pairs, report, itk_field))
            except DirioError as error:
                problem = str(error)
        problem = broadcast_object(problem, ranks)
        if problem is not None:
            raise DirioError(problem)
        logger = _open_log(out_dir, ranks, quiet)
        if replaced is not None:
            logger.info("--overwrite: removed %d file(s) of the earlier run", len(replaced.removed))
            for line in replaced.kept_lines():
                logger.warning("%s", line)
        mine = [pair for pair in pairs if pair.index % ranks.world_size == ranks.rank]
        logger.info("%s split %s: %d pairs, %d on this process (rank %d of %d), device %s, %s threads",
                    data.path.name, split, len(pairs), len(mine), ranks.rank, ranks.world_size, device,
                    torch.get_num_threads())
        _run_pairs(mine, out_dir, configuration, label_ids, device, ranks, report, logger, itk_field)
        barrier(ranks)
        outcome: dict = {"failed": 0}
        if ranks.main:
            try:
                outcome["failed"] = _finish(out_dir, data.name, pairs, run_record, wall, report, logger)
            except Exception as error:  # noqa: BLE001 - told to every rank, then raised here
                outcome = {"error": _one_line(error)}
                if not ranks.distributed:
                    raise
                broadcast_object(outcome, ranks)
                raise
        outcome = broadcast_object(outcome, ranks)
        if "error" in outcome:
            raise DirioError(f"rank 0 could not write the run's tables: {outcome['error']}")
        failed = outcome["failed"]
        return RunResult(exit_code=1 if failed else 0, pairs=len(pairs), done=len(pairs) - failed, failed=failed,
                         out_dir=out_dir)
    finally:
        if logger is not None:
            _close_log(logger)
        lock.release()
        # The ranks leave together: torchrun stops every worker as soon as one exits with an error
        # status, so no rank may exit while another is still closing its files.
        if sys.exc_info()[0] is None:
            barrier(ranks)
        destroy_process_group(ranks)


def _finish(out_dir: Path, name: str, pairs: Sequence[Pair], run_record: dict, wall: float, report: bool,
            logger: logging.Logger) -> int:
    """Rank 0, after every pair: tables, summary, run.json, report; returns the number of failed pairs.

    A report that cannot be drawn is logged as a warning: the fields and tables are the run's results.
    """
    records = {pair.name: read_status(out_dir, pair) for pair in pairs}
    result = write_tables(out_dir, name, pairs, records)
    failed = len(result["failed"])
    run_record.update({"finished": _now(), "seconds": time.perf_counter() - wall, "done": result["done"],
                       "failed": failed})
    write_json(out_dir / RUN_MANIFEST, sign_record(run_record), overwrite=True)
    written = list(TABLES)
    if report:
        from dirio.viz.html_report import write_report

        try:
            logger.info("report: %s", write_report(out_dir))
            written += report_names()
        except Exception as error:  # noqa: BLE001 - see the docstring
            logger.debug("report failed:\n%s", traceback.format_exc())
            logger.warning("no report: %s", _one_line(error))
    # run.json, written last, is the manifest of the run's tables and report (dirio.io.manifest)
    earlier = {name: digest for name, digest in run_record.get("files", {}).items() if unchanged(out_dir, name, digest)}
    run_record["files"] = {**earlier, **files_with_checksums(out_dir, written)}
    write_json(out_dir / RUN_MANIFEST, sign_record(run_record), overwrite=True)
    logger.info("%d of %d pairs done, %d failed; %s; tables in %s", result["done"], len(pairs), failed,
                format_duration(time.perf_counter() - wall), out_dir)
    for item in result["failed"]:
        logger.warning("failed: %s: %s", item["pair"], item["error"])
    return failed


def _run_pairs(mine: Sequence[Pair], out_dir: Path, configuration: RunConfiguration,
               label_ids: Sequence[int] | None, device: torch.device, ranks: Ranks, report: bool,
               logger: logging.Logger, itk_field: bool = False) -> None:
    """This rank's pairs in order: skip finished ones, register the others, one progress line each.

    A finished pair that lacks its ``--itk-field`` files gets them from its field file."""
    todo = []
    for position, pair in enumerate(mine, start=1):
        if finished(out_dir, pair):
            if itk_field and not all(path.is_file() for path in itk_paths(out_dir, pair)):
                from dirio.io.fields import load_field_and_affine

                write_itk_fields(out_dir, pair, *load_field_and_affine(out_dir / pair.disp_name))
            logger.info("[%d/%d] %s already done, skipped", position, len(mine), pair.name)
        else:
            todo.append((position, pair))
    spent = 0.0
    for count, (position, pair) in enumerate(todo, start=1):
        record = register_pair(pair, out_dir, configuration, label_ids, device, ranks, report, logger, itk_field)
        _write_status(out_dir, record)
        spent += record["seconds"]
        eta = format_duration((len(todo) - count) * spent / count)
        counter = f"[{position}/{len(mine)}] {pair.name}"
        if record["status"] == "done":
            logger.info("%s done in %.1f s, ETA %s", counter, record["seconds"], eta)
        else:
            logger.info("%s FAILED after %.1f s: %s; ETA %s", counter, record["seconds"], record["error"], eta)
