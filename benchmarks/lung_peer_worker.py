"""Worker of benchmarks/lung_validation.py: one ConvexAdam reference registration, run by the peer's
own interpreter (the PyPI package ``convexAdam``, not a dirio dependency).

    PEER_PYTHON benchmarks/lung_peer_worker.py JOB.json

``JOB.json`` names ``fixed`` and ``moving`` (``.npy`` float32 arrays ``(H, W, D)``, HU), optionally
``fixed_mask`` and ``moving_mask`` (``.nii.gz`` uint8, identity affine, same shape), ``params``
(keyword arguments of ``convex_adam_pt``), ``threads`` (torch CPU threads) and ``out`` (``.npy``
path for the returned displacement ``(H, W, D, 3)``, float32, voxels). Writes ``out`` and, beside it,
``<out>.json`` with the wall and CPU seconds (``resource.getrusage`` of this process, all threads)
of the ``convex_adam_pt`` call alone, and the package version. Uses only the standard library, numpy,
torch and convexAdam: it never imports dirio.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from importlib import metadata


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(job_path: str) -> int:
    import numpy as np
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    with open(job_path) as handle:
        job = json.load(handle)
    torch.set_num_threads(int(job.get("threads", torch.get_num_threads())))
    fixed = np.load(job["fixed"]).astype(np.float32)
    moving = np.load(job["moving"]).astype(np.float32)
    params = dict(job.get("params", {}))
    if job.get("fixed_mask"):
        params.update(use_mask=True, path_fixed_mask=job["fixed_mask"], path_moving_mask=job["moving_mask"])
    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    disp = convex_adam_pt(torch.from_numpy(fixed), torch.from_numpy(moving), device=torch.device("cpu"), **params)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    np.save(job["out"], np.asarray(disp, dtype=np.float32))
    with open(job["out"] + ".json", "w") as handle:
        json.dump({"wall_s": wall, "cpu_s": cpu, "threads": torch.get_num_threads(),
                   "convexAdam": metadata.version("convexAdam"), "torch": torch.__version__,
                   "shape": list(disp.shape)}, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
