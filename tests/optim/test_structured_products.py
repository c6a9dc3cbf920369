"""Structured products of kfac_tn.optim against singd's own operations and dense algebra (float64)."""

import pytest
import torch
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix

from kfac_tn.optim.structured_products import (
    block_sandwich,
    left_multiply,
    right_multiply,
    rmatmat_transposes,
    stock_projector,
    symmetric_addmm_,
    symmetric_product,
)


class Block3DiagonalMatrix(BlockDiagonalMatrixTemplate):
    BLOCK_DIM = 3


def _random(cls, dim, gen):
    """A non-symmetric matrix of structure ``cls`` (as K and C become after updates)."""
    if cls is Block3DiagonalMatrix:  # from_dense would take the blocks of a symmetric matrix
        blocks = torch.randn(dim // 3, 3, 3, generator=gen, dtype=torch.float64)
        return cls(blocks, torch.randn(dim % 3, dim % 3, generator=gen, dtype=torch.float64))
    return cls.from_dense(torch.randn(dim, dim, generator=gen, dtype=torch.float64))


@pytest.mark.parametrize("cls", [DenseMatrix, DiagonalMatrix, Block3DiagonalMatrix])
@pytest.mark.parametrize("dim", [2, 3, 7, 9])
def test_left_and_right_multiply(cls, dim, stock_float64):
    gen = torch.Generator().manual_seed(dim)
    M = _random(cls, dim, gen)
    dense = M.to_dense()
    X = torch.randn(dim, 4, generator=gen, dtype=torch.float64)
    Y = torch.randn(5, dim, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(left_multiply(M, X), dense @ X)
    torch.testing.assert_close(left_multiply(M, X, transpose=True), dense.T @ X)
    torch.testing.assert_close(right_multiply(Y, M), Y @ dense)
    torch.testing.assert_close(right_multiply(Y, M, transpose=True), Y @ dense.T)
    # singd's own rmatmat: the transpose, except for block-diagonal matrices
    expected = dense.T @ X if rmatmat_transposes(M) else dense @ X
    torch.testing.assert_close(M.rmatmat(X), expected)


@pytest.mark.parametrize("cls", [DenseMatrix, Block3DiagonalMatrix])
def test_stock_projector_and_sandwich_reproduce_singd(cls, stock_float64):
    gen = torch.Generator().manual_seed(0)
    M = _random(cls, 8, gen)
    X = torch.randn(8, 4, generator=gen, dtype=torch.float64)
    P = stock_projector(M)
    P = P if isinstance(P, torch.Tensor) else P.to_dense()
    torch.testing.assert_close(P @ X, M @ M.rmatmat(X))
    if cls is Block3DiagonalMatrix:
        S = torch.randn(8, 8, generator=gen, dtype=torch.float64)
        A = S @ S.T
        stock = cls.from_dense(M.rmatmat(M.rmatmat(A).T).T)  # singd's Mᵀ A M
        blocks = torch.stack([A[3 * i : 3 * i + 3, 3 * i : 3 * i + 3] for i in range(2)])
        ours = block_sandwich(M, blocks, A[6:, 6:])
        torch.testing.assert_close(ours.to_dense(), stock.to_dense())


@pytest.mark.parametrize("n", [5, 600, 1100])
def test_symmetric_products(n):
    gen = torch.Generator().manual_seed(n)
    L = torch.randn(n, 7, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(symmetric_product(L, L.T), L @ L.T)
    S = torch.randn(n, n, generator=gen, dtype=torch.float64)
    target = S + S.T
    expected = target + 0.5 * L @ L.T
    torch.testing.assert_close(symmetric_addmm_(target, L, L.T, alpha=0.5), expected)
