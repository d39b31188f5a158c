"""Safe output files: refuse to overwrite unless asked, and write atomically.

Every file dirio writes goes through :func:`atomic_output`: the content is written to a
temporary file in the destination directory and moved onto the final name with
:func:`os.replace` only when writing succeeded, so an interrupted run never leaves a
half-written file under a real name, and an existing file is either kept whole or replaced whole.
"""

from __future__ import annotations

import json
import hashlib
import os
import secrets
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from dirio.errors import DirioError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

PathLike = str | os.PathLike


def check_writable(paths: PathLike | Iterable[PathLike], overwrite: bool, folders: bool = True) -> None:
    """Refuse to go on when an output file already exists and ``overwrite`` is false.

    Call it before a long run starts, with every path the run will write, so that the run
    fails at once rather than after hours of work.

    Args:
        paths: one path or an iterable of paths.
        overwrite: when true, existing files are allowed (they will be replaced).
        folders: also check that each path's folder can be written by creating a temporary file
            in it (:func:`check_output_folder`); without it, only that no file stands in the way.
    Raises:
        DirioError: ``"<path> exists; pass `overwrite` to replace it"`` for the first existing
            path, or when a path is an existing directory (never replaced, whatever ``overwrite``),
            or a name is longer than the file system allows.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    folders_checked = set()
    for path in paths:
        path = Path(path)
        check_name_lengths(path)
        if path.is_dir():
            raise DirioError(f"{path} is a directory; expected a file name")
        if path.exists() and not overwrite:
            raise DirioError(f"{path} exists; pass `overwrite` to replace it")
        if path.parent not in folders_checked:
            check_output_folder(path.parent, probe=folders)
            folders_checked.add(path.parent)


def _nearest_existing(folder: Path) -> Path:
    """``folder`` itself or its nearest existing ancestor."""
    folder = Path(os.path.abspath(folder))
    while not _exists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _exists(path: Path) -> bool:
    """``path.exists()``, false for a name the system refuses (``File name too long``)."""
    try:
        return path.exists()
    except OSError:
        return False


def check_output_folder(folder: PathLike, probe: bool = True) -> None:
    """Refuse, before any work, an output folder that cannot be created or written.

    The folder is really tried: the folders still missing on the way to it are created, a
    temporary file is created in it (which also catches read-only file systems, full quota,
    ``/proc`` and ``/sys``, and names longer than the file system allows), and then the probe file
    and the folders made for it are removed again, so a refused or later failing command leaves
    nothing behind. ``probe=False`` checks only the names and that no file stands where a folder is
    needed (nothing is created).

    Raises:
        DirioError: ``"<folder> is a file, not a folder"`` (also for a file on the way to it),
            ``"<folder>: name too long ..."``, ``"<folder>: cannot create this folder (<reason>)"`` or
            ``"<folder>: cannot write there (<reason>)"``.
    """
    folder = Path(folder)
    absolute = Path(os.path.abspath(folder))
    check_name_lengths(absolute)
    existing = _nearest_existing(absolute)
    if not existing.is_dir():
        where = "" if existing == absolute else f" (on the way to {folder})"
        raise DirioError(f"{existing} is a file, not a folder{where}; choose another output location")
    if not probe:
        return
    for attempt in range(3):  # another process probing the same new folder may remove it under us
        if _probe_folder(folder, absolute, existing, last_try=attempt == 2):
            return


def _probe_folder(folder: Path, absolute: Path, existing: Path, last_try: bool) -> bool:
    """Create the missing folders and a temporary file in ``absolute``, then remove them again.

    Returns False (try again) when a folder vanished meanwhile (unless ``last_try``).
    """
    missing = []
    parent = absolute
    while parent != existing:
        missing.append(parent)
        parent = parent.parent
    created = []
    try:
        for part in reversed(missing):
            try:
                os.mkdir(part)
            except FileExistsError:
                continue  # made by another process meanwhile
            except FileNotFoundError:
                if not last_try and existing != absolute:
                    return False
                raise DirioError(f"{folder}: cannot create this folder (No such file or directory)") from None
            except OSError as error:
                raise DirioError(f"{folder}: cannot create this folder ({error.strerror or error})") from None
            created.append(part)
        try:
            handle, probe_path = tempfile.mkstemp(prefix=".tmp-probe-", dir=absolute)
        except FileNotFoundError:
            if not last_try and not created and existing != absolute:
                return False
            raise DirioError(f"{folder}: cannot write there (No such file or directory)") from None
        except OSError as error:
            raise DirioError(f"{folder}: cannot write there ({error.strerror or error})") from None
        os.close(handle)
        os.unlink(probe_path)
        return True
    finally:
        for part in reversed(created):
            try:
                os.rmdir(part)
            except OSError:
                pass


# The random prefix of a temporary file's name (:func:`_temporary_sibling`): ``.tmp-`` 12 hex ``-``.
_TEMPORARY_PREFIX_LENGTH = 18


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) the file system of ``folder`` (or its nearest existing ancestor) allows."""
    try:
        return int(os.pathconf(_nearest_existing(folder), "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # pragma: no cover - no pathconf (Windows)
        return 255


def check_name_lengths(path: PathLike) -> None:
    """Refuse a path with a component longer than its file system allows (``File name too long``).

    Raises:
        DirioError: ``"<path>: the name '<start>...' has N bytes; the file system allows at most M"``.
    """
    path = Path(os.path.abspath(path))
    limit = _name_max(path)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise DirioError(f"{path}: the name {part[:24]!r}... has {size} bytes; the file system allows at most "
                             f"{limit}; choose a shorter output name")


def remove_temporaries(folder: PathLike) -> int:
    """Delete the ``.tmp-*`` files an interrupted dirio process left in ``folder`` (not recursive).

    Only call it while holding the folder's :class:`OutputLock`, so that no live process's
    temporary file is removed. Returns how many were deleted.
    """
    removed = 0
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.glob(".tmp-*"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


LOCK_NAME = ".dirio.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class OutputLock:
    """An advisory lock on an output folder: one dirio process writes into a folder at a time.

    The lock is the file ``<folder>/.dirio.lock`` holding the owner's pid, host and start time.
    Where :mod:`fcntl` is available it is held with ``flock`` (released by the kernel when the
    process dies, even by ``kill -9``, so a stale lock file is simply taken over); elsewhere, or
    where the file system refuses ``flock``, the file is created exclusively and a lock file whose
    pid is no longer running on this host is recovered as stale. :meth:`release` deletes the file
    (and the folder, when :meth:`acquire` created it and it is empty).

    Use as a context manager: ``with OutputLock(out_dir): ...``.
    """

    def __init__(self, folder: PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created_folder = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _busy(self, owner: str) -> DirioError:
        owner = " ".join(owner.split()) or "unknown"
        return DirioError(
            f"{self.folder} is being written by another dirio process (lock {self.path}: {owner}); "
            f"wait for it to finish or choose another -o"
        )

    def _owner_text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")[:200]
        except OSError:
            return ""

    def acquire(self) -> None:
        """Take the lock or raise :class:`DirioError` naming the process that holds it."""
        check_output_folder(self.folder)
        if not self.folder.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            self._created_folder = True
        try:
            self._acquire()
        except BaseException:
            self._remove_created_folder()
            raise
        stamp = f"pid {os.getpid()} host {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.write(self._fd, stamp.encode("utf-8"))

    def _acquire(self) -> None:
        if fcntl is not None:
            for _ in range(100):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._busy(self._owner_text()) from None
                except OSError:  # e.g. ENOLCK on some network file systems: use the pid file
                    os.close(fd)
                    break
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if same:  # not a file its previous owner deleted while we waited for it
                    self._fd = fd
                    return
                os.close(fd)
        self._acquire_pid_file()

    def _acquire_pid_file(self) -> None:
        for _ in range(100):
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                return
            except FileExistsError:
                owner = self._owner_text()
                parts = owner.split()
                pid = int(parts[1]) if len(parts) > 3 and parts[0] == "pid" and parts[1].isdigit() else None
                same_host = len(parts) > 3 and parts[3] == socket.gethostname()
                if pid is None or not same_host or _pid_alive(pid):
                    raise self._busy(owner) from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
        raise self._busy(self._owner_text())

    def release(self) -> None:
        """Delete the lock file and let it go (idempotent)."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        self._remove_created_folder()

    def _remove_created_folder(self) -> None:
        if self._created_folder:
            try:
                self.folder.rmdir()  # only when empty: a failed run leaves nothing behind
            except OSError:
                pass
            self._created_folder = False


def _temporary_sibling(path: Path) -> Path:
    """A fresh name ``.tmp-<random>-<name>`` beside ``path``.

    The full file name, suffixes included, is kept at the end so that writers that choose the
    format from the name (nibabel, SimpleITK, matplotlib) see ``.nii.gz``, ``.mha``, ``.png``...; of a
    name too long for the prefix, only its end is kept.
    """
    name = path.name
    room = _name_max(path.parent) - _TEMPORARY_PREFIX_LENGTH
    while len(os.fsencode(name)) > room:
        name = name[1:]
    return path.with_name(f".tmp-{secrets.token_hex(6)}-{name}")


@contextmanager
def atomic_output(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Write a file atomically: yield a temporary path, then move it onto ``path``.

    The caller writes the complete file to the yielded path. On normal exit the temporary file
    replaces ``path`` with :func:`os.replace` (atomic on one file system, which holds because
    the temporary file sits in the same directory). If the body raises (``KeyboardInterrupt``
    included), the temporary file is deleted, ``path`` is left as it was, and the exception
    propagates. The parent directory is created when missing.

    Args:
        path: the final file name.
        overwrite: allow replacing an existing file.
    Yields:
        The temporary path ``<dir>/.tmp-<random>-<name>`` (not yet created).
    Raises:
        DirioError: when ``path`` exists and ``overwrite`` is false, or is a directory.
        FileNotFoundError: when the body wrote nothing to the temporary path.
    """
    path = Path(path)
    check_writable(path, overwrite, folders=False)  # no write probe per file: callers probe up front
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file {tmp} for {path}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_default(value: Any) -> Any:
    """Convert the non-JSON types dirio results contain (numpy scalars and arrays, paths)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def write_text(path: PathLike, text: str, overwrite: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; refuses to replace a file unless ``overwrite``."""
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: PathLike, obj: Any, overwrite: bool = False) -> None:
    """Write ``obj`` as JSON (indent 2, trailing newline) to ``path`` atomically.

    NaN and infinities are written as the JavaScript literals ``NaN``/``Infinity`` that Python's
    :mod:`json` reads back (a metric can be undefined, e.g. Dice of an absent label). numpy
    scalars and arrays and :class:`os.PathLike` values are converted.
    """
    text = json.dumps(obj, indent=2, allow_nan=True, default=_json_default)
    write_text(path, text + "\n", overwrite=overwrite)


def sha256_of(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
