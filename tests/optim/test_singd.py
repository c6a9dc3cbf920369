"""kfac_tn.SINGD against stock singd 0.0.5 and against equivalent models."""

import copy
import warnings

import pytest
import torch
from helpers import labelled_data, train, watch_layer
from singd.optim.optimizer import SINGD as StockSINGD
from torch import nn

import kfac_tn

STRUCTURES = ["dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz", "triutoeplitz"]


def _train(model, opt, data, steps):
    return train(model, opt, *data, steps)


_data = labelled_data


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
    )


@pytest.fixture(params=["cpu", "accelerator"])
def routes(request):
    """Run the test on kfac_tn's CPU kernel routes and on its accelerator routes (one GEMM
    per product, unfold + GEMM for KFC, large chunks), which CI has no GPU to reach."""
    with kfac_tn.use_routes(request.param):
        yield request.param


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_trajectory_matches_stock_singd(structure, approx, stock_float64, routes):
    """Linear + ungrouped Conv2d: same arguments, same data -> same parameters.

    ``alpha1 = 0.3``: with 0.5 a momentum weighted by ``1 − alpha1`` instead of ``alpha1``
    (a bug the diagonal bank once had as a mutant) gives the same numbers.

    In float64, so that the only differences are rounding. The first conv takes the
    factor-sandwich route (many rows), the second and the Linear layer the row route,
    the grad-output side both: all are exercised.
    """
    dtype = torch.float64
    tol = dict(rtol=1e-10, atol=1e-12)
    data = _data((6, 3, 7, 7), dtype=dtype)
    for kfac_like in (False, True):
        for T in (1, 3):
            kwargs = dict(lr=0.1, lr_cov=0.1, T=T, structures=(structure, structure),
                          kfac_approx=approx, kfac_like=kfac_like, alpha1=0.0 if kfac_like else 0.3,
                          weight_decay=1e-3)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m1, m2 = _cnn().to(dtype), _cnn().to(dtype)
                ref = _train(m1, StockSINGD(m1, **kwargs), data, 4)
                ours = _train(m2, kfac_tn.SINGD(m2, **kwargs), data, 4)
            torch.testing.assert_close(ours, ref, **tol)


def test_block_bank_with_factors_of_whole_blocks_matches_stock(stock_float64):
    """d_K = 60, d_C = 30 and d_K = 31, d_C = 4: factors made of whole 30-blocks (an empty
    last block), one block and a last block, and a last block alone; K and C as stock's."""
    data = (torch.randn(5, 59, dtype=torch.float64, generator=torch.Generator().manual_seed(4)),
            torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(5)))
    kwargs = dict(lr=0.1, lr_cov=0.2, T=1, alpha1=0.3, structures=("block30diagonal", "block30diagonal"))
    models = []
    for _ in range(2):
        torch.manual_seed(2)
        models.append(nn.Sequential(nn.Linear(59, 30), nn.ReLU(), nn.Linear(30, 4)).double())
    stock, ours = StockSINGD(models[0], **kwargs), kfac_tn.SINGD(models[1], **kwargs)
    ref, got = _train(models[0], stock, data, 3), _train(models[1], ours, data, 3)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    for name in ("0", "2"):
        for mine, theirs in ((ours.Ks[name], stock.Ks[name]), (ours.Cs[name], stock.Cs[name])):
            torch.testing.assert_close(mine.to_dense(), theirs.to_dense(), rtol=1e-10, atol=1e-12)


