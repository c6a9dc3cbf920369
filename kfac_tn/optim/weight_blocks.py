"""A layer's parameters as Kronecker-factored matrix blocks, and back.

Each block is ``[D, d]``: output channels of one group × (input channel, kernel
index.., bias) — the matrix whose preconditioner is ``C ⊗ K``. Linear and ungrouped
convolutions have one block; grouped ones one per group, or (``group_average``) a
single block stacking all groups' rows, which share one input factor (singd's convention).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kfac_tn.factors.layers import TRANSPOSED_CONV_TYPES


def num_blocks(module: nn.Module, group_average: bool) -> int:
    return 1 if group_average else getattr(module, "groups", 1)


def _per_group(module: nn.Module, weight: Tensor) -> list[Tensor]:
    """``[D, C·K..]`` matrices of each group (views where possible)."""
    if isinstance(module, nn.Linear):
        return [weight]
    G = module.groups
    if isinstance(module, TRANSPOSED_CONV_TYPES):  # weight [G·C, D, K..]
        return [w.transpose(0, 1).flatten(1) for w in weight.chunk(G, 0)]
    return list(weight.flatten(1).chunk(G, 0))  # weight [G·D, C, K..]


def matrix_blocks(module: nn.Module, weight: Tensor, bias: Tensor | None, group_average: bool) -> list[Tensor]:
    """Blocks ``[D, d(+1)]`` of (weight, bias)-shaped tensors such as their gradients."""
    blocks = _per_group(module, weight)
    if bias is not None:
        biases = bias.chunk(len(blocks), 0)
        blocks = [torch.cat([w, b.unsqueeze(1)], dim=1) for w, b in zip(blocks, biases)]
    if group_average and len(blocks) > 1:
        return [torch.cat(blocks, dim=0)]
    return blocks


def from_matrix_blocks(module: nn.Module, blocks: list[Tensor], has_bias: bool) -> tuple[Tensor, ...]:
    """Inverse of :func:`matrix_blocks`: ``(weight,)`` or ``(weight, bias)``, contiguous."""
    G = getattr(module, "groups", 1)
    if len(blocks) == 1 and G > 1:
        blocks = list(blocks[0].chunk(G, 0))
    if has_bias:
        biases = [b[:, -1] for b in blocks]
        blocks = [b[:, :-1] for b in blocks]
    weight = module.weight
    if isinstance(module, nn.Linear):
        w = blocks[0]
    elif isinstance(module, TRANSPOSED_CONV_TYPES):
        shape = (weight.shape[1], weight.shape[0] // G) + tuple(weight.shape[2:])  # [D, C, K..]
        w = torch.cat([b.reshape(shape).transpose(0, 1) for b in blocks], dim=0)
    else:
        w = torch.cat(blocks, dim=0) if len(blocks) > 1 else blocks[0]
    # contiguous like the parameter: a strided slice (a Linear's weight next to its bias
    # column) would send every foreach update of the group off CUDA's fast path
    w = w.reshape(weight.shape).contiguous()
    return (w, torch.cat(biases)) if has_bias else (w,)


def block_dims(module: nn.Module, group_average: bool) -> tuple[int, int]:
    """``(dim_K, dim_C)`` of each block's preconditioner."""
    has_bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return module.in_features + has_bias, module.out_features
    G = module.groups
    kernel = 1
    for k in module.kernel_size:
        kernel *= k
    dim_K = module.in_channels // G * kernel + has_bias
    dim_C = module.out_channels if group_average else module.out_channels // G
    return dim_K, dim_C


def gradient_blocks(module: nn.Module, group_average: bool) -> list[Tensor]:
    """:func:`matrix_blocks` of the gradients; a bias without gradient (frozen) counts as 0.

    The factors include the bias row whenever the layer has a bias, so its column must
    be present even if the bias is not trained.
    """
    bias = module.bias
    bias_grad = None
    if bias is not None:
        bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
    return matrix_blocks(module, module.weight.grad, bias_grad, group_average)
