"""Safe output files: refuse to overwrite unless asked, and write atomically.

Every file dirio writes goes through :func:`atomic_output`: the content is written to a
temporary file in the destination directory and moved onto the final name with
:func:`os.replace` only when writing succeeded, so an interrupted run never leaves a
half-written file under a real name, and an existing file is either kept whole or replaced whole.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from dirio.errors import DirioError

PathLike = str | os.PathLike


def check_writable(paths: PathLike | Iterable[PathLike], overwrite: bool) -> None:
    """Refuse to go on when an output file already exists and ``overwrite`` is false.

    Call it before a long run starts, with every path the run will write, so that the run
    fails at once rather than after hours of work.

    Args:
        paths: one path or an iterable of paths.
        overwrite: when true, existing files are allowed (they will be replaced).
    Raises:
        DirioError: ``"<path> exists; pass `overwrite` to replace it"`` for the first existing
            path, or when a path is an existing directory (never replaced, whatever ``overwrite``).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for path in paths:
        path = Path(path)
        if path.is_dir():
            raise DirioError(f"{path} is a directory; expected a file name")
        if path.exists() and not overwrite:
            raise DirioError(f"{path} exists; pass `overwrite` to replace it")


def _temporary_sibling(path: Path) -> Path:
    """A fresh name ``.tmp-<random>-<name>`` beside ``path``.

    The full file name, suffixes included, is kept at the end so that writers that choose the
    format from the name (nibabel, SimpleITK, matplotlib) see ``.nii.gz``, ``.mha``, ``.png``...
    """
    return path.with_name(f".tmp-{secrets.token_hex(6)}-{path.name}")


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
    check_writable(path, overwrite)
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