def test_grouped_average_matches_stock_singd():
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))

    data = _data((5, 4, 5, 5))
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1)
    m1, m2 = model(), model()
    ref = _train(m1, StockSINGD(m1, **kwargs), data, 3)
    ours = _train(m2, kfac_tn.SINGD(m2, grouped_conv="average", **kwargs), data, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


class _Split(nn.Module):
    """A grouped conv written as G separate ungrouped convs (an independent oracle)."""

    def __init__(self, grouped: nn.Conv2d):
        super().__init__()
        G = grouped.groups
        self.parts = nn.ModuleList()
        for w, b in zip(grouped.weight.chunk(G), grouped.bias.chunk(G)):
            conv = nn.Conv2d(w.shape[1], w.shape[0], grouped.kernel_size, grouped.stride, grouped.padding)
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(b)
            self.parts.append(conv)

    def forward(self, x):
        return torch.cat([p(xg) for p, xg in zip(self.parts, x.chunk(len(self.parts), 1))], 1)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block30diagonal"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_grouped_exact_equals_split_layers(approx, structure):
    torch.manual_seed(0)
    grouped = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()  # d = 37 per group: a full 30-block too
    head = nn.Linear(6 * 25, 5).double()
    split = _Split(grouped).double()
    head2 = nn.Linear(6 * 25, 5).double()
    head2.load_state_dict(head.state_dict())
    m1 = nn.Sequential(grouped, nn.Flatten(), head)
    m2 = nn.Sequential(split, nn.Flatten(), head2)
    X, y = _data((4, 8, 5, 5))
    data = (X.double(), y)
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1, kfac_approx=approx, structures=(structure, structure))
    _train(m1, kfac_tn.SINGD(m1, **kwargs), data, 3)
    _train(m2, kfac_tn.SINGD(m2, **kwargs), data, 3)
    torch.testing.assert_close(grouped.weight, torch.cat([p.weight for p in split.parts]))
    torch.testing.assert_close(grouped.bias, torch.cat([p.bias for p in split.parts]))


@pytest.mark.parametrize("structure", ["dense", "block30diagonal"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv1d_and_conv3d_equal_stock_on_equivalent_conv2d(approx, structure):
    """Conv1d(K) on [N, C, L] ≡ Conv2d((1, K)) on [N, C, 1, L]; Conv3d((1, k, k)) likewise."""
    X, y = _data((4, 4, 1, 6, 6))
    cases = [  # the Conv3d has d = 37: one full 30-block and a last block
        (nn.Conv1d(4, 4, 3, padding=1), nn.Conv2d(4, 4, (1, 3), padding=(0, 1)), X[:, :, 0, 0], X[:, :, 0, :1]),
        (nn.Conv3d(4, 4, (1, 3, 3)), nn.Conv2d(4, 4, 3), X, X[:, :, 0]),
    ]
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1, kfac_approx=approx, structures=(structure, structure))
    for ours_layer, ref_layer, x_ours, x_ref in cases:
        ref_layer.weight.data.copy_(ours_layer.weight.data.reshape(ref_layer.weight.shape))
        ref_layer.bias.data.copy_(ours_layer.bias.data)
        m1 = nn.Sequential(ours_layer, nn.Flatten())
        m2 = nn.Sequential(ref_layer, nn.Flatten())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _train(m1, kfac_tn.SINGD(m1, **kwargs), (x_ours, y % 4), 3)
            _train(m2, StockSINGD(m2, **kwargs), (x_ref, y % 4), 3)
        torch.testing.assert_close(ours_layer.weight.data.reshape(ref_layer.weight.shape), ref_layer.weight.data)


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_conv_transpose_equals_stock_on_flipped_conv(structure):
    """ConvTranspose2d (stride 1, padding P) ≡ Conv2d with the flipped, transposed kernel
    and padding K−1−P; the factors differ by a tap permutation, to which SINGD with
    dense or diagonal structures is equivariant."""
    torch.manual_seed(0)
    tconv = nn.ConvTranspose2d(3, 4, 3, padding=1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.weight.data.copy_(tconv.weight.data.transpose(0, 1).flip(-1, -2))
    conv.bias.data.copy_(tconv.bias.data)
    data = _data((4, 3, 5, 5), classes=4)
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1, structures=(structure, structure))
    m1, m2 = nn.Sequential(tconv, nn.Flatten()), nn.Sequential(conv, nn.Flatten())
    _train(m1, kfac_tn.SINGD(m1, **kwargs), data, 3)
    _train(m2, StockSINGD(m2, **kwargs), data, 3)
    torch.testing.assert_close(tconv.weight.data.transpose(0, 1).flip(-1, -2), conv.weight.data)


@pytest.mark.parametrize("structures", [("dense", "diagonal"), ("diagonal", "diagonal"),
                                        ("block30diagonal", "block30diagonal")])
@pytest.mark.parametrize("pending", [False, True], ids=["after_step", "between_backward_and_step"])
def test_state_dict_round_trip_is_bit_identical(structures, pending):
    """Resume through torch.save/torch.load (default weights_only=True) equals the
    uninterrupted run, also from a checkpoint with pending statistics (taken between
    backward() and step())."""
    import io

    data = _data((6, 3, 7, 7))
    kwargs = dict(lr=0.1, lr_cov=0.1, T=2, structures=structures)
    m1 = _cnn()
    uninterrupted = _train(m1, kfac_tn.SINGD(m1, **kwargs), data, 5)
    m2 = _cnn()
    opt2 = kfac_tn.SINGD(m2, **kwargs)
    _train(m2, opt2, data, 2 if pending else 3)
    if pending:  # step 2 is a statistics step (T = 2): its backward pass is in the checkpoint
        opt2.zero_grad()
        nn.functional.cross_entropy(m2(data[0]), data[1]).backward()
        assert opt2.H_Ks
    buffer = io.BytesIO()
    torch.save({"opt": opt2.state_dict(), "model": m2.state_dict(),
                "grads": [p.grad for p in m2.parameters()]}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)  # torch's default: weights_only=True
    m3 = _cnn()
    m3.load_state_dict(checkpoint["model"])
    opt3 = kfac_tn.SINGD(m3, **kwargs)
    opt3.load_state_dict(checkpoint["opt"])
    if pending:
        for p, g in zip(m3.parameters(), checkpoint["grads"]):
            p.grad = g
        opt3.step()
    resumed = _train(m3, opt3, data, 2)
    assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block30diagonal", "hierarchical15_15",
                                       ("block30diagonal", "diagonal")])
