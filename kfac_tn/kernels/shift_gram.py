"""KFAC-expand (KFC) input factor as Gram matrices of shifted input windows.

Evaluates the network :func:`kfac_tn.tensor_network.expressions.kfc`.

The KFC network ``n c i.., Π(k,o,i).., n c_ i_.., Π(k_,o,i_).. -> (c k..) (c_ k_..)``
pairs, per output position, the input read by tap ``k`` with the one read by tap
``k_``. Along one dimension those two inputs are a fixed offset δ apart, and all
positions a tap reads lie on a lattice ``p = r + s·m`` over a window of ``m``. Tap
pairs with the same (phase ``r``, step ``s``, offset δ) only differ in their
windows, so their sums share the Gram matrices of the elementary boxes the windows
split into. For a stride-1 3×3 convolution this needs 13 channel Grams of the
input (δ and −δ are transposes of each other) instead of a GEMM with the 9× larger
unfolded input, and no padded or unfolded copy is ever built: padding is handled by
clipping windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise, product
from math import prod

import torch
from torch import Tensor

from kfac_tn.runtime.chunking import batch_chunk
from kfac_tn.tensor_network.geometry import ConvDim


@dataclass(frozen=True)
class TapPair:
    """Where the products of taps ``k`` and ``k_`` live along one dimension.

    The first copy reads position ``r + s·m``, the second ``r + s·m + delta``, for
    ``lo <= m < hi``.
    """

    k: int
    k_: int
    r: int
    s: int
    delta: int
    lo: int
    hi: int

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.r, self.s, self.delta)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _clip(lo: int, hi: int, r: int, s: int, delta: int, size: int) -> tuple[int, int]:
    """Restrict ``m`` so that ``r + s·m`` and ``r + s·m + delta`` lie in ``[0, size)``."""
    lo = max(lo, _ceil_div(-r, s), _ceil_div(-delta - r, s))
    hi = min(hi, _ceil_div(size - r, s), _ceil_div(size - delta - r, s))
    return lo, hi


@lru_cache(maxsize=512)
def tap_pairs(dim: ConvDim) -> tuple[TapPair, ...]:
    """All tap pairs of one dimension whose products are not identically zero."""
    K, S, D, P, I = dim.kernel_size, dim.stride, dim.dilation, dim.pad_left, dim.input_size
    O = dim.output_size
    pairs = []
    for k, k_ in product(range(K), repeat=2):
        if dim.transposed:
            # input i meets output o = i·S + k·D − P; the second copy sits at
            # i + (k − k_)·D / S, which must be an integer.
            if ((k - k_) * D) % S:
                continue
            r, s, delta = 0, 1, (k - k_) * D // S
            lo, hi = _ceil_div(P - k * D, S), _ceil_div(O + P - k * D, S)
        else:
            start = k * D - P  # position read at o = 0
            r, s, delta = start % S, S, (k_ - k) * D
            lo = (start - r) // S
            hi = lo + O
        lo, hi = _clip(lo, hi, r, s, delta, I)
        if lo < hi:
            pairs.append(TapPair(k, k_, r, s, delta, lo, hi))
    return tuple(pairs)


def _intervals(windows: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Elementary intervals that the windows split into (only covered ones)."""
    cuts = sorted({b for w in windows for b in w})
    return [
        (a, b) for a, b in pairwise(cuts) if any(lo <= a and b <= hi for lo, hi in windows)
    ]


@dataclass(frozen=True)
class _Group:
    """Multi-dimensional tap pairs sharing phase, step and offset in every dimension."""

    key: tuple[tuple[int, int, int], ...]
    pairs: tuple[tuple[TapPair, ...], ...]  # each entry: one TapPair per dimension
    boxes: tuple[tuple[tuple[int, int], ...], ...]  # elementary boxes, one interval per dim


