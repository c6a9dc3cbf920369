"""Collective helpers for the no-wrapper data-parallel pattern (torch.distributed).

Every process holds a full replica and computes statistics and gradients on its own
shard of the batch; the optimizers average them so that all ranks apply identical
updates (equal, up to rounding, to one process that saw the concatenated batch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_flat_async(tensors: list[Tensor], op=dist.ReduceOp.AVG) -> Callable[[], None]:
    """Start all-reducing ``tensors`` (one flat bucket per dtype/device); returns ``finish``.

    ``finish()`` waits for the collectives and writes the results back in place, so the
    communication overlaps whatever runs in between (e.g. the rest of the backward pass).
    """
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    average = op == dist.ReduceOp.AVG and dist.get_backend() == "gloo"  # gloo has no AVG
    launched = []
    for group in buckets.values():
        flat = _flatten_dense_tensors(group)
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM if average else op, async_op=True)
        launched.append((group, flat, work))

    def finish() -> None:
        for group, flat, work in launched:
            work.wait()
            if average:
                flat /= dist.get_world_size()
            for t, reduced in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(reduced)

    return finish


def all_reduce_flat(tensors: list[Tensor], op=dist.ReduceOp.AVG) -> None:
    """All-reduce ``tensors`` in place as one flat bucket per dtype/device (one collective each)."""
    all_reduce_flat_async(tensors, op)()


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


def worker_groups(fraction: float) -> list[list[int]]:
    """Consecutive groups of ``round(fraction · world)`` ranks (at least one rank each)."""
    world = dist.get_world_size()
    size = min(world, max(1, round(fraction * world)))
    return [list(range(start, min(start + size, world))) for start in range(0, world, size)]


def assign_greedy(costs: dict[str, float], n_groups: int) -> dict[str, int]:
    """Longest-processing-time-first: each item, largest first, to the least-loaded group.

    Deterministic (ties by name and group index), so every rank computes the same map.
    """
    load = [0.0] * n_groups
    owners = {}
    for name, cost in sorted(costs.items(), key=lambda item: (-item[1], item[0])):
        group = min(range(n_groups), key=lambda g: (load[g], g))
        owners[name] = group
        load[group] += cost
    return owners


def all_ranks_ok(ok: Tensor, ddp_synced: bool) -> Tensor:
    """``ok`` (0-d bool, this rank's "no inf/NaN") of every rank combined: false if any rank's
    is. Without a DistributedDataParallel backward each rank's gradients are its own until
    the optimizer reduces them, so one rank's NaN would reach the others' updates while only
    that rank skipped; one small all-reduce (MIN), no host sync. After a DDP backward the
    gradients, and so the flags, agree already: nothing is sent."""
    if not is_distributed() or ddp_synced:
        return ok
    flag = ok.to(torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.bool()


def reduce_gradients_(tensors: list[Tensor], averaged_loss: bool, ddp_synced: bool) -> None:
    """Turn every rank's ``tensors`` (gradients, or directions linear in them) into those of
    one process on the concatenated batch, in place: the mean over ranks for an averaged
    loss, the sum for a summed one. After a DistributedDataParallel backward (``ddp_synced``)
    the gradients are averaged already: nothing is sent (a summed loss's are scaled by the
    world size)."""
    if not tensors:
        return
    if ddp_synced:
        if not averaged_loss:
            torch._foreach_mul_(tensors, float(dist.get_world_size()))
        return
    all_reduce_flat(tensors, dist.ReduceOp.AVG if averaged_loss else dist.ReduceOp.SUM)