def test_normalized_lr_cov_matches_stock(structure, stock_float64, routes):
    """normalize_lr_cov divides the step size by the momentum's largest entry (per factor);
    mixed structures: per-layer storage instead of a bank."""
    structure = structure if isinstance(structure, tuple) else (structure, structure)
    dtype = torch.float64
    X, y = _data((6, 3, 7, 7))
    data = (30 * X.to(dtype), y)  # large statistics: the momenta's entries exceed 1, so it matters
    kwargs = dict(lr=0.1, lr_cov=0.5, T=1, structures=structure, normalize_lr_cov=True,
                  alpha1=0.3, damping=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1, m2 = _cnn().to(dtype), _cnn().to(dtype)
        ref = _train(m1, StockSINGD(m1, **kwargs), data, 4)
        ours = _train(m2, kfac_tn.SINGD(m2, **kwargs), data, 4)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_a_state_without_pending_statistics_loads_and_one_without_momenta_is_refused(structure):
    """Saved between backward() and step(), less H_Ks/H_Cs: the run goes on as one whose
    pending statistics were cleared. Less m_Ks or m_Cs: an error, not momenta lost silently."""
    X, y = _data((4, 3, 7, 7))
    kwargs = dict(T=1, alpha1=0.3, lr_cov=0.2, structures=(structure, structure))
    model = _cnn()
    opt = kfac_tn.SINGD(model, **kwargs)
    _train(model, opt, (X, y), 1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()  # pending statistics
    state = copy.deepcopy(opt.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    stripped = {k: v for k, v in state.items() if k not in ("H_Ks", "H_Cs")}
    resumed_model = copy.deepcopy(model)
    for p, g in zip(resumed_model.parameters(), grads):
        p.grad = g.clone()
    resumed = kfac_tn.SINGD(resumed_model, **kwargs)
    resumed.load_state_dict(stripped)
    opt._H_K_blocks.clear(), opt._H_C_blocks.clear()  # the reference: statistics dropped
    for o in (opt, resumed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (no statistics for the update: warned)
            o.step()
    assert all(torch.equal(p.grad, g) for p, g in zip(resumed_model.parameters(), grads))
    for ours, theirs in zip(resumed_model.parameters(), model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    for key in ("m_Ks", "m_Cs"):
        with pytest.raises(ValueError, match=f"no '{key}'"):
            kfac_tn.SINGD(_cnn(), **kwargs).load_state_dict({k: v for k, v in state.items() if k != key})


def test_state_dict_of_another_model_is_rejected():
    m1 = _cnn()
    state = kfac_tn.SINGD(m1).state_dict()
    other = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="other layers"):
        kfac_tn.SINGD(other).load_state_dict(state)
    m2 = _cnn()
    with pytest.raises(ValueError, match="shape or structure"):
        kfac_tn.SINGD(m2, structures=("diagonal", "dense")).load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1.0), "lr must be"),
        (dict(damping=-1e-3), "damping must be"),
        (dict(T=0), "T must be"),
        (dict(T=1.5), "T must be"),
        (dict(alpha1=1.0), "alpha1 must"),
        (dict(lr_cov=-0.1), "lr_cov must"),
        (dict(structures=("dense", "sparse")), "Unknown structure 'sparse'"),
        (dict(kfac_approx="diag"), "kfac_approx must"),
        (dict(loss_average="mean"), "loss_average must"),
        (dict(grouped_conv="sum"), "grouped_conv must"),
        (dict(update_worker_fraction=0.0), "update_worker_fraction must"),
        (dict(shard_preconditioner=1), "shard_preconditioner must be True or False"),
        (dict(shard_preconditioner=True, update_worker_fraction=0.5), "excludes update_worker_fraction"),
    ],
)
def test_invalid_hyperparameters_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kfac_tn.SINGD(_cnn(), **kwargs)


