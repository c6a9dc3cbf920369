"""Block-diagonal factors (``max_factor_dim``): the layout's operations against
``torch.block_diag`` and masked dense matrices, and a resumed KFAC run against a literal
KFAC on masked factors (the single step: tests/optim/test_kfac.py)."""

import io

import pytest
import torch
from helpers import block_mask, kfac_test_batch, kfac_test_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfac_tn
from kfac_tn.factors import (
    grad_output_factor,
    grad_output_factor_blocks,
    input_factor,
    input_factor_blocks,
)
from kfac_tn.optim.factor_blocks import (
    block_layout,
    diagonal_blocks,
    multiply_left,
    multiply_right,
    padded_blocks,
    trace_mean,
)


def _psd(d, gen):
    X = torch.randn(d, d + 2, generator=gen, dtype=torch.float64)
    return X @ X.T / d


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 40), max_dim=st.integers(1, 45), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_blocked_products_equal_the_masked_dense_products(d, max_dim, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    n, size = block_layout(d, max_dim)
    assert size <= max(max_dim, 1) and (n - 1) * size < d <= n * size
    assert (n == 1) == (d <= max_dim)
    F = _psd(d, gen)
    blocks = diagonal_blocks(F.unsqueeze(0), n, size)[0]
    if n == 1:  # a dense factor is its own single block
        assert blocks.shape == (d, d)
        blocks = blocks.unsqueeze(0)
    masked = torch.where(block_mask(d, max_dim), F, 0.0)
    dense = torch.block_diag(*blocks)
    torch.testing.assert_close(dense[:d, :d], masked)
    torch.testing.assert_close(torch.diagonal(dense)[d:], torch.ones(n * size - d, dtype=F.dtype))  # padding: I
    M = blocks if n > 1 else F  # dense factors stay [d, d]
    V = torch.randn(rows, d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(multiply_right(V, M), V @ masked)
    torch.testing.assert_close(multiply_left(M, V.T), masked @ V.T)
    torch.testing.assert_close(trace_mean(blocks.unsqueeze(0) if n > 1 else F.unsqueeze(0), d),
                               (F.trace() / d).reshape(1, 1))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("layer, x_shape, g_shape", [
    (nn.Linear(23, 11), (5, 23), (5, 11)),
    (nn.Conv2d(3, 7, 3, padding=1, bias=False), (4, 3, 6, 6), (4, 7, 6, 6)),
    (nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), (3, 4, 3, 3), (3, 6, 6, 6)),
])
def test_factor_blocks_from_the_kernels_are_the_dense_factors_blocks(layer, x_shape, g_shape, approx):
    gen = torch.Generator().manual_seed(3)
    layer = layer.double()
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64)
    g = torch.randn(*g_shape, generator=gen, dtype=torch.float64)
    A, G = input_factor(layer, x, approx), grad_output_factor(layer, g, approx)
    for dense, kernel in ((A, input_factor_blocks), (G, grad_output_factor_blocks)):
        n, size = block_layout(dense.shape[-1], max(1, dense.shape[-1] // 3))
        if n == 1:
            continue
        blocks = padded_blocks(*kernel(layer, x if dense is A else g, size, approx), n)
        torch.testing.assert_close(blocks, diagonal_blocks(dense, n, size))


_model, _data = kfac_test_model, kfac_test_batch


def test_describe_names_every_layer_and_how_its_factors_are_kept():
    opt = kfac_tn.KFAC(_model(), max_factor_dim=10)
    lines = opt.describe().splitlines()
    assert lines[0].startswith("0: A 28 as 3 blocks of 10, G 4 dense")
    assert lines[1].startswith("2: A 9 dense, G 1 dense")
    assert lines[2].startswith("5: A 201 as 21 blocks of 10, G 5 dense")
    assert opt.factor_blocks["5"] == ((21, 10), (1, 5))
    assert kfac_tn.KFAC(_model()).factor_blocks["5"] == ((1, 201), (1, 5))  # 201 rows: within the default 256


def test_a_resumed_blocked_run_follows_the_reference_kfac_and_refuses_another_layout():
    """Two steps, a checkpoint into a fresh optimizer, two more: the parameters of a literal
    KFAC whose damped factors are masked to their blocks (tests/reference_kfac.py), with
    running averages, momentum and a stale inverse in between."""
    from reference_kfac import ReferenceKFAC

    kwargs = dict(lr=0.05, momentum=0.9, damping=1e-2, ema_decay=0.8, inverse_update_freq=3, kl_clip=1e-2,
                  max_factor_dim=10)
    batches = [_data(seed) for seed in range(4)]
    reference = _model()
    oracle = ReferenceKFAC(reference, **kwargs)
    model = _model()
    opt = kfac_tn.KFAC(model, inverse_dtype=torch.float64, **kwargs)
    for k, (X, y) in enumerate(batches):
        oracle.step(X, y)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        if k == 1:  # round trip through torch.save into a fresh optimizer
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
            opt = kfac_tn.KFAC(model, inverse_dtype=torch.float64, **kwargs)
            opt.load_state_dict(saved)
            other = kfac_tn.KFAC(_model(), **{**kwargs, "max_factor_dim": 20})
            with pytest.raises(ValueError, match="max_factor_dim=20"):
                other.load_state_dict(saved)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_max_factor_dim_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="max_factor_dim"):
        kfac_tn.KFAC(_model(), max_factor_dim=value)
