"""Sharded preconditioner state for data-parallel training (``shard_preconditioner=True``).

Every rank keeps the preconditioner (K, C and their momenta) of the layers it owns only,
so that its memory is about the total over the world size. One step of a sharded SINGD:

1. statistics: each rank computes its shard's raw, preconditioner-free statistics of every
   layer (A and G, or their diagonals or blocks) and reduces them to the layer's owner;
2. the owner updates the layer's K and C;
3. gradients: reduced to the owners (after a DistributedDataParallel backward they are
   averaged already: nothing is sent);
4. the owner forms the layer's natural gradient and broadcasts it; every rank applies
   the same update (momentum, weight decay) to its full replica of the parameters.

Results equal the unsharded run up to rounding. Owners are chosen by a greedy balance of
the state's bytes (:func:`assign_owners`), the same on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from kfac_tn.optim.distributed import assign_greedy, broadcast_flat


def assign_owners(state_bytes: dict[str, float], world: int) -> dict[str, int]:
    """Layer → owning rank, balancing the preconditioner bytes per rank (greedy, largest
    first; deterministic, so every rank computes the same map)."""
    return assign_greedy(state_bytes, world)


def reduce_to_owner_async(tensors: list[Tensor], owner: int, average: bool) -> Callable[[], None]:
    """Start reducing ``tensors`` (one flat bucket per dtype/device) to rank ``owner``;
    ``finish()`` waits and, on the owner, writes the sum (or the mean over ranks) back in
    place. Other ranks' tensors are left as they were."""
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    launched = []
    for group in buckets.values():
        flat = _flatten_dense_tensors(group)
        launched.append((group, flat, dist.reduce(flat, dst=owner, op=dist.ReduceOp.SUM, async_op=True)))

    def finish() -> None:
        for group, flat, work in launched:
            work.wait()
            if dist.get_rank() != owner:
                continue
            if average:
                flat /= dist.get_world_size()
            for t, reduced in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(reduced)

    return finish


def reduce_to_owners(by_owner: dict[int, list[Tensor]], average: bool) -> None:
    """:func:`reduce_to_owner_async` for every owner's tensors (ranks in order), waiting."""
    for finish in [reduce_to_owner_async(ts, owner, average) for owner, ts in sorted(by_owner.items()) if ts]:
        finish()


def broadcast_from_owners(by_owner: dict[int, list[Tensor]]) -> None:
    """Every owner's tensors to every rank, in place (one flat broadcast per owner)."""
    for owner, tensors in sorted(by_owner.items()):
        if tensors:
            broadcast_flat(tensors, src=owner)


def gather_layer_states(local: dict[str, dict[str, Any]], order: list[str], device: torch.device) -> dict[str, dict]:
    """``{key: {layer: state}}`` of all ranks merged (each layer lives on one rank), in
    ``order``, with tensors on ``device``. Sent through host memory (pickled), so that any
    backend and device work; every rank receives the whole state."""
    on_host = {key: {name: _to(entry, torch.device("cpu")) for name, entry in layers.items()}
               for key, layers in local.items()}
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, on_host)
    merged: dict[str, dict] = {}
    for key in local:
        found = {name: entry for part in parts for name, entry in part[key].items()}
        merged[key] = {name: _to(found[name], device) for name in order if name in found}
    return merged


def _to(entry: Any, device: torch.device) -> Any:
    """``entry`` (nested lists/dicts of tensors and plain values) with tensors on ``device``."""
    if isinstance(entry, Tensor):
        return entry.to(device)
    if isinstance(entry, dict):
        return {k: _to(v, device) for k, v in entry.items()}
    if isinstance(entry, (list, tuple)):
        return type(entry)(_to(v, device) for v in entry)
    return entry