def test_wrappers_and_unsupported_layers():
    with pytest.raises(TypeError, match="DataParallel"):
        kfac_tn.SINGD(nn.DataParallel(_cnn()))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.warns(UserWarning, match=r"un-supported parameter.*layer\(s\) 1 \(BatchNorm2d\)\..*or pass warn_unsupported=False "
                      "to silence this warning"):
        kfac_tn.SINGD(model)


def test_no_statistics_in_eval_mode_or_no_grad():
    model = _cnn()
    opt = kfac_tn.SINGD(model, T=1)
    X, y = _data((4, 3, 7, 7))
    with torch.no_grad():
        model(X)
    model.eval()
    nn.functional.cross_entropy(model(X), y).backward()
    assert not opt.H_Ks
    K_before = opt.Ks["0"].to_dense().clone()
    with pytest.warns(UserWarning, match="No curvature statistics"):
        opt.step()
    assert torch.equal(K_before, opt.Ks["0"].to_dense())


def _snapshot(model, opt):
    """Every tensor of the model and the optimizer's state, cloned."""
    tensors = [p.detach().clone() for p in model.parameters()]
    for store in (opt.Ks, opt.Cs, opt.m_Ks, opt.m_Cs):
        tensors += [t.clone() for M in store.values() for _, t in M.named_tensors()]
    tensors += [s["momentum_buffer"].clone() for s in opt.state.values() if "momentum_buffer" in s]
    return tensors


GUARD_STRUCTURES = ["dense", "diagonal", "block30diagonal", "triltoeplitz"]


