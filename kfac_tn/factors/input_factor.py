"""Kronecker input factor A of a layer (KFAC-expand or KFAC-reduce), and its pieces.

Three views of the same factor, for the callers' different needs:

- :func:`input_factor`: A itself, ``[groups, d, d]``.
- :func:`input_rows`: a matrix X with ``A = Xᵀ X`` (``[groups, R, d]``); cheap when R is
  small (reduce: R = batch size), so that ``Kᵀ A K`` can be formed as ``(X K)ᵀ (X K)``.
- :func:`input_factor_diagonal`: ``diag(A)`` only, ``[groups, d]``, at the cost of one
  averaged unfold of ``x²`` (diagonal preconditioner structures need nothing else).
- :func:`input_factor_blocks`: A's ``B × B`` diagonal blocks only (block-diagonal
  structures), from the unfolded input in feature-major chunks: ``d·B`` instead of
  ``d²`` multiply-adds per position.
"""

from __future__ import annotations

from collections.abc import Iterator
from math import prod, sqrt

import torch
from torch import Tensor, nn

from kfac_tn.factors.layers import (
    check_approx,
    check_layer,
    conv_input,
    layer_groups,
)
from kfac_tn.kernels.averaged_input import averaged_unfolded_input
from kfac_tn.kernels.block_gram import block_gram
from kfac_tn.kernels.kfc import kfc_factor
from kfac_tn.kernels.unfold_gram import (
    unfolded_feature_chunks,
    unfolded_row_chunks,
    unfolded_rows,
)
from kfac_tn.runtime.chunking import batch_chunk
from kfac_tn.runtime.routes import launch_bound
from kfac_tn.runtime.workspace import Workspace
from kfac_tn.tensor_network.geometry import ConvDim


def _with_bias(core: Tensor, mean_row: Tensor) -> Tensor:
    """``[[core, m], [mᵀ, 1]]`` per group; ``core`` ``[groups, d, d]``, ``mean_row`` ``[groups, d]``."""
    groups, d, _ = core.shape
    out = core.new_empty(groups, d + 1, d + 1)
    out[:, :d, :d] = core
    out[:, :d, d] = mean_row
    out[:, d, :d] = mean_row
    out[:, d, d] = 1
    return out


def _append_ones(rows: Tensor, value: float = 1.0) -> Tensor:
    return torch.cat([rows, rows.new_full(rows.shape[:-1] + (1,), value)], dim=-1)


def _linear_rows(layer: nn.Linear, x: Tensor, approx: str) -> Tensor:
    """``[R, d_in]``: every position (expand) or the mean over positions (reduce)."""
    rows = _linear_input(layer, x)
    if approx == "reduce":
        rows = rows.mean(1, keepdim=True)
    return rows.flatten(0, 1)


def _linear_input(layer: nn.Linear, x: Tensor) -> Tensor:
    if x.dim() < 2 or x.shape[-1] != layer.in_features:
        raise ValueError(
            f"Linear has {layer.in_features} inputs; x must be [B, ..., {layer.in_features}], "
            f"got shape {tuple(x.shape)}."
        )
    return x.reshape(x.shape[0], -1, x.shape[-1])  # [B, P, d_in]


def _conv_setup(layer: nn.Module, x: Tensor, group_average: bool) -> tuple[Tensor, tuple[ConvDim, ...], int]:
    """Input actually convolved, its geometry and the number of factor blocks.

    ``group_average=True`` averages the input over channel groups first and returns one
    shared block (singd's and curvlinops' convention for grouped convolutions).
    """
    x, dims = conv_input(layer, x)
    groups = layer_groups(layer)
    if group_average and groups > 1:
        return x.unflatten(1, (groups, -1)).mean(1), dims, 1
    return x, dims, groups


def _averaged_unfold_of_square(x: Tensor, dims: tuple[ConvDim, ...], chunk_bytes: int = 2**20) -> Tensor:
    """``Σ_n ū(x²)[n]`` ``[groups·C·K..]``: ū is linear, so the batch is summed first, then one
    sample is contracted. Accelerators: one reduction kernel (``vector_norm`` over the
    batch); CPUs: squares of small batch chunks in a reused buffer, summed (a reduction
    over the outermost dimension is ~10× slower there)."""
    if launch_bound(x.device):
        square = torch.linalg.vector_norm(x, dim=0, keepdim=True).square_()
    else:
        chunk = batch_chunk(x, x[0].numel() * x.element_size(), chunk_bytes)
        buffer = x.new_empty((chunk,) + tuple(x.shape[1:]))
        square = None
        for part in x.split(chunk):
            summed = torch.mul(part, part, out=buffer[: part.shape[0]]).sum(0, keepdim=True)
            square = summed if square is None else square.add_(summed)
    return averaged_unfolded_input(square, dims).flatten()