@lru_cache(maxsize=512)
def _plan(dims: tuple[ConvDim, ...]) -> tuple[_Group, ...]:
    """Group the N-d tap pairs; keep one of each (pair, transposed pair)."""
    kernel = tuple(d.kernel_size for d in dims)
    flat = lambda ks: sum(k * prod(kernel[j + 1 :]) for j, k in enumerate(ks))  # noqa: E731
    groups: dict[tuple, list] = {}
    for combo in product(*(tap_pairs(d) for d in dims)):
        ks = tuple(p.k for p in combo)
        ks_ = tuple(p.k_ for p in combo)
        if flat(ks) > flat(ks_):
            continue  # filled in by symmetry
        groups.setdefault(tuple(p.key for p in combo), []).append(combo)
    plan = []
    for key, combos in groups.items():
        per_dim = [_intervals([(c[j].lo, c[j].hi) for c in combos]) for j in range(len(dims))]
        plan.append(_Group(key, tuple(combos), tuple(product(*per_dim))))
    return tuple(plan)


def shift_gram_cost(dims: tuple[ConvDim, ...], channels: int, groups: int) -> tuple[int, int]:
    """(elements copied, multiply-adds) per sample of :func:`shift_gram_kfc`."""
    copied = macs = 0
    for group in _plan(dims):
        for box in group.boxes:
            rows = _box_numel(box)
            copied += 2 * rows * groups * channels
            macs += rows * groups * channels * channels
    return copied, macs


def _box_view(x_cl: Tensor, key, box, second: bool) -> Tensor:
    """Channels-last slice of the box, first (or shifted second) copy."""
    index = [slice(None)]
    for (r, s, delta), (a, b) in zip(key, box):
        start = r + s * a + (delta if second else 0)
        index.append(slice(start, start + s * (b - a - 1) + 1, s))
    return x_cl[tuple(index)]


def _box_numel(box: tuple[tuple[int, int], ...]) -> int:
    return prod(b - a for a, b in box)


def _copy_into(workspace: Tensor, view: Tensor) -> Tensor:
    """Copy ``view`` into the front of a flat ``workspace``; return it contiguous."""
    out = workspace[: view.numel()].view(view.shape)
    out.copy_(view)
    return out


def _flat_gram(x_cl: Tensor, key, box, out: Tensor) -> bool:
    """Gram of a box without copying it, if possible; returns whether it was done.

    With the last two spatial axes flattened (channels-last input), a box of stride-1
    rows is one contiguous run per sample from its first to its last element, and so
    is its shifted partner: one batched GEMM on strided views. The run also covers the
    columns between the box's rows; their (thin) contribution is subtracted. Needs one
    group, step 1 in the last two axes, a box at least half as wide as the input, and
    runs of at least 4·C rows (else the per-sample C × C products cost more than copies).
    """
    n_dims = len(key)
    if any(s != 1 for _, s, _ in key[-2:]):
        return False
    C = x_cl.shape[-1]
    base = x_cl.storage_offset()
    sample = x_cl.stride(0)
    leading = [range(a, b) for a, b in box[:-2]] if n_dims > 1 else [range(1)]
    if n_dims == 1:
        (_, _, delta), (a, b) = key[0], box[0]
        if b - a < 4 * C:
            return False
        u = x_cl.as_strided((x_cl.shape[0], b - a, C), (sample, C, 1), base + a * C)
        v = x_cl.as_strided((x_cl.shape[0], b - a, C), (sample, C, 1), base + (a + delta) * C)
        out.copy_(torch.bmm(u.transpose(1, 2), v).sum(0))
        return True
    W = x_cl.shape[-2]
    (a1, b1), (a2, b2) = box[-2:]
    shift = key[-2][2] * W + key[-1][2]
    first, length = a1 * W + a2, (b1 - 1 - a1) * W + (b2 - a2)
    if 2 * (b2 - a2) < W or length < 4 * C:
        return False
    run, rows = W - (b2 - a2), b1 - 1 - a1
    out.zero_()
    for ms in product(*leading):
        off_u = off_v = base
        for j, m in enumerate(ms):
            r, s, delta = key[j]
            off_u += (r + s * m) * x_cl.stride(1 + j)
            off_v += (r + s * m + delta) * x_cl.stride(1 + j)
        u = x_cl.as_strided((x_cl.shape[0], length, C), (sample, C, 1), off_u + first * C)
        v = x_cl.as_strided((x_cl.shape[0], length, C), (sample, C, 1), off_v + (first + shift) * C)
        out.add_(torch.bmm(u.transpose(1, 2), v).sum(0))
        if run and rows:
            start = a1 * W + b2
            shape, strides = (x_cl.shape[0], rows, run, C), (sample, W * C, C, 1)
            uc = x_cl.as_strided(shape, strides, off_u + start * C).reshape(-1, C)
            vc = x_cl.as_strided(shape, strides, off_v + (start + shift) * C).reshape(-1, C)
            out.sub_(uc.T @ vc)
    return True


