"""What earlier dirio commands wrote into an output folder, so that ``--overwrite`` replaces exactly that.

Every set of outputs dirio writes into a folder is described by a *manifest*: a JSON record that
names each file with its SHA-256 and carries the SHA-256 of its own content (key
``record_sha256``, :func:`sign_record`), so that a record the user edited, or a file of the same
name that dirio did not write, is not taken for one:

* ``dirio register``: ``metrics.json`` (``outputs`` ``{key: path}`` and ``sha256`` ``{key: hex}``);
  while a set is being replaced, ``dirio-incomplete.json`` names the files being written and the
  earlier set's files with their checksums;
* ``dirio run``: ``run.json`` (``files``: the tables, ``summary.json`` and the report) and one
  ``status/<pair>.json`` per pair (``files``: the pair's field, ITK fields and thumbnail);
* ``dirio sweep``: ``sweep.json``; ``dirio demo``: ``demo.json`` (``files``: the other files).

:func:`earlier_outputs` reads them; :func:`replace_earlier_outputs` is what ``--overwrite`` of
``dirio register`` and ``dirio run`` does with them (they replace each other's outputs): it refuses
(before deleting anything) when a file the new command writes exists but is not an unchanged
earlier output, then deletes the earlier outputs whose checksum still matches, and reports every
other file as kept. ``sweep`` and ``demo`` only refuse (:func:`check_replaceable`): they write
files of fixed names. Paths are relative to the folder, with ``/``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from dirio.errors import DirioError
from dirio.io.atomic import LOCK_NAME, _json_default, sha256_of

PathLike = str | os.PathLike

RECORD_CHECKSUM_KEY = "record_sha256"
REGISTER_MANIFEST = "metrics.json"
INCOMPLETE_MARKER = "dirio-incomplete.json"
RUN_MANIFEST = "run.json"
RUN_STATUS_FOLDER = "status"
# Written by dirio run and appended to by every later run in the folder (never deleted, never "kept").
RUN_LOG = "run.log"
# Replace whatever the file holds: named by the marker of an interrupted ``dirio register``, which
# was writing it when it stopped (its checksum was never recorded).
ANY_CONTENT = "*"


def record_checksum(record: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON record's content (keys sorted, ``record_sha256`` left out).

    The record is first passed through JSON (numpy values and paths converted as
    :func:`dirio.io.atomic.write_json` does), so the checksum of a record as written equals the
    checksum of the record read back from the file.
    """
    content = {key: value for key, value in record.items() if key != RECORD_CHECKSUM_KEY}
    plain = json.loads(json.dumps(content, allow_nan=True, default=_json_default))
    text = json.dumps(plain, sort_keys=True, allow_nan=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sign_record(record: Mapping[str, Any]) -> dict:
    """``record`` with ``record_sha256`` (its :func:`record_checksum`) as its last key."""
    signed = {key: value for key, value in record.items() if key != RECORD_CHECKSUM_KEY}
    signed[RECORD_CHECKSUM_KEY] = record_checksum(signed)
    return signed


def read_signed_record(path: PathLike) -> dict | None:
    """The JSON object in ``path`` when its ``record_sha256`` matches its content, else ``None``
    (missing, unreadable, not JSON, unsigned, or changed since it was written)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get(RECORD_CHECKSUM_KEY) != record_checksum(record):
        return None
    return record


def files_with_checksums(folder: PathLike, names: Iterable[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files among ``names`` (relative to ``folder``) that exist."""
    folder = Path(folder)
    return {name: sha256_of(folder / name) for name in names if (folder / name).is_file()}


def _relative(folder: Path, path: str) -> str | None:
    """``path`` (absolute, or relative to the folder or to the working folder of the writer) as a
    path relative to ``folder``; ``None`` when it cannot lie in it."""
    candidate = Path(path)
    if candidate.is_absolute():
        try:
            return candidate.relative_to(folder).as_posix()
        except ValueError:
            return None
    return candidate.name  # the manifests that name files by path name files directly in their folder


def _manifest_files(folder: Path, name: str) -> dict[str, str]:
    """The manifest ``folder/name`` and the files it names (empty when it is not a signed record).

    A manifest names files by ``files`` (``{relative path: sha256}``), by ``outputs`` and ``sha256``
    (``{key: path}``, ``{key: sha256}``: ``metrics.json``), by ``earlier`` (``{relative path: sha256}``)
    and ``writing`` (``{key: path}``, any content: the marker of an interrupted ``dirio register``).
    """
    record = read_signed_record(folder / name)
    if record is None:
        return {}
    owned = {name: sha256_of(folder / name)}
    outputs, checksums = record.get("outputs") or {}, record.get("sha256") or {}
    if isinstance(outputs, dict) and isinstance(checksums, dict):
        for key, digest in checksums.items():
            path = _relative(folder, str(outputs.get(key, "")))
            if path and isinstance(digest, str):
                owned[path] = digest
    for key in ("files", "earlier"):
        entries = record.get(key) or {}
        if isinstance(entries, dict):
            owned.update({str(path): str(digest) for path, digest in entries.items()})
    writing = record.get("writing") or {}
    if isinstance(writing, dict):
        for path in writing.values():
            path = _relative(folder, str(path))
            if path:
                owned[path] = ANY_CONTENT
    return owned


# The manifests of each kind of output folder (relative to it; ``status/*.json``: every record there).
MANIFESTS = {
    "register": (REGISTER_MANIFEST, INCOMPLETE_MARKER),
    "run": (RUN_MANIFEST, f"{RUN_STATUS_FOLDER}/*.json"),
    "sweep": ("sweep.json",),
    "demo": ("demo.json",),
}


def earlier_outputs(folder: PathLike, kinds: Iterable[str] = ("run", "register")) -> dict[str, str]:
    """``{relative path: sha256}`` of every file that earlier dirio commands of ``kinds`` (keys of
    :data:`MANIFESTS`) recorded writing into ``folder``; the value :data:`ANY_CONTENT` marks a file
    an interrupted ``dirio register`` was writing. By default the outputs of ``dirio run`` and
    ``dirio register``, which replace each other's."""
    folder = Path(folder)
    owned: dict[str, str] = {}
    if not folder.is_dir():
        return owned
    for kind in kinds:
        for pattern in MANIFESTS[kind]:
            names = ([path.relative_to(folder).as_posix() for path in sorted(folder.glob(pattern)) if path.is_file()]
                     if "*" in pattern else [pattern])
            for name in names:
                for path, digest in _manifest_files(folder, name).items():
                    if _inside(folder, path):
                        owned.setdefault(path, digest)
    return owned


def _inside(folder: Path, name: str) -> bool:
    """Whether ``name`` leads to a place inside ``folder`` (a manifest never names anything outside
    it: no absolute path, no ``..``, no way out through a symbolic link)."""
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or not name:
        return False
    try:
        return (folder / path).resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):
        return False