def _check_subsample_approx(approx: str) -> None:
    if approx != "expand":
        raise ValueError("subsample samples output positions of KFAC-expand factors: use approx='expand'.")


def _validate(layer: nn.Module, approx: str) -> None:
    check_layer(layer)
    check_approx(approx)


def input_factor(
    layer: nn.Module,
    x: Tensor,
    approx: str = "expand",
    group_average: bool = False,
    subsample: float | int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Input-side Kronecker factor A of ``layer`` for its input ``x``.

    Args:
        layer: ``nn.Linear``, ``nn.Conv{1,2,3}d`` or ``nn.ConvTranspose{1,2,3}d``.
        x: the layer's input, batch first: ``[B, ..., d_in]`` (Linear, extra axes are
            weight-sharing positions) or ``[B, C_in, I..]`` (convolutions).
        approx: ``"expand"`` (KFC: ``1/(B·P) Σ_{b,p} u uᵀ`` over batch and the P output
            positions) or ``"reduce"`` (``1/B Σ_b ū ūᵀ``, ū = mean of u over positions).
        group_average: for grouped convolutions, average the input over groups and return
            one shared block (singd's convention) instead of one exact block per group.
        subsample: KFAC-expand only: an unbiased randomized factor from a random subset
            of the output positions (a fraction in (0, 1] or a count; drawn from
            ``generator``), see :func:`kfac_tn.factors.subsampled_input_factor`.
        generator: random source of ``subsample``'s positions (torch's global one if None).

    Returns:
        ``[groups, d, d]``, one exact block per channel group (groups = 1 for Linear), with
        ``d = C_in/groups · K1·…·KN (+1 with bias)``. Rows are ordered ``(input channel,
        k1, …, kN)`` like ``weight.flatten(1)`` of a convolution; for a transposed
        convolution like ``weight[g·C:(g+1)·C].transpose(0, 1).flatten(1)`` of group g.
        The bias row/column, if any, is last. Non-zero padding modes give the factor of
        the padded input the layer convolves.
    """
    _validate(layer, approx)
    if subsample is not None:
        from kfac_tn.factors.subsampled import subsampled_input_factor  # (it builds on this module)

        _check_subsample_approx(approx)
        return subsampled_input_factor(layer, x, subsample, group_average, generator)
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        rows = _linear_rows(layer, x, approx)
        core = (rows.T @ rows).div_(rows.shape[0]).unsqueeze(0)
        return _with_bias(core, rows.mean(0).unsqueeze(0)) if bias else core
    x, dims, groups = _conv_setup(layer, x, group_average)
    N = x.shape[0]
    if approx == "expand":
        core = kfc_factor(x, dims, groups)
        if not bias:
            return core
        return _with_bias(core, averaged_unfolded_input(x, dims).reshape(N, groups, -1).mean(0))
    u = averaged_unfolded_input(x, dims).reshape(N, groups, -1)
    if bias:
        u = _append_ones(u)
    return torch.einsum("ngi,ngj->gij", u, u).div_(N)


def input_rows(layer: nn.Module, x: Tensor, approx: str = "expand", group_average: bool = False) -> Tensor:
    """``X`` of shape ``[groups, R, d]`` with ``Xᵀ X`` = :func:`input_factor`.

    Reduce: R = B rows ``ū / sqrt(B)``. Expand: R = B·P unfolded rows ``u / sqrt(B·P)``
    (the unfolded input: only worth it when R is small compared with d).
    """
    _validate(layer, approx)
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        rows = _linear_rows(layer, x, approx).unsqueeze(0)
    else:
        x, dims, groups = _conv_setup(layer, x, group_average)
        if approx == "reduce":
            rows = averaged_unfolded_input(x, dims).reshape(x.shape[0], groups, -1).transpose(0, 1)
        else:
            rows = unfolded_rows(x, dims, groups)
    if bias:
        rows = _append_ones(rows)
    return rows / sqrt(rows.shape[1])  # out of place: rows may be a view of the caller's input


def input_row_chunks(
    layer: nn.Module, x: Tensor, approx: str = "expand", group_average: bool = False, chunk_bytes: int = 2**22
) -> Iterator[Tensor]:
    """:func:`input_rows` in pieces ``[groups, r, d]`` of about ``chunk_bytes`` of unfolded input.

    ``Σ_pieces Xᵀ X`` = :func:`input_factor`, so consumers that are additive over rows
    (e.g. ``Kᵀ Xᵀ X K``) never hold the whole unfolded input. Expand convolutions only
    are split; otherwise one piece.
    """
    if isinstance(layer, nn.Linear) or approx == "reduce":
        yield input_rows(layer, x, approx, group_average)
        return
    _validate(layer, approx)
    x, dims, groups = _conv_setup(layer, x, group_average)
    scale = 1.0 / sqrt(x.shape[0] * prod(d.output_size for d in dims))
    for rows in unfolded_row_chunks(x, dims, groups, chunk_bytes):
        if layer.bias is not None:
            rows = _append_ones(rows)
        yield rows.mul_(scale)


def input_factor_diagonal(
    layer: nn.Module, x: Tensor, approx: str = "expand", group_average: bool = False
) -> Tensor:
    """``diag(A)`` of :func:`input_factor`, shape ``[groups, d]``, without forming A.

    Expand: ``diag(A)[c, k] = 1/B Σ_b ū(x²)[b, c, k]`` (Σ_o Π = O·Π̄); reduce: the mean
    of ``ū²`` over the batch. The bias entry (last, if any) is 1.
    """
    weight_part, scale = input_factor_diagonal_sum(layer, x, approx, group_average)
    diag = weight_part.mul_(scale)
    return _append_ones(diag) if layer.bias is not None else diag


def input_factor_diagonal_sum(
    layer: nn.Module, x: Tensor, approx: str = "expand", group_average: bool = False
) -> tuple[Tensor, float]:
    """``(S, s)`` with ``diag(A)[:, :d_w] = s · S`` ``[groups, d_w]``, the weight entries only.

    For callers that fold the scale ``s`` (and the bias entry, always 1) into a later
    kernel, e.g. an ``addcmul_`` into an accumulator: one launch less per layer.
    """
    _validate(layer, approx)
    if isinstance(layer, nn.Linear):
        rows = _linear_input(layer, x)
        B, P = rows.shape[0], rows.shape[1]
        if approx == "expand":
            return torch.linalg.vector_norm(rows, dim=(0, 1)).square_().unsqueeze(0), 1.0 / (B * P)
        return rows.sum(1).square_().sum(0).unsqueeze(0), 1.0 / (B * P * P)
    x, dims, groups = _conv_setup(layer, x, group_average)
    N = x.shape[0]
    if approx == "expand":
        return _averaged_unfold_of_square(x, dims).reshape(groups, -1), 1.0 / N
    return torch.linalg.vector_norm(averaged_unfolded_input(x, dims).reshape(N, groups, -1), dim=0).square_(), 1.0 / N


def input_factor_blocks(
    layer: nn.Module,
    x: Tensor,
    block: int,
    approx: str = "expand",
    group_average: bool = False,
    chunk_bytes: int = 2**22,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``block × block`` diagonal blocks of :func:`input_factor`, without the rest.

    Returns:
        ``(blocks, last)`` in singd's block-diagonal layout: ``[groups, d // block, block,
        block]`` and ``[groups, d mod block, d mod block]`` (possibly empty), ``d`` as for
        :func:`input_factor` (bias row last). Expand convolutions stream the unfolded
        input in batch chunks of about ``chunk_bytes`` (in ``workspace`` if given), so
        it never exists whole.
    """
    _validate(layer, approx)
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        rows = _linear_rows(layer, x, approx)  # [R, d_in]
        blocks, last = block_gram(rows.T.unsqueeze(0), block, bias)
        return blocks.div_(rows.shape[0]), last.div_(rows.shape[0])
    x, dims, groups = _conv_setup(layer, x, group_average)
    N = x.shape[0]
    if approx == "reduce":
        u = averaged_unfolded_input(x, dims).reshape(N, groups, -1).permute(1, 2, 0)  # [groups, D, N]
        blocks, last = block_gram(u, block, bias)
        return blocks.div_(N), last.div_(N)
    blocks = last = None
    for u in unfolded_feature_chunks(x, dims, groups, chunk_bytes, workspace):
        part = block_gram(u, block, bias)
        if blocks is None:
            blocks, last = part
        else:
            blocks.add_(part[0])
            last.add_(part[1])
    scale = N * prod(d.output_size for d in dims)
    return blocks.div_(scale), last.div_(scale)
