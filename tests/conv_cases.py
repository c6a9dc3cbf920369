"""Hypothesis strategies for (transposed) convolution layers and a reference unfold."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from unfoldNd import unfold_transposeNd, unfoldNd

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@st.composite
def conv_layers(draw, transposed=None, max_dims=3, padding_modes=True):
    """A random (transposed) convolution layer and a batched float64 input for it."""
    n = draw(st.integers(1, max_dims))
    if transposed is None:
        transposed = draw(st.booleans())
    groups = draw(st.integers(1, 2))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(n))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(n))
    bias = draw(st.booleans())
    small = 5 if n == 3 else 7
    sizes = tuple(draw(st.integers(1, small)) for _ in range(n))
    if transposed:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
        out_pad = tuple(
            draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation)
        )
        layer = TRANSPOSED[n](
            c_in, c_out, kernel, stride, padding, out_pad, groups, bias, dilation
        )
    else:
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"])) if padding_modes else "zeros"
        if all(s == 1 for s in stride) and draw(st.booleans()):
            padding = draw(st.sampled_from(["same", "valid"]))
        else:
            padding = tuple(draw(st.integers(0, 2)) for _ in range(n))
        if mode == "reflect":  # reflect needs padding < input size
            sizes = tuple(max(s, 3) for s in sizes)
        layer = CONV[n](
            c_in, c_out, kernel, stride, padding, dilation, groups, bias, padding_mode=mode
        )
    layer = layer.double()
    batch = draw(st.integers(1, 3))
    x = torch.randn(batch, c_in, *sizes, dtype=torch.float64)
    try:
        out = layer(x)
    except RuntimeError:
        from hypothesis import assume

        assume(False)
    from hypothesis import assume

    assume(out.numel() > 0)
    return layer, x


def reference_unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input ``[N, G, C·K.., O]`` via unfoldNd, checked to reproduce ``layer(x)``."""
    n = len(layer.kernel_size)
    G = layer.groups
    if isinstance(layer, tuple(TRANSPOSED.values())):
        u = unfold_transposeNd(
            x, layer.kernel_size, layer.stride, layer.padding, layer.output_padding, layer.dilation
        )
        C = layer.in_channels // G
        w = layer.weight.unflatten(0, (G, C)).transpose(1, 2).flatten(2)  # [G, D, C·K]
    else:
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        xp = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
        u = unfoldNd(xp, layer.kernel_size, layer.dilation, 0, layer.stride)
        w = layer.weight.unflatten(0, (G, layer.out_channels // G)).flatten(2)  # [G, D, C·K]
    u = u.unflatten(1, (G, -1))
    y = layer(x)
    if layer.bias is not None:
        y = y - layer.bias.reshape(1, -1, *([1] * n))
    torch.testing.assert_close(torch.einsum("gdi,ngio->ngdo", w, u).flatten(1, 2), y.flatten(2))
    return u


def reference_input_factor(layer: nn.Module, x: torch.Tensor, approx: str) -> torch.Tensor:
    """``[G, d, d]`` from the explicit unfolded input (the textbook definition)."""
    u = reference_unfold(layer, x)  # [N, G, d, O]
    N, G, _, O = u.shape
    if layer.bias is not None:
        u = torch.cat([u, u.new_ones(N, G, 1, O)], dim=2)
    if approx == "expand":
        return torch.einsum("ngio,ngjo->gij", u, u) / (N * O)
    ubar = u.mean(-1)
    return torch.einsum("ngi,ngj->gij", ubar, ubar) / N
