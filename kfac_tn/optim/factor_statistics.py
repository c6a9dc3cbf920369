"""SINGD's curvature statistics of one layer: ``H_K = structure(Kᵀ A K)`` and
``H_C = structure(Cᵀ G C)``.

:func:`input_H` / :func:`grad_output_H` take the cheapest exact route per structure: the
factor's diagonal alone for diagonal K; its diagonal blocks alone for block-diagonal K;
``(X K)ᵀ(X K)`` from the few rows ``X`` of a reduce factor or a small unfolded input;
otherwise the whole factor sandwiched by K (a pending :class:`SymmetricSum` for dense K).

``H_K`` is linear in A, so the A of several ranks can also be averaged first and
sandwiched by whoever holds K (sharded SINGD, :mod:`sharding`): :func:`input_statistics`
/ :func:`grad_output_statistics` form the part of A or G a structure needs, without K,
and :func:`sandwich_statistics` applies K later. Randomized statistics (``subsample``)
always come as the whole randomized factor.
"""

from __future__ import annotations

from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from torch import Tensor, nn

from kfac_tn.factors import (
    grad_output_factor,
    grad_output_factor_blocks,
    grad_output_factor_diagonal,
    grad_output_rows,
    input_factor,
    input_factor_blocks,
    input_factor_diagonal,
    input_row_chunks,
    input_rows,
    subsampled_grad_output_factor,
    subsampled_input_factor,
)
from kfac_tn.factors.layers import num_positions
from kfac_tn.optim.structured_products import block_sandwich, inner_with, sandwich
from kfac_tn.optim.symmetric_sum import SymmetricSum
from kfac_tn.optim.weight_blocks import block_dims
from kfac_tn.runtime.workspace import Workspace


def input_H(
    layer: nn.Module,
    x: Tensor,
    Ks: list[StructuredMatrix],
    approx: str,
    group_average: bool,
    subsample: float | int | None = None,
    workspace: Workspace | None = None,
) -> list:
    """``structure(Kᵀ A K)`` per block (group) ``K`` of ``Ks``, by the cheapest exact route."""
    if subsample is not None:
        return sandwich_statistics(Ks, input_statistics(layer, x, type(Ks[0]), approx, group_average, subsample),
                                   subsample)
    if all(isinstance(K, DiagonalMatrix) for K in Ks):
        diag = input_factor_diagonal(layer, x, approx, group_average)  # [G, d]
        return [K.from_inner(X=d.clamp_min(0).sqrt().unsqueeze(1)) for K, d in zip(Ks, diag)]
    if _same_block_structure(Ks):
        if workspace is not None:
            workspace.reset()
        blocks, last = input_factor_blocks(layer, x, Ks[0].BLOCK_DIM, approx, group_average, workspace=workspace)
        return [block_sandwich(K, b, r) for K, b, r in zip(Ks, blocks, last)]
    dim_K = block_dims(layer, group_average)[0]
    rows_count = x.shape[0] if approx == "reduce" else x.shape[0] * num_positions(layer, x)
    if approx == "reduce" or _factored_is_cheaper(rows_count, dim_K, Ks[0]):
        if isinstance(Ks[0], DenseMatrix):
            rows = input_rows(layer, x, approx, group_average)  # [G, R, d]
            return [_inner_with(K, r.T) for K, r in zip(Ks, rows)]
        # other structures: Mᵀ Xᵀ X M is additive over rows, so stream the unfolded input
        H = None
        for rows in input_row_chunks(layer, x, approx, group_average):
            part = [K.from_inner(X=r.T) for K, r in zip(Ks, rows)]
            H = part if H is None else [h.add_(p) for h, p in zip(H, part)]
        return H
    A = input_factor(layer, x, approx, group_average)  # [G, d, d]
    return [sandwich_dense(K, a) for K, a in zip(Ks, A)]


def grad_output_H(
    layer: nn.Module,
    g: Tensor,
    Cs: list[StructuredMatrix],
    approx: str,
    loss_average: str | None,
    group_average: bool,
    subsample: float | int | None = None,
    workspace: Workspace | None = None,
) -> list:
    """``structure(Cᵀ G C)`` per block (group) ``C`` of ``Cs``, by the cheapest exact route."""
    if subsample is not None:
        return sandwich_statistics(
            Cs, grad_output_statistics(layer, g, type(Cs[0]), approx, loss_average, group_average, subsample),
            subsample)
    if all(isinstance(C, DiagonalMatrix) for C in Cs):
        diag = grad_output_factor_diagonal(layer, g, approx, loss_average, group_average)  # [G, D]
        return [C.from_inner(X=d.sqrt().unsqueeze(1)) for C, d in zip(Cs, diag)]
    if _same_block_structure(Cs):
        if workspace is not None:
            workspace.reset()
        blocks, last = grad_output_factor_blocks(layer, g, Cs[0].BLOCK_DIM, approx, loss_average, group_average,
                                                 workspace=workspace)
        return [block_sandwich(C, b, r) for C, b, r in zip(Cs, blocks, last)]
    channels = g.shape[-1] if isinstance(layer, nn.Linear) else g.shape[1]
    rows_count = g.shape[0] if approx == "reduce" else g.numel() // channels
    if _factored_is_cheaper(rows_count, block_dims(layer, group_average)[1], Cs[0]):
        rows = grad_output_rows(layer, g, approx, loss_average, group_average)  # [G, R, D]
        return [_inner_with(C, r.T) for C, r in zip(Cs, rows)]
    grams = grad_output_factor(layer, g, approx, loss_average, group_average)
    return [sandwich_dense(C, gram) for C, gram in zip(Cs, grams)]


