"""Kronecker output-gradient factor G of a layer (KFAC-expand or KFAC-reduce)."""

from __future__ import annotations

from math import sqrt

import torch
from torch import Tensor, nn

from kfac_tn.factors.layers import check_approx, check_layer, check_output, layer_groups
from kfac_tn.kernels.block_gram import block_gram
from kfac_tn.runtime.chunking import batch_chunk
from kfac_tn.runtime.workspace import Workspace

LOSS_AVERAGES = (None, "batch", "batch+sequence")


def _check(layer: nn.Module, grad_output: Tensor, approx: str, loss_average: str | None) -> None:
    check_layer(layer)
    check_approx(approx)
    if loss_average not in LOSS_AVERAGES:
        raise ValueError(f"Unknown loss_average {loss_average!r}; use one of {LOSS_AVERAGES}.")
    check_output(layer, grad_output)


def _per_position(layer: nn.Module, grad_output: Tensor) -> Tensor:
    """``[B, P, D_total]`` view: batch, weight-sharing positions, output channels."""
    B = grad_output.shape[0]
    if isinstance(layer, nn.Linear):
        return grad_output.reshape(B, -1, grad_output.shape[-1])
    return grad_output.flatten(2).transpose(1, 2)


def _summands(
    layer: nn.Module, grad_output: Tensor, approx: str, loss_average: str | None, group_average: bool
) -> tuple[Tensor, int, float]:
    """``(g, groups, c)``: ``g`` ``[B, P, groups·D]`` per position (reduce: P = 1, summed over
    positions), the number of blocks ``groups`` and the loss-average scale ``c``."""
    scale = grad_output_scale(layer, grad_output, approx, loss_average)
    groups = 1 if group_average else layer_groups(layer)
    g = _per_position(layer, grad_output)  # [B, P, groups·D]
    if approx == "reduce":
        g = g.sum(1, keepdim=True)
    return g, groups, scale


def grad_output_rows(
    layer: nn.Module,
    grad_output: Tensor,
    approx: str = "expand",
    loss_average: str | None = "batch",
    group_average: bool = False,
) -> Tensor:
    """``Y`` of shape ``[groups, R, D]`` with ``Yᵀ Y`` = :func:`grad_output_factor`.

    Expand: R = B·P rows (one per sample and position); reduce: R = B rows, each
    the sum of the gradient over positions. Scaled by ``sqrt(c)``, see
    :func:`grad_output_factor`. ``group_average=True`` keeps all output channels in
    one block (singd's convention for grouped convolutions).
    """
    g, groups, scale = _summands(layer, grad_output, approx, loss_average, group_average)
    g = g.flatten(0, 1).unflatten(1, (groups, -1)).transpose(0, 1)  # [groups, R, D]
    return g * sqrt(scale)


