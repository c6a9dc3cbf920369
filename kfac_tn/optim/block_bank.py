"""Block-diagonal SINGD pre-conditioners of many layers in one ``[N, b, b]`` stack.

singd's ``Block{b}DiagonalMatrix`` of dimension ``d`` has ``d // b`` blocks of ``b × b``
and a last block of ``d mod b``. A :class:`BlockBank` stores the blocks of every K and
C of one parameter group as *slots* of one ``[N, b, b]`` tensor; a last block is the
top-left ``r × r`` corner of a slot whose remaining rows and columns are zero (and stay
zero: the update never couples them). Momenta, pending statistics and the cached
natural-gradient projectors ``M M`` share the layout. The Riemannian update of every
block of every layer is then ~35 batched kernels, whatever the number of layers, with
the per-factor traces from one segmented sum and the non-finite guard as device masks
(no host sync).

singd 0.0.5 treats the blocks as symmetric (``from_inner()`` is ``M Mᵀ`` per block, see
``structured_products.rmatmat_transposes``); the bank reproduces this, for parity with
stock singd. Each K (and C) of a layer's channel group is one *segment* of slots;
``partner[s]`` is the other factor of the same group.
"""

from __future__ import annotations

import torch
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from torch import Tensor

from kfac_tn.optim.segments import Segments


