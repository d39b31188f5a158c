"""Process-wide settings of the C memory allocator for the command line (glibc only).

Why: glibc's ``malloc`` serves every block above its mmap threshold (32 MiB at most) with a
fresh ``mmap`` and unmaps it on ``free``; the kernel then zeroes every page of the next such
block again. A dense full-resolution step allocates and frees tens of blocks of that size (one
3 x 160 x 192 x 224 float32 field is 82 MB), so on the 160 x 192 x 224 brain pair the whole
``dirio register --preset brain-mri`` command spent 9-10 s of its ~48 CPU s in the kernel,
faulting in ~14 GB of zeroed pages (``/usr/bin/time -v``: 3.5 million minor page faults).

:func:`keep_freed_memory` makes ``malloc`` serve such blocks from its heap instead (no ``mmap``
per block) and keep up to :data:`TRIM_THRESHOLD_BYTES` of freed memory at the heap's top: a freed
field is reused by the next one without new page faults. Measured on that command (2-core CPU,
medians of 4 interleaved runs; benchmarks/RESULTS.md): 9.4 -> 3.1 s of system time, 30.7 -> 25.4 s
wall, peak resident memory 1.66 -> 2.2-3.1 GB (freed blocks stay mapped). The trade is the one
PyTorch's CPU performance guide makes with jemalloc or tcmalloc: speed for resident memory.

Only the command line calls it, for dense registrations and for the network stages under
``--network-budget cpu`` (on the brain pair: NIO 81.5 -> 70.3 s, peak 5.7 -> 6.8 GB; IO 78.1 ->
70.1 s, peak 10.9 -> 13.0 GB; the same outputs). The papers' network schedules, whose full-resolution
steps hold 13-15 GB, keep glibc's defaults. Library users keep their process's settings;
so does anyone who set the allocator through the environment (``MALLOC_*`` variables or
``GLIBC_TUNABLES``), which this module then leaves alone, and ``DIRIO_ALLOCATOR=system`` keeps glibc's
defaults (less resident memory, more time).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["TRIM_THRESHOLD_BYTES", "keep_freed_memory"]

#: Freed memory kept at the top of the heap before glibc returns it to the system (bytes). With
#: 256 MiB the brain command's system time was 1.9 s and its peak 2.2 GB; with 1 GiB 1.6 s and 2.8 GB.
TRIM_THRESHOLD_BYTES = 256 << 20

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

#: Environment variables through which a user sets glibc's allocator; any of them disables the tuning.
ENVIRONMENT_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                        "GLIBC_TUNABLES")
#: ``DIRIO_ALLOCATOR=system`` keeps glibc's defaults.
OPT_OUT = ("DIRIO_ALLOCATOR", "system")


def _glibc():
    """The C library when it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def keep_freed_memory(trim_threshold: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Serve large blocks from the heap and keep ``trim_threshold`` bytes of freed memory (see the
    module docstring). Returns whether the settings were applied: False off glibc, or when the
    environment already sets the allocator (see :data:`ENVIRONMENT_SETTINGS`) or asks for the
    system's (:data:`OPT_OUT`)."""
    if any(name in os.environ for name in ENVIRONMENT_SETTINGS) or os.environ.get(OPT_OUT[0]) == OPT_OUT[1]:
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; a refused setting leaves glibc's default in place.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
