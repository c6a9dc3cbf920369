"""Products of singd's structured matrices that know their result is symmetric.

``KᵀK``, ``Kᵀ X Xᵀ K``, ``Kᵀ A K`` and ``K Kᵀ`` are symmetric. For dense matrices only
the lower block triangle is computed (recursively, a few levels), which saves about
a third of the multiply-adds of a plain GEMM; other structures use singd's own
structured routines, which are already cheap.
"""

from __future__ import annotations

from singd.structures.base import StructuredMatrix
from singd.structures.dense import DenseMatrix
from torch import Tensor

#: below this size a plain GEMM is as fast as splitting it
MIN_SPLIT = 512


def symmetric_product(left: Tensor, right: Tensor, levels: int = 3) -> Tensor:
    """``left @ right`` ``[n, n]`` for operands whose product is known to be symmetric.

    Computes the diagonal blocks recursively and one off-diagonal block, mirrored.
    """
    n = left.shape[0]
    if levels == 0 or n < MIN_SPLIT:
        return left @ right
    h = n // 2
    out = left.new_empty(n, n)
    out[:h, :h] = symmetric_product(left[:h], right[:, :h], levels - 1)
    out[h:, h:] = symmetric_product(left[h:], right[:, h:], levels - 1)
    off = left[h:] @ right[:, :h]
    out[h:, :h] = off
    out[:h, h:] = off.T
    return out


def symmetric_addmm_(target: Tensor, left: Tensor, right: Tensor, alpha: float, levels: int = 3) -> Tensor:
    """``target += alpha · left @ right`` in place, for a symmetric target and product.

    Only the lower block triangle is multiplied; the upper off-diagonal blocks are
    mirrored from it, so ``target`` must be symmetric before the call.
    """
    n = target.shape[0]
    if levels == 0 or n < MIN_SPLIT:
        return target.addmm_(left, right, alpha=alpha)
    h = n // 2
    symmetric_addmm_(target[:h, :h], left[:h], right[:, :h], alpha, levels - 1)
    symmetric_addmm_(target[h:, h:], left[h:], right[:, h:], alpha, levels - 1)
    target[h:, :h].addmm_(left[h:], right[:, :h], alpha=alpha)
    target[:h, h:].copy_(target[h:, :h].T)
    return target


def right_multiply_update_(M: Tensor, update: Tensor, beta: float, rows: int = 1024) -> Tensor:
    """``M ← M − beta · M @ update`` in place, a block of rows at a time (small temporaries)."""
    for start in range(0, M.shape[0], rows):
        block = M[start : start + rows]
        block.sub_(block @ update, alpha=beta)
    return M


def inner(M: StructuredMatrix) -> StructuredMatrix:
    """``structure(Mᵀ M)``."""
    if isinstance(M, DenseMatrix):
        mat = M.to_dense()
        return DenseMatrix(symmetric_product(mat.T, mat))
    return M.from_inner()


def inner_with(M: StructuredMatrix, X: Tensor) -> StructuredMatrix:
    """``structure(Mᵀ X Xᵀ M)`` for ``X`` of shape ``[d, R]``."""
    if isinstance(M, DenseMatrix):
        S = M.rmatmat(X)  # Mᵀ X
        return DenseMatrix(symmetric_product(S, S.T))
    return M.from_inner(X=X)


def sandwich(M: StructuredMatrix, A: Tensor) -> StructuredMatrix:
    """``structure(Mᵀ A M)`` for symmetric ``A`` ``[d, d]``."""
    left = M.rmatmat(A)  # Mᵀ A
    if isinstance(M, DenseMatrix):
        return DenseMatrix(symmetric_product(left, M.to_dense()))
    return type(M).from_dense(M.rmatmat(left.T).T)  # (Mᵀ (Mᵀ A)ᵀ)ᵀ = Mᵀ A M


def outer_dense(M: StructuredMatrix) -> Tensor:
    """Dense ``M Mᵀ``."""
    mat = M.to_dense()
    return symmetric_product(mat, mat.T)
