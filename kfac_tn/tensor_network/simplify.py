"""Symbolic simplification of a :class:`TensorNetwork` before it is evaluated.

Rule (dense patterns): for a convolution dimension with K <= S, no left padding, no
dilation and O·S <= I, Π[k, o, i] = δ(i, o·S + k). The input axis ``i`` is narrowed to
O·S entries, split into ``(o, s)`` and narrowed to ``s < K``, all as views, and Π is
dropped. This covers patchify stems (K == S), down-sampling shortcuts (K < S, the
unused inputs are sliced away) and identities (K == S == 1). For Π̄ = mean_o Π the
split-off ``o`` becomes a summed index and the network is scaled by 1/O.
"""

from __future__ import annotations

from itertools import count

from torch import Tensor

from kfac_tn.tensor_network.network import Pattern, TensorNetwork


def _dense_split(t: Tensor, axis: int, out_size: int, stride: int, kernel: int) -> Tensor:
    """View ``t``'s ``axis`` of size >= O·S as ``(O, K)``: entry [o, k] = t[o·S + k]."""
    t = t.narrow(axis, 0, out_size * stride).unflatten(axis, (out_size, stride))
    return t.narrow(axis + 1, 0, kernel)


def simplify(network: TensorNetwork) -> TensorNetwork:
    """Return an equivalent network without the dense index patterns."""
    operands = list(network.operands)
    indices = list(network.indices)
    scale = network.scale
    fresh = count()
    removed = []
    for p, op in enumerate(operands):
        if not isinstance(op, Pattern) or not op.dim.is_dense:
            continue
        dim = op.dim
        if op.mean:
            k_name, i_name = indices[p]
            o_name = f"_o{next(fresh)}"
        else:
            k_name, o_name, i_name = indices[p]
        holders = [q for q, idx in enumerate(indices) if q != p and q not in removed and i_name in idx]
        if len(holders) != 1 or i_name in network.output:
            continue
        (q,) = holders
        if isinstance(operands[q], Pattern):
            continue
        axis = indices[q].index(i_name)
        operands[q] = _dense_split(operands[q], axis, dim.output_size, dim.stride, dim.kernel_size)
        indices[q] = indices[q][:axis] + (o_name, k_name) + indices[q][axis + 1 :]
        removed.append(p)
        if op.mean:
            scale /= dim.output_size
    return TensorNetwork(
        [op for p, op in enumerate(operands) if p not in removed],
        [idx for p, idx in enumerate(indices) if p not in removed],
        network.output,
        groups=network.groups,
        scale=scale,
    )
