"""SINGD's Riemannian update of one pre-conditioner factor, with device scalars.

``m = scale·(a_H·H + a_MM·MᵀM − I) + alpha1·m_old``; ``M ← M − β·M m`` (singd 0.0.5's
rule, see :func:`riemannian_step_`). Every scalar that depends on data (traces, the
skip flag, a normalised step size) stays a 0-d tensor on the device, so an update
needs no host sync: kernels take the scalars as operands (``addcmul_`` with a 0-d
factor) where singd passes Python floats (``alpha=float(tensor)``, one sync each).

Skipping on the device: with ``scale = 0``, ``alpha1 = 1``, ``beta = 0`` and finite
``H`` the update leaves ``M`` and ``m_old`` bit-identical (``x + 0·finite = x``), which
is how a block with non-finite statistics is skipped (:func:`step_scalars`). The
scalars of all blocks of a parameter group are formed together, by a dozen vector
kernels (:func:`step_scalars`), not by a dozen scalar kernels per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from singd.structures.dense import DenseMatrix
from torch import Tensor

from kfac_tn.optim.matrix_tensors import matrix_dtype, statistics_tensors, untraced_sums
from kfac_tn.optim.structured_products import right_multiply_update_, symmetric_addmm_
from kfac_tn.optim.symmetric_sum import SymmetricSum
from kfac_tn.runtime.routes import launch_bound
from kfac_tn.runtime.workspace import Workspace


def trace_inner(M: StructuredMatrix) -> Tensor:
    """``tr(MᵀM)`` as a 0-d tensor (singd's ``M.from_inner().average_trace()`` times d):
    for dense and block-diagonal M the squared Frobenius norm, one dot product per tensor."""
    if isinstance(M, (DenseMatrix, BlockDiagonalMatrixTemplate)):
        squares = [torch.dot(t.reshape(-1), t.reshape(-1)) for _, t in M.named_tensors() if t.numel()]
        return squares[0] if len(squares) == 1 else torch.stack(squares).sum()
    return M.from_inner().average_trace() * M.shape[0]


def trace(H: StructuredMatrix | SymmetricSum) -> Tensor:
    """``tr(H)`` as a 0-d tensor; for thin factors ``Σ ‖S‖²`` (one dot product each)."""
    if not isinstance(H, SymmetricSum):
        return H.average_trace() * H.shape[0]
    parts = [torch.dot(S.reshape(-1), S.reshape(-1)) for S in H.factors]
    if H.dense is not None:
        parts.append(torch.trace(H.dense))
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def infinity_norm(M: StructuredMatrix) -> Tensor:
    """Largest absolute entry, a 0-d tensor (singd's ``infinity_vector_norm`` compares
    tensors in Python, one host sync per comparison)."""
    norms = [torch.linalg.vector_norm(t, ord=float("inf")) for _, t in M.named_tensors() if t.numel()]
    return norms[0] if len(norms) == 1 else torch.stack(norms).amax()


#: columns of a row of :func:`step_scalars`
COLUMNS = ("a_H", "a_MM", "scale", "alpha1", "neg_beta", "c_H", "c_MM", "root_c_H")


@dataclass(frozen=True)
class StepScalars:
    """0-d tensors of one factor's step: ``a_H, a_MM, scale, alpha1``, ``neg_beta = −β`` (the
    operand of ``M.addcmul_(M m, neg_beta)``: no negation kernel per factor) and the derived
    ``c_H = scale·a_H``, ``c_MM = scale·a_MM``, ``root_c_H = √c_H``."""

    a_H: Tensor
    a_MM: Tensor
    scale: Tensor
    alpha1: Tensor
    neg_beta: Tensor
    c_H: Tensor
    c_MM: Tensor
    root_c_H: Tensor

    @classmethod
    def from_row(cls, row: Tensor) -> StepScalars:
        """Views into a row ``[len(COLUMNS)]`` of :func:`step_scalars`' table (no kernels)."""
        return cls(**dict(zip(COLUMNS, row.unbind(0))))