@pytest.mark.parametrize("structure", GUARD_STRUCTURES)
def test_non_finite_gradients_skip_the_step(structure, routes):
    """After a good step, a step with inf gradients changes nothing: parameters, K, C,
    their momenta and the momentum buffers keep their bits; its statistics are dropped."""
    model = _cnn()
    opt = kfac_tn.SINGD(model, T=1, lr=0.1, lr_cov=0.1, structures=(structure, structure))
    X, y = _data((4, 3, 7, 7))
    _train(model, opt, (X, y), 1)
    before = _snapshot(model, opt)
    X = X.clone()
    X[0, 0, 0, 0] = float("inf")
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    with pytest.warns(UserWarning, match="Encountered inf in gradients") as record:
        opt.step()
    # the statistics are non-finite too, but the gradients skipped the step: no layer is blamed
    assert not [w for w in record if "curvature statistics" in str(w.message)]
    after = _snapshot(model, opt)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(after, before))
    assert not opt.H_Ks  # the step's statistics were dropped
    _train(model, opt, (X.nan_to_num(posinf=1.0), y), 1)  # and training goes on
    assert not all(torch.equal(a, b) for a, b in zip(_snapshot(model, opt), before))


@pytest.mark.parametrize("structure", GUARD_STRUCTURES)
def test_huge_finite_activations_never_reach_the_preconditioner(structure):
    """Finite gradients, overflowing statistics (x² of a 1e25 input): the layer's update is
    skipped with a warning, K and C stay finite and later steps update them again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = kfac_tn.SINGD(model, T=1, lr=0.0, lr_cov=0.1, structures=(structure, structure))
    X, y = torch.randn(4, 10), torch.randint(0, 3, (4,))  # 4 rows: dense K keeps thin factors S
    nn.functional.cross_entropy(model(X * 1e25), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    K_before = opt.Ks["0"].to_dense().clone()
    with pytest.warns(UserWarning, match="Non-finite curvature statistics in layer '0'"):
        opt.step()
    assert torch.equal(K_before, opt.Ks["0"].to_dense())
    assert all(torch.isfinite(M.to_dense()).all() for M in (*opt.Ks.values(), *opt.Cs.values()))
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    assert not torch.equal(K_before, opt.Ks["0"].to_dense())


def _same_as_stock(run, kwargs):
    """Run ``run(model, optimizer)`` with stock singd and with kfac_tn; compare parameters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1, m2 = _cnn(), _cnn()
        run(m1, StockSINGD(m1, **kwargs(m1) if callable(kwargs) else kwargs))
        run(m2, kfac_tn.SINGD(m2, **kwargs(m2) if callable(kwargs) else kwargs))
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-5)


def test_gradient_accumulation_matches_stock():
    X, y = _data((8, 3, 7, 7))

    def run(model, opt):
        for _ in range(3):
            opt.zero_grad()
            for Xb, yb in zip(X.chunk(2), y.chunk(2)):
                nn.functional.cross_entropy(model(Xb), yb).backward()
            opt.step()

    _same_as_stock(run, dict(lr=0.1, lr_cov=0.1, T=1))


def test_param_groups_match_stock():
    X, y = _data((6, 3, 7, 7))

    def kwargs(model):
        convs = [p for m in model if isinstance(m, nn.Conv2d) for p in m.parameters()]
        head = list(model[-1].parameters())
        return dict(params=[{"params": convs, "lr": 0.05, "structures": ("diagonal", "dense")},
                            {"params": head, "lr": 0.2, "T": 2}], lr_cov=0.1, T=1)

    _same_as_stock(lambda m, o: _train(m, o, (X, y), 4), kwargs)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block30diagonal"])
def test_grad_scaler_and_bf16_autocast_match_stock(structure):
    X, y = _data((6, 3, 7, 7))

    def run(model, opt):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(X), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    _same_as_stock(run, dict(lr=0.1, lr_cov=0.1, T=1, init_grad_scale=2.0**4, structures=(structure, structure)))


def test_bfloat16_preconditioner_storage_trains():
    """Statistics in float32, K/C and momenta stored in bfloat16."""
    model = _cnn()
    opt = kfac_tn.SINGD(model, lr=0.05, lr_cov=0.1, T=1, preconditioner_dtype=(torch.bfloat16, torch.bfloat16))
    data = _data((6, 3, 7, 7))
    params = _train(model, opt, data, 4)
    assert torch.isfinite(params).all()
    assert opt.Ks["0"].to_dense().dtype == torch.bfloat16
    nn.functional.cross_entropy(model(data[0]), data[1]).backward()  # statistics of step 4
    H = opt.H_Ks["0"]
    assert (H.dense if H.dense is not None else H.factors[0]).dtype == torch.float32


