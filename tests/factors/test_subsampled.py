"""Randomized KFAC-expand factors: their mean over every subset of positions is exact."""

from itertools import combinations

import pytest
import torch
from torch import nn

import kfac_tn
from kfac_tn.factors import subsampled_grad_output_factor, subsampled_input_factor

LAYERS = {
    "conv2d": (lambda: nn.Conv2d(3, 4, 3, padding=1), (2, 3, 3, 3)),
    "grouped strided conv2d": (lambda: nn.Conv2d(4, 6, 2, stride=2, groups=2, bias=False), (2, 4, 4, 6)),
    "depthwise conv1d, reflect padding": (lambda: nn.Conv1d(3, 3, 3, padding=1, groups=3, padding_mode="reflect"),
                                          (2, 3, 7)),
    "depthwise strided conv2d with bias": (lambda: nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3), (2, 3, 4, 3)),
    "dilated depthwise conv3d": (lambda: nn.Conv3d(2, 2, 2, padding=1, dilation=(1, 2, 1), groups=2), (2, 2, 2, 3, 1)),
    "conv_transpose2d": (lambda: nn.ConvTranspose2d(3, 2, 2, stride=2), (2, 3, 2, 2)),
    "linear over positions": (lambda: nn.Linear(3, 4), (2, 5, 3)),
}


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("group_average", [False, True])
@pytest.mark.parametrize("routes", ["cpu", "accelerator"])  # grouped layers: per-group Grams or windows
def test_the_mean_over_all_subsets_is_the_exact_factor(name, m, group_average, routes):
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    out = layer(x)
    g = torch.randn_like(out)
    A = kfac_tn.input_factor(layer, x, "expand", group_average)
    G = kfac_tn.grad_output_factor(layer, g, "expand", group_average=group_average)
    P = out[0].numel() // out.shape[1] if not isinstance(layer, nn.Linear) else out[0].numel() // out.shape[-1]
    subsets = [torch.tensor(s) for s in combinations(range(P), m)]
    with kfac_tn.use_routes(routes):
        mean_A = sum(subsampled_input_factor(layer, x, m, group_average, positions=s) for s in subsets) / len(subsets)
        mean_G = sum(subsampled_grad_output_factor(layer, g, m, group_average=group_average, positions=s)
                     for s in subsets) / len(subsets)
    torch.testing.assert_close(mean_A, A)
    torch.testing.assert_close(mean_G, G)


def test_all_positions_give_the_exact_factors_and_bad_fractions_are_errors():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    g = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(subsampled_input_factor(layer, x, 1.0), kfac_tn.input_factor(layer, x, "expand"))
    torch.testing.assert_close(subsampled_grad_output_factor(layer, g, 25), kfac_tn.grad_output_factor(layer, g))
    generator = torch.Generator().manual_seed(0)
    first = subsampled_input_factor(layer, x, 0.2, generator=generator)
    assert not torch.equal(first, subsampled_input_factor(layer, x, 0.2, generator=generator))  # fresh subsets
    for bad in (0.0, 1.5, 0, True, "half"):
        with pytest.raises(ValueError, match="subsample"):
            subsampled_input_factor(layer, x, bad)


def test_input_and_grad_output_factor_take_subsample():
    """``subsample=`` on the public factor functions: the randomized factor of the same
    draw (same seed), exact at every position; KFAC-reduce has no positions to sample."""
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    g = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    for fn, sub, arg in ((kfac_tn.input_factor, subsampled_input_factor, x),
                         (kfac_tn.grad_output_factor, subsampled_grad_output_factor, g)):
        ours = fn(layer, arg, "expand", subsample=4, generator=torch.Generator().manual_seed(3))
        theirs = sub(layer, arg, 4, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(fn(layer, arg, "expand", subsample=1.0), fn(layer, arg, "expand"))
        with pytest.raises(ValueError, match="approx='expand'"):
            fn(layer, arg, "reduce", subsample=0.5)