def step_scalars(
    traces: Tensor, update: Tensor, *, grad_unscaling: float, damping: float, kfac_like: bool,
    scale: float, alpha1: float, beta: float,
) -> Tensor:
    """Scalars of the K and C steps of ``B`` blocks at once: ``[2, B, len(COLUMNS)]``.

    Args:
        traces: ``[B, 4]`` average traces ``tr(H_K)/d_K, tr(H_C)/d_C, tr(KᵀK)/d_K,
            tr(CᵀC)/d_C`` per block (singd's ``H.average_trace()`` and
            ``M.from_inner().average_trace()``).
        update: ``[B]`` bool: blocks to update; the others get ``scale = 0, alpha1 = 1,
            beta = 0`` (and zero ``a_H, a_MM``), which leaves M and m unchanged.
        grad_unscaling, damping, kfac_like, scale, alpha1, beta: as in singd 0.0.5.

    Row 0 holds K's scalars (``a_H = grad_unscaling·tr(H_C)/d_C`` or 1 if ``kfac_like``,
    ``a_MM = damping·tr(CᵀC)/d_C`` or ``damping``), row 1 C's (``a_H =
    grad_unscaling·tr(H_K)/d_K`` or ``grad_unscaling``, ...). A dozen vector kernels for all blocks; no host data is copied.
    """
    on = update.to(traces.dtype)
    tr = torch.where(update.unsqueeze(1), traces, 0.0)  # a skipped block's traces may be inf/NaN
    if kfac_like:
        a_H = torch.stack([on, on * grad_unscaling])
        a_MM = torch.stack([on, on]) * damping
    else:
        a_H = torch.stack([tr[:, 1], tr[:, 0]]) * grad_unscaling
        a_MM = torch.stack([tr[:, 3], tr[:, 2]]) * damping
    s = (on * scale).expand(2, -1)
    c_H = a_H * s
    a1 = torch.where(update, on * alpha1, 1.0).expand(2, -1)
    columns = [a_H, a_MM, s, a1, (on * -beta).expand(2, -1), c_H, a_MM * s, c_H.sqrt()]
    return torch.stack(columns, dim=-1)


def riemannian_step_(
    M: StructuredMatrix, H: StructuredMatrix | SymmetricSum, m_old: StructuredMatrix | None,
    scalars: StepScalars, *, normalize: bool, workspace: Workspace | None = None,
) -> StructuredMatrix:
    """``m = scale·(a_H·H + a_MM·MᵀM − I) + alpha1·m_old``; ``M ← M − β·M m``. Returns m.

    ``scalars`` are 0-d tensors of M's dtype on its device. With ``normalize``, β is
    divided by ``max(1, max|m|)``. ``H`` must be finite. Dense M: in place in
    ``m_old``'s buffer; on accelerators ``MᵀM`` and ``M m`` are one GEMM each (into one
    ``d × d`` temporary), on a CPU symmetric block products and a row-blocked ``M m``
    with Python scalars (reading a CPU tensor costs no sync), so no ``d × d`` scratch.
    Block-diagonal M: batched over blocks. Other structures: singd's structured
    arithmetic on their tensors. Returns the new momentum (``m_old`` itself where it was
    given and M is dense or block-diagonal).
    """
    if isinstance(M, DenseMatrix):
        return _dense_step_(M, H, m_old, scalars, normalize, workspace)
    if isinstance(M, BlockDiagonalMatrixTemplate) and type(H) is type(M):
        return _block_step_(M, H, m_old, scalars, normalize)
    # singd's order: m = ((0 + a_H·H) + a_MM·MᵀM − I)·scale + alpha1·m_old
    dtype = scalars.scale.dtype
    new_m = M.zeros(M.shape[0], dtype=dtype, device=scalars.scale.device)
    inner = M.from_inner()
    for (_, t), (_, h), (_, mm) in zip(new_m.named_tensors(), H.named_tensors(), inner.named_tensors()):
        t.addcmul_(h.to(dtype), scalars.a_H).addcmul_(mm, scalars.a_MM)
    new_m.diag_add_(-1.0)  # may rebuild the matrix's tensors: iterate them afterwards
    old_tensors = [t for _, t in m_old.named_tensors()] if m_old is not None else None
    for i, (_, t) in enumerate(new_m.named_tensors()):
        t.mul_(scalars.scale)
        if old_tensors is not None:
            t.addcmul_(old_tensors[i], scalars.alpha1)
    neg_beta = scalars.neg_beta / infinity_norm(new_m).clamp_min(1.0) if normalize else scalars.neg_beta
    product = M @ new_m
    for (_, t), (_, p) in zip(M.named_tensors(), product.named_tensors()):
        t.addcmul_(p, neg_beta)
    return new_m