def grad_output_factor(
    layer: nn.Module,
    grad_output: Tensor,
    approx: str = "expand",
    loss_average: str | None = "batch",
    group_average: bool = False,
    subsample: float | int | None = None,
    generator: torch.Generator | None = None,
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
        group_average: one block over all output channels instead of one per group.
        subsample, generator: as for :func:`kfac_tn.input_factor` (see
            :func:`kfac_tn.factors.subsampled_grad_output_factor`).

    Returns:
        ``[groups, D, D]``, one block per channel group, ``D = C_out / groups``.
    """
    if subsample is not None:
        # (imported here: both modules build on this one)
        from kfac_tn.factors.input_factor import _check_subsample_approx
        from kfac_tn.factors.subsampled import subsampled_grad_output_factor

        _check_subsample_approx(approx)
        return subsampled_grad_output_factor(layer, grad_output, subsample, loss_average, group_average, generator)
    if isinstance(layer, nn.Linear):
        rows = grad_output_rows(layer, grad_output, approx, loss_average, group_average)
        return torch.bmm(rows.transpose(1, 2), rows)
    columns, scale = _feature_major(layer, grad_output, approx, loss_average, group_average)
    return torch.bmm(columns, columns.transpose(1, 2)).mul_(scale)


def grad_output_scale(layer: nn.Module, grad_output: Tensor, approx: str, loss_average: str | None) -> float:
    """The factor c that undoes ``loss_average`` (see :func:`grad_output_factor`), checked."""
    _check(layer, grad_output, approx, loss_average)
    B = grad_output.shape[0]
    channels = grad_output.shape[-1] if isinstance(layer, nn.Linear) else grad_output.shape[1]
    positions = grad_output.numel() // (B * channels)
    return {None: 1.0, "batch": float(B), "batch+sequence": float(B * positions)}[loss_average]


def channel_blocks(layer: nn.Module, grad_output: Tensor, group_average: bool) -> Tensor:
    """A convolution's output gradient as ``[B, groups, D, P]`` (a view: batch, channel
    groups, channels per group, positions)."""
    groups = 1 if group_average else layer_groups(layer)
    return grad_output.reshape(grad_output.shape[0], groups, grad_output.shape[1] // groups, -1)


def _feature_major(
    layer: nn.Module, grad_output: Tensor, approx: str, loss_average: str | None, group_average: bool
) -> tuple[Tensor, float]:
    """``(Y, c)`` with ``c·Y Yᵀ`` = :func:`grad_output_factor` of a convolution: ``Y``
    ``[groups, D, R]`` holds each output channel's R summands contiguously (one copy of
    ``grad_output``), so the Gram is a GEMM with a long inner dimension; 3-5× faster than
    from ``[groups, R, D]`` rows, most for few channels per group."""
    scale = grad_output_scale(layer, grad_output, approx, loss_average)
    x = channel_blocks(layer, grad_output, group_average)  # [B, groups, D, P]
    if approx == "reduce":
        x = x.sum(-1, keepdim=True)
    return x.permute(1, 2, 0, 3).flatten(2), scale


def grad_output_factor_diagonal(
    layer: nn.Module,
    grad_output: Tensor,
    approx: str = "expand",
    loss_average: str | None = "batch",
    group_average: bool = False,
) -> Tensor:
    """``diag(G)`` of :func:`grad_output_factor`, ``[groups, D]``, by reductions only (no copies)."""
    diag, scale = grad_output_factor_diagonal_sum(layer, grad_output, approx, loss_average, group_average)
    return diag.mul_(scale)


def grad_output_factor_diagonal_sum(
    layer: nn.Module,
    grad_output: Tensor,
    approx: str = "expand",
    loss_average: str | None = "batch",
    group_average: bool = False,
) -> tuple[Tensor, float]:
    """``(S, s)`` with ``diag(G) = s · S`` ``[groups, D]``, for callers that fold ``s`` into a later kernel."""
    g, groups, scale = _summands(layer, grad_output, approx, loss_average, group_average)
    return torch.linalg.vector_norm(g, dim=(0, 1)).square_().reshape(groups, -1), scale


def grad_output_factor_blocks(
    layer: nn.Module,
    grad_output: Tensor,
    block: int,
    approx: str = "expand",
    loss_average: str | None = "batch",
    group_average: bool = False,
    chunk_bytes: int = 2**22,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``block × block`` diagonal blocks of :func:`grad_output_factor`.

    The gradient is transposed to feature-major rows in batch chunks of about
    ``chunk_bytes`` (in ``workspace`` if given), so the block Grams are long GEMMs.

    Returns:
        ``(blocks, last)`` in singd's block-diagonal layout: ``[groups, D // block, block,
        block]`` and ``[groups, D mod block, D mod block]``.
    """
    g, groups, scale = _summands(layer, grad_output, approx, loss_average, group_average)
    B, P, GD = g.shape
    chunk = batch_chunk(g, P * GD * g.element_size(), chunk_bytes)
    buffer = None if workspace is None else workspace.take((GD * chunk * P,), g)
    blocks = last = None
    for start in range(0, B, chunk):
        part = g[start : start + chunk].permute(2, 0, 1)  # [groups·D, n, P]
        shape = (groups, GD // groups, part.shape[1] * P)
        if buffer is None:
            features = part.reshape(shape)
        else:
            features = buffer[: part.numel()].view(shape)
            features.view(part.shape).copy_(part)
        pieces = block_gram(features, block)
        if blocks is None:
            blocks, last = pieces
        else:
            blocks.add_(pieces[0])
            last.add_(pieces[1])
    return blocks.mul_(scale), last.mul_(scale)
