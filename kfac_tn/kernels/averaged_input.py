"""Unfolded input averaged over output positions, ``ū = x ×_j Π̄_j``, layout-friendly.

Evaluates the network :func:`kfac_tn.tensor_network.expressions.averaged_unfold`.

Evaluates ``n c i1..iN, k1 i1, …, kN iN -> n c k1..kN`` (the KFAC-reduce network
before its outer product) one spatial dimension at a time from the last to the first,
so that every step is a matrix product on a view: the input is read once and never
permuted or copied (an einsum would transpose it first). Dense dimensions (see
:attr:`ConvDim.is_dense`) need no Π̄ at all: a strided sum over a view.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from kfac_tn.tensor_network.contraction import pattern_tensor
from kfac_tn.tensor_network.geometry import ConvDim


def averaged_unfolded_input(x: Tensor, dims: Sequence[ConvDim]) -> Tensor:
    """ū of shape ``[N, C, K1, …, KN]`` for input ``x`` of shape ``[N, C, I1, …, IN]``."""
    n = len(dims)
    lead = x.shape[: x.dim() - n]
    t = x
    done = 1  # product of kernel sizes of the dimensions already contracted (trailing)
    for j in reversed(range(n)):
        dim = dims[j]
        # t: [..., I_j, done] with all earlier spatial axes still in front
        t = t.reshape(*lead, *x.shape[x.dim() - n : x.dim() - n + j], dim.input_size, done)
        if dim.is_dense:
            O, S, K = dim.output_size, dim.stride, dim.kernel_size
            t = t.narrow(-2, 0, O * S).unflatten(-2, (O, S)).narrow(-2, 0, K).sum(-3) / O
        else:
            pbar = pattern_tensor(dim, True, x.dtype, x.device)  # [K, I]
            t = pbar @ t if done > 1 else (t.squeeze(-1) @ pbar.T).unsqueeze(-1)
        done *= dim.kernel_size
    return t.reshape(*lead, *(d.kernel_size for d in dims))