class BlockBank:
    """``K, C`` (momenta, statistics, projectors) of layers with one block-diagonal structure.

    Args:
        layers: ``name -> (G, d_K, d_C)``: number of channel groups and factor dimensions.
        structure: singd's block-diagonal class (its ``BLOCK_DIM`` is the block size).
        dtype, device: of the stored ``K, C`` and momenta.
        momenta: whether to keep momenta (``alpha1 != 0``).
    """

    def __init__(self, layers: dict[str, tuple[int, int, int]], structure: type[BlockDiagonalMatrixTemplate],
                 dtype: torch.dtype, device: torch.device, momenta: bool) -> None:
        b = self.block = structure.BLOCK_DIM
        self.structure = structure
        #: name -> [(first slot, full blocks, last size) of K_g for each g] + [... of C_g]
        self.layout: dict[str, list[tuple[int, int, int]]] = {}
        self.segments = Segments(device)
        slot_segment, dims, partner, valid = [], [], [], []
        for name, (G, d_K, d_C) in layers.items():
            first = self.segments.add(name, 2 * G)
            entries = []
            for d in [d_K] * G + [d_C] * G:
                n, r = divmod(d, b)
                entries.append((len(slot_segment), n, r))
                slot_segment += [len(dims)] * (n + (r > 0))
                valid += [b] * n + ([r] if r else [])
                dims.append(d)
            partner += [first + G + g for g in range(G)] + [first + g for g in range(G)]
            self.layout[name] = entries
        N = len(slot_segment)
        self.dtype, self.device = dtype, device
        self.stat_dtype = torch.promote_types(dtype, torch.float32)
        #: 1 on the real diagonal entries of each slot, 0 on a last block's padding
        self.valid = (torch.arange(b).unsqueeze(0) < torch.tensor(valid).unsqueeze(1)).to(dtype).to(device)
        self.values = torch.diag_embed(self.valid)
        self.momenta = torch.zeros(N, b, b, dtype=dtype, device=device) if momenta else None
        #: pending statistics H = M A Mᵀ per block, summed over backward passes
        self.stats = torch.zeros(N, b, b, dtype=self.stat_dtype, device=device)
        self._projectors: Tensor | None = None
        self._matrices: dict[tuple[str, str], tuple[list, list]] = {}
        self.slot_segment = torch.tensor(slot_segment, device=device)
        self.dims = torch.tensor(dims, dtype=dtype, device=device)
        self.partner = torch.tensor(partner, device=device)

    # ------------------------------------------------------------- views
    def _matrix(self, buffer: Tensor, entry: tuple[int, int, int]) -> BlockDiagonalMatrixTemplate:
        first, n, r = entry
        return self.structure(buffer[first : first + n], buffer[first + n, :r, :r] if r else buffer[first, :0, :0])

    def matrices(self, buffer: Tensor, name: str) -> tuple[list, list]:
        """singd block-diagonal matrices (K per group, C per group) viewing ``buffer`` (the
        same objects at every call for the persistent ``values``, ``momenta``, ``stats``)."""
        own = next((key for key in ("values", "momenta", "stats") if buffer is getattr(self, key)), None)
        out = self._matrices.get((own, name)) if own is not None else None
        if out is None:
            entries = self.layout[name]
            G = len(entries) // 2
            out = ([self._matrix(buffer, e) for e in entries[:G]], [self._matrix(buffer, e) for e in entries[G:]])
            if own is not None:
                self._matrices[(own, name)] = out
        return out

    def projectors(self, name: str) -> tuple[list, list]:
        """``M M`` per block (singd's ``M @ M.rmatmat(·)``) of the layer's K and C, computed
        for all slots at once after each update and kept until the next one."""
        if self._projectors is None:
            self._projectors = torch.bmm(self.values, self.values)
        return self.matrices(self._projectors, name)

    def loaded_(self) -> None:
        """Refresh derived buffers after ``values`` were overwritten (a loaded state)."""
        self._projectors = None

    # -------------------------------------------------------- statistics
    def add_statistics(self, name: str, side: int, g: int, blocks: Tensor, last: Tensor, scale: float) -> None:
        """Accumulate ``scale · M A Mᵀ`` per block of factor ``side`` (0: K, 1: C) of group
        ``g`` from A's diagonal blocks ``[n, b, b]`` and ``last`` ``[r, r]``."""
        entries = self.layout[name]
        first, n, r = entries[side * (len(entries) // 2) + g]
        stats, M = self.stats[first : first + n], self.values[first : first + n].to(self.stat_dtype)
        if n:
            stats.baddbmm_(torch.bmm(M, blocks), M.transpose(1, 2), alpha=scale)
        if r:
            M_last = self.values[first + n, :r, :r].to(self.stat_dtype)
            self.stats[first + n, :r, :r].addmm_(M_last @ last, M_last.T, alpha=scale)

    def clear_statistics(self) -> None:
        self.stats.zero_()

    # ------------------------------------------------------------ update
    def update_(
        self, *, present: Tensor, ok: Tensor, grad_unscaling: float, damping: float,
        alpha1: float, scale: float, beta: float, kfac_like: bool, normalize: bool,
    ) -> Tensor:
        """One Riemannian SINGD step of every block whose segment is ``present``.

        Per block ``M`` (singd 0.0.5's rule with its block-symmetric ``from_inner``):
        ``m = scale·(a_H·H + a_MM·M Mᵀ − I) + alpha1·m``, ``M ← M − β·M m``, with
        ``a_H = grad_unscaling·tr(H_other)/d_other`` (kfac_like: 1 for K,
        ``grad_unscaling`` for C) and ``a_MM = damping·tr(M_other M_otherᵀ)/d_other``
        (kfac_like: ``damping``); β divided by ``max(1, max|m|)`` over the factor if
        ``normalize``. Segments that are not present, have non-finite statistics or
        traces, or where ``ok`` is false keep their bits. Returns the bool
        ``[segments.total]`` mask of segments skipped for non-finite statistics alone.
        """
        M, seg, S = self.values, self.slot_segment, self.segments.total
        H = self.stats.to(self.dtype)
        per_slot = torch.stack([
            H.diagonal(dim1=1, dim2=2).sum(1), H.sum((1, 2)), M.square().sum((1, 2)),
        ])  # [3, N]: tr(H), Σ H (finiteness of off-diagonal entries), tr(M Mᵀ)
        per_segment = torch.zeros(3, S, dtype=self.dtype, device=self.device).index_add_(1, seg, per_slot)
        finite = torch.isfinite(per_segment[:2]).all(0)
        finite = finite & finite.index_select(0, self.partner)  # a block's K and C together
        update = present & finite & ok
        traces = torch.where(update, per_segment[0::2], 0.0) / self.dims  # [2, S]: tr(H), tr(M Mᵀ)
        other = traces.index_select(1, self.partner)
        on = update.to(self.dtype)
        if kfac_like:
            is_K = torch.arange(S, device=self.device) < self.partner
            a_H = torch.where(is_K, on, on * grad_unscaling)
            a_MM = on * damping
        else:
            a_H, a_MM = other[0] * grad_unscaling, other[1] * damping
        s = on * scale
        coefficients = torch.stack([a_H * s, a_MM * s, s, torch.where(update, on * alpha1, 1.0), on * -beta])
        c_H, c_MM, s_e, a1_e, neg_beta_e = coefficients.index_select(1, seg).view(5, -1, 1, 1).unbind(0)
        keep = ~update.index_select(0, seg).view(-1, 1, 1)
        m = torch.where(keep, 0.0, H).mul_(c_H)  # a skipped block's H may be inf/NaN
        m.addcmul_(torch.bmm(M, M.transpose(1, 2)), c_MM)
        m.diagonal(dim1=1, dim2=2).sub_(self.valid * s_e.view(-1, 1))
        if self.momenta is not None:
            m.addcmul_(self.momenta, a1_e)
            self.momenta.copy_(m)
        if normalize:
            largest = torch.zeros(S, dtype=self.dtype, device=self.device).index_reduce_(
                0, seg, torch.linalg.vector_norm(m, ord=float("inf"), dim=(1, 2)), "amax", include_self=False)
            neg_beta_e = neg_beta_e / largest.clamp_min(1.0).index_select(0, seg).view(-1, 1, 1)
        M.addcmul_(torch.bmm(M, m), neg_beta_e)
        self._projectors = None
        return present & ~finite & ok
