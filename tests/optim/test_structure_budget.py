"""budget_groups: SINGD's large factors in a cheaper structure, each such layer in its own
param group, against stock singd 0.0.5 given the same groups."""

import warnings

import pytest
import torch
from helpers import labelled_data, train
from singd.optim.optimizer import SINGD as StockSINGD
from torch import nn

import kfac_tn
from kfac_tn.optim.structure_budget import budget_groups


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),              # d_K 28, d_C 4
        nn.Conv2d(4, 6, 3, stride=2, bias=False), nn.ReLU(),   # d_K 36, d_C 6
        nn.Flatten(), nn.Linear(6 * 3 * 3, 35), nn.ReLU(),     # d_K 55, d_C 35
        nn.Linear(35, 5),                                      # d_K 36, d_C 5
    )


def test_layers_above_the_bound_get_the_cheap_structure_on_their_large_side_only():
    model = _net()
    model[0].bias.requires_grad_(False)  # a frozen bias is not a parameter of any group
    groups = budget_groups(model, max_dense_dim=32, structures=("dense", "diagonal"))
    assert [g.get("layers") for g in groups] == [None, "2", "5", "7"]
    assert [g.get("structures") for g in groups[1:]] == [("block30diagonal", "diagonal"),
                                                         ("block30diagonal", "block30diagonal"),
                                                         ("block30diagonal", "diagonal")]
    assert groups[0]["params"] == [model[0].weight]
    assert groups[2]["params"] == [model[5].weight, model[5].bias]
    assert budget_groups(model, max_dense_dim=55) == [{"params": [p for p in model.parameters() if p.requires_grad]}]


@pytest.mark.parametrize("large", ["block30diagonal", "diagonal"])
def test_singd_on_budget_groups_matches_stock_on_the_same_groups(large):
    X, y = labelled_data((6, 3, 7, 7))
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1, structures=("dense", "dense"), damping=1e-2)
    results = []
    for cls in (StockSINGD, kfac_tn.SINGD):
        model = _net()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls(model, params=budget_groups(model, 32, large_structure=large), **kwargs)
        results.append(train(model, opt, X, y, steps=3))
        if cls is kfac_tn.SINGD:  # layer 5: K of 55 and C of 35 above 32; layer 0 within
            cheap = "Block30DiagonalMatrix" if large == "block30diagonal" else "DiagonalMatrix"
            assert type(opt.Ks["5"]).__name__ == type(opt.Cs["5"]).__name__ == cheap
            assert type(opt.Ks["0"]).__name__ == type(opt.Cs["0"]).__name__ == "DenseMatrix"
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)
    assert not torch.equal(results[1], torch.cat([p.detach().flatten() for p in _net().parameters()]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_dense_dim=0), "max_dense_dim must be an integer >= 1"),
    (dict(max_dense_dim=True), "max_dense_dim must be an integer >= 1"),
    (dict(max_dense_dim=8, large_structure="dense"), "large_structure must be one of"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        budget_groups(_net(), **kwargs)


def test_singd_max_dense_dim_equals_stock_on_budget_groups_and_needs_its_own_groups():
    """``SINGD(max_dense_dim=...)`` builds the groups itself: SINGD's ``structures`` apply to
    the layers within the bound and to the small side of the others (stock as the oracle)."""
    X, y = labelled_data((6, 3, 7, 7))
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1, damping=1e-2, structures=("dense", "diagonal"))
    stock_model, model = _net(), _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = StockSINGD(stock_model, params=budget_groups(stock_model, 32, ("dense", "diagonal"), "diagonal"),
                           **kwargs)
        opt = kfac_tn.SINGD(model, max_dense_dim=32, large_structure="diagonal", **kwargs)
    assert [g.get("layers") for g in opt.param_groups] == [None, "2", "5", "7"]
    assert [g["structures"] for g in opt.param_groups] == [("dense", "diagonal"), ("diagonal", "diagonal"),
                                                           ("diagonal", "diagonal"), ("diagonal", "diagonal")]
    torch.testing.assert_close(train(model, opt, X, y, steps=3), train(stock_model, stock, X, y, steps=3),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="max_dense_dim builds the param groups itself"):
        kfac_tn.SINGD(_net(), params=_net().parameters(), max_dense_dim=32)
