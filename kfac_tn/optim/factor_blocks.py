"""Block-diagonal Kronecker factors: a large factor kept as its diagonal blocks only.

A factor of dimension ``d`` above a bound ``max_dim`` is split into ``n = ⌈d / max_dim⌉``
diagonal blocks of ``B = ⌈d / n⌉`` (Distributed Shampoo's ``max_preconditioner_dim``); the
rest of the factor is taken as zero. The last block is padded to ``B`` with the identity
(``n·B − d < n`` entries), so the blocks stack as ``[groups, n, B, B]``: averages, damping,
inverses and products stay batched, and the padding never meets a gradient (its columns
are zero and are cut off again). Costs per step for a ``[d_G, d_A]`` gradient drop from
``d_G d_A (d_G + d_A)`` to ``d_G d_A (B_G + B_A)`` multiply-adds, inverses from ``d³`` to
``d B²``, and the factors' statistics from ``d²`` to ``d B`` per sample.

A factor at or below the bound stays dense, ``[groups, d, d]``: ``n = 1``, no padding.
"""

from __future__ import annotations

from math import ceil

import torch
from torch import Tensor


def block_layout(dim: int, max_dim: int | None) -> tuple[int, int]:
    """``(n, B)``: the number and size of the diagonal blocks of a ``dim``-dimensional factor
    (``(1, dim)``: dense, if ``max_dim`` is None or ``dim ≤ max_dim``)."""
    if max_dim is None or dim <= max_dim:
        return 1, dim
    n = ceil(dim / max_dim)
    return n, ceil(dim / n)


def is_blocked(factor: Tensor) -> bool:
    """Whether ``factor`` is stored as blocks ``[groups, n, B, B]`` (else ``[groups, d, d]``)."""
    return factor.dim() == 4


def padded_blocks(blocks: Tensor, last: Tensor, n: int) -> Tensor:
    """``[groups, n, B, B]`` from singd's block layout (``blocks [groups, k, B, B]`` and a
    trailing ``last [groups, t, t]``, ``t < B``), the last block padded with the identity."""
    groups, k, B, _ = blocks.shape
    t = last.shape[-1]
    if k + (t > 0) != n:
        raise ValueError(f"{k} full blocks and a last block of {t} do not make {n} blocks of {B}.")
    if t == 0:
        return blocks
    tail = torch.zeros(groups, 1, B, B, dtype=blocks.dtype, device=blocks.device)
    tail[:, 0, :t, :t] = last
    tail[:, 0, range(t, B), range(t, B)] = 1
    return torch.cat([blocks, tail], dim=1)


def diagonal_blocks(factor: Tensor, n: int, B: int) -> Tensor:
    """The ``n`` diagonal ``B × B`` blocks of a dense ``[groups, d, d]`` factor, padded."""
    groups, d, _ = factor.shape
    if n == 1 and B == d:
        return factor
    padded = torch.zeros(groups, n * B, n * B, dtype=factor.dtype, device=factor.device)
    padded[:, :d, :d] = factor
    padded[:, range(d, n * B), range(d, n * B)] = 1
    blocks = padded.unflatten(1, (n, B)).unflatten(3, (n, B))  # [groups, n, B, n, B]
    return blocks.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()


def trace_mean(factor: Tensor, dim: int) -> Tensor:
    """``tr(F) / d`` per group ``[groups, 1]`` of the unpadded factor (dense or blocked)."""
    diagonal = factor.diagonal(dim1=-2, dim2=-1)
    if not is_blocked(factor):
        return diagonal.mean(-1, keepdim=True)
    padding = factor.shape[1] * factor.shape[2] - dim  # identity entries, one each
    return (diagonal.sum((-2, -1)) - padding).unsqueeze(-1) / dim


def multiply_right(V: Tensor, M: Tensor, keep: int | None = None) -> Tensor:
    """``V · M`` for ``M`` dense ``[d, d]`` or blocks ``[n, B, B]``, and ``V [r, k]`` with
    ``k ≤ n·B`` columns (the rest taken as zero); the first ``keep`` columns (default ``k``:
    ``n·B`` keeps the padded coordinates, e.g. an eigenbasis' of a padded block)."""
    if M.dim() == 2:
        return V @ M
    n, B, _ = M.shape
    r, k = V.shape
    padded = V if k == n * B else torch.cat([V, V.new_zeros(r, n * B - k)], dim=1)
    out = torch.bmm(padded.view(r, n, B).transpose(0, 1), M)  # [n, r, B]
    return out.transpose(0, 1).reshape(r, n * B)[:, : k if keep is None else keep]


def multiply_left(M: Tensor, V: Tensor, keep: int | None = None) -> Tensor:
    """``M · V`` for ``M`` dense ``[d, d]`` or blocks ``[n, B, B]``, and ``V [k, c]`` with
    ``k ≤ n·B`` rows (the rest taken as zero); the first ``keep`` rows (default ``k``)."""
    if M.dim() == 2:
        return M @ V
    n, B, _ = M.shape
    k, c = V.shape
    padded = V if k == n * B else torch.cat([V, V.new_zeros(n * B - k, c)], dim=0)
    return torch.bmm(M, padded.view(n, B, c)).reshape(n * B, c)[: k if keep is None else keep]
