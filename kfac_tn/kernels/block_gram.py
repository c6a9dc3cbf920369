"""Diagonal blocks of a Gram matrix ``X Xᵀ``, without the rest of it.

Evaluates the diagonal blocks of :func:`kfac_tn.tensor_network.expressions.kfc` (rows
from the unfold network, in batch chunks) or of the KFAC-reduce factor.

Block-diagonal pre-conditioner structures (singd's ``Block{B}DiagonalMatrix``) only read
the ``B × B`` diagonal blocks of a Kronecker factor. For feature-major rows ``X``
``[G, D, M]`` those are ``D // B`` GEMMs of ``B × M × B``, batched, plus one for the
trailing features: ``D·B·M`` multiply-adds instead of ``D²·M``. An optional constant
row of ones (the bias of a layer) is appended virtually, never materialized.

Blocks follow singd's layout: ``d // B`` full blocks and a last block of ``d mod B``
(possibly empty), with ``d = D (+1 for the ones row)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def block_gram(X: Tensor, block: int, ones_row: bool = False) -> tuple[Tensor, Tensor]:
    """Diagonal blocks of ``[X; 1ᵀ] [X; 1ᵀ]ᵀ`` per group (the ones row only if asked).

    Args:
        X: ``[G, D, M]`` rows of features, any strides.
        block: block size ``B``.
        ones_row: append a virtual row of ``M`` ones as feature ``D``.

    Returns:
        ``(blocks, last)``: ``[G, d // B, B, B]`` and ``[G, d mod B, d mod B]``.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}.")
    if X.dim() != 3:
        raise ValueError(f"X must be [groups, features, samples], got shape {tuple(X.shape)}.")
    G, D, M = X.shape
    inside = D // block  # full blocks that do not reach the ones row
    blocks = X.new_empty(G, inside, block, block)
    if inside:
        for g in range(G):
            rows = X[g, : inside * block].unflatten(0, (inside, block))  # [n, B, M]
            torch.bmm(rows, rows.transpose(1, 2), out=blocks[g])
    tail = X[:, inside * block :]  # [G, t, M], t < B
    last = torch.bmm(tail, tail.transpose(1, 2))
    if ones_row:
        t = tail.shape[1]
        core, last = last, X.new_empty(G, t + 1, t + 1)
        last[:, :t, :t] = core
        sums = tail.sum(-1)
        last[:, :t, t] = sums
        last[:, t, :t] = sums
        last[:, t, t] = M
    if last.shape[1] == block:
        return torch.cat([blocks, last.unsqueeze(1)], dim=1), X.new_empty(G, 0, 0)
    return blocks, last
