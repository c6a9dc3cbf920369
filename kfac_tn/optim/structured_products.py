"""Products of singd's structured matrices, cheaper than singd's own where it pays.

``KᵀK``, ``Kᵀ X Xᵀ K``, ``Kᵀ A K`` and ``K Kᵀ`` are symmetric. For dense matrices on a
CPU only the lower block triangle is computed (recursively, down to blocks of ~256),
which takes ~56% of a plain GEMM's time for d = 4608 on 2 CPU cores; on accelerators
one GEMM (see :mod:`kfac_tn.runtime.routes`). :func:`left_multiply`
and :func:`right_multiply` apply dense matrices by one GEMM and block-diagonal ones by
one batched GEMM over their blocks (instead of singd's split/rearrange/einsum/
concatenate), writing into a reusable workspace; other structures use singd's own
routines.
"""

from __future__ import annotations

import torch
from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from singd.structures.dense import DenseMatrix
from torch import Tensor

from kfac_tn.runtime.routes import launch_bound
from kfac_tn.runtime.workspace import Workspace

#: below this size a plain GEMM is as fast as splitting it
MIN_SPLIT = 256


def symmetric_product(left: Tensor, right: Tensor, levels: int = 5) -> Tensor:
    """``left @ right`` ``[n, n]`` for operands whose product is known to be symmetric.

    Computes the diagonal blocks recursively and one off-diagonal block, mirrored.
    """
    n = left.shape[0]
    if levels == 0 or n < MIN_SPLIT or launch_bound(left.device):
        return left @ right
    h = n // 2
    out = left.new_empty(n, n)
    out[:h, :h] = symmetric_product(left[:h], right[:, :h], levels - 1)
    out[h:, h:] = symmetric_product(left[h:], right[:, h:], levels - 1)
    off = left[h:] @ right[:, :h]
    out[h:, :h] = off
    out[:h, h:] = off.T
    return out


def symmetric_addmm_(target: Tensor, left: Tensor, right: Tensor, alpha: float, levels: int = 5) -> Tensor:
    """``target += alpha · left @ right`` in place, for a symmetric target and product.

    Only the lower block triangle is multiplied; the upper off-diagonal blocks are
    mirrored from it, so ``target`` must be symmetric before the call.
    """
    n = target.shape[0]
    if levels == 0 or n < MIN_SPLIT or launch_bound(target.device):
        return target.addmm_(left, right, alpha=alpha)
    h = n // 2
    symmetric_addmm_(target[:h, :h], left[:h], right[:, :h], alpha, levels - 1)
    symmetric_addmm_(target[h:, h:], left[h:], right[:, h:], alpha, levels - 1)
    target[h:, :h].addmm_(left[h:], right[:, :h], alpha=alpha)
    target[:h, h:].copy_(target[h:, :h].T)
    return target


def right_multiply_update_(
    M: Tensor, update: Tensor, alpha: float | Tensor, rows: int = 1024, workspace: Workspace | None = None
) -> Tensor:
    """``M ← M + alpha · M @ update`` in place, a block of rows at a time.

    One ``rows × d`` temporary (from ``workspace`` if given) serves every block. ``alpha``
    may be a 0-d tensor on M's device (no host sync).
    """
    rows = min(rows, M.shape[0])
    temp = _scratch((rows, update.shape[1]), M, workspace)
    for start in range(0, M.shape[0], rows):
        block = M[start : start + rows]
        product = torch.mm(block, update, out=temp[: block.shape[0]])
        if isinstance(alpha, Tensor):
            block.addcmul_(product, alpha)
        else:
            block.add_(product, alpha=alpha)
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


def block_sandwich(M: BlockDiagonalMatrixTemplate, blocks: Tensor, last: Tensor) -> BlockDiagonalMatrixTemplate:
    """singd's ``structure(Mᵀ A M)`` for block-diagonal ``M`` from A's diagonal blocks alone.

    ``blocks`` ``[n, B, B]`` and ``last`` ``[r, r]`` in ``M``'s layout; the off-diagonal
    blocks of A do not enter the block-diagonal result. singd 0.0.5 takes the blocks of
    ``M`` as symmetric (see :func:`rmatmat_transposes`), so this is ``M_b A_b M_bᵀ``
    per block, exactly what stock computes.
    """
    M_blocks, M_last = _block_tensors(M, False)
    out_blocks = torch.bmm(torch.bmm(M_blocks, blocks), M_blocks.transpose(1, 2))
    out_last = M_last @ last @ M_last.T
    return type(M)(out_blocks, out_last)


