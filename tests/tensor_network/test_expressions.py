"""Einsum expressions against torch's convolutions, autograd and unfoldNd (float64)."""

from math import prod

import pytest
import torch
import torch.nn.functional as F
from conv_cases import TRANSPOSED, conv_layers, reference_input_factor, reference_unfold
from hypothesis import given, settings

from kfac_tn.factors.layers import conv_input
from kfac_tn.tensor_network import contract, conv_dims, expressions, simplify


def _setup(layer, x):
    xp, dims = conv_input(layer, x)
    return xp, dims, layer.groups


@given(conv_layers())
@settings(max_examples=60, deadline=None)
def test_forward_and_vjps_match_torch(case):
    layer, x = case
    xp, dims, G = _setup(layer, x)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    if layer.bias is not None:
        y = y - layer.bias.reshape(1, -1, *([1] * len(dims)))
    for simplified in (False, True):
        ours = contract(expressions.forward(xp, layer.weight.detach(), dims, G), simplified)
        torch.testing.assert_close(ours, y.detach())
    grad_out = torch.randn_like(y)
    x_grad, w_grad = torch.autograd.grad(y, (x, layer.weight), grad_out)
    for simplified in (False, True):
        w_ours = contract(expressions.weight_vjp(xp, grad_out, dims, G), simplified)
        torch.testing.assert_close(w_ours, w_grad)
        if layer.padding_mode == "zeros" or isinstance(layer, tuple(TRANSPOSED.values())):
            x_ours = contract(expressions.input_vjp(grad_out, layer.weight.detach(), dims, G), simplified)
            torch.testing.assert_close(x_ours, x_grad)


@given(conv_layers(padding_modes=False))
@settings(max_examples=60, deadline=None)
def test_unfold_and_factor_networks_match_unfoldnd(case):
    layer, x = case
    xp, dims, G = _setup(layer, x)
    u_ref = reference_unfold(layer, x)  # [N, G, C·K, O]
    for simplified in (False, True):
        u = contract(expressions.unfold(xp, dims), simplified)
        torch.testing.assert_close(u, u_ref.flatten(1, 2))
        layer_nobias = layer
        bias, layer_nobias.bias = layer.bias, None
        try:
            for approx, build in (("expand", expressions.kfc), ("reduce", expressions.kfac_reduce)):
                ref = reference_input_factor(layer_nobias, x, approx)
                torch.testing.assert_close(contract(build(xp, dims, G), simplified), ref)
        finally:
            layer_nobias.bias = bias


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        ((256, 256), 4, 4, 0),  # patchify stem: no Π at all
        ((56, 56), 1, 2, 0),  # 1x1 stride-2 shortcut: slice, then dense
        ((8, 8), 1, 1, 0),  # identity
        ((9, 8), (3, 2), (3, 2), 0),
        ((56, 56), 3, 1, 2),  # a real 3x3 conv keeps its patterns
        ((7, 7), 1, 2, 2),  # O·S > I: needs padding, not simplified
    ],
)
def test_simplification_removes_dense_patterns(size, kernel, stride, expected):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    dims = conv_dims(size, kernel, stride, 0 if expected == 0 or kernel == 1 else 1)
    for build in (expressions.kfc, expressions.kfac_reduce):
        network = build(x, dims)
        simple = simplify(network)
        copies = network.num_patterns() // len(dims)  # KFC/reduce hold two copies
        assert simple.num_patterns() == expected * copies
        torch.testing.assert_close(contract(simple, False), contract(network, False))
    w = torch.randn(5, 3, *dims_kernel(dims), dtype=torch.float64)
    ref = F.conv2d(x, w, stride=stride, padding=dims[0].pad_left)
    torch.testing.assert_close(contract(expressions.forward(x, w, dims)), ref)


def dims_kernel(dims):
    return tuple(d.kernel_size for d in dims)


def test_expression_shape_errors():
    dims = conv_dims((5, 5), 3)
    with pytest.raises(ValueError, match="4-d input"):
        expressions.kfc(torch.randn(2, 3, 5), dims)
    with pytest.raises(ValueError, match="divisible by groups"):
        expressions.kfc(torch.randn(2, 3, 5, 5), dims, groups=2)
    with pytest.raises(ValueError, match="does not match"):
        expressions.kfc(torch.randn(2, 3, 6, 5), dims)
    with pytest.raises(ValueError, match="kernel"):
        expressions.forward(torch.randn(2, 3, 5, 5), torch.randn(4, 3, 2, 2), dims)


@given(conv_layers(padding_modes=False))
@settings(max_examples=60, deadline=None)
def test_both_kfc_methods_match_unfold_reference(case):
    """The cost model picks one evaluation per shape; each must be exact everywhere."""
    from kfac_tn.kernels.averaged_input import averaged_unfolded_input
    from kfac_tn.kernels.group_gram import group_gram_kfc
    from kfac_tn.kernels.kfc import kfc_factor

    layer, x = case
    xp, dims, G = _setup(layer, x)
    bias, layer.bias = layer.bias, None
    try:
        ref = reference_input_factor(layer, x, "expand")
        ref_reduce = reference_input_factor(layer, x, "reduce")
    finally:
        layer.bias = bias
    transposed = any(d.transposed for d in dims)
    for method in ("shift", "unfold") + (() if transposed else ("group",)):
        torch.testing.assert_close(kfc_factor(xp, dims, G, method), ref)
    if not transposed:  # pieces of one sample and of two (the last one partial for odd batches)
        piece = ref.shape[-1] * prod(d.output_size for d in dims) * xp.element_size()
        for samples in (1, 2):
            torch.testing.assert_close(group_gram_kfc(xp, dims, G, piece_bytes=samples * piece), ref)
    ubar = averaged_unfolded_input(xp.unflatten(1, (G, -1)).flatten(0, 1), dims).reshape(x.shape[0], G, -1)
    torch.testing.assert_close(torch.einsum("ngi,ngj->gij", ubar, ubar) / x.shape[0], ref_reduce)


def test_kfc_method_is_validated():
    from kfac_tn.kernels.kfc import kfc_factor

    with pytest.raises(ValueError, match="Unknown KFC method 'fast'"):
        kfc_factor(torch.randn(2, 3, 5), conv_dims((5,), 3), method="fast")
    transposed = conv_dims((5,), 3, transposed=True)
    with pytest.raises(ValueError, match="transposed convolutions have no input windows"):
        kfc_factor(torch.randn(2, 3, 5), transposed, method="group")