def test_bias_free_linear_matches_stock():
    """Regression: the rows route must not rescale a bias-free Linear's saved input."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 7 * 7, 8, bias=False), nn.ReLU(), nn.Linear(8, 5, bias=False))

    data = _data((6, 3, 7, 7))
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1)
    m1, m2 = model(), model()
    ref = _train(m1, StockSINGD(m1, **kwargs), data, 3)
    ours = _train(m2, kfac_tn.SINGD(m2, **kwargs), data, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("structure", ["hierarchical15_15", "triltoeplitz"])
def test_float64_with_a_float32_only_structure_is_a_clear_error(structure):
    """singd 0.0.5's products of these structures reject float64 (at the first backward
    pass, deep inside singd); kfac_tn says so at construction, with what to pass."""
    model = _cnn().double()
    with pytest.raises(ValueError, match=r"'hierarchical15_15'|'triltoeplitz'") as error:
        kfac_tn.SINGD(model, structures=(structure, structure))
    assert "float64" in str(error.value) and "preconditioner_dtype=(torch.float32" in str(error.value)
    assert not any(m._forward_hooks for m in model.modules())  # the failed optimizer left no hooks
    opt = kfac_tn.SINGD(model, structures=(structure, structure), lr_cov=0.1,
                        preconditioner_dtype=(torch.float32, torch.float32))
    params = _train(model, opt, _data((4, 3, 7, 7), dtype=torch.float64), 2)
    assert params.dtype == torch.float64 and torch.isfinite(params).all()


def _checkpoint_run(optimizer_class, structure):
    """``(data, kwargs, model, optimizer)`` after 3 float64 steps of the runs that move
    checkpoints between stock singd and kfac_tn."""
    dtype = torch.float64
    data = _data((6, 3, 7, 7), dtype=dtype)
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1, structures=(structure, structure), weight_decay=1e-3)
    model = _cnn().to(dtype)
    opt = optimizer_class(model, **kwargs)
    _train(model, opt, data, 3)
    return data, kwargs, model, opt


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block30diagonal"])
def test_loads_a_stock_singd_checkpoint(structure, stock_float64):
    """Train with stock singd, continue with kfac_tn from stock's state: the same
    parameters as stock continuing (float64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, kwargs, m1, stock = _checkpoint_run(StockSINGD, structure)
        m2 = _cnn().to(torch.float64)
        m2.load_state_dict(m1.state_dict())
        ours = kfac_tn.SINGD(m2, **kwargs)
        ours.load_state_dict(copy.deepcopy(stock.state_dict()))
        ref = _train(m1, stock, data, 2)
        got = _train(m2, ours, data, 2)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_nan_off_the_diagonal_of_pending_statistics_leaves_the_preconditioner_intact():
    """A NaN that the trace does not see (off the diagonal of a dense part) must still
    stop the update of that layer, and only of that layer."""
    from kfac_tn.optim.symmetric_sum import SymmetricSum

    model = _cnn()
    opt = kfac_tn.SINGD(model, T=1)
    X, y = _data((4, 3, 7, 7))
    nn.functional.cross_entropy(model(X), y).backward()
    poison = torch.zeros(28, 28)
    poison[0, 1] = poison[1, 0] = float("nan")
    opt.H_Ks["0"].add_(SymmetricSum(dense=poison))
    K_before = {name: K.to_dense().clone() for name, K in opt.Ks.items()}
    with pytest.warns(UserWarning, match="Non-finite curvature statistics in layer '0'"):
        opt.step()
    assert torch.equal(K_before["0"], opt.Ks["0"].to_dense())
    assert not torch.equal(K_before["5"], opt.Ks["5"].to_dense())  # the other layers moved on


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block30diagonal"])
@pytest.mark.parametrize("pending", [False, True])
def test_a_checkpoint_continues_in_stock_singd(structure, pending, stock_float64):
    """Train with kfac_tn, save (weights_only load), convert with stock_state_dict and
    continue with stock singd: the same parameters as kfac_tn continuing (float64), also
    from a checkpoint taken between backward() and step() (pending statistics)."""
    import io

    from kfac_tn.optim.singd import stock_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data, kwargs, m1, ours = _checkpoint_run(kfac_tn.SINGD, structure)
        if pending:
            ours.zero_grad()
            nn.functional.cross_entropy(m1(data[0]), data[1]).backward()
        buffer = io.BytesIO()
        torch.save(ours.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        m2 = _cnn().to(torch.float64)
        m2.load_state_dict(m1.state_dict())
        stock = StockSINGD(m2, **kwargs)
        stock.load_state_dict(stock_state_dict(state))
        if pending:
            for p1, p2 in zip(m1.parameters(), m2.parameters()):
                p2.grad = p1.grad.clone()
            ours.step()
            stock.step()
        ref = _train(m1, ours, data, 2)
        got = _train(m2, stock, data, 2)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_public_matrices_have_singd_types():
    """As in singd, ``Ks[name]`` etc. are one StructuredMatrix per layer (singd's tutorial
    reads ``opt.Ks[name].to_dense()``); a grouped convolution with per-group blocks has a
    list; assigning singd's ``{name: matrix}`` works."""
    from singd.structures.base import StructuredMatrix

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 3))
    opt = kfac_tn.SINGD(model, T=1, structures=("dense", "diagonal"))
    for store in (opt.Ks, opt.Cs, opt.m_Ks, opt.m_Cs):
        assert isinstance(store["2"], StructuredMatrix)
        assert isinstance(store["0"], list) and len(store["0"]) == 2
    assert opt.Ks["2"].to_dense().shape == (5, 5)
    nn.functional.cross_entropy(model(torch.randn(2, 4, 3, 3)), torch.tensor([0, 1])).backward()
    assert set(opt.H_Ks) == {"0", "2"}
    opt.step()
    assert not opt.H_Ks
    K = opt.Ks["2"]
    opt.Ks = dict(opt.Ks)
    assert opt.Ks["2"] is K and len(opt.Ks["0"]) == 2
    from kfac_tn.optim.singd import stock_state_dict

    with pytest.raises(ValueError, match="grouped_conv='average'"):
        stock_state_dict(opt.state_dict())


