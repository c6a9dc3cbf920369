"""kfac_tn.KFAC: the preconditioned step against an explicit Kronecker solve."""

import copy

import pytest
import torch
from helpers import block_mask, flat_parameters, kfac_test_batch, kfac_test_model, watch_layer
from torch import nn

import kfac_tn

_model, _data = kfac_test_model, kfac_test_batch


@pytest.mark.parametrize("max_factor_dim", [None, 3, 10])
@pytest.mark.parametrize("method", ["eigh", "cholesky"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("pi_damping", [False, True])
def test_step_is_the_damped_kronecker_solve(method, approx, pi_damping, max_factor_dim):
    """One step is ``((G + δ_G I) ⊗ (A + δ_A I))⁻¹ vec V`` with the factors of
    :func:`kfac_tn.kfac_factors`; with ``max_factor_dim`` the factors are masked to their
    diagonal blocks first (π from the whole traces). The layers' A have 28, 9 (per group) and
    201 rows, their G 4, 1 and 5: bound 3 splits every factor but the 1-row G (201 into 67
    blocks of 3, 5 into 3 + 2 with padding), bound 10 the A of 28 (10 + 10 + 8) and 201."""
    model = _model()
    X, y = _data()
    lr, damping = 0.1, 1e-2
    factors = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), X, y, approx=approx, fisher="empirical")
    start = {n: [p.detach().clone() for p in model.get_submodule(n).parameters()] for n in factors}
    opt = kfac_tn.KFAC(model, lr=lr, momentum=0.0, damping=damping, ema_decay=0.0, inverse_method=method,
                       inverse_dtype=torch.float64, kfac_approx=approx, pi_damping=pi_damping, kl_clip=None,
                       max_factor_dim=max_factor_dim)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    grads = {n: [p.grad.clone() for p in model.get_submodule(n).parameters()] for n in factors}
    opt.step()
    from kfac_tn.optim.weight_blocks import matrix_blocks

    for name, (A, G) in factors.items():
        module = model.get_submodule(name)
        V = matrix_blocks(module, *grads[name], False)
        moved = [(a - b) / lr for a, b in zip(matrix_blocks(module, *start[name], False),
                                              matrix_blocks(module, *[p.detach() for p in module.parameters()], False))]
        d_A, d_G = A.shape[-1], G.shape[-1]
        for b in range(A.shape[0]):
            pi = 1.0
            if pi_damping and G[b].trace() > 0:  # a dead block (G = 0) keeps π = 1
                pi = ((A[b].trace() / d_A) / (G[b].trace() / d_G)).sqrt()
            A_b = torch.where(block_mask(d_A, max_factor_dim), A[b], 0.0) + pi * damping**0.5 * torch.eye(d_A)
            G_b = torch.where(block_mask(d_G, max_factor_dim), G[b], 0.0) + damping**0.5 / pi * torch.eye(d_G)
            expected = torch.linalg.solve(torch.kron(G_b, A_b), V[b].flatten()).reshape(V[b].shape)
            torch.testing.assert_close(moved[b], expected)
    blocks = {None: (1, 201, 201), 3: (1, 67, 3, 3), 10: (1, 21, 10, 10)}[max_factor_dim]
    assert opt.kfac_state["5"]["A"].shape == blocks


def _train(model, opt, steps, data=None):
    X, y = data or _data()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_trains_and_uses_stale_inverses_between_updates():
    model = _model()
    opt = kfac_tn.KFAC(model, lr=0.05, damping=1e-2, inverse_update_freq=3, factor_update_freq=1)
    losses = _train(model, opt, 8)
    assert losses[-1] < 0.5 * losses[0]
    # the last layer's input moves with the parameters (the first layer's, X, does not)
    inverse = opt.kfac_state["5"]["A_inv"].clone()  # (the default: Cholesky inverses)
    _train(model, opt, 1)  # step 8: no inversion (8 % 3 != 0)
    assert torch.equal(inverse, opt.kfac_state["5"]["A_inv"])
    _train(model, opt, 1)  # step 9: inverted again, from factors that moved
    assert not torch.equal(inverse, opt.kfac_state["5"]["A_inv"])


