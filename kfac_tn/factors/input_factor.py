"""Kronecker input factor A of a layer (KFAC-expand or KFAC-reduce)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kfac_tn.factors.layers import check_approx, check_layer, conv_input, layer_groups
from kfac_tn.tensor_network.averaged_unfold import averaged_unfold
from kfac_tn.tensor_network.kfc import kfc_factor


def _with_bias(core: Tensor, mean_row: Tensor) -> Tensor:
    """Append the bias row/column: ``[[core, m], [mᵀ, 1]]`` per group.

    ``core``: ``[G, d, d]``, ``mean_row``: ``[G, d]``.
    """
    G, d, _ = core.shape
    out = core.new_empty(G, d + 1, d + 1)
    out[:, :d, :d] = core
    out[:, :d, d] = mean_row
    out[:, d, :d] = mean_row
    out[:, d, d] = 1
    return out


def _linear_factor(layer: nn.Linear, x: Tensor, approx: str) -> Tensor:
    if x.dim() < 2 or x.shape[-1] != layer.in_features:
        raise ValueError(
            f"Linear has {layer.in_features} inputs; x must be [B, ..., {layer.in_features}], "
            f"got shape {tuple(x.shape)}."
        )
    B = x.shape[0]
    if approx == "expand":
        rows = x.reshape(-1, x.shape[-1])
        core = (rows.T @ rows).div_(rows.shape[0]).unsqueeze(0)
        mean = rows.mean(0)
    else:
        rows = x.reshape(B, -1, x.shape[-1]).mean(1)
        core = (rows.T @ rows).div_(B).unsqueeze(0)
        mean = rows.mean(0)
    return _with_bias(core, mean.unsqueeze(0)) if layer.bias is not None else core


def input_factor(layer: nn.Module, x: Tensor, approx: str = "expand") -> Tensor:
    """Input-side Kronecker factor A of ``layer`` for its input ``x``.

    Args:
        layer: ``nn.Linear``, ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d``.
        x: the layer's input, batch first: ``[B, ..., d_in]`` (Linear, extra axes are
            weight-sharing positions) or ``[B, C_in, I..]`` (convolutions).
        approx: ``"expand"`` (KFC: ``1/(B·P) Σ_{b,p} u uᵀ`` over batch and the P output
            positions) or ``"reduce"`` (``1/B Σ_b ū ūᵀ``, ū = mean of u over positions).

    Returns:
        ``[G, d, d]``, one exact block per channel group (G = 1 for Linear), with
        ``d = C_in/G · K1·…·KN (+1 with bias)``. Rows are ordered ``(input channel,
        k1, …, kN)`` like ``weight.flatten(1)`` of a convolution; for a transposed
        convolution like ``weight[g·C:(g+1)·C].transpose(0, 1).flatten(1)`` of group g.
        The bias row/column, if any, is last. Non-zero padding modes give the factor of
        the padded input the layer convolves.
    """
    check_layer(layer)
    check_approx(approx)
    if isinstance(layer, nn.Linear):
        return _linear_factor(layer, x, approx)
    x, dims = conv_input(layer, x)
    G = layer_groups(layer)
    N = x.shape[0]
    bias = layer.bias is not None
    if approx == "expand":
        core = kfc_factor(x, dims, G)
        if not bias:
            return core
        mean = averaged_unfold(x, dims).reshape(N, G, -1).mean(0)
        return _with_bias(core, mean)
    u = averaged_unfold(x, dims).reshape(N, G, -1)
    if bias:
        u = torch.cat([u, u.new_ones(N, G, 1)], dim=2)
    return torch.einsum("ngi,ngj->gij", u, u).div_(N)
