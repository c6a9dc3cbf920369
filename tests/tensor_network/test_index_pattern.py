"""Index patterns Π and Π̄ against einconv, a brute-force unfold and each other."""

import torch
from einconv import index_pattern as einconv_index_pattern
from hypothesis import given, settings
from hypothesis import strategies as st
from unfoldNd import unfold_transposeNd

from kfac_tn.tensor_network import ConvDim, conv_dims, index_pattern, mean_index_pattern

dims_1d = st.builds(
    lambda i, k, s, d, p: (i, k, s, d, p),
    st.integers(1, 12), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.integers(0, 3),
)


@given(dims_1d)
@settings(max_examples=60, deadline=None)
def test_conv_pattern_matches_einconv(case):
    i, k, s, d, p = case
    try:
        (dim,) = conv_dims((i,), k, s, p, d)
    except ValueError:
        return  # no output: nothing to compare
    ours = index_pattern(dim, dtype=torch.bool)
    theirs = einconv_index_pattern(i, k, stride=s, padding=p, dilation=d)
    assert torch.equal(ours, theirs)


@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 3))
@settings(max_examples=40, deadline=None)
def test_same_padding_reads_like_torch(i, k, d):
    """'same' (asymmetric when D·(K−1) is odd): Π reproduces F.conv1d(padding='same')."""
    (dim,) = conv_dims((i,), k, 1, "same", d)
    x = torch.randn(2, 1, i, dtype=torch.float64)
    w = torch.randn(1, 1, k, dtype=torch.float64)
    pattern = index_pattern(dim, dtype=torch.float64)
    ours = torch.einsum("nci,koi,dck->ndo", x, pattern, w)
    torch.testing.assert_close(ours, torch.nn.functional.conv1d(x, w, padding="same", dilation=d))


@given(st.integers(1, 8), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), st.data())
@settings(max_examples=60, deadline=None)
def test_transposed_pattern_matches_unfold_transpose(i, k, s, d, p, data):
    op = data.draw(st.integers(0, max(s, d) - 1))
    try:
        dim = ConvDim(i, k, s, d, p, p, op, transposed=True)
    except ValueError:
        return
    ones = torch.eye(i, dtype=torch.float64).unsqueeze(1)  # batch i: one-hot inputs
    u = unfold_transposeNd(ones, k, stride=s, padding=p, output_padding=op, dilation=d)
    assert torch.equal(index_pattern(dim, torch.float64), u.permute(1, 2, 0))


@given(dims_1d, st.booleans())
@settings(max_examples=60, deadline=None)
def test_mean_pattern_is_mean_over_outputs(case, transposed):
    i, k, s, d, p = case
    try:
        dim = ConvDim(i, k, s, d, p, p, 0, transposed)
    except ValueError:
        return
    pattern = index_pattern(dim, torch.float64)
    torch.testing.assert_close(mean_index_pattern(dim, torch.float64), pattern.mean(1))


def test_invalid_geometry_is_named():
    import pytest

    with pytest.raises(ValueError, match="stride"):
        ConvDim(5, 3, stride=0)
    with pytest.raises(ValueError, match="no output"):
        ConvDim(2, 5)
    with pytest.raises(ValueError, match="output_padding"):
        ConvDim(5, 3, stride=2, output_padding=2, transposed=True)
    with pytest.raises(ValueError, match="strided"):
        conv_dims((5,), 3, 2, "same")
    with pytest.raises(ValueError, match="Unknown padding"):
        conv_dims((5,), 3, 1, "full")