@pytest.mark.parametrize("structure", STRUCTURES)
def test_subsample_of_all_positions_matches_stock(structure, stock_float64):
    """subsample=1.0 samples every position: the randomized statistics route (dense A and G
    sandwiched into every structure, no fused banks) gives stock singd's trajectory."""
    dtype = torch.float64
    data = _data((6, 3, 7, 7), dtype=dtype)
    kwargs = dict(lr=0.1, lr_cov=0.1, T=1, structures=(structure, structure), weight_decay=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1, m2 = _cnn().to(dtype), _cnn().to(dtype)
        ref = _train(m1, StockSINGD(m1, **kwargs), data, 3)
        ours = _train(m2, kfac_tn.SINGD(m2, subsample=1.0, **kwargs), data, 3)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_subsampled_statistics_are_those_of_the_sampled_positions(monkeypatch):
    """With K = C = I (the first step), H_K and H_C are the randomized A and G of the
    sampled positions (unbiased: tests/factors/test_subsampled.py); runs are reproducible
    under torch's seed; KFAC-reduce and bad fractions are clear errors."""
    import kfac_tn.factors.subsampled as subsampled

    dtype = torch.float64
    X, y = _data((6, 3, 7, 7), dtype=dtype)
    model = _cnn().to(dtype)
    monkeypatch.setattr(subsampled, "sample_positions", lambda P, s, generator=None: torch.arange(min(s, P)))
    seen, hook = watch_layer(model[0])
    opt = kfac_tn.SINGD(model, subsample=5, T=1)
    nn.functional.cross_entropy(model(X), y).backward()
    hook.remove()
    first = torch.arange(5)
    A = subsampled.subsampled_input_factor(model[0], seen["x"], 5, positions=first)[0]
    G = subsampled.subsampled_grad_output_factor(model[0], seen["g"], 5, positions=first)[0]
    torch.testing.assert_close(opt.H_Ks["0"].to_dense(), A)
    torch.testing.assert_close(opt.H_Cs["0"].to_dense(), G)
    assert not torch.allclose(A, kfac_tn.input_factor(model[0], seen["x"])[0])
    monkeypatch.undo()

    def run(seed):
        m = _cnn().to(dtype)  # seeds torch itself
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _train(m, kfac_tn.SINGD(m, lr=0.1, T=1, subsample=0.25), (X, y), 2)

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))
    with pytest.raises(ValueError, match="kfac_approx='expand'"):
        kfac_tn.SINGD(_cnn(), kfac_approx="reduce", subsample=0.5)
    for bad in (0.0, 1.5, 0, True):
        with pytest.raises(ValueError, match="subsample"):
            kfac_tn.SINGD(_cnn(), subsample=bad)