def _inner_with(M: StructuredMatrix, X: Tensor):
    """Pending ``Mᵀ X Xᵀ M``: thin factor for dense M when it is smaller than d × d."""
    if isinstance(M, DenseMatrix) and 2 * X.shape[1] <= X.shape[0]:
        return SymmetricSum(factor=M.rmatmat(X))
    H = inner_with(M, X)
    return SymmetricSum(dense=H.to_dense()) if isinstance(M, DenseMatrix) else H


def _factored_is_cheaper(rows: int, dim: int, M: StructuredMatrix) -> bool:
    """Whether ``(X M)ᵀ(X M)`` from ``rows`` rows beats forming ``Mᵀ (XᵀX) M``.

    Dense M: 3·R·d² against R·d² + 4·d³ multiply-adds, so rows win up to R = 2d. Other
    structures have cheap products either way; rows are used while they take no more
    memory than the d × d factor.
    """
    return rows <= (2 * dim if isinstance(M, DenseMatrix) else dim)


def _same_block_structure(Ms: list[StructuredMatrix]) -> bool:
    """Whether all blocks are singd block-diagonal matrices of one block size."""
    return all(isinstance(M, BlockDiagonalMatrixTemplate) for M in Ms) and len({M.BLOCK_DIM for M in Ms}) == 1


def _form(structure: type[StructuredMatrix], subsample: float | int | None) -> str:
    if subsample is not None:
        return "dense"
    if issubclass(structure, DiagonalMatrix):
        return "diagonal"
    if issubclass(structure, BlockDiagonalMatrixTemplate):
        return "blocks"
    return "dense"


def input_statistics(
    layer: nn.Module,
    x: Tensor,
    structure: type[StructuredMatrix],
    approx: str,
    group_average: bool,
    subsample: float | int | None = None,
) -> list[Tensor]:
    """The input factor's part that ``structure(Kᵀ A K)`` needs: ``[diag [G, d]]``,
    ``[blocks, last]`` (see :func:`kfac_tn.factors.input_factor_blocks`) or ``[A [G, d, d]]``."""
    form = _form(structure, subsample)
    if subsample is not None:
        return [subsampled_input_factor(layer, x, subsample, group_average)]
    if form == "diagonal":
        return [input_factor_diagonal(layer, x, approx, group_average)]
    if form == "blocks":
        return list(input_factor_blocks(layer, x, structure.BLOCK_DIM, approx, group_average))
    return [input_factor(layer, x, approx, group_average)]


def grad_output_statistics(
    layer: nn.Module,
    g: Tensor,
    structure: type[StructuredMatrix],
    approx: str,
    loss_average: str | None,
    group_average: bool,
    subsample: float | int | None = None,
) -> list[Tensor]:
    """:func:`input_statistics` for the output-gradient factor G."""
    form = _form(structure, subsample)
    if subsample is not None:
        return [subsampled_grad_output_factor(layer, g, subsample, loss_average, group_average)]
    if form == "diagonal":
        return [grad_output_factor_diagonal(layer, g, approx, loss_average, group_average)]
    if form == "blocks":
        return list(grad_output_factor_blocks(layer, g, structure.BLOCK_DIM, approx, loss_average, group_average))
    return [grad_output_factor(layer, g, approx, loss_average, group_average)]


def sandwich_statistics(Ms: list[StructuredMatrix], statistics: list[Tensor], subsample: float | int | None = None) -> list:
    """``structure(Mᵀ A M)`` per block (group) ``M`` of ``Ms`` from :func:`input_statistics`
    or :func:`grad_output_statistics`."""
    form = _form(type(Ms[0]), subsample)
    if form == "diagonal":
        return [M.from_inner(X=d.clamp_min(0).sqrt().unsqueeze(1)) for M, d in zip(Ms, statistics[0])]
    if form == "blocks":
        blocks, last = statistics
        return [block_sandwich(M, b, r) for M, b, r in zip(Ms, blocks, last)]
    return [sandwich_dense(M, a) for M, a in zip(Ms, statistics[0])]


def sandwich_dense(M: StructuredMatrix, A: Tensor):
    """``structure(Mᵀ A M)`` of a whole factor ``A`` (dense M: a pending :class:`SymmetricSum`)."""
    H = sandwich(M, A)
    return SymmetricSum(dense=H.to_dense()) if isinstance(M, DenseMatrix) else H
