"""torch.distributed helpers shared by the dataset runner and the training loop.

Gradients are averaged explicitly (:func:`average_gradients`) rather than by
``DistributedDataParallel``'s backward hooks: the combination rules take one gradient per
objective with ``torch.autograd.grad``, which never fires those hooks, and they must project the
*global* (all-rank) gradients, so each objective's gradient is averaged across ranks before any
projection. Averaging the per-rank gradients of a mean loss over equal per-rank batches gives the
gradient of the mean loss over the combined batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from dirio.errors import DirioError

# How long a rank waits for the others at a barrier: a rank with fewer or faster pairs may wait for
# hours; a rank that dies is noticed by torchrun, which stops the whole group.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def average_gradients(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Mean of ``tensors`` over all ranks (one all-reduce of a flat buffer); unchanged in one process.

    Args:
        tensors: the gradient tensors of one objective, any shapes, one device and dtype.
    Returns:
        New tensors of the same shapes (the inputs are not modified).
    """
    if not is_distributed() or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view_as(t))
        start += t.numel()
    return out


def broadcast_parameters(module: torch.nn.Module, source: int = 0) -> None:
    """Copy ``module``'s parameters and buffers from rank ``source`` to every rank (no-op alone)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, source)


# --- the process group of a torchrun launch ---------------------------------------------------


@dataclass
class Ranks:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_environment() -> Ranks:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` as set by torchrun (and SLURM launchers using it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DirioError("RANK, WORLD_SIZE and LOCAL_RANK must be integers when set") from None
    if world < 1 or not 0 <= rank < world:
        raise DirioError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return Ranks(rank, world, local)


def init_process_group(ranks: Ranks, timeout: datetime.timedelta = BARRIER_TIMEOUT) -> None:
    """Join the gloo process group of a torchrun launch (no-op in one process)."""
    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=timeout)


def broadcast_object(value: Any, ranks: Ranks) -> Any:
    """Rank 0's ``value`` on every rank (the value itself without torch.distributed)."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (no-op in one process)."""
    if ranks.distributed:
        dist.barrier()


def destroy_process_group(ranks: Ranks) -> None:
    """Leave the process group (no-op in one process or when it was never joined)."""
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
