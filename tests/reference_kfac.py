"""A slow, literal KFAC: the oracle for tests that would otherwise compare KFAC with itself.

Factors come from :func:`kfac_tn.kfac_factors` (its own hooks, curvlinops' conventions,
tested against curvlinops), everything else is restated here from the documented rule:
running averages, damped Kronecker solves per block by ``torch.linalg.solve``, the
layout of a layer's gradient as blocks (README conventions), KL clipping (kfac-pytorch's
``kl_clip``), SGD's weight decay and momentum. Parameters of unsupported layers take SGD
steps.
"""

from __future__ import annotations

import torch
from helpers import block_mask
from torch import Tensor, nn

import kfac_tn

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _blocks(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> list[Tensor]:
    """Per group ``[d_out, d_in(+1)]``: rows output channels, columns ``(input channel,
    kernel taps)``, bias last; transposed convolutions per group ``w[g].transpose(0, 1)``."""
    groups = getattr(layer, "groups", 1)
    if isinstance(layer, _TRANSPOSED):
        mats = [w.transpose(0, 1).flatten(1) for w in weight.chunk(groups, 0)]
    else:
        mats = [w.flatten(1) for w in weight.chunk(groups, 0)]
    if bias is not None:
        mats = [torch.cat([m, b.unsqueeze(1)], 1) for m, b in zip(mats, bias.chunk(groups))]
    return mats


def _unblock(layer: nn.Module, mats: list[Tensor]) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`_blocks` (weight shaped like ``layer.weight``)."""
    bias = None
    if layer.bias is not None:
        bias = torch.cat([m[:, -1] for m in mats])
        mats = [m[:, :-1] for m in mats]
    shape = layer.weight.shape
    if isinstance(layer, _TRANSPOSED):
        per_group = (shape[0] // len(mats), shape[1], *shape[2:])
        weight = torch.cat([m.reshape(per_group[1], per_group[0], *shape[2:]).transpose(0, 1) for m in mats])
    else:
        weight = torch.cat([m.reshape(shape[0] // len(mats), *shape[1:]) for m in mats])
    return weight, bias


class ReferenceKFAC:
    """KFAC on ``model`` with the constructor arguments of :class:`kfac_tn.KFAC` it names
    (and its defaults, but for ``lr``, which is required)."""

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 damping: float = 1e-2, ema_decay: float = 0.95, factor_update_freq: int = 1,
                 inverse_update_freq: int = 10, kfac_approx: str = "reduce", kl_clip: float | None = 1e-2,
                 max_factor_dim: int | None = 256) -> None:
        self.model, self.lr, self.momentum, self.weight_decay = model, lr, momentum, weight_decay
        self.damping, self.ema_decay, self.approx = damping, ema_decay, kfac_approx
        self.factor_update_freq, self.inverse_update_freq = factor_update_freq, inverse_update_freq
        self.kl_clip, self.max_factor_dim = kl_clip, max_factor_dim
        self.averages: dict[str, tuple[Tensor, Tensor]] = {}
        self.frozen: dict[str, tuple[Tensor, Tensor]] = {}  # damped factors of the last inversion
        self.buffers: dict[int, Tensor] = {}
        self.steps = 0

    def _masked(self, F: Tensor) -> Tensor:
        """``F`` with the entries outside its diagonal blocks (``max_factor_dim``) set to 0."""
        return torch.where(block_mask(F.shape[-1], self.max_factor_dim), F, 0.0)

    def step(self, X: Tensor, y: Tensor) -> None:
        """One step on the batch ``(X, y)`` with the mean cross-entropy loss."""
        model = self.model
        if self.steps % self.factor_update_freq == 0:
            new = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), X, y, approx=self.approx, fisher="empirical")
            for name, (A, G) in new.items():
                old = self.averages.get(name)
                eps = self.ema_decay
                self.averages[name] = (A, G) if old is None else (eps * old[0] + (1 - eps) * A,
                                                                  eps * old[1] + (1 - eps) * G)
        if self.steps % self.inverse_update_freq == 0:
            root = self.damping**0.5
            for name, (A, G) in self.averages.items():
                A, G = self._masked(A), self._masked(G)
                self.frozen[name] = (A + root * torch.eye(A.shape[-1], dtype=A.dtype),
                                     G + root * torch.eye(G.shape[-1], dtype=G.dtype))
        model.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        directions = {}
        for name, (A, G) in self.frozen.items():
            layer = model.get_submodule(name)
            V = _blocks(layer, layer.weight.grad, None if layer.bias is None else layer.bias.grad)
            nat = [torch.linalg.solve(G[b], torch.linalg.solve(A[b], V[b].T).T) for b in range(len(V))]
            weight, bias = _unblock(layer, nat)
            directions[id(layer.weight)] = weight
            if bias is not None:
                directions[id(layer.bias)] = bias
        if self.kl_clip is not None and directions:  # predicted KL change lr² Σ ⟨d, g⟩ at most κ
            grads = {id(p): p.grad for p in model.parameters()}
            kl = sum(self.lr**2 * (d * grads[i]).sum() for i, d in directions.items())
            nu = min(1.0, (self.kl_clip / abs(kl.item())) ** 0.5)
            directions = {i: nu * d for i, d in directions.items()}
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is None:
                    continue
                d = directions.get(id(p), p.grad) + self.weight_decay * p
                buf = self.buffers[id(p)] = self.momentum * self.buffers.get(id(p), torch.zeros_like(p)) + d
                p.sub_(self.lr * buf)
        self.steps += 1