class FactorPair(NamedTuple):
    """One block's pre-conditioner factors ``K [d_K, d_K]``, ``C [d_C, d_C]``, their
    statistics ``H_K``, ``H_C`` and Riemannian momenta ``m_K``, ``m_C`` (None without)."""

    K: StructuredMatrix
    C: StructuredMatrix
    H_K: StructuredMatrix | SymmetricSum
    H_C: StructuredMatrix | SymmetricSum
    m_K: StructuredMatrix | None
    m_C: StructuredMatrix | None


def update_pairs_(
    pairs: list[FactorPair], ok: Tensor, dims: Tensor, *, grad_unscaling: float, damping: float,
    kfac_like: bool, scale: float, alpha1: float, beta: float, normalize: bool, workspace: Workspace | None = None,
) -> tuple[list[tuple[StructuredMatrix | None, StructuredMatrix | None]], Tensor]:
    """SINGD's update (singd 0.0.5) of the K and C of ``B`` blocks of one parameter group.

    Args:
        pairs: the blocks; their K, C (and momenta) are updated in place. H_K, H_C are
            consumed: a skipped block's statistics are zeroed.
        ok: 0-d bool, the step's gradient flag; false skips every block.
        dims: ``[B, 4]`` ``(d_K, d_C, d_K, d_C)`` per block, in the traces' dtype.
        grad_unscaling, damping, kfac_like, scale, alpha1, beta: as in :func:`step_scalars`.
        normalize: ``normalize_lr_cov`` (β divided by ``max(1, max|m|)``).
        workspace: scratch for the dense products, reset before each factor.

    Returns the new momenta ``(m_K, m_C)`` per block (None where ``alpha1 == 0``) and
    ``finite`` ``[B]`` bool: a block whose statistics or traces are not finite is skipped
    on the device (K, C and momenta keep their bits). No host sync: all traces and
    step sizes are formed together by a few vector kernels.
    """
    raw = []
    for pair in pairs:
        tr_HK, tr_HC = trace(pair.H_K), trace(pair.H_C)
        sums = untraced_sums(pair.H_K) + untraced_sums(pair.H_C)
        check = torch.stack(sums).sum() if sums else tr_HK
        raw += [tr_HK, tr_HC, trace_inner(pair.K), trace_inner(pair.C), check]
    raw = torch.stack(raw).view(len(pairs), 5)
    finite = torch.isfinite(raw).all(1)
    update = finite & ok
    table = step_scalars(raw[:, :4] / dims, update, grad_unscaling=grad_unscaling, damping=damping,
                         kfac_like=kfac_like, scale=scale, alpha1=alpha1, beta=beta)
    skip = ~update
    tables: dict[torch.dtype, Tensor] = {table.dtype: table}
    momenta = []
    for i, pair in enumerate(pairs):
        for H in (pair.H_K, pair.H_C):  # a skipped update must not meet inf/NaN (0·inf is NaN)
            for t in statistics_tensors(H):
                t.masked_fill_(skip[i], 0.0)
        new = []
        for side, (M, H, m_old) in enumerate(((pair.K, pair.H_K, pair.m_K), (pair.C, pair.H_C, pair.m_C))):
            dtype = matrix_dtype(M)
            if dtype not in tables:
                tables[dtype] = table.to(dtype)
            if workspace is not None:
                workspace.reset()
            m = riemannian_step_(M, H, m_old if alpha1 != 0.0 else None, StepScalars.from_row(tables[dtype][side, i]),
                                 normalize=normalize, workspace=workspace)
            new.append(m if alpha1 != 0.0 else None)
        momenta.append((new[0], new[1]))
    return momenta, finite