@pytest.mark.parametrize("optimizer", ["singd_diagonal", "singd_dense", "kfac"])
def test_step_leaves_every_grad_as_it_was(optimizer):
    """torch's optimizers read ``.grad`` and leave it: so must these, also with weight decay
    for the parameters they step like SGD (a BitFit bias of a frozen weight), whose step is
    torch.optim.SGD's (the oracle)."""
    model = _cnn()
    model[0].weight.requires_grad_(False)  # BitFit: its bias takes plain steps
    lr, wd = 0.1, 3e-2
    if optimizer == "kfac":
        opt = kfac_tn.KFAC(model, lr=lr, weight_decay=wd)
    else:
        structure = optimizer.split("_")[1]
        opt = kfac_tn.SINGD(model, lr=lr, weight_decay=wd, T=1, structures=(structure, structure))
    X, y = _data((6, 3, 7, 7))
    nn.functional.cross_entropy(model(X), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    bias = copy.deepcopy(model[0].bias)
    bias.grad = grads["0.bias"].clone()
    torch.optim.SGD([bias], lr=lr, momentum=0.9, weight_decay=wd).step()
    opt.step()
    assert set(grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name]), name
    torch.testing.assert_close(model[0].bias, bias)


@pytest.mark.parametrize("kwargs, kept", [
    (dict(), "per layer (dense has no bank)"),
    (dict(structures=("diagonal", "diagonal")), "in the diagonal bank"),
    (dict(structures=("block30diagonal", "block30diagonal")), "in the block30diagonal bank"),
    (dict(structures=("block30diagonal", "block30diagonal"), subsample=0.5), "per layer (subsample)"),
    (dict(structures=("diagonal", "diagonal"), update_worker_fraction=0.5), "per layer (update_worker_fraction < 1)"),
    (dict(structures=("diagonal", "diagonal"), preconditioner_dtype=(torch.float64, torch.float32)),
     "per layer (K and C have different dtypes)"),
    (dict(structures=("diagonal", "dense")), "per layer (K and C have different structures)"),
])
def test_describe_names_each_layers_structures_and_storage(kwargs, kept):
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 9, 5))
    opt = kfac_tn.SINGD(model, T=3, **kwargs)
    K, C = kwargs.get("structures", ("dense", "dense"))
    assert opt.describe().splitlines() == [f"0: K 19 {K}, C 3 {C} × 2 groups, T 3; {kept}",
                                           f"3: K 55 {K}, C 5 {C}, T 3; {kept}"]
    assert (opt._bank_of != {}) == kept.startswith("in the")  # what describe says is what runs