def rmatmat_transposes(M: StructuredMatrix) -> bool:
    """Whether singd's ``M.rmatmat(X)`` is ``Mᵀ @ X``.

    Not for singd 0.0.5's block-diagonal matrices: they take their blocks as symmetric,
    so ``rmatmat(X)`` is ``M @ X`` and ``from_inner()`` is ``M Mᵀ``. K and C stop being
    symmetric after their second update, so stock's block-diagonal SINGD uses ``K``
    where the method has ``Kᵀ`` (statistics ``K A Kᵀ``, natural gradient
    ``C C ∇W Kᵀ Kᵀ``). kfac_tn reproduces this, for trajectory parity with stock.
    """
    return not isinstance(M, BlockDiagonalMatrixTemplate)


def _block_tensors(M: BlockDiagonalMatrixTemplate, transpose: bool) -> tuple[Tensor, Tensor]:
    tensors = dict(M.named_tensors())
    blocks, last = tensors["_blocks"], tensors["_last"]
    return (blocks.transpose(1, 2), last.T) if transpose else (blocks, last)


def stock_projector(M: StructuredMatrix) -> Tensor | StructuredMatrix:
    """``P`` with ``P @ X`` equal to singd's ``M @ M.rmatmat(X)``.

    Dense: the tensor ``M Mᵀ`` (its lower block triangle multiplied, then mirrored).
    Block-diagonal: ``M M`` per block
    (see :func:`rmatmat_transposes`), as small as ``M`` itself.
    """
    if isinstance(M, BlockDiagonalMatrixTemplate):
        blocks, last = _block_tensors(M, False)
        return type(M)(torch.bmm(blocks, blocks), last @ last)
    return outer_dense(M)


def _dense(M: DenseMatrix | Tensor, transpose: bool) -> Tensor:
    mat = M if isinstance(M, Tensor) else M.to_dense()
    return mat.T if transpose else mat


def _scratch(shape: tuple[int, ...], like: Tensor, workspace: Workspace | None) -> Tensor:
    """An uninitialized tensor like ``like``, from ``workspace`` if given."""
    return like.new_empty(shape) if workspace is None else workspace.take(shape, like)


def left_multiply(
    M: StructuredMatrix | Tensor, X: Tensor, transpose: bool = False, workspace: Workspace | None = None
) -> Tensor:
    """``M @ X`` (``Mᵀ @ X`` if ``transpose``) for ``X`` ``[d, c]``.

    Dense M: one GEMM; block-diagonal M: one batched GEMM. Their result is taken from
    ``workspace`` if given.
    """
    if isinstance(M, (DenseMatrix, Tensor)):
        mat = _dense(M, transpose)
        return torch.mm(mat, X, out=_scratch((mat.shape[0], X.shape[1]), X, workspace))
    if not isinstance(M, BlockDiagonalMatrixTemplate):
        return M.rmatmat(X) if transpose else M @ X
    blocks, last = _block_tensors(M, transpose)
    n = blocks.shape[0] * blocks.shape[1]
    out = _scratch(tuple(X.shape), X, workspace)
    if n:
        torch.bmm(blocks, X[:n].unflatten(0, blocks.shape[:2]), out=out[:n].unflatten(0, blocks.shape[:2]))
    if last.numel():
        torch.mm(last, X[n:], out=out[n:])
    return out


def right_multiply(
    X: Tensor, M: StructuredMatrix | Tensor, transpose: bool = False, workspace: Workspace | None = None
) -> Tensor:
    """``X @ M`` (``X @ Mᵀ`` if ``transpose``) for ``X`` ``[r, d]``.

    Dense M: one GEMM. Block-diagonal M: one batched GEMM over the column blocks of X
    (into a block-major temporary, then copied into place). Result and temporary come
    from ``workspace`` if given.
    """
    if isinstance(M, (DenseMatrix, Tensor)):
        mat = _dense(M, transpose)
        return torch.mm(X, mat, out=_scratch((X.shape[0], mat.shape[1]), X, workspace))
    if not isinstance(M, BlockDiagonalMatrixTemplate):
        return (M @ X.T).T if transpose else M.rmatmat(X.T).T
    blocks, last = _block_tensors(M, transpose)
    nb, B = blocks.shape[:2]
    n, r = nb * B, X.shape[0]
    out = _scratch(tuple(X.shape), X, workspace)
    if n:
        product = _scratch((nb, r, B), X, workspace)
        torch.bmm(X[:, :n].unflatten(1, (nb, B)).transpose(0, 1), blocks, out=product)
        out[:, :n].unflatten(1, (nb, B)).copy_(product.transpose(0, 1))
    if last.numel():
        out[:, n:] = X[:, n:] @ last
    return out
