"""KFAC-expand (KFC) input factor: pick the cheaper of two exact evaluations per shape.

Evaluates the network :func:`kfac_tn.tensor_network.expressions.kfc`.

All evaluate the KFC network ``n g c i.., Π.., n g c_ i_.., Π.. -> g (c k..) (c_ k_..)``
exactly; they differ in cost. :mod:`shift_gram` needs a channel Gram per distinct
(phase, offset) of tap pairs and wins when tap windows overlap and there are many
channels (stride-1 3×3 convolutions); :mod:`unfold_gram` writes the unfolded input of a
batch chunk and does one GEMM, which wins for few channels or non-overlapping taps
(stems, patchify); :mod:`group_gram` unfolds one group at a time into cache-sized pieces
and wins for grouped convolutions with few channels per group (depthwise), whose thin
per-group GEMMs are bound by memory traffic. On a CPU, depthwise-like convolutions take
the group route and the others a simple cost model of copied elements and
multiply-adds; on accelerators the unfold route (few large GEMMs) is taken.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kfac_tn.kernels.group_gram import group_gram_kfc
from kfac_tn.kernels.shift_gram import shift_gram_cost, shift_gram_kfc
from kfac_tn.kernels.unfold_gram import unfold_gram_cost, unfold_gram_kfc
from kfac_tn.runtime.routes import launch_bound
from kfac_tn.tensor_network.geometry import ConvDim

#: seconds per copied element and per multiply-add (ratio measured on 2 CPU cores)
COPY_COST, MAC_COST = 1.0e-9, 2.0e-11
METHODS = ("auto", "shift", "unfold", "group")
#: on a CPU, grouped convolutions with at most this many channels per group take ``"group"``
GROUP_ROUTE_CHANNELS = 4


def choose_kfc_method(dims: Sequence[ConvDim], channels: int, groups: int) -> str:
    """``"shift"`` or ``"unfold"``, whichever the cost model predicts to be cheaper."""
    dims = tuple(dims)

    def cost(copied_macs: tuple[int, int]) -> float:
        copied, macs = copied_macs
        # thin GEMMs (few channels) are memory bound: charge at least one read per element
        return COPY_COST * copied + max(MAC_COST * macs, 0.25 * COPY_COST * copied)

    shift = cost(shift_gram_cost(dims, channels, groups))
    unfold = cost(unfold_gram_cost(dims, channels, groups))
    return "shift" if shift <= unfold else "unfold"


def group_route(device: torch.device, dims: Sequence[ConvDim], channels: int, groups: int) -> bool:
    """Whether KFAC-expand input factors go group by group (:mod:`group_gram`): on a CPU,
    for convolutions with several groups of at most :data:`GROUP_ROUTE_CHANNELS` channels."""
    return (
        not launch_bound(device)
        and groups > 1
        and channels <= GROUP_ROUTE_CHANNELS
        and not any(d.transposed for d in dims)
    )


def kfc_factor(x: Tensor, dims: Sequence[ConvDim], groups: int = 1, method: str = "auto") -> Tensor:
    """KFAC-expand input factor ``[G, C·K.., C·K..]`` of ``x`` ``[N, G·C, I..]``, scale 1/(N·O)."""
    if method not in METHODS:
        raise ValueError(f"Unknown KFC method {method!r}; use one of {METHODS}.")
    dims = tuple(dims)
    if method == "auto":
        # accelerators: one large GEMM per chunk beats many thin shift Grams (measured on
        # an H200: 3x3 conv, 64 channels, 56x56, batch 32: 18 ms shift vs 2.3 ms unfold)
        channels = x.shape[1] // groups
        if launch_bound(x.device):
            method = "unfold"
        elif group_route(x.device, dims, channels, groups):
            method = "group"
        else:
            method = choose_kfc_method(dims, channels, groups)
    if method == "group":
        return group_gram_kfc(x, dims, groups)
    if method == "shift":
        return shift_gram_kfc(x, dims, groups)
    return unfold_gram_kfc(x, dims, groups)