def test_state_dict_round_trip_and_lr_scheduler():
    kwargs = dict(lr=0.05, damping=1e-2, inverse_update_freq=2)
    m1 = _model()
    o1 = kfac_tn.KFAC(m1, **kwargs)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=2, gamma=0.5)
    for _ in range(5):
        _train(m1, o1, 1)
        s1.step()
    m2 = _model()
    o2 = kfac_tn.KFAC(m2, **kwargs)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=2, gamma=0.5)
    for _ in range(3):
        _train(m2, o2, 1)
        s2.step()
    saved = (m2.state_dict(), o2.state_dict(), s2.state_dict())
    m3 = _model()
    m3.load_state_dict(saved[0])
    o3 = kfac_tn.KFAC(m3, **kwargs)
    o3.load_state_dict(saved[1])
    s3 = torch.optim.lr_scheduler.StepLR(o3, step_size=2, gamma=0.5)
    s3.load_state_dict(saved[2])
    for _ in range(2):
        _train(m3, o3, 1)
        s3.step()
    assert o3.param_groups[0]["lr"] == o1.param_groups[0]["lr"] == 0.05 * 0.25
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p1, p3)
    with pytest.raises(ValueError, match="other layers"):
        kfac_tn.KFAC(nn.Sequential(nn.Linear(2, 2))).load_state_dict(o1.state_dict())


