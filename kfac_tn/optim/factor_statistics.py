"""A layer's curvature statistics before the preconditioner enters them, in the form its
K or C structure needs, and their sandwich with K or C.

SINGD's statistic ``H_K = structure(Kᵀ A K)`` is linear in A, so the A of several ranks
can be averaged first and sandwiched by whoever holds K (sharded SINGD, :mod:`sharding`).
What is formed of A (likewise G) depends on the structure: its diagonal for diagonal K,
its diagonal blocks for block-diagonal K, the whole factor otherwise (or the randomized
factor of sampled positions, for every structure).
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
    input_factor,
    input_factor_blocks,
    input_factor_diagonal,
    subsampled_grad_output_factor,
    subsampled_input_factor,
)
from kfac_tn.optim.structured_products import block_sandwich, sandwich
from kfac_tn.optim.symmetric_sum import SymmetricSum


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
