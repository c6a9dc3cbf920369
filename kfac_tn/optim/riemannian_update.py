"""SINGD's Riemannian update of one pre-conditioner factor, with device scalars.

``m = scale·(a_H·H + a_MM·MᵀM − I) + alpha1·m_old``; ``M ← M − β·M m`` (singd 0.0.5's
rule, see :func:`riemannian_step_`). Every scalar that depends on data (traces, the
skip flag, a normalised step size) stays a 0-d tensor on the device, so an update
needs no host sync: kernels take the scalars as operands (``addcmul_`` with a 0-d
factor) where singd passes Python floats (``alpha=float(tensor)``, one sync each).

Skipping on the device: with ``scale = 0``, ``alpha1 = 1``, ``beta = 0`` and finite
``H`` the update leaves ``M`` and ``m_old`` bit-identical (``x + 0·finite = x``), which
is how a block with non-finite statistics is skipped (:func:`skip_coefficients`).
"""

from __future__ import annotations

import torch
from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from singd.structures.dense import DenseMatrix
from torch import Tensor

from kfac_tn.optim.pending import SymmetricSum
from kfac_tn.optim.structured_products import right_multiply_update_, symmetric_addmm_
from kfac_tn.tensor_network.workspace import Workspace


def average_trace_inner(M: StructuredMatrix) -> Tensor:
    """``tr(Mᵀ M) / d`` as a 0-d tensor; for dense and block-diagonal M the squared
    Frobenius norm (no product formed)."""
    if isinstance(M, (DenseMatrix, BlockDiagonalMatrixTemplate)):
        tensors = [t for _, t in M.named_tensors() if t.numel()]
        return torch.stack([torch.linalg.vector_norm(t) for t in tensors]).square().sum() / M.shape[0]
    return M.from_inner().average_trace()


def infinity_norm(M: StructuredMatrix) -> Tensor:
    """Largest absolute entry, a 0-d tensor (singd's ``infinity_vector_norm`` compares
    tensors in Python, one host sync per comparison)."""
    norms = [torch.linalg.vector_norm(t, ord=float("inf")) for _, t in M.named_tensors() if t.numel()]
    return norms[0] if len(norms) == 1 else torch.stack(norms).amax()


