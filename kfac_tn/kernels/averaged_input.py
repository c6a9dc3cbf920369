"""Unfolded input averaged over output positions, ``ū = x ×_j Π̄_j``, layout-friendly.

Evaluates the network :func:`kfac_tn.tensor_network.expressions.averaged_unfold`.

Evaluates ``n c i1..iN, k1 i1, …, kN iN -> n c k1..kN`` (the KFAC-reduce network
before its outer product) one spatial dimension at a time from the last to the first,
so that every step is a matrix product on a view: the input is read once and never
permuted or copied (an einsum would transpose it first). Dense dimensions (see
:attr:`ConvDim.is_dense`) need no Π̄ at all: a strided sum over a view.

Accelerators (:func:`launch_bound`): one matrix product with the Kronecker product
``Π̄_1 ⊗ … ⊗ Π̄_N`` ``[K1·…·KN, I1·…·IN]`` (cached per geometry, dtype and device) where it
has at most :data:`KRON_ENTRIES` entries: one kernel instead of one or several per
dimension (more multiply-adds, which a GPU does not notice at these sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from math import prod

import torch
from torch import Tensor

from kfac_tn.runtime.routes import launch_bound
from kfac_tn.tensor_network.contraction import pattern_tensor
from kfac_tn.tensor_network.geometry import ConvDim

#: largest Kronecker pattern (entries) of the one-product accelerator route (1 MiB in float32)
KRON_ENTRIES = 2**18
#: Kronecker patterns kept (at most KRON_CACHE_SIZE · KRON_ENTRIES entries on a device)
KRON_CACHE_SIZE = 64


@lru_cache(maxsize=KRON_CACHE_SIZE)
def kron_pattern(dims: tuple[ConvDim, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(Π̄_1 ⊗ … ⊗ Π̄_N)ᵀ`` ``[I1·…·IN, K1·…·KN]``, contiguous (cached)."""
    pattern = pattern_tensor(dims[0], True, dtype, device)
    for dim in dims[1:]:
        pattern = torch.kron(pattern, pattern_tensor(dim, True, dtype, device))
    return pattern.T.contiguous()


def averaged_unfolded_input(x: Tensor, dims: Sequence[ConvDim]) -> Tensor:
    """ū of shape ``[N, C, K1, …, KN]`` for input ``x`` of shape ``[N, C, I1, …, IN]``."""
    n = len(dims)
    lead = x.shape[: x.dim() - n]
    inputs, kernels = prod(d.input_size for d in dims), prod(d.kernel_size for d in dims)
    if launch_bound(x.device) and inputs * kernels <= KRON_ENTRIES:
        out = x.reshape(-1, inputs) @ kron_pattern(tuple(dims), x.dtype, x.device)
        return out.view(*lead, *(d.kernel_size for d in dims))
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