def _dense_step_(M, H, m_old, scalars: StepScalars, normalize: bool, workspace):
    mat = M.to_dense()
    buf = m_old.to_dense().mul_(scalars.alpha1) if m_old is not None else torch.zeros_like(mat)
    if launch_bound(mat.device):  # one GEMM into a d × d product (reused for M m below)
        inner = mat.T @ mat
        buf.addcmul_(inner, scalars.c_MM)
        _add_statistics_(buf, H, scalars.c_H, scalars.root_c_H)
    else:  # a CPU reads its scalars for free: products straight into buf, no d × d scratch
        symmetric_addmm_(buf, mat.T, mat, alpha=float(scalars.c_MM))
        if isinstance(H, SymmetricSum):
            H.add_to_(buf, alpha=float(scalars.c_H))
        else:
            buf.add_(H.to_dense().to(buf.dtype), alpha=float(scalars.c_H))
    buf.diagonal().sub_(scalars.scale)
    new_m = m_old if m_old is not None else DenseMatrix(buf)
    neg_beta = scalars.neg_beta
    if normalize:
        neg_beta = neg_beta / torch.linalg.vector_norm(buf, ord=float("inf")).clamp_min(1.0)
    if launch_bound(mat.device):  # one GEMM, into the d × d product that is dead by now
        mat.addcmul_(torch.mm(mat, buf, out=inner), neg_beta)
    else:  # blocks of rows: a small reused temporary
        right_multiply_update_(mat, buf, neg_beta, workspace=workspace)
    return new_m


def _add_statistics_(target: Tensor, H: SymmetricSum | StructuredMatrix, coefficient: Tensor, root: Tensor) -> None:
    """``target += coefficient · H`` (``root = √coefficient``, 0-d tensors)."""
    if not isinstance(H, SymmetricSum):
        target.addcmul_(H.to_dense().to(target.dtype), coefficient)
        return
    for S in H.factors:  # c·S Sᵀ = (√c S)(√c S)ᵀ: a thin scaled copy, no d × d temporary
        S = S.to(target.dtype) * root
        symmetric_addmm_(target, S, S.T, alpha=1.0)
    if H.dense is not None:
        target.addcmul_(H.dense.to(target.dtype), coefficient)


def _block_step_(M, H, m_old, scalars: StepScalars, normalize: bool):
    """Batched over blocks, in place in m_old. ``MᵀM`` is singd 0.0.5's block-diagonal
    ``from_inner()``, which is ``M Mᵀ`` per block (reproduced for parity with stock)."""
    dtype = scalars.scale.dtype
    new_m = m_old if m_old is not None else M.zeros(M.shape[0], dtype=dtype, device=scalars.scale.device)
    Ms, Hs, ms = dict(M.named_tensors()), dict(H.named_tensors()), dict(new_m.named_tensors())
    for key in ("_blocks", "_last"):
        mat, buf = Ms[key], ms[key]
        if not mat.numel():
            continue
        batched = mat.unsqueeze(0) if mat.dim() == 2 else mat
        buf_b = buf.unsqueeze(0) if buf.dim() == 2 else buf
        if m_old is not None:
            buf_b.mul_(scalars.alpha1)
        buf_b.addcmul_(Hs[key].to(dtype).view_as(buf_b), scalars.c_H)
        buf_b.addcmul_(torch.bmm(batched, batched.transpose(1, 2)), scalars.c_MM)
        buf_b.diagonal(dim1=1, dim2=2).sub_(scalars.scale)
    neg_beta = scalars.neg_beta / infinity_norm(new_m).clamp_min(1.0) if normalize else scalars.neg_beta
    for key in ("_blocks", "_last"):
        mat, buf = Ms[key], ms[key]
        if mat.numel():
            mat.addcmul_(mat @ buf, neg_beta)
    return new_m
