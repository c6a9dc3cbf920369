"""The tensors behind singd's structured matrices and kfac_tn's :class:`SymmetricSum`:
their dtype, casts, stored sizes, and which dtypes singd's products accept."""

from __future__ import annotations

import copy
import sys

import torch
from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from torch import Tensor

from kfac_tn.optim.symmetric_sum import SymmetricSum


def matrix_dtype(M: StructuredMatrix) -> torch.dtype:
    return next(t for _, t in M.named_tensors()).dtype


def stored_diagonal(M: DiagonalMatrix) -> Tensor:
    """The stored diagonal ``[d]`` of a ``DiagonalMatrix`` (``to_dense`` would build d × d)."""
    return dict(M.named_tensors())["_mat_diag"]


def cast(M: StructuredMatrix, dtype: torch.dtype) -> StructuredMatrix:
    """``M`` itself if already in ``dtype``, else a shallow copy with its tensors cast."""
    if matrix_dtype(M) == dtype:
        return M
    out = copy.copy(M)
    for name, tensor in M.named_tensors():
        setattr(out, name, tensor.to(dtype))
    return out


def statistics_tensors(H: StructuredMatrix | SymmetricSum) -> list[Tensor]:
    """The tensors that hold statistics ``H`` (structured matrix or SymmetricSum)."""
    if isinstance(H, SymmetricSum):
        return H.tensors()
    return [t for _, t in H.named_tensors()]


def untraced_sums(H: StructuredMatrix | SymmetricSum) -> list[Tensor]:
    """Sums over the entries of statistics ``H`` that its trace does not see (dense parts,
    structured tensors), so that a finite trace and finite sums mean finite entries."""
    if isinstance(H, SymmetricSum):  # tr(S Sᵀ) = ‖S‖² covers every entry of a thin factor
        return [H.dense.sum()] if H.dense is not None else []
    return [t.sum() for _, t in H.named_tensors() if t.numel()]


def stored_elements(structure: type[StructuredMatrix], dim: int) -> int:
    """Stored numbers of a ``dim × dim`` matrix of ``structure``."""
    if issubclass(structure, DenseMatrix):
        return dim * dim
    return sum(t.numel() for _, t in structure.zeros(dim, dtype=torch.float32).named_tensors())


def singd_computes_in(structure: type[StructuredMatrix], dtype: torch.dtype) -> bool:
    """Whether singd's products of ``structure`` accept ``dtype`` (its ``lowest_precision``
    rejects float64 for the hierarchical and Toeplitz structures). kfac_tn's own routes
    (dense, diagonal, block-diagonal) accept every float dtype."""
    if structure is DenseMatrix or issubclass(structure, (DiagonalMatrix, BlockDiagonalMatrixTemplate)):
        return True
    check = getattr(sys.modules[structure.__module__], "lowest_precision", None)
    if check is None:
        return True
    try:
        check(dtype, dtype)
    except NotImplementedError:
        return False
    return True
