"""Diagonal SINGD pre-conditioners of many layers in flat buffers, updated by a few kernels.

For diagonal ``K`` and ``C`` SINGD's update is elementwise within each block and
couples blocks only through four scalars per block (the average traces of
``H_K, H_C, KᵀK, CᵀC``). A :class:`DiagonalBank` keeps the diagonals of every layer of
one parameter group in one flat buffer (and momenta, pending statistics and the
squares ``K², C²`` in buffers of the same layout), so a preconditioner update of all
layers is ~20 kernels, whatever the number of layers, and needs no host sync: the
per-block traces come from one segmented reduction, the non-finite guard is a device
mask applied by ``torch.where``.

Layout: per layer its ``G`` blocks' K diagonals ``[G, d_K]``, then their C diagonals
``[G, d_C]``. Every block's K and its C are one *segment* each; ``partner[s]`` is the
other factor of segment ``s``'s block. singd-facing ``DiagonalMatrix`` objects hold
views into the buffers (:meth:`matrices`).
"""

from __future__ import annotations

import torch
from singd.structures.diagonal import DiagonalMatrix
from torch import Tensor

from kfac_tn.optim.segments import Segments


class DiagonalBank:
    """``K, C`` (and momenta, statistics) of layers with diagonal structures.

    Args:
        layers: ``name -> (G, d_K, d_C)``: number of blocks and the dimensions of each.
        dtype, device: of the stored ``K, C`` and momenta.
        momenta: whether to keep momenta ``m_K, m_C`` (``alpha1 != 0``).
    """

    def __init__(self, layers: dict[str, tuple[int, int, int]], dtype: torch.dtype,
                 device: torch.device, momenta: bool) -> None:
        self.layout: dict[str, tuple[int, int, int, int, int]] = {}
        self.segments = Segments(device)
        lengths, partner, is_K = [], [], []
        offset = 0
        for name, (G, d_K, d_C) in layers.items():
            self.layout[name] = (offset, offset + G * d_K, G, d_K, d_C)
            first = self.segments.add(name, 2 * G)
            lengths += [d_K] * G + [d_C] * G
            partner += [first + G + b for b in range(G)] + [first + b for b in range(G)]
            is_K += [True] * G + [False] * G
            offset += G * (d_K + d_C)
        self.dtype, self.device = dtype, device
        self.stat_dtype = torch.promote_types(dtype, torch.float32)
        self.values = torch.ones(offset, dtype=dtype, device=device)
        self.momenta = torch.zeros(offset, dtype=dtype, device=device) if momenta else None
        #: pending statistics: H = K² ⊙ diag(A) (resp. C² ⊙ diag(G)), summed over backward passes
        self.stats = torch.zeros(offset, dtype=self.stat_dtype, device=device)
        #: K², C² as of the last update (statistics and natural gradients use them)
        self.squares = torch.ones(offset, dtype=self.stat_dtype, device=device)
        self.lengths = torch.tensor(lengths, device=device)
        self.segment_ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), self.lengths)
        self.partner = torch.tensor(partner, device=device)
        self.is_K = torch.tensor(is_K, device=device)
        self._one = torch.ones((), dtype=dtype, device=device)
        self._views: dict[tuple[str, str, int], Tensor] = {}
        self._matrices: dict[tuple[str, str], tuple[list, list]] = {}

    # ------------------------------------------------------------- views
    def _own(self, buffer: Tensor) -> str | None:
        """The name of ``buffer`` if it is one of the bank's persistent buffers (whose views
        are cached: they are only ever updated in place)."""
        for key in ("values", "momenta", "stats", "squares"):
            if buffer is getattr(self, key):
                return key
        return None

    def K_view(self, buffer: Tensor, name: str) -> Tensor:
        """``[G, d_K]`` view of a layer's K part of ``buffer``."""
        return self._view(buffer, name, 0)

    def C_view(self, buffer: Tensor, name: str) -> Tensor:
        """``[G, d_C]`` view of a layer's C part of ``buffer``."""
        return self._view(buffer, name, 1)

    def _view(self, buffer: Tensor, name: str, side: int) -> Tensor:
        own = self._own(buffer)
        view = self._views.get((own, name, side)) if own is not None else None
        if view is None:
            k_start, c_start, G, d_K, d_C = self.layout[name]
            start, d = (k_start, d_K) if side == 0 else (c_start, d_C)
            view = buffer[start : start + G * d].view(G, d)
            if own is not None:
                self._views[(own, name, side)] = view
        return view

    def matrices(self, buffer: Tensor, name: str) -> tuple[list[DiagonalMatrix], list[DiagonalMatrix]]:
        """singd ``DiagonalMatrix`` objects (K blocks, C blocks) viewing ``buffer`` (the same
        objects at every call for the bank's own buffers)."""
        own = self._own(buffer)
        out = self._matrices.get((own, name)) if own is not None else None
        if out is None:
            out = ([DiagonalMatrix(k) for k in self.K_view(buffer, name)],
                   [DiagonalMatrix(c) for c in self.C_view(buffer, name)])
            if own is not None:
                self._matrices[(own, name)] = out
        return out

    def loaded_(self) -> None:
        """Refresh derived buffers after ``values`` were overwritten (a loaded state)."""
        self.squares.copy_(self.values.square())

    # -------------------------------------------------------- statistics
    def add_statistics(self, name: str, sum_A: Tensor, scale_A: float, sum_G: Tensor, scale_G: float) -> None:
        """Accumulate ``H_K = K² ⊙ diag(A)`` and ``H_C = C² ⊙ diag(G)`` of one backward pass.

        ``diag(A) = scale_A · sum_A`` on the weight entries ``[G, d_w]`` (a bias entry,
        if ``d_K = d_w + 1``, is 1) and ``diag(G) = scale_G · sum_G`` ``[G, d_C]``, as
        returned by ``input_factor_diagonal_sum`` / ``grad_output_factor_diagonal_sum``.
        """
        stats_K, squares_K = self.K_view(self.stats, name), self.K_view(self.squares, name)
        d_w = sum_A.shape[1]
        stats_K[:, :d_w].addcmul_(sum_A, squares_K[:, :d_w], value=scale_A)
        if d_w < stats_K.shape[1]:
            stats_K[:, d_w:].add_(squares_K[:, d_w:])
        self.C_view(self.stats, name).addcmul_(sum_G, self.C_view(self.squares, name), value=scale_G)

    def clear_statistics(self) -> None:
        self.stats.zero_()

    # ------------------------------------------------------------ update
    def update_(
        self, *, present: Tensor, ok: Tensor | None, grad_unscaling: float, damping: float,
        alpha1: float, scale: float, beta: float, kfac_like: bool, normalize: bool,
    ) -> Tensor:
        """One Riemannian SINGD step of every block whose segments are ``present``.

        Per block, with ``v`` its K (or C) diagonal and ``H`` the pending statistics:
        ``m = scale·(a_H·H + a_MM·v² − 1) + alpha1·m``, ``v ← v − β·v ⊙ m`` with
        ``a_H = grad_unscaling·tr(H_other)/d_other``,
        ``a_MM = damping·tr(other²)/d_other`` (kfac_like: ``a_H = 1`` resp.
        ``grad_unscaling``, ``a_MM = damping``), exactly singd 0.0.5's rule. A block is
        updated only where ``present``, its traces are finite and ``ok`` (a 0-d device
        flag) holds; elsewhere values and momenta keep their bits. Returns the bool
        ``[segments.total]`` mask of blocks that were present and skipped for non-finite
        statistics alone (not because ``ok`` was false).
        """
        values, squares = self.values, self.squares.to(self.dtype)
        H = self.stats.to(self.dtype)
        traces = torch.segment_reduce(torch.stack([H, squares]), "mean",
                                      lengths=self.lengths.expand(2, -1), axis=1)  # [2, S]
        other = traces.index_select(1, self.partner)  # [2, S]: the partner factor's traces
        finite = torch.isfinite(traces[0]) & torch.isfinite(other[0])
        update = present & finite if ok is None else present & finite & ok
        if kfac_like:
            a_H = torch.where(self.is_K, self._one, grad_unscaling)
            a_MM = torch.full_like(a_H, damping)
        else:
            a_H = other[0] * grad_unscaling
            a_MM = other[1] * damping
        coefficients = torch.stack([a_H, a_MM, update.to(self.dtype)]).index_select(1, self.segment_ids)
        a_H_e, a_MM_e, update_e = coefficients.unbind(0)
        m = H.mul_(a_H_e).addcmul_(squares, a_MM_e).sub_(1.0).mul_(scale)  # H's buffer is scratch
        if self.momenta is not None:
            m.add_(self.momenta, alpha=alpha1)
        if normalize:
            norms = torch.segment_reduce(m.abs(), "max", lengths=self.lengths).clamp_min_(1.0)
            step = m * (beta / norms).index_select(0, self.segment_ids)
        else:
            step = m.mul(beta)
        keep = update_e == 0
        torch.where(keep, values, values - values * step, out=values)
        if self.momenta is not None:
            torch.where(keep, self.momenta, m, out=self.momenta)
        if self.squares.dtype == values.dtype:
            torch.mul(values, values, out=self.squares)
        else:
            self.squares.copy_(values.square())
        return present & ~finite if ok is None else present & ~finite & ok