def skip_coefficients(ok: Tensor, dtype: torch.dtype, scale: float, alpha1: float, beta: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """``(scale, alpha1, beta)`` as 0-d tensors of ``dtype`` on ``ok``'s device: the given
    values where the 0-d bool ``ok`` holds, ``(0, 1, 0)`` (leave M and m unchanged)
    where not. No host data is copied (that would synchronise a GPU stream)."""
    on = ok.to(dtype)
    return on * scale, torch.where(ok, on * alpha1, 1.0), on * beta


def riemannian_step_(
    M: StructuredMatrix, H: StructuredMatrix | SymmetricSum, m_old: StructuredMatrix | None, *,
    a_H: Tensor, a_MM: Tensor, scale: Tensor, alpha1: Tensor, beta: Tensor, normalize: bool,
    workspace: Workspace | None = None,
) -> StructuredMatrix:
    """``m = scale·(a_H·H + a_MM·MᵀM − I) + alpha1·m_old``; ``M ← M − β·M m``. Returns m.

    All scalars are 0-d tensors on M's device (cast to M's dtype). With ``normalize``, β is divided by ``max(1, max|m|)``. ``H`` must be
    finite. Dense M: in place in ``m_old``'s buffer (symmetric block products,
    row-blocked ``M m``), with one ``d × d`` scratch from ``workspace`` for ``MᵀM``.
    Block-diagonal M: batched over blocks. Other structures: singd's structured
    arithmetic on their tensors. Returns the new momentum (``m_old`` itself where it
    was given and M is dense or block-diagonal).
    """
    dtype = next(t for _, t in M.named_tensors()).dtype
    a_H, a_MM = a_H.to(dtype), a_MM.to(dtype)
    scale, alpha1, beta = scale.to(dtype), alpha1.to(dtype), beta.to(dtype)
    if isinstance(M, DenseMatrix):
        return _dense_step_(M, H, m_old, scale * a_H, scale * a_MM, scale, alpha1, beta, normalize, workspace)
    if isinstance(M, BlockDiagonalMatrixTemplate) and type(H) is type(M):
        return _block_step_(M, H, m_old, scale * a_H, scale * a_MM, scale, alpha1, beta, normalize)
    # singd's order: m = ((0 + a_H·H) + a_MM·MᵀM − I)·scale + alpha1·m_old
    new_m = M.zeros(M.shape[0], dtype=dtype, device=scale.device)
    inner = M.from_inner()
    for (_, t), (_, h), (_, mm) in zip(new_m.named_tensors(), H.named_tensors(), inner.named_tensors()):
        t.addcmul_(h.to(dtype), a_H).addcmul_(mm, a_MM)
    new_m.diag_add_(-1.0)  # may rebuild the matrix's tensors: iterate them afterwards
    old_tensors = [t for _, t in m_old.named_tensors()] if m_old is not None else None
    for i, (_, t) in enumerate(new_m.named_tensors()):
        t.mul_(scale)
        if old_tensors is not None:
            t.addcmul_(old_tensors[i], alpha1)
    if normalize:
        beta = beta / infinity_norm(new_m).clamp_min(1.0)
    product = M @ new_m
    for (_, t), (_, p) in zip(M.named_tensors(), product.named_tensors()):
        t.addcmul_(p, -beta)
    return new_m


def _dense_step_(M, H, m_old, c_H, c_MM, scale, alpha1, beta, normalize, workspace):
    mat = M.to_dense()
    d = mat.shape[0]
    buf = m_old.to_dense().mul_(alpha1) if m_old is not None else torch.zeros_like(mat)
    inner = (workspace.take((d, d), mat) if workspace is not None else torch.empty_like(mat)).zero_()
    symmetric_addmm_(inner, mat.T, mat, alpha=1.0)
    buf.addcmul_(inner, c_MM)
    _add_statistics_(buf, H, c_H)
    buf.diagonal().sub_(scale)
    new_m = m_old if m_old is not None else DenseMatrix(buf)
    if normalize:
        beta = beta / torch.linalg.vector_norm(buf, ord=float("inf")).clamp_min(1.0)
    right_multiply_update_(mat, buf, beta, workspace=workspace)
    return new_m


def _add_statistics_(target: Tensor, H: SymmetricSum | StructuredMatrix, coefficient: Tensor) -> None:
    """``target += coefficient · H`` (``coefficient >= 0``, a 0-d tensor)."""
    if not isinstance(H, SymmetricSum):
        target.addcmul_(H.to_dense().to(target.dtype), coefficient)
        return
    root = coefficient.sqrt()
    for S in H.factors:  # c·S Sᵀ = (√c S)(√c S)ᵀ: a thin scaled copy, no d × d temporary
        S = S.to(target.dtype) * root
        symmetric_addmm_(target, S, S.T, alpha=1.0)
    if H.dense is not None:
        target.addcmul_(H.dense.to(target.dtype), coefficient)


def _block_step_(M, H, m_old, c_H, c_MM, scale, alpha1, beta, normalize):
    """Batched over blocks, in place in m_old. ``MᵀM`` is singd 0.0.5's block-diagonal
    ``from_inner()``, which is ``M Mᵀ`` per block (reproduced for parity with stock)."""
    dtype = c_H.dtype
    new_m = m_old if m_old is not None else M.zeros(M.shape[0], dtype=dtype, device=c_H.device)
    Ms, Hs, ms = dict(M.named_tensors()), dict(H.named_tensors()), dict(new_m.named_tensors())
    for key in ("_blocks", "_last"):
        mat, buf = Ms[key], ms[key]
        if not mat.numel():
            continue
        batched = mat.unsqueeze(0) if mat.dim() == 2 else mat
        buf_b = buf.unsqueeze(0) if buf.dim() == 2 else buf
        if m_old is not None:
            buf_b.mul_(alpha1)
        buf_b.addcmul_(Hs[key].to(dtype).view_as(buf_b), c_H)
        buf_b.addcmul_(torch.bmm(batched, batched.transpose(1, 2)), c_MM)
        buf_b.diagonal(dim1=1, dim2=2).sub_(scale)
    if normalize:
        beta = beta / infinity_norm(new_m).clamp_min(1.0)
    for key in ("_blocks", "_last"):
        mat, buf = Ms[key], ms[key]
        if mat.numel():
            mat.addcmul_(mat @ buf, -beta)
    return new_m