def shift_gram_kfc(x: Tensor, dims: Sequence[ConvDim], groups: int = 1, chunk_bytes: int = 2**24) -> Tensor:
    """KFAC-expand input factor, shape ``[G, C·K.., C·K..]`` with C channels per group.

    Equals ``1/(N·O) Σ_{n,o} u uᵀ`` of the unfolded input ``u`` (rows ``(c, k..)``),
    computed from shifted-window Grams. ``x``: ``[N, G·C, I..]``; the batch is processed
    in chunks of about ``chunk_bytes`` of input to bound temporary memory.
    """
    dims = tuple(dims)
    N, GC = x.shape[:2]
    C = GC // groups
    kernel = tuple(d.kernel_size for d in dims)
    plan = _plan(dims)
    # per pair, the boxes its window covers
    cover = []
    for group in plan:
        for combo in group.pairs:
            inside = [
                b for b, box in enumerate(group.boxes)
                if all(p.lo <= a and e <= p.hi for p, (a, e) in zip(combo, box))
            ]
            cover.append(inside)
    factor = x.new_zeros((groups, C) + kernel + (C,) + kernel)
    per_sample = x[0].numel() * x.element_size()
    chunk = batch_chunk(x, per_sample, chunk_bytes)
    # workspaces reused for every box: no allocation (and no page faults) per box
    largest = max((_box_numel(box) for group in plan for box in group.boxes), default=0)
    x_cl = x.new_empty((chunk,) + tuple(x.shape[2:]) + (GC,))
    work_u = x.new_empty(chunk * largest * GC)
    work_v = x.new_empty(chunk * largest * GC)
    gram_buffer = x.new_empty((max((len(g.boxes) for g in plan), default=0), groups, C, C))
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        x_chunk = x_cl[:n]
        x_chunk.copy_(x[start : start + n].movedim(1, -1))
        c = 0
        for group in plan:
            grams = gram_buffer[: len(group.boxes)]
            for b, box in enumerate(group.boxes):
                if groups == 1 and _flat_gram(x_chunk, group.key, box, grams[b, 0]):
                    continue
                u = _copy_into(work_u, _box_view(x_chunk, group.key, box, False)).reshape(-1, groups, C)
                v = _copy_into(work_v, _box_view(x_chunk, group.key, box, True)).reshape(-1, groups, C)
                if groups == 1:
                    torch.mm(u[:, 0].T, v[:, 0], out=grams[b, 0])
                else:
                    torch.bmm(u.permute(1, 2, 0), v.transpose(0, 1), out=grams[b])
            for combo in group.pairs:
                ks = tuple(p.k for p in combo)
                ks_ = tuple(p.k_ for p in combo)
                target = factor[(slice(None), slice(None)) + ks + (slice(None),) + ks_]
                mirror = factor[(slice(None), slice(None)) + ks_ + (slice(None),) + ks] if ks != ks_ else None
                for b in cover[c]:
                    target.add_(grams[b])
                    if mirror is not None:
                        mirror.add_(grams[b].transpose(1, 2))
                c += 1
    d = C * prod(kernel)
    positions = prod(dim.output_size for dim in dims)
    return factor.reshape(groups, d, d).div_(N * positions)
