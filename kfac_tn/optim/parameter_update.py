"""The parameter update of SINGD and KFAC, for all parameters of a group at once.

``step = natural_gradient + weight_decay · p``; ``buf ← momentum · buf + step``;
``p ← p − lr · buf`` (singd's and ``torch.optim.SGD``'s order of operations), with
``torch._foreach_*`` kernels: a handful of launches for all parameters instead of three
or four per parameter. With a flag ``ok`` (0-d bool tensor) the update is skipped when
``ok`` is false: on accelerators on the device, without a host sync (the steps are
zeroed, the momentum buffers and parameters keep their values); on a CPU, where reading
a tensor costs nothing, by reading it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfac_tn.runtime.routes import launch_bound


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


def momentum_buffers(state: dict, params: list[Tensor], momentum: float) -> list[Tensor] | None:
    """The ``momentum_buffer`` of each parameter in an optimizer's ``state`` (zeros when
    new: ``momentum · 0 + step`` is the first step, as torch.optim.SGD's clone); None
    without momentum."""
    if momentum == 0.0:
        return None
    for p in params:
        if "momentum_buffer" not in state[p]:
            state[p]["momentum_buffer"] = torch.zeros_like(p)
    return [state[p]["momentum_buffer"] for p in params]


def gradients_finite(grads: list[Tensor]) -> Tensor:
    """0-d bool on the gradients' device: no inf/NaN in any of them.

    From their largest magnitudes (inf/NaN propagate, large finite values do not
    overflow): one ``_foreach_norm`` kernel on accelerators, ``aminmax`` per tensor on a
    CPU (``vector_norm`` is ~10× slower there).
    """
    if launch_bound(grads[0].device):
        return torch.isfinite(torch.stack(torch._foreach_norm(grads, float("inf")))).all()
    return torch.isfinite(torch.stack([v for g in grads for v in torch.aminmax(g)])).all()


def apply_updates_(
    params: list[Tensor],
    steps: list[Tensor],
    buffers: list[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    ok: Tensor | None = None,
    workspaces: list[Tensor] = (),
) -> None:
    """Update ``params`` in place by their preconditioned gradients ``steps``.

    Args:
        params: parameter tensors (``p.data``), updated in place.
        steps: natural gradients of the same shapes; overwritten (scratch).
        buffers: momentum buffers (updated in place), or None when ``momentum == 0``.
        lr, momentum, weight_decay: as in ``torch.optim.SGD``.
        ok: optional 0-d bool tensor on the parameters' device; false skips the update.
            Accelerators: skipped on the device (masks, no host sync). CPU: read on the
            host (free there) and the update skipped outright.
        workspaces: flat buffers holding some of the steps (masked by one kernel each).
    """
    if not params:
        return
    if ok is not None and not launch_bound(params[0].device):
        if not bool(ok):  # a CPU tensor: no device queue to drain
            return
        ok = None
    if ok is not None:
        # a skipped step may carry inf/NaN: select zeros instead (multiplying would keep NaN)
        steps = mask_steps_(steps, ok, workspaces)
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
    # accelerators, skip flag on the device: weight decay and lr times ok, momentum factor 1
    # when skipped; the temporaries come from the caching allocator
    dtype, device = params[0].dtype, params[0].device
    on = ok.to(dtype)
    factor = torch.where(ok, torch.full((), momentum, dtype=dtype, device=device), 1.0)
    if weight_decay != 0.0:
        torch._foreach_add_(steps, torch._foreach_mul(params, on * weight_decay))
    if momentum != 0.0:
        torch._foreach_mul_(buffers, factor)
        torch._foreach_add_(buffers, steps)
        steps = buffers
    torch._foreach_add_(params, torch._foreach_mul(steps, on * -lr))
