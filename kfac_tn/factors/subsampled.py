"""Randomized KFAC-expand factors from a random subset of output positions.

The tensor-network view gives sub-tensor access: restricting the output index ``o`` of the
unfold network to a subset S of the P positions is a slice of its index patterns Π (the
paper's randomized back-propagation samples spatial positions this way, and found it more
accurate than sampling channels at equal cost). With S drawn uniformly among the subsets
of ``m`` positions (the same S for every sample of the batch)::

    Â = 1/(B·m) Σ_{n, o∈S} u_{n,o} u_{n,o}ᵀ,        Ĝ = c·(P/m) Σ_{n, o∈S} g_{n,o} g_{n,o}ᵀ

are unbiased: their mean over all subsets is the exact KFAC-expand A and G of
:func:`kfac_tn.input_factor` / :func:`kfac_tn.grad_output_factor`. For ordinary
convolutions only the sampled positions' windows are copied, in batch chunks of at most
32 MiB; for transposed convolutions the unfolded rows are formed first and then sliced.
"""

from __future__ import annotations

from math import prod, sqrt

import torch
from torch import Tensor, nn

from kfac_tn.factors.grad_output_factor import channel_blocks, grad_output_rows, grad_output_scale
from kfac_tn.factors.input_factor import _append_ones, _conv_setup, input_rows
from kfac_tn.factors.layers import check_layer, num_positions
from kfac_tn.kernels.group_gram import group_gram_kfc
from kfac_tn.kernels.kfc import group_route
from kfac_tn.kernels.unfold_gram import windows
from kfac_tn.runtime.chunking import batch_chunk


def sample_count(positions: int, subsample: float | int) -> int:
    """Positions to keep: a fraction in (0, 1] of ``positions`` (at least one), or a count."""
    if isinstance(subsample, bool) or not isinstance(subsample, (int, float)):
        raise ValueError(f"subsample must be a fraction in (0, 1] or a count >= 1, got {subsample!r}.")
    if isinstance(subsample, float):
        if not 0 < subsample <= 1:
            raise ValueError(f"subsample as a fraction must lie in (0, 1], got {subsample!r}.")
        return max(1, round(subsample * positions))
    if subsample < 1:
        raise ValueError(f"subsample as a count must be >= 1, got {subsample!r}.")
    return min(subsample, positions)


def sample_positions(positions: int, subsample: float | int, generator: torch.Generator | None = None) -> Tensor:
    """Sorted indices of a uniformly random subset of the ``positions`` output positions."""
    m = sample_count(positions, subsample)
    return torch.randperm(positions, generator=generator)[:m].sort().values


def _conv_window_factor(layer: nn.Module, x: Tensor, chosen: Tensor, group_average: bool,
                        chunk_bytes: int = 2**25) -> Tensor | None:
    """Mean of ``row rowᵀ`` ``[groups, d, d]`` over the unfolded rows at the chosen
    positions (columns ``(c, k..)``, bias column last), in batch chunks of about
    ``chunk_bytes`` (depthwise-like layers on a CPU: group by group, see
    :mod:`kfac_tn.kernels.group_gram`); None for transposed convolutions (no windows)."""
    x, dims, groups = _conv_setup(layer, x, group_average)
    N, C = x.shape[0], x.shape[1] // groups
    if group_route(x.device, dims, C, groups):
        return group_gram_kfc(x, dims, groups, positions=chosen, ones_row=layer.bias is not None)
    view = windows(x.unflatten(1, (groups, C)), dims)  # [N, groups, C, O.., K..]
    if view is None:
        return None
    index = torch.unravel_index(chosen.to(x.device), tuple(d.output_size for d in dims))
    K = prod(d.kernel_size for d in dims)
    d = C * K + (layer.bias is not None)
    gram = x.new_zeros(groups, d, d)
    chunk = batch_chunk(x, groups * C * K * chosen.numel() * x.element_size(), chunk_bytes)
    for start in range(0, N, chunk):
        picked = view[start : start + chunk][(slice(None),) * 3 + index]  # [n, groups, C, m, K..]
        rows = picked.movedim(3, 1).movedim(2, 0).reshape(groups, -1, C * K)  # only the chosen windows
        if layer.bias is not None:
            rows = _append_ones(rows)
        gram.baddbmm_(rows.transpose(1, 2), rows)
    return gram.div_(N * chosen.numel())


def subsampled_input_factor(
    layer: nn.Module,
    x: Tensor,
    subsample: float | int,
    group_average: bool = False,
    generator: torch.Generator | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Unbiased KFAC-expand A ``[groups, d, d]`` from a random subset of output positions.

    Args:
        layer, x, group_average: as for :func:`kfac_tn.input_factor`.
        subsample: fraction in (0, 1] of the positions, or their number.
        generator: random source of the subset (fresh subset per call).
        positions: the subset itself (sorted indices), overriding the random draw.
    """
    check_layer(layer)
    P = num_positions(layer, x)
    chosen = positions if positions is not None else sample_positions(P, subsample, generator)
    factor = None if isinstance(layer, nn.Linear) else _conv_window_factor(layer, x, chosen, group_average)
    if factor is not None:
        return factor
    # Linear positions, transposed convolutions: all rows, then the chosen ones
    full = input_rows(layer, x, "expand", group_average) * sqrt(x.shape[0] * P)  # [groups, B·P, d]
    rows = full.unflatten(1, (x.shape[0], P)).index_select(2, chosen.to(full.device)).flatten(1, 2)
    return torch.bmm(rows.transpose(1, 2), rows).div_(rows.shape[1])


def subsampled_grad_output_factor(
    layer: nn.Module,
    grad_output: Tensor,
    subsample: float | int,
    loss_average: str | None = "batch",
    group_average: bool = False,
    generator: torch.Generator | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Unbiased KFAC-expand G ``[groups, D, D]`` from a random subset of output positions
    (arguments as for :func:`kfac_tn.grad_output_factor` and :func:`subsampled_input_factor`)."""
    if isinstance(layer, nn.Linear):
        rows = grad_output_rows(layer, grad_output, "expand", loss_average, group_average)  # [groups, B·P, D]
        B = grad_output.shape[0]
        P = rows.shape[1] // B
        chosen = positions if positions is not None else sample_positions(P, subsample, generator)
        picked = rows.unflatten(1, (B, P)).index_select(2, chosen.to(rows.device)).flatten(1, 2)
        return torch.bmm(picked.transpose(1, 2), picked).mul_(P / chosen.numel())
    # convolutions: the chosen positions of [B, groups, D, P], then feature-major columns
    scale = grad_output_scale(layer, grad_output, "expand", loss_average)
    x = channel_blocks(layer, grad_output, group_average)
    P = x.shape[-1]
    chosen = positions if positions is not None else sample_positions(P, subsample, generator)
    # (advanced indexing of the last dimension: 6x faster than index_select there on a CPU)
    picked = x[..., chosen.to(x.device)].permute(1, 2, 0, 3).flatten(2)  # [groups, D, B·m]
    return torch.bmm(picked, picked.transpose(1, 2)).mul_(scale * P / chosen.numel())
