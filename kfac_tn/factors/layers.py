"""Which layers have Kronecker factors, and how their inputs map onto the engine."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from kfac_tn.tensor_network.geometry import (
    CONV_TYPES,
    TRANSPOSED_CONV_TYPES,
    ConvDim,
    conv_dims,
    layer_conv_dims,
)

SUPPORTED_LAYERS = (nn.Linear,) + CONV_TYPES + TRANSPOSED_CONV_TYPES
APPROXIMATIONS = ("expand", "reduce")


def check_layer(layer: nn.Module) -> None:
    """Raise a ``TypeError`` naming the layer if it has no Kronecker factors here."""
    if not isinstance(layer, SUPPORTED_LAYERS):
        names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
        raise TypeError(f"Unsupported layer {type(layer).__name__}; supported: {names}.")


def check_approx(approx: str) -> None:
    if approx not in APPROXIMATIONS:
        raise ValueError(f"Unknown approx {approx!r}; use one of {APPROXIMATIONS}.")


def layer_groups(layer: nn.Module) -> int:
    """Number of channel groups (1 for Linear)."""
    return getattr(layer, "groups", 1)


def conv_input(layer: nn.Module, x: Tensor) -> tuple[Tensor, tuple[ConvDim, ...]]:
    """The input the layer really convolves and its geometry.

    Non-zero padding modes are applied explicitly (reflect, replicate, circular), after
    which the geometry has zero padding.

    Args:
        layer: a (transposed) convolution.
        x: its batched input ``[N, C_in, I..]``.

    Returns:
        The (possibly padded) input and one :class:`ConvDim` per spatial dimension.
    """
    n = len(layer.kernel_size)
    if x.dim() != n + 2:
        raise ValueError(
            f"{type(layer).__name__} expects a batched input [N, C, {n} spatial dims], "
            f"got shape {tuple(x.shape)}."
        )
    if x.shape[1] != layer.in_channels:
        raise ValueError(
            f"{type(layer).__name__} has {layer.in_channels} input channels, the input has {x.shape[1]}."
        )
    if isinstance(layer, TRANSPOSED_CONV_TYPES) or layer.padding_mode == "zeros":
        return x, layer_conv_dims(layer, x.shape)
    x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
    return x, conv_dims(x.shape[2:], layer.kernel_size, layer.stride, 0, layer.dilation)


def as_called(layer: nn.Module, x: Tensor, output_shape: Sequence[int]) -> nn.Module:
    """The layer as one call ran it: a transposed convolution called with ``output_size=``
    (e.g. a U-Net decoder) adds output entries that its ``output_padding`` attribute does
    not hold. Returns ``layer`` itself, or a shallow copy (same parameters) whose
    ``output_padding`` is the one that produced ``output_shape``.
    """
    if not isinstance(layer, TRANSPOSED_CONV_TYPES) or x.dim() != len(layer.kernel_size) + 2:
        return layer
    default = [d.output_size - d.output_padding for d in layer_conv_dims(layer, x.shape)]
    padding = tuple(int(o) - d for o, d in zip(output_shape[2:], default))
    if padding == tuple(layer.output_padding):
        return layer
    called = copy.copy(layer)
    called.output_padding = padding
    return called


def num_positions(layer: nn.Module, x: Tensor) -> int:
    """Output positions per sample P (weight-sharing positions for Linear)."""
    if isinstance(layer, nn.Linear):
        return x[0].numel() // x.shape[-1]
    _, dims = conv_input(layer, x[:1])
    positions = 1
    for d in dims:
        positions *= d.output_size
    return positions


def output_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def check_output(layer: nn.Module, grad_output: Tensor, dims: Sequence[ConvDim] | None = None) -> None:
    """Shape check of a gradient w.r.t. the layer's output."""
    if isinstance(layer, nn.Linear):
        if grad_output.dim() < 2 or grad_output.shape[-1] != layer.out_features:
            raise ValueError(
                f"Linear has {layer.out_features} outputs; grad_output must be [B, ..., "
                f"{layer.out_features}], got shape {tuple(grad_output.shape)}."
            )
        return
    n = len(layer.kernel_size)
    if grad_output.dim() != n + 2 or grad_output.shape[1] != layer.out_channels:
        raise ValueError(
            f"{type(layer).__name__} grad_output must be [N, {layer.out_channels}, {n} spatial dims], "
            f"got shape {tuple(grad_output.shape)}."
        )
