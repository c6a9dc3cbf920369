"""KFAC-expand input factor as the Gram matrix of an explicitly unfolded input, in chunks.

Evaluates the networks :func:`kfac_tn.tensor_network.expressions.kfc` (the Gram) and
:func:`~kfac_tn.tensor_network.expressions.unfold` (the rows, one batch chunk at a time:
at most ``chunk_bytes`` of unfolded input exist at once).

The unfolded input ``u[n, o.., (k.., c)]`` of a batch chunk is written tap by tap from
slices of the input (padding and the zeros of transposed convolutions are never
materialized in the input, only left as zeros in the buffer), then ``uᵀu`` is one GEMM
per group. Cheaper than :mod:`shift_gram` when there are few channels (stems) or the
taps do not overlap (patchify), where the shift Grams would be many thin GEMMs.

Accelerators, 2-d convolutions with symmetric zero padding: torch's own im2col
(``F.unfold``, one kernel and one host call per batch chunk) gives the rows in the factor's
``(c, k..)`` order directly (:func:`im2col_chunks`), so neither the tap copies nor the
final reordering of the Gram are needed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from itertools import product
from math import prod

import torch
import torch.nn.functional as F
from torch import Tensor

from kfac_tn.runtime.chunking import batch_chunk
from kfac_tn.runtime.routes import launch_bound, windowed_unfold
from kfac_tn.runtime.workspace import Workspace
from kfac_tn.tensor_network.geometry import ConvDim


@lru_cache(maxsize=512)
def tap_slices(dim: ConvDim) -> tuple[tuple[int, slice, slice] | None, ...]:
    """Per tap ``k``: ``(k, input slice, output slice)`` it reads/writes, or None if empty."""
    out = []
    I, O, S, D, P = dim.input_size, dim.output_size, dim.stride, dim.dilation, dim.pad_left
    for k in range(dim.kernel_size):
        if dim.transposed:  # o = i·S + k·D − P
            i_lo = max(0, -((k * D - P) // S))
            i_hi = min(I, -(-(O + P - k * D) // S))
            if i_lo >= i_hi:
                out.append(None)
                continue
            o_lo = i_lo * S + k * D - P
            out.append((k, slice(i_lo, i_hi), slice(o_lo, o_lo + S * (i_hi - i_lo - 1) + 1, S)))
        else:  # i = k·D + o·S − P
            o_lo = max(0, -(-(P - k * D) // S))
            o_hi = min(O, -(-(I + P - k * D) // S))
            if o_lo >= o_hi:
                out.append(None)
                continue
            i_lo = k * D + o_lo * S - P
            out.append((k, slice(i_lo, i_lo + S * (o_hi - o_lo - 1) + 1, S), slice(o_lo, o_hi)))
    return tuple(out)


@lru_cache(maxsize=512)
def tap_copies(dims: tuple[ConvDim, ...]) -> tuple[tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]], ...]:
    """Per N-d tap that reads anything: ``(taps, input slices, output slices)``."""
    out = []
    for combo in product(*(tap_slices(d) for d in dims)):
        if any(t is None for t in combo):
            continue
        out.append((tuple(t[0] for t in combo), tuple(t[1] for t in combo), tuple(t[2] for t in combo)))
    return tuple(out)


def windows(x: Tensor, dims: tuple[ConvDim, ...]) -> Tensor | None:
    """All taps of every output position as one strided view: ``[P, Q, R, O.., K..]`` for
    ``x`` ``[P, Q, R, I..]`` (one copy if the convolution pads, none otherwise).

    The accelerator route of the unfolding below: one copy kernel from this view instead
    of one per tap. None for transposed dimensions (their taps do not form windows).
    """
    if any(d.transposed for d in dims):
        return None
    pads = [p for d in reversed(dims) for p in (d.pad_left, d.pad_right)]
    if any(pads):
        x = torch.nn.functional.pad(x, pads)
    lead = x.dim() - len(dims)
    for j, d in enumerate(dims):
        span = d.dilation * (d.kernel_size - 1) + 1
        x = x.unfold(lead + j, span, d.stride)[..., :: d.dilation]
        x = x.narrow(lead + j, 0, d.output_size)  # right padding beyond the last window
    return x


def _covers_output(dims: tuple[ConvDim, ...]) -> bool:
    """Whether every tap writes every output position (no padding zeros to keep)."""
    return all(
        t is not None and t[2].stop - t[2].start == d.output_size and (t[2].step or 1) == 1
        for d in dims
        for t in tap_slices(d)
    )


def unfold_gram_cost(dims: Sequence[ConvDim], channels: int, groups: int) -> tuple[int, int]:
    """(elements copied, multiply-adds) per sample of :func:`unfold_gram_kfc`."""
    positions = prod(d.output_size for d in dims)
    d = channels * prod(dim.kernel_size for dim in dims)
    return positions * groups * d, positions * groups * d * d


def unfolded_chunks(
    x: Tensor, dims: Sequence[ConvDim], groups: int = 1, chunk_bytes: int = 2**25
) -> Iterator[Tensor]:
    """Unfolded input by batch chunks: ``[G, n·O, K·C]`` with columns ordered ``(k.., c)``.

    The yielded tensor is a view of one reused buffer: consume it before the next one.
    """
    dims = tuple(dims)
    N, GC = x.shape[:2]
    C = GC // groups
    out_sizes = tuple(d.output_size for d in dims)
    kernel = tuple(d.kernel_size for d in dims)
    K = prod(kernel)
    per_sample = prod(out_sizes) * GC * K * x.element_size()
    chunk = batch_chunk(x, per_sample, chunk_bytes)
    buffer = x.new_empty((groups, chunk) + out_sizes + kernel + (C,))
    copies = tap_copies(dims)
    complete = _covers_output(dims)
    use_windows = windowed_unfold(x.device, C, K) and not any(d.transposed for d in dims)
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        u = buffer[:, :n]
        if not (complete or use_windows):
            u.zero_()
        src = x[start : start + n].unflatten(1, (groups, C)).movedim(2, -1).movedim(1, 0)  # [G, n, I.., C]
        view = windows(src.movedim(-1, 2), dims) if use_windows else None  # [G, n, C, O.., K..]
        if view is not None:
            D = len(dims)
            u.copy_(view.permute(0, 1, *range(3, 3 + D), *range(3 + D, 3 + 2 * D), 2))
            yield u.reshape(groups, -1, K * C)
            continue
        for ks, reads, writes in copies:
            u[(slice(None), slice(None)) + writes + ks].copy_(src[(slice(None), slice(None)) + reads])
        yield u.reshape(groups, -1, K * C)


def unfolded_feature_chunks(
    x: Tensor,
    dims: Sequence[ConvDim],
    groups: int = 1,
    chunk_bytes: int = 2**22,
    workspace: Workspace | None = None,
) -> Iterator[Tensor]:
    """Unfolded input by batch chunks, feature-major: ``[G, C·K.., n·O]``, rows ``(c, k..)``.

    Each feature's samples are contiguous, so Grams of row blocks are GEMMs with a long
    inner dimension. Tap slices are copied straight from the ``[N, C, I..]`` layout (no
    channels-last copy). The yielded tensor is a view of one reused buffer (taken from
    ``workspace`` if given) whose never-written entries (padding) stay zero: consume it
    before the next one.
    """
    dims = tuple(dims)
    if im2col_applies(x, dims):
        yield from im2col_chunks(x, dims, groups, chunk_bytes)
        return
    N, GC = x.shape[:2]
    C = GC // groups
    out_sizes = tuple(d.output_size for d in dims)
    kernel = tuple(d.kernel_size for d in dims)
    per_sample = prod(out_sizes) * GC * prod(kernel) * x.element_size()
    chunk = batch_chunk(x, per_sample, chunk_bytes)
    shape = (groups, C) + kernel + (chunk,) + out_sizes
    use_windows = windowed_unfold(x.device, C, prod(kernel)) and not any(d.transposed for d in dims)
    if workspace is None:
        buffer = x.new_empty(shape) if use_windows else x.new_zeros(shape)
    else:
        buffer = workspace.take(shape, x)
        if not (use_windows or _covers_output(dims)):
            buffer.zero_()
    copies = tap_copies(dims)
    src_all = x.unflatten(1, (groups, C)).movedim(0, 2)  # [G, C, N, I..] (a view)
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        u = buffer[(slice(None),) * (2 + len(dims)) + (slice(0, n),)]
        src = src_all[:, :, start : start + n]
        view = windows(src, dims) if use_windows else None  # [G, C, n, O.., K..]
        if view is not None:
            D = len(dims)
            u.copy_(view.permute(0, 1, *range(3 + D, 3 + 2 * D), 2, *range(3, 3 + D)))
            yield u.reshape(groups, C * prod(kernel), n * prod(out_sizes))
            continue
        for ks, reads, writes in copies:
            u[(slice(None), slice(None)) + ks + (slice(None),) + writes].copy_(
                src[(slice(None), slice(None), slice(None)) + reads]
            )
        yield u.reshape(groups, C * prod(kernel), n * prod(out_sizes))


def im2col_applies(x: Tensor, dims: Sequence[ConvDim]) -> bool:
    """Whether :func:`im2col_chunks` serves this input: accelerator routes, 2-d, not
    transposed, zero padding equal on both sides (``F.unfold``'s geometry)."""
    return (launch_bound(x.device) and len(dims) == 2
            and not any(d.transposed or d.pad_left != d.pad_right for d in dims))


def im2col_chunks(x: Tensor, dims: Sequence[ConvDim], groups: int = 1, chunk_bytes: int = 2**25) -> Iterator[Tensor]:
    """Unfolded input by batch chunks, feature-major ``[G, C·K1·K2, n·O]`` (rows ``(c, k1, k2)``,
    columns ``(n, o1, o2)``), by ``F.unfold`` and one copy per chunk (see :func:`im2col_applies`).
    Two chunk-sized tensors exist at once (im2col's output and the copy), so a chunk holds
    half of what the tap-by-tap route's would: the same peak memory."""
    N, GC = x.shape[:2]
    O = prod(d.output_size for d in dims)
    K = prod(d.kernel_size for d in dims)
    chunk = batch_chunk(x, 2 * O * GC * K * x.element_size(), chunk_bytes)
    kwargs = dict(kernel_size=tuple(d.kernel_size for d in dims), dilation=tuple(d.dilation for d in dims),
                  padding=tuple(d.pad_left for d in dims), stride=tuple(d.stride for d in dims))
    for start in range(0, N, chunk):
        part = x[start : start + chunk]
        n = part.shape[0]
        u = F.unfold(part, **kwargs)  # [n, G·C·K, O], rows (g, c, k1, k2)
        yield u.view(n, groups, -1, O).permute(1, 2, 0, 3).reshape(groups, -1, n * O)


def unfolded_row_chunks(
    x: Tensor, dims: Sequence[ConvDim], groups: int = 1, chunk_bytes: int = 2**25
) -> Iterator[Tensor]:
    """Unfolded input by batch chunks ``[G, n·O, C·K..]``, columns ordered ``(c, k..)``.

    Each chunk is a new tensor (never a view of the reused unfolding buffer).
    """
    if im2col_applies(x, dims):
        for u in im2col_chunks(x, dims, groups, chunk_bytes):
            yield u.transpose(1, 2)
        return
    C = x.shape[1] // groups
    K = prod(d.kernel_size for d in dims)
    for u in unfolded_chunks(x, dims, groups, chunk_bytes):
        out = u.new_empty(u.shape)
        out.view(u.shape[0], u.shape[1], C, K).copy_(u.unflatten(2, (K, C)).transpose(2, 3))  # (k, c) -> (c, k)
        yield out


def unfolded_rows(x: Tensor, dims: Sequence[ConvDim], groups: int = 1) -> Tensor:
    """Whole unfolded input ``[G, N·O, C·K..]``, columns ordered ``(c, k..)``."""
    chunks = list(unfolded_row_chunks(x, dims, groups))
    return torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]


def unfold_gram_kfc(x: Tensor, dims: Sequence[ConvDim], groups: int = 1, chunk_bytes: int = 2**25) -> Tensor:
    """KFAC-expand input factor ``[G, C·K.., C·K..]`` (rows ``(c, k..)``), scale 1/(N·O)."""
    if im2col_applies(x, dims):
        gram = None
        for u in im2col_chunks(x, dims, groups, chunk_bytes):
            gram = torch.bmm(u, u.transpose(1, 2)) if gram is None else gram.baddbmm_(u, u.transpose(1, 2))
        return gram.div_(x.shape[0] * prod(d.output_size for d in dims))
    C = x.shape[1] // groups
    K = prod(d.kernel_size for d in dims)
    gram = x.new_zeros(groups, K * C, K * C)
    for rows in unfolded_chunks(x, dims, groups, chunk_bytes):
        gram.baddbmm_(rows.transpose(1, 2), rows)
    # rows/cols are (k.., c): reorder to (c, k..)
    d = C * K
    gram = gram.view(groups, K, C, K, C).permute(0, 2, 1, 4, 3).reshape(groups, d, d)
    return gram.div_(x.shape[0] * prod(d.output_size for d in dims))
