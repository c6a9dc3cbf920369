"""The parameter update of SINGD and KFAC, for all parameters of a group at once.

``step = natural_gradient + weight_decay · p``; ``buf ← momentum · buf + step``;
``p ← p − lr · buf`` (singd's and ``torch.optim.SGD``'s order of operations), with
``torch._foreach_*`` kernels: a handful of launches for all parameters instead of
three or four per parameter. With a device flag ``ok`` (0-d bool tensor) the update
is skipped on the device when ``ok`` is false, without a host sync: the steps are
zeroed, the momentum buffers and parameters keep their values.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
    if weight_decay != 0.0:
        if ok is None:
            torch._foreach_add_(steps, params, alpha=weight_decay)
        else:
            decay = torch._foreach_mul(params, ok.to(params[0].dtype) * weight_decay)
            torch._foreach_add_(steps, decay)
    if momentum != 0.0:
        if buffers is None or len(buffers) != len(params):
            raise ValueError("apply_updates_ needs one momentum buffer per parameter when momentum != 0.")
        if ok is None:
            torch._foreach_mul_(buffers, momentum)
        else:  # factor 1 when skipped: the buffers keep their values
            factor = torch.full((), momentum, dtype=buffers[0].dtype, device=buffers[0].device)
            torch._foreach_mul_(buffers, torch.where(ok, factor, 1.0))
        torch._foreach_add_(buffers, steps)
        steps = buffers
    if ok is None:
        torch._foreach_add_(params, steps, alpha=-lr)
    else:
        torch._foreach_add_(params, torch._foreach_mul(steps, ok.to(params[0].dtype) * -lr))