def unchanged(folder: Path, name: str, digest: str) -> bool:
    """Whether ``folder/name`` is a file that still holds what the manifest recorded."""
    path = folder / name
    return path.is_file() and (digest == ANY_CONTENT or sha256_of(path) == digest)


def _listing(names: list[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


@dataclass
class Replacement:
    """What :func:`replace_earlier_outputs` did.

    Attributes:
        removed: the earlier outputs deleted (relative paths).
        changed: earlier outputs kept because they changed since dirio wrote them.
        foreign: files kept because no earlier dirio command recorded writing them.
    """

    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def kept_lines(self) -> list[str]:
        """One line per kind of kept file (none when nothing was kept)."""
        lines = []
        if self.foreign:
            lines.append(f"kept {len(self.foreign)} file(s) that no earlier dirio run wrote: {_listing(self.foreign)}")
        if self.changed:
            lines.append(f"kept {len(self.changed)} file(s) changed since dirio wrote them: {_listing(self.changed)}")
        return lines


def _all_files(folder: Path) -> list[str]:
    """Every file below ``folder`` (relative, sorted), without the lock, temporaries and ``run.log``."""
    names = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            relative = (Path(root) / name).relative_to(folder).as_posix()
            if name == LOCK_NAME or name.startswith(".tmp-") or relative == RUN_LOG:
                continue
            names.append(relative)
    return sorted(names)


def check_replaceable(folder: PathLike, will_write: Iterable[str], owned: Mapping[str, str] | None = None) -> None:
    """Refuse ``overwrite`` when a file the new command will write exists but is not an unchanged
    earlier output (a file of the user's, or one changed since dirio wrote it).

    Args:
        folder: the output folder.
        will_write: the paths (relative to ``folder``) the new command writes.
        owned: :func:`earlier_outputs` of ``folder`` (read when not given).
    Raises:
        DirioError: naming the folder and the files, before anything is deleted.
    """
    folder = Path(folder)
    owned = earlier_outputs(folder) if owned is None else owned
    blocking = [name for name in sorted(set(will_write)) if (folder / name).exists()
                and not (name in owned and unchanged(folder, name, owned[name]))]
    if blocking:
        raise DirioError(
            f"{folder}: `overwrite` replaces only what an earlier dirio run wrote, but {_listing(blocking)} "
            f"{'was' if len(blocking) == 1 else 'were'} not written by dirio or changed since; "
            f"move {'it' if len(blocking) == 1 else 'them'} away, or choose another output folder"
        )


def replace_earlier_outputs(folder: PathLike, will_write: Iterable[str], owned: Mapping[str, str] | None = None,
                            spare: Iterable[str] = ()) -> Replacement:
    """``overwrite``: delete the earlier outputs of ``folder`` that are unchanged, keep everything else.

    First :func:`check_replaceable` (nothing is deleted when it refuses); then every file named by
    :func:`earlier_outputs` whose checksum still matches is deleted, and folders left empty by it
    are removed (not ``folder`` itself).

    Args:
        folder: the output folder.
        will_write: the paths (relative to ``folder``) the new command writes.
        owned: :func:`earlier_outputs` of ``folder`` (read when not given).
        spare: paths neither deleted nor reported (e.g. the new command's own marker).
    Returns:
        The :class:`Replacement`: what was removed and what was kept (and why).
    """
    folder = Path(folder)
    spare = set(spare)
    owned = {name: digest for name, digest in (earlier_outputs(folder) if owned is None else owned).items()
             if name not in spare}
    check_replaceable(folder, will_write, owned)
    result = Replacement()
    emptied = set()
    # the manifests last: an interruption leaves them naming the files still there
    manifests = {REGISTER_MANIFEST, INCOMPLETE_MARKER, RUN_MANIFEST}
    for name in sorted(owned, key=lambda n: (n in manifests or n.startswith(RUN_STATUS_FOLDER + "/"), n)):
        path = folder / name
        if not path.is_file():
            continue
        if unchanged(folder, name, owned[name]):
            path.unlink()
            result.removed.append(name)
            emptied.update(parent for parent in path.parents if folder in parent.parents)
        else:
            result.changed.append(name)
    for parent in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        try:
            parent.rmdir()  # only when empty
        except OSError:
            pass
    result.foreign = [name for name in _all_files(folder) if name not in owned and name not in spare]
    return result
