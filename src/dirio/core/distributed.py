"""torch.distributed helpers shared by the dataset runner and the training loop.

Gradients are averaged explicitly (:func:`average_gradients`) rather than by
``DistributedDataParallel``'s backward hooks: the combination rules take one gradient per
objective with ``torch.autograd.grad``, which never fires those hooks, and they must project the
*global* (all-rank) gradients, so each objective's gradient is averaged across ranks before any
projection. Averaging the per-rank gradients of a mean loss over equal per-rank batches gives the
gradient of the mean loss over the combined batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


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
