"""The parameter update of SINGD and KFAC, for all parameters of a group at once.

``step = natural_gradient + weight_decay · p``; ``buf ← momentum · buf + step``;
``p ← p − lr · buf`` (singd's and ``torch.optim.SGD``'s order of operations), with
``torch._foreach_*`` kernels on accelerators: a handful of launches for all parameters
instead of three or four per parameter; on a CPU (no launch cost) torch.optim's in-place
for-loop form, which allocates nothing. With a device flag ``ok`` (0-d bool tensor) the update
is skipped on the device when ``ok`` is false, without a host sync: the steps are
zeroed, the momentum buffers and parameters keep their values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfac_tn.tensor_network.routes import launch_bound


def mask_steps_(steps: list[Tensor], ok: Tensor, flats: list[Tensor] = ()) -> list[Tensor]:
    """``steps`` zeroed where the 0-d bool ``ok`` is false (inf/NaN included), no host sync.

    Steps that live in one of the flat buffers ``flats`` (e.g. the used part of the
    workspace they were written into) are masked by one kernel per buffer, in place;
    the others by one kernel each (new tensors).
    """
    storages = set()
    for flat in flats:
        torch.where(ok, flat, torch.zeros((), dtype=flat.dtype, device=flat.device), out=flat)
        storages.add(flat.untyped_storage().data_ptr())
    return [s if s.untyped_storage().data_ptr() in storages else torch.where(ok, s, 0.0) for s in steps]


def apply_updates_(
    params: list[Tensor],
    steps: list[Tensor],
    buffers: list[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    ok: Tensor | None = None,
    masked: bool = False,
) -> None:
    """Update ``params`` in place by their preconditioned gradients ``steps``.

    Args:
        params: parameter tensors (``p.data``), updated in place.
        steps: natural gradients of the same shapes; overwritten (scratch).
        buffers: momentum buffers (updated in place), or None when ``momentum == 0``.
        lr, momentum, weight_decay: as in ``torch.optim.SGD``.
        ok: optional 0-d bool tensor on the parameters' device; false skips the update.
        masked: the steps are already zero where ``ok`` is false (:func:`mask_steps_`).
    """
    if not params:
        return
    if ok is not None and not masked:
        # a skipped step may carry inf/NaN: select zeros instead (multiplying would keep NaN)
        steps = mask_steps_(steps, ok)
    if momentum != 0.0 and (buffers is None or len(buffers) != len(params)):
        raise ValueError("apply_updates_ needs one momentum buffer per parameter when momentum != 0.")
    if ok is None:
        if weight_decay != 0.0:
            torch._foreach_add_(steps, params, alpha=weight_decay)
        if momentum != 0.0:
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, steps)
            steps = buffers
        torch._foreach_add_(params, steps, alpha=-lr)
        return
    # skip flag on the device: weight decay and lr times ok, momentum factor 1 when skipped
    dtype, device = params[0].dtype, params[0].device
    on = ok.to(dtype)
    factor = torch.where(ok, torch.full((), momentum, dtype=dtype, device=device), 1.0)
    if launch_bound(device):  # few launches; the temporaries come from the caching allocator
        if weight_decay != 0.0:
            torch._foreach_add_(steps, torch._foreach_mul(params, on * weight_decay))
        if momentum != 0.0:
            torch._foreach_mul_(buffers, factor)
            torch._foreach_add_(buffers, steps)
            steps = buffers
        torch._foreach_add_(params, torch._foreach_mul(steps, on * -lr))
        return
    # CPU: torch.optim's for-loop form, in place (no parameter-sized temporaries)
    decay, minus_lr = on * weight_decay, on * -lr
    for i, (p, step) in enumerate(zip(params, steps)):
        if weight_decay != 0.0:
            step.addcmul_(p, decay)
        if momentum != 0.0:
            step = buffers[i].mul_(factor).add_(step)
        p.addcmul_(step, minus_lr)
