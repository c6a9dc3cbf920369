"""Index-pattern tensors Π[k, o, i] and their output mean Π̄[k, i], in closed form.

Π[k, o, i] = 1 iff input ``i`` feeds output ``o`` through kernel tap ``k``:
``i = k·D + o·S − P`` (convolution) or ``o = i·S + k·D − P`` (transposed
convolution), with ``0 <= i < I`` and ``0 <= o < O``. Built from index arithmetic,
never by running a convolution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfac_tn.tensor_network.geometry import ConvDim


def tap_input_index(dim: ConvDim, device: torch.device | None = None) -> Tensor:
    """Input index read by tap k at output o, shape ``[K, O]`` (may be out of range).

    For a transposed convolution the relation is inverted: entry ``[k, o]`` is the
    input index ``i`` with ``o = i·S + k·D − P`` if it is an integer, else ``-1``.
    """
    k = torch.arange(dim.kernel_size, device=device).unsqueeze(1)
    o = torch.arange(dim.output_size, device=device).unsqueeze(0)
    if not dim.transposed:
        return k * dim.dilation + o * dim.stride - dim.pad_left
    numerator = o + dim.pad_left - k * dim.dilation
    hits = numerator.remainder(dim.stride) == 0
    return torch.where(hits, numerator.div(dim.stride, rounding_mode="floor"), -1)


def index_pattern(
    dim: ConvDim, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """Index pattern Π of one dimension, shape ``[K, O, I]``, entries 0/1 in ``dtype``."""
    idx = tap_input_index(dim, device)
    valid = (idx >= 0) & (idx < dim.input_size)
    pattern = torch.zeros(
        dim.kernel_size, dim.output_size, dim.input_size, dtype=dtype, device=device
    )
    k, o = valid.nonzero(as_tuple=True)
    pattern[k, o, idx[k, o]] = 1
    return pattern


def mean_index_pattern(
    dim: ConvDim, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> Tensor:
    """Π̄[k, i] = mean over o of Π[k, o, i], shape ``[K, I]``, in closed form.

    For fixed ``k`` distinct outputs read distinct inputs, so Π̄ is ``1/O`` where input
    ``i`` is read by tap ``k`` at some output and 0 elsewhere.
    """
    i = torch.arange(dim.input_size, device=device).unsqueeze(0)
    k = torch.arange(dim.kernel_size, device=device).unsqueeze(1)
    if dim.transposed:
        o = i * dim.stride + k * dim.dilation - dim.pad_left
        hit = (o >= 0) & (o < dim.output_size)
    else:
        offset = i + dim.pad_left - k * dim.dilation
        o = offset.div(dim.stride, rounding_mode="floor")
        hit = (offset >= 0) & (offset.remainder(dim.stride) == 0) & (o < dim.output_size)
    return hit.to(dtype) / dim.output_size
