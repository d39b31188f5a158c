"""Peak-memory measurement for a run (CUDA allocator statistics, or the process's resident-set
high-water mark on the CPU) and the wall time of a command's steps."""

from __future__ import annotations

import contextlib
import resource
import time

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement (CUDA statistics, or Linux's per-process VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM).
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated (CUDA devices), else the peak resident set size of the process
    since :func:`reset_peak_memory` (Linux VmHWM; elsewhere the all-time ``ru_maxrss``), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StepTimes:
    """Wall-clock seconds of the named steps of a command, in the order they ran.

    ``with times("evaluate"): ...`` adds the block's duration to ``times.seconds["evaluate"]``
    (a step entered twice accumulates).
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
