"""Collective helpers for the no-wrapper data-parallel pattern (torch.distributed).

Every process holds a full replica and computes statistics and gradients on its own
shard of the batch; the optimizers average them so that all ranks apply identical
updates (equal, up to rounding, to one process that saw the concatenated batch).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_flat(tensors: list[Tensor], op=dist.ReduceOp.AVG) -> None:
    """All-reduce ``tensors`` in place as one flat bucket per dtype/device (one collective each)."""
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for group in buckets.values():
        flat = _flatten_dense_tensors(group)
        if op == dist.ReduceOp.AVG and dist.get_backend() == "gloo":
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # gloo has no AVG
            flat /= dist.get_world_size()
        else:
            dist.all_reduce(flat, op=op)
        for t, reduced in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(reduced)


def broadcast_flat(tensors: list[Tensor], src: int) -> None:
    """Broadcast ``tensors`` from rank ``src`` in place, one flat bucket per dtype/device."""
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for group in buckets.values():
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, src=src)
        for t, received in zip(group, _unflatten_dense_tensors(flat, group)):
            t.copy_(received)