def test_non_finite_gradients_skip_the_step():
    model = _model()
    opt = kfac_tn.KFAC(model)
    X, y = _data()
    _train(model, opt, 1, (X, y))
    before = [p.detach().clone() for p in model.parameters()]
    A_before = opt.kfac_state["0"]["A"].clone()
    X = X.clone()
    X[0, 0, 0, 0] = float("nan")
    # the warning says what happened and what to do
    with pytest.warns(UserWarning, match=r"Non-finite gradients at step 1: the step was skipped \(parameters and "
                      r"optimizer state as before it\)\. If this repeats, training has diverged: lower lr, raise "
                      r"damping or lower kl_clip\."):
        _train(model, opt, 1, (X, y))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.equal(A_before, opt.kfac_state["0"]["A"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-0.1), "lr must be"),
        (dict(damping=-1.0), "damping must be"),
        (dict(ema_decay=1.0), "ema_decay must"),
        (dict(inverse_update_freq=0), "inverse_update_freq must"),
        (dict(inverse_method="svd"), "inverse_method must"),
        (dict(shard_preconditioner=1), "shard_preconditioner must be True or False"),
        (dict(shard_preconditioner=True, update_worker_fraction=0.5), "excludes update_worker_fraction"),
        (dict(inverse_dtype=torch.float16), "inverse_dtype must"),
        (dict(kfac_approx="diag"), "kfac_approx must"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kfac_tn.KFAC(_model(), **kwargs)


def test_unsupported_layers_warn_and_wrappers_fail():
    with pytest.warns(UserWarning, match="BatchNorm1d"):
        kfac_tn.KFAC(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    with pytest.raises(TypeError, match="DataParallel"):
        kfac_tn.KFAC(nn.DataParallel(_model()))


def test_grad_scaler_and_bf16_autocast_are_neutral():
    """Power-of-two loss scaling is exact: with a GradScaler the trajectory is the same."""
    X, y = _data()

    def run(scaled):
        model = _model().float()
        opt = kfac_tn.KFAC(model, lr=0.05, damping=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, enabled=scaled)
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(X.float()), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        return flat_parameters(model)

    torch.testing.assert_close(run(True), run(False), rtol=1e-5, atol=1e-6)


def test_grad_scaler_overflow_skips_the_step():
    model = _model().float()
    opt = kfac_tn.KFAC(model, lr=0.05, damping=1e-2)
    X, y = _data()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(X.float()), y)).backward()
    next(model.parameters()).grad[0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="GradScaler found inf"):
        scaler.step(opt)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_checkpoint_between_backward_and_step_resumes_exactly():
    """The pending statistics of a backward pass are part of the state (torch.save round trip)."""
    import io

    kwargs = dict(lr=0.05, damping=1e-2, inverse_update_freq=1)
    X, y = _data()
    m1 = _model()
    o1 = kfac_tn.KFAC(m1, **kwargs)
    _train(m1, o1, 3)
    m2 = _model()
    o2 = kfac_tn.KFAC(m2, **kwargs)
    _train(m2, o2, 2)
    o2.zero_grad()
    nn.functional.cross_entropy(m2(X), y).backward()
    assert o2._pending
    buffer = io.BytesIO()
    torch.save({"opt": o2.state_dict(), "model": m2.state_dict(), "grads": [p.grad for p in m2.parameters()]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    m3 = _model()
    m3.load_state_dict(saved["model"])
    o3 = kfac_tn.KFAC(m3, **kwargs)
    o3.load_state_dict(saved["opt"])
    for p, g in zip(m3.parameters(), saved["grads"]):
        p.grad = g
    o3.step()
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p1, p3)


def test_factor_averages_stay_float32_under_bf16_autocast():
    """Running averages in bfloat16 stop moving (ε·A + (1−ε)·A_new rounds back to A)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = kfac_tn.KFAC(model, lr=0.01, damping=1e-2, ema_decay=0.99)
    X, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
    for state in opt.kfac_state.values():
        assert state["A"].dtype == state["G"].dtype == torch.float32


@pytest.mark.parametrize("factor_update_freq", [1, 2])
def test_running_averages_weight_old_and_new_factors_as_documented(factor_update_freq):
    """After two statistics steps A = ε·F₁ + (1−ε)·F₂ (kfac_factors on the same, fixed
    model as the oracle); with factor_update_freq f, only steps 0 and f contribute."""
    model = _model()
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 5, (6,), generator=gen))
               for _ in range(3)]
    first, ignored, second = batches
    eps = 0.7
    opt = kfac_tn.KFAC(model, lr=0.0, momentum=0.0, ema_decay=eps, factor_update_freq=factor_update_freq,
                       kfac_approx="expand")
    schedule = [first] + [ignored] * (factor_update_freq - 1) + [second]
    for X, y in schedule:
        _train(model, opt, 1, (X, y))
    F1 = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), *first, fisher="empirical")
    F2 = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), *second, fisher="empirical")
    for name, state in opt.kfac_state.items():
        for i, key in enumerate(("A", "G")):
            torch.testing.assert_close(state[key], eps * F1[name][i] + (1 - eps) * F2[name][i])


def test_a_layer_used_twice_equals_one_call_on_both_inputs():
    """KFAC-expand: a siamese network (one Linear applied to two inputs) and the same
    function as one call on ``[B, 2, D]`` get the same factors. (KFAC-reduce averages
    inputs over positions before the outer product, which per-call hooks cannot do across
    calls: there the two forms differ, see the README.)"""
    approx = "expand"
    torch.manual_seed(0)
    shared = nn.Linear(4, 3).double()
    X, y = torch.randn(5, 2, 4, dtype=torch.float64), torch.randint(0, 3, (5,))

    def loss_twice(model):
        return nn.functional.cross_entropy(model(X[:, 0]) + model(X[:, 1]), y)

    def loss_once(model):
        return nn.functional.cross_entropy(model(X).sum(1), y)

    factors = []
    for loss in (loss_twice, loss_once):
        model = copy.deepcopy(shared)
        opt = kfac_tn.KFAC(model, lr=0.0, momentum=0.0, ema_decay=0.0, kfac_approx=approx)
        loss(model).backward()
        opt.step()
        factors.append((opt.kfac_state[""]["A"], opt.kfac_state[""]["G"]))
    for a, b in zip(*factors):
        torch.testing.assert_close(a, b)


def test_inverses_are_refreshed_exactly_every_inverse_update_freq_steps():
    """inverse_update_freq=3: step 2 preconditions with the inverse formed at step 0,
    i.e. with the factors of step 0's batch (kfac_factors as the oracle), not step 1's."""
    from kfac_tn.optim.weight_blocks import matrix_blocks

    model = _model()
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 5, (6,), generator=gen))
               for _ in range(3)]
    damping, lr = 1e-2, 0.1
    oracle = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), *batches[0], fisher="empirical")
    opt = kfac_tn.KFAC(model, lr=lr, momentum=0.0, damping=damping, ema_decay=0.0, inverse_update_freq=3,
                       inverse_dtype=torch.float64, kl_clip=None, kfac_approx="expand")
    for X, y in batches[:2]:
        _train(model, opt, 1, (X, y))
    before = {n: [p.detach().clone() for p in model.get_submodule(n).parameters()] for n in oracle}
    opt.zero_grad()
    nn.functional.cross_entropy(model(batches[2][0]), batches[2][1]).backward()
    grads = {n: [p.grad.clone() for p in model.get_submodule(n).parameters()] for n in oracle}
    opt.step()
    for name, (A, G) in oracle.items():
        module = model.get_submodule(name)
        V = matrix_blocks(module, *grads[name], False)
        step = matrix_blocks(module, *[(b - p.detach()) / lr for b, p in zip(before[name], module.parameters())], False)
        for b in range(A.shape[0]):
            curvature = torch.kron(G[b] + damping**0.5 * torch.eye(G.shape[-1], dtype=A.dtype),
                                   A[b] + damping**0.5 * torch.eye(A.shape[-1], dtype=A.dtype))
            expected = torch.linalg.solve(curvature, V[b].flatten()).reshape(V[b].shape)
            torch.testing.assert_close(step[b], expected)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize(
    "sizes, idiom",
    [((7, 1), "sum/N"), ((2, 5, 1), "sum/N"), ((3, 3), "mean/k"), ((4, 2), "sum, summed loss")],
)
def test_gradient_accumulation_gives_the_whole_batch_factors(approx, sizes, idiom):
    """Micro-batches of unequal sizes, accumulated with a loss that weights every sample
    alike, give KFAC the factors of one pass over the whole batch (kfac_factors, with its
    own hooks, as the oracle): A weighted by samples, G rescaled per pass."""
    model = _model()
    gen = torch.Generator().manual_seed(5)
    N = sum(sizes)
    X, y = torch.randn(N, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 5, (N,), generator=gen)
    summed = idiom == "sum, summed loss"
    opt = kfac_tn.KFAC(model, lr=0.0, momentum=0.0, ema_decay=0.0, kfac_approx=approx,
                       loss_average=None if summed else "batch")
    for Xb, yb in zip(X.split(list(sizes)), y.split(list(sizes))):
        loss = nn.functional.cross_entropy(model(Xb), yb, reduction="sum" if idiom != "mean/k" else "mean")
        loss = {"sum/N": loss / N, "mean/k": loss / len(sizes), "sum, summed loss": loss}[idiom]
        loss.backward()
    opt.step()
    oracle = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(reduction="sum" if summed else "mean"), X, y,
                                  approx=approx, fisher="empirical")
    for name, (A, G) in oracle.items():
        torch.testing.assert_close(opt.kfac_state[name]["A"], A)
        torch.testing.assert_close(opt.kfac_state[name]["G"], G)


@pytest.mark.parametrize("approx, kl_clip", [("expand", 1e-3), ("reduce", 1e-3), ("expand", None)])
def test_a_resumed_run_follows_the_reference_kfac(approx, kl_clip):
    """Three steps, a checkpoint (torch.save, weights_only load) into a fresh model and
    optimizer, two more steps: the same parameters as a literal KFAC (tests/reference_kfac.py)
    over all five batches, with momentum, weight decay, running averages and factor and
    inverse periods that are out of phase."""
    import io

    from reference_kfac import ReferenceKFAC

    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, damping=1e-2, ema_decay=0.8,
                  factor_update_freq=2, inverse_update_freq=3, kfac_approx=approx, kl_clip=kl_clip)
    gen = torch.Generator().manual_seed(11)
    batches = [(torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 5, (6,), generator=gen))
               for _ in range(5)]
    reference = _model()
    oracle = ReferenceKFAC(reference, **kwargs)
    for X, y in batches:
        oracle.step(X, y)
    model = _model()
    opt = kfac_tn.KFAC(model, inverse_dtype=torch.float64, **kwargs)
    for X, y in batches[:3]:
        _train(model, opt, 1, (X, y))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _model()
    resumed.load_state_dict(saved["model"])
    opt = kfac_tn.KFAC(resumed, inverse_dtype=torch.float64, **kwargs)
    opt.load_state_dict(saved["opt"])
    for X, y in batches[3:]:
        _train(resumed, opt, 1, (X, y))
    for p, q in zip(resumed.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)


def test_subsampled_factors_enter_the_running_averages(monkeypatch):
    """subsample=m: KFAC's A and G are the randomized factors of the sampled positions
    (unbiased: tests/factors/test_subsampled.py); all positions give the exact factors;
    KFAC-reduce has no positions to sample."""
    import kfac_tn.factors.subsampled as subsampled

    model, (X, y) = _model(), _data()
    exact = kfac_tn.kfac_factors(model, nn.CrossEntropyLoss(), X, y, fisher="empirical")
    opt = kfac_tn.KFAC(model, lr=0.0, momentum=0.0, ema_decay=0.0, subsample=1.0)
    _train(model, opt, 1)
    for name, (A, G) in exact.items():
        torch.testing.assert_close(opt.kfac_state[name]["A"], A)
        torch.testing.assert_close(opt.kfac_state[name]["G"], G)
    opt.remove_hooks()
    # a known subset (the first m positions) in place of the random draw
    monkeypatch.setattr(subsampled, "sample_positions", lambda P, s, generator=None: torch.arange(min(s, P)))
    seen, hook = watch_layer(model[0])
    opt = kfac_tn.KFAC(model, lr=0.0, momentum=0.0, ema_decay=0.0, subsample=7)
    _train(model, opt, 1)
    hook.remove()
    first = torch.arange(7)
    torch.testing.assert_close(opt.kfac_state["0"]["A"],
                               subsampled.subsampled_input_factor(model[0], seen["x"], 7, positions=first))
    torch.testing.assert_close(opt.kfac_state["0"]["G"],
                               subsampled.subsampled_grad_output_factor(model[0], seen["g"], 7, positions=first))
    assert not torch.allclose(opt.kfac_state["0"]["A"], exact["0"][0])
    with pytest.raises(ValueError, match="kfac_approx='expand'"):
        kfac_tn.KFAC(_model(), kfac_approx="reduce", subsample=0.5)


def test_subsampled_factors_of_averaged_groups_are_the_exact_averaged_ones():
    """grouped_conv='average' with subsample=1.0 (every position): the factors of the
    unsampled path, averaged over the groups as well (not one block per group)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 3))
    X, y = torch.randn(5, 4, 5, 5), torch.randint(0, 3, (5,))
    states = []
    for subsample in (None, 1.0):
        opt = kfac_tn.KFAC(model, lr=0.0, momentum=0.0, ema_decay=0.0, kfac_approx="expand",
                           grouped_conv="average", subsample=subsample)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        states.append({k: v for k, v in opt.kfac_state["0"].items() if k in ("A", "G")})
        opt.remove_hooks()
    assert states[0]["A"].shape[0] == 1  # one averaged block, not one per group
    for key in ("A", "G"):
        torch.testing.assert_close(states[1][key], states[0][key])


