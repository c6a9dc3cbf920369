"""Einsum expressions of N-d (transposed) convolution and its KFAC input factors.

Each builder returns a :class:`TensorNetwork`. Index names: ``n`` batch, ``g`` channel
group, ``c`` input channel within a group, ``d`` output channel within a group,
``i{j}`` / ``o{j}`` / ``k{j}`` input / output / kernel index of spatial dimension
``j``; a trailing ``_`` marks the second copy in factor networks. The same equations
serve convolutions and transposed convolutions: only the patterns (``ConvDim.transposed``)
and the weight's axis order differ (conv: ``[G·D, C, K...]``, transposed:
``[G·C, D, K...]``).

Shapes (2d, ungrouped for brevity):

- forward:      x [N, C, I1, I2], W -> [N, D, O1, O2]
- input VJP:    grad_out [N, D, O1, O2], W -> [N, C, I1, I2]
- weight VJP:   x, grad_out -> W's shape
- unfold:       x -> [N, C·K1·K2, O1·O2]  (transposed dims: the transposed conv's im2col)
- KFC:          x -> [G, C·K1·K2, C·K1·K2], scale 1/(N·O1·O2)
- KFAC-reduce:  x -> [G, C·K1·K2, C·K1·K2], scale 1/N, via Π̄ = mean_o Π
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from torch import Tensor

from kfac_tn.tensor_network.geometry import ConvDim
from kfac_tn.tensor_network.network import Pattern, TensorNetwork


def _names(prefix: str, n: int, suffix: str = "") -> tuple[str, ...]:
    return tuple(f"{prefix}{j}{suffix}" for j in range(n))


def _patterns(dims: Sequence[ConvDim], suffix: str = "", mean: bool = False):
    """Pattern operands and their indices, one per dimension."""
    ops, idx = [], []
    for j, dim in enumerate(dims):
        ops.append(Pattern(dim, mean=mean))
        if mean:
            idx.append((f"k{j}{suffix}", f"i{j}{suffix}"))
        else:
            idx.append((f"k{j}{suffix}", f"o{j}", f"i{j}{suffix}"))
    return ops, idx


def _check(x: Tensor, dims: Sequence[ConvDim], groups: int, what: str = "input") -> None:
    n = len(dims)
    if x.dim() != n + 2:
        raise ValueError(f"Expected a {n + 2}-d {what} [N, C, *spatial], got shape {tuple(x.shape)}.")
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"{what} channels {x.shape[1]} are not divisible by groups={groups}.")


def _grouped(x: Tensor, groups: int) -> Tensor:
    """``[N, G·C, ...] -> [N, G, C, ...]`` (a view)."""
    return x.unflatten(1, (groups, x.shape[1] // groups))


def _check_spatial(x: Tensor, dims: Sequence[ConvDim], output: bool = False) -> None:
    expected = tuple(d.output_size if output else d.input_size for d in dims)
    if tuple(x.shape[2:]) != expected:
        kind = "output" if output else "input"
        raise ValueError(f"Spatial {kind} size {tuple(x.shape[2:])} does not match {expected}.")


def _weight(weight: Tensor, dims: Sequence[ConvDim], groups: int) -> tuple[Tensor, tuple[str, ...]]:
    """Weight as ``[G, D, C, K...]`` (conv) or ``[G, C, D, K...]`` (transposed) view."""
    n = len(dims)
    if weight.dim() != n + 2:
        raise ValueError(f"Expected a {n + 2}-d weight, got shape {tuple(weight.shape)}.")
    if tuple(weight.shape[2:]) != tuple(d.kernel_size for d in dims):
        raise ValueError(f"Weight kernel {tuple(weight.shape[2:])} does not match the geometry.")
    if weight.shape[0] % groups:
        raise ValueError(f"Weight rows {weight.shape[0]} are not divisible by groups={groups}.")
    first = ("g", "c", "d") if dims[0].transposed else ("g", "d", "c")
    return weight.unflatten(0, (groups, weight.shape[0] // groups)), first + _names("k", n)


def forward(x: Tensor, weight: Tensor, dims: Sequence[ConvDim], groups: int = 1) -> TensorNetwork:
    """``n g c i.., Π.., W -> n (g d) o..``."""
    _check(x, dims, groups)
    _check_spatial(x, dims)
    n = len(dims)
    w, w_idx = _weight(weight, dims, groups)
    pats, pat_idx = _patterns(dims)
    out = ("n", "g", "d") + _names("o", n)
    return TensorNetwork(
        [_grouped(x, groups), *pats, w],
        [("n", "g", "c") + _names("i", n), *pat_idx, w_idx],
        out,
        groups=(("n",), ("g", "d")) + tuple((o,) for o in _names("o", n)),
    )


def input_vjp(grad_output: Tensor, weight: Tensor, dims: Sequence[ConvDim], groups: int = 1) -> TensorNetwork:
    """``n g d o.., Π.., W -> n (g c) i..`` (the vector-Jacobian product w.r.t. the input)."""
    _check(grad_output, dims, groups, "grad_output")
    _check_spatial(grad_output, dims, output=True)
    n = len(dims)
    w, w_idx = _weight(weight, dims, groups)
    pats, pat_idx = _patterns(dims)
    out = ("n", "g", "c") + _names("i", n)
    return TensorNetwork(
        [_grouped(grad_output, groups), *pats, w],
        [("n", "g", "d") + _names("o", n), *pat_idx, w_idx],
        out,
        groups=(("n",), ("g", "c")) + tuple((i,) for i in _names("i", n)),
    )


def weight_vjp(x: Tensor, grad_output: Tensor, dims: Sequence[ConvDim], groups: int = 1) -> TensorNetwork:
    """``n g c i.., Π.., n g d o.. -> W``-shaped result (gradient w.r.t. the weight)."""
    _check(x, dims, groups)
    _check(grad_output, dims, groups, "grad_output")
    _check_spatial(x, dims)
    _check_spatial(grad_output, dims, output=True)
    n = len(dims)
    pats, pat_idx = _patterns(dims)
    ks = _names("k", n)
    if dims[0].transposed:
        out, groups_out = ("g", "c", "d") + ks, (("g", "c"), ("d",))
    else:
        out, groups_out = ("g", "d", "c") + ks, (("g", "d"), ("c",))
    return TensorNetwork(
        [_grouped(x, groups), *pats, _grouped(grad_output, groups)],
        [("n", "g", "c") + _names("i", n), *pat_idx, ("n", "g", "d") + _names("o", n)],
        out,
        groups=groups_out + tuple((k,) for k in ks),
    )


def unfold(x: Tensor, dims: Sequence[ConvDim]) -> TensorNetwork:
    """im2col: ``n c i.., Π.. -> n (c k..) (o..)``.

    With transposed dimensions this is the transposed convolution's unfolded input
    (rows ``(c, k..)`` in the order of ``weight.transpose(0, 1).flatten(1)``).
    """
    _check(x, dims, 1)
    _check_spatial(x, dims)
    n = len(dims)
    pats, pat_idx = _patterns(dims)
    ks, os_ = _names("k", n), _names("o", n)
    return TensorNetwork(
        [x, *pats],
        [("n", "c") + _names("i", n), *pat_idx],
        ("n", "c") + ks + os_,
        groups=(("n",), ("c",) + ks, os_),
    )


def kfc(x: Tensor, dims: Sequence[ConvDim], groups: int = 1) -> TensorNetwork:
    """KFAC-expand input factor, one block per group, scale ``1/(N·O)``.

    ``n g c i.., Π(k, o, i).., n g c_ i_.., Π(k_, o, i_).. -> g (c k..) (c_ k_..)``
    """
    _check(x, dims, groups)
    _check_spatial(x, dims)
    n = len(dims)
    xg = _grouped(x, groups)
    pats1, idx1 = _patterns(dims)
    pats2, idx2 = _patterns(dims, suffix="_")
    row = ("c",) + _names("k", n)
    col = ("c_",) + _names("k", n, "_")
    positions = prod(d.output_size for d in dims)
    return TensorNetwork(
        [xg, *pats1, xg, *pats2],
        [("n", "g", "c") + _names("i", n), *idx1, ("n", "g", "c_") + _names("i", n, "_"), *idx2],
        ("g",) + row + col,
        groups=(("g",), row, col),
        scale=1.0 / (x.shape[0] * positions),
    )


def averaged_unfold(x: Tensor, dims: Sequence[ConvDim], groups: int = 1) -> TensorNetwork:
    """Unfolded input averaged over output positions: ``n g c i.., Π̄.. -> n g (c k..)``."""
    _check(x, dims, groups)
    _check_spatial(x, dims)
    n = len(dims)
    pats, pat_idx = _patterns(dims, mean=True)
    row = ("c",) + _names("k", n)
    return TensorNetwork(
        [_grouped(x, groups), *pats],
        [("n", "g", "c") + _names("i", n), *pat_idx],
        ("n", "g") + row,
        groups=(("n",), ("g",), row),
    )


def kfac_reduce(x: Tensor, dims: Sequence[ConvDim], groups: int = 1) -> TensorNetwork:
    """KFAC-reduce input factor, one block per group, scale ``1/N``.

    ``n g c i.., Π̄(k, i).., n g c_ i_.., Π̄(k_, i_).. -> g (c k..) (c_ k_..)``
    """
    _check(x, dims, groups)
    _check_spatial(x, dims)
    n = len(dims)
    xg = _grouped(x, groups)
    pats1, idx1 = _patterns(dims, mean=True)
    pats2, idx2 = _patterns(dims, suffix="_", mean=True)
    row = ("c",) + _names("k", n)
    col = ("c_",) + _names("k", n, "_")
    return TensorNetwork(
        [xg, *pats1, xg, *pats2],
        [("n", "g", "c") + _names("i", n), *idx1, ("n", "g", "c_") + _names("i", n, "_"), *idx2],
        ("g",) + row + col,
        groups=(("g",), row, col),
        scale=1.0 / x.shape[0],
    )
