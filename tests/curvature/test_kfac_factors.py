"""kfac_tn.kfac_factors against curvlinops' KFAC, backpack's KFLR and exactness results."""

import pytest
import torch
from curvlinops import GGNLinearOperator, KFACLinearOperator
from curvlinops.kfac import FisherType, KFACType
from torch import nn

import kfac_tn

FISHERS = {"empirical": FisherType.EMPIRICAL, "type-2": FisherType.TYPE2, "mc": FisherType.MC}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 3, 2, stride=2, bias=False), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(3 * 3 * 3, 4),
    ).double()


def _targets(loss_func, N, C):
    gen = torch.Generator().manual_seed(3)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return torch.randint(0, C, (N,), generator=gen)
    if isinstance(loss_func, nn.BCEWithLogitsLoss):
        return torch.randint(0, 2, (N, C), generator=gen).double()
    return torch.randn(N, C, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("fisher", ["empirical", "type-2", "mc"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    "loss_func",
    [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum"), nn.MSELoss(), nn.BCEWithLogitsLoss()],
    ids=["ce-mean", "mse-sum", "mse-mean", "bce-mean"],
)
def test_matches_curvlinops(loss_func, approx, fisher):
    model = _model()
    X = torch.randn(5, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = _targets(loss_func, 5, 4)
    mc_samples = 2 if fisher == "mc" else 1
    ours = kfac_tn.kfac_factors(model, loss_func, X, y, approx=approx, fisher=fisher, mc_samples=mc_samples)
    kfac = KFACLinearOperator(
        model, loss_func, list(model.parameters()), [(X, y)], fisher_type=FISHERS[fisher],
        kfac_approx=KFACType.EXPAND if approx == "expand" else KFACType.REDUCE,
        check_deterministic=False, separate_weight_and_bias=False, mc_samples=mc_samples,
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    assert set(ours) == set(state["input_covariances"])
    for name, (A, G) in ours.items():
        torch.testing.assert_close(A[0], state["input_covariances"][name])
        torch.testing.assert_close(G[0], state["gradient_covariances"][name])


def _dense(op) -> torch.Tensor:
    n = op.shape[1]
    return op @ torch.eye(n, dtype=torch.float64)


def test_type2_expand_is_exact_for_deep_linear_nets_with_per_position_loss():
    """Eschenhagen et al. (2023): for deep linear networks with weight sharing and a
    loss per position (MSE), type-2 KFAC-expand equals the exact GGN block."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    X = torch.randn(4, 5, 3, dtype=torch.float64)  # 5 shared positions
    y = torch.randn(4, 5, 2, dtype=torch.float64)
    loss_func = nn.MSELoss(reduction="sum")
    factors = kfac_tn.kfac_factors(model, loss_func, X, y, approx="expand", fisher="type-2")
    params = list(model.parameters())
    ggn = _dense(GGNLinearOperator(model, loss_func, params, [(X, y)], check_deterministic=False))
    offset = 0
    for name, p in zip(["0", "1"], params):
        n = p.numel()
        A, G = factors[name]
        torch.testing.assert_close(torch.kron(G[0], A[0]), ggn[offset : offset + n, offset : offset + n])
        offset += n


class _PooledConvNet(nn.Module):
    """Linear conv net whose positions are pooled (summed) before the loss."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3, bias=False)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(self.conv(x).sum(-1))


def test_type2_reduce_is_exact_when_positions_are_pooled():
    """KFAC-reduce is exact for the weight-sharing layer when positions are pooled before
    the loss (Eschenhagen et al., 2023), here a Conv1d in a linear network."""
    torch.manual_seed(0)
    model = _PooledConvNet().double()
    X = torch.randn(4, 3, 7, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    loss_func = nn.MSELoss(reduction="sum")
    A, G = kfac_tn.kfac_factors(model, loss_func, X, y, approx="reduce", fisher="type-2")["conv"]
    params = list(model.parameters())
    ggn = _dense(GGNLinearOperator(model, loss_func, params, [(X, y)], check_deterministic=False))
    n = model.conv.weight.numel()
    # reduce: A is over mean positions, G over summed ones; the GGN sees sums: scale O²/O²
    torch.testing.assert_close(torch.kron(G[0], A[0]), ggn[:n, :n])


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv1d(2, 3, 3, stride=2, padding=1), (4, 2, 7)),
        (nn.Conv3d(2, 3, 2, padding=1), (3, 2, 3, 4, 3)),
        # backpack 1.7.1 disagrees once output_padding > 0 (its unfold ignores it; ours
        # reproduces the layer's forward pass, see test_expressions), so it is left out here
        (nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1), (3, 2, 3, 4)),
        (nn.ConvTranspose1d(2, 3, 2, dilation=2), (3, 2, 5)),
    ],
)
def test_input_factor_matches_backpack_kflr(layer, shape):
    """backpack's KFLR A for convolutions is KFC without the 1/positions (1/N only)."""
    from backpack import backpack, extend
    from backpack.extensions import KFLR

    torch.manual_seed(0)
    layer = layer.double()
    model = extend(nn.Sequential(layer, nn.Flatten()))
    X = torch.randn(*shape, dtype=torch.float64)
    out = model(X)
    y = torch.randn_like(out)
    loss = extend(nn.MSELoss(reduction="sum"))(out, y)
    with backpack(KFLR()):
        loss.backward()
    A_backpack = layer.weight.kflr[1]
    positions = out.shape[1] // layer.out_channels
    layer_nobias = layer
    bias, layer_nobias.bias = layer.bias, None
    try:
        A = kfac_tn.input_factor(layer_nobias, X, "expand")[0]
    finally:
        layer_nobias.bias = bias
    torch.testing.assert_close(A * positions, A_backpack)


def test_errors_are_named():
    model = _model()
    X = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (2,))
    with pytest.raises(TypeError, match="Unsupported loss L1Loss"):
        kfac_tn.kfac_factors(model, nn.L1Loss(), X, y)
    with pytest.raises(ValueError, match="fisher must be"):
        kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), X, y, fisher="exact")
    with pytest.raises(ValueError, match="reduction"):
        kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(reduction="none"), X, y)
    with pytest.raises(ValueError, match="mc_samples"):
        kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), X, y, fisher="mc", mc_samples=0)


def test_layers_are_chosen_by_the_optimizers_rule_and_eval_mode_counts():
    """kfac_factors watches the layers the optimizers precondition (trainable weight,
    capture.supported_layers) with the optimizers' capture, also in eval mode; a frozen
    weight leaves its layer out."""
    import torch
    from torch import nn

    import kfac_tn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    train_mode = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), X, y)
    model.eval()
    eval_mode = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), X, y)
    assert set(train_mode) == set(eval_mode) == {"0", "2"}
    for name in train_mode:
        for a, b in zip(train_mode[name], eval_mode[name]):
            torch.testing.assert_close(a, b)
    model[0].weight.requires_grad_(False)
    assert set(kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), X, y)) == {"2"}
    assert not model[0]._forward_hooks and not model[2]._forward_hooks  # hooks removed afterwards