def test_a_state_saved_with_eigh_continues_with_cholesky_inverses():
    """KFAC's default inverse method changed (eigh -> cholesky): a state saved with eigh and
    loaded into a Cholesky optimizer must not keep applying the loaded eigenbases. Both
    methods give the same damped inverse, so the run equals an eigh run throughout."""
    kwargs = dict(lr=0.05, damping=1e-2, inverse_update_freq=1, inverse_dtype=torch.float64)
    data = [_data()] * 4
    whole = _model()
    opt = kfac_tn.KFAC(whole, inverse_method="eigh", **kwargs)
    for X, y in data:
        _train(whole, opt, 1, (X, y))
    model = _model()
    opt = kfac_tn.KFAC(model, inverse_method="eigh", **kwargs)
    for X, y in data[:2]:
        _train(model, opt, 1, (X, y))
    state = opt.state_dict()
    opt = kfac_tn.KFAC(model, inverse_method="cholesky", **kwargs)
    opt.load_state_dict(state)
    for X, y in data[2:]:
        _train(model, opt, 1, (X, y))
    assert "Q_A" not in opt.kfac_state["5"] and "A_inv" in opt.kfac_state["5"]
    for p, q in zip(model.parameters(), whole.parameters()):
        torch.testing.assert_close(p, q)


def test_cholesky_inversions_of_all_layers_cost_one_host_sync():
    """The Cholesky factorizations of all layers a step inverts (3 layers, 6 factors) are
    checked with one ``_local_scalar_dense`` more than a step without inversions takes (on a
    CPU that one reads the previous step's skip flags from their host copy, which on CUDA
    is no device sync: tests/test_cuda.py)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Syncs.count += func.overloadpacket.__name__ == "_local_scalar_dense"
            return func(*args, **(kwargs or {}))

    model = _model()
    opt = kfac_tn.KFAC(model, lr=0.05, inverse_update_freq=2)
    X, y = _data()
    per_step = []
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        Syncs.count = 0
        with Syncs():
            opt.step()
        per_step.append(Syncs.count)
    base = per_step[1]
    assert base <= 1 and per_step == [base + 1, base, base + 1, base]
