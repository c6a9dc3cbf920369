"""Kronecker output-gradient factor G of a layer (KFAC-expand or KFAC-reduce)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kfac_tn.factors.layers import check_approx, check_layer, check_output, layer_groups

LOSS_AVERAGES = (None, "batch", "batch+sequence")


def grad_output_factor(
    layer: nn.Module,
    grad_output: Tensor,
    approx: str = "expand",
    loss_average: str | None = "batch",
) -> Tensor:
    """Output-side Kronecker factor G from the gradient w.r.t. the layer's output.

    Args:
        layer: as for :func:`kfac_tn.input_factor`.
        grad_output: ``[B, ..., d_out]`` (Linear) or ``[B, C_out, O..]`` (convolutions).
        approx: ``"expand"``: ``c · Σ_{b,p} g gᵀ`` over batch and positions;
            ``"reduce"``: ``c · Σ_b ĝ ĝᵀ`` with ĝ the sum of g over positions.
        loss_average: how the loss that produced ``grad_output`` was reduced, as in
            singd: ``None`` (sum, c = 1), ``"batch"`` (mean over the batch, c = B) or
            ``"batch+sequence"`` (mean over batch and the P positions, c = B·P). The
            scaling undoes the average so that G matches curvlinops' KFAC.

    Returns:
        ``[G, D, D]``, one block per channel group, ``D = C_out / G``.
    """
    check_layer(layer)
    check_approx(approx)
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"Unknown loss_average {loss_average!r}; use one of {LOSS_AVERAGES}.")
    check_output(layer, grad_output)
    B = grad_output.shape[0]
    G = layer_groups(layer)
    if isinstance(layer, nn.Linear):
        g = grad_output.reshape(B, -1, grad_output.shape[-1]).transpose(1, 2)
    else:
        g = grad_output.flatten(2)
    g = g.unflatten(1, (G, g.shape[1] // G))  # [B, G, D, P]
    positions = g.shape[-1]
    scale = {None: 1.0, "batch": float(B), "batch+sequence": float(B * positions)}[loss_average]
    if approx == "expand":
        factor = torch.einsum("bgdp,bgep->gde", g, g)
    else:
        s = g.sum(-1)
        factor = torch.einsum("bgd,bge->gde", s, s)
    return factor.mul_(scale)
