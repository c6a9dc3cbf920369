"""Curvature statistics of dense factors, kept factored until the preconditioner update.

Between the backward pass and the update, stock SINGD holds ``H = Kᵀ A K`` as a dense
``d × d`` matrix for every layer at once. :class:`SymmetricSum` keeps ``H = Σ S Sᵀ``
as its thin factors ``S`` (``d × R``, R = batch size for KFAC-reduce) where that is
smaller, and adds them into the update's buffer one layer at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfac_tn.optim.structured_products import symmetric_addmm_


class SymmetricSum:
    """``H = Σ_i S_i S_iᵀ + D`` with thin factors ``S_i`` ``[d, R_i]`` and a dense part ``D``."""

    def __init__(self, factor: Tensor | None = None, dense: Tensor | None = None) -> None:
        self.factors: list[Tensor] = [] if factor is None else [factor]
        self.dense = dense

    @property
    def dim(self) -> int:
        return self.dense.shape[0] if self.dense is not None else self.factors[0].shape[0]

    def add_(self, other: SymmetricSum) -> SymmetricSum:
        self.factors.extend(other.factors)
        if other.dense is not None:
            self.dense = other.dense.clone() if self.dense is None else self.dense.add_(other.dense)
        return self

    def average_trace(self) -> Tensor:
        total = sum(S.square().sum() for S in self.factors)
        if self.dense is not None:
            total = total + self.dense.diagonal().sum()
        return total / self.dim

    def add_to_(self, target: Tensor, alpha: float) -> Tensor:
        """``target += alpha · H`` in place (``target`` symmetric)."""
        for S in self.factors:
            S = S.to(target.dtype)  # statistics kept in float32, K/C may be stored lower
            symmetric_addmm_(target, S, S.T, alpha=alpha)
        if self.dense is not None:
            target.add_(self.dense.to(target.dtype), alpha=alpha)
        return target

    def to_dense(self) -> Tensor:
        out = torch.zeros(self.dim, self.dim, dtype=self._dtype, device=self._device)
        return self.add_to_(out, 1.0)

    @property
    def _dtype(self) -> torch.dtype:
        return (self.dense if self.dense is not None else self.factors[0]).dtype

    @property
    def _device(self) -> torch.device:
        return (self.dense if self.dense is not None else self.factors[0]).device

    def tensors(self) -> list[Tensor]:
        """The thin factors and the dense part, if any."""
        return self.factors + ([self.dense] if self.dense is not None else [])
