"""What users get wrong, and what they get back (SINGD and KFAC alike).

| misuse | outcome |
|---|---|
| unsupported layer with parameters | warning naming it (tests/test_singd.py, test_kfac.py) |
| negative lr/damping, unknown structure/approx, T < 1 | ValueError naming the argument (same files) |
| non-finite loss or gradients | step skipped, warning, state intact (same files) |
| a layer used twice in one forward (weight tying) | both uses contribute statistics; trains |
| inputs changing shape between steps | contraction re-planned, no crash |
| an empty batch (`X[:0]`), alone or as a micro-batch | no statistics, zero gradients: the trajectory without it |
| one sample without its batch dimension (`layer(x[0])`) | a batch of one |
| SINGD on a model with lazy layers (`LazyLinear`) | ValueError naming them: run one forward pass first (KFAC takes them) |
| eval-mode forward / torch.no_grad | no statistics captured |
| model moved to another dtype/device after the optimizer was built | RuntimeError naming the layer |
| state dict of another model | ValueError naming the mismatch (same files) |
| a frozen bias (requires_grad=False) | treated as a zero-gradient column; not updated |
| a layer that takes no part in a step | skipped (SINGD also warns at its update step) |
| `copy.deepcopy(model)` after building the optimizer | the copy's passes feed nothing to the optimizer |
| `del opt` (or a new optimizer on the same model) | the model does not keep it alive; its hooks go at the next forward |
| `opt.remove_hooks()` | no more statistics captured |
| rebuilding the optimizer after `model.double()` | the new one trains; the old one is gone, its hooks too |
| two live optimizers on one model | each captures its own statistics |
| `SINGD(model, params=[layer.weight])` | only the weight changes (the bias column still shapes the solve) |
| GradScaler + `unscale_` + gradient clipping (torch's AMP recipe) | with `opt.set_current_grad_scale(scaler.get_scale())` before `scaler.step(opt)`: equals the unscaled run; without it: a RuntimeError saying so |
| an optimizer built on `torch.compile(model)` | layer names without `_orig_mod.`: states move between compiled and plain models |
| activation checkpointing (`torch.utils.checkpoint`, non-reentrant) | the same trajectory as without |
| channels_last model and input | the same trajectory as contiguous |
| a layer whose forward() never runs (MultiheadAttention.out_proj) | one warning naming the cause, then gradient/SGD steps |
| `ConvTranspose2d(...)(x, output_size=...)` (U-Net decoder) | factors of the call made, not of the stored `output_padding` |
| `torch.compile(model)`, `torch.compile(opt.step)`, trained for several steps | no recompiles after the first step (hooks and step run eagerly); the eager trajectory |
| a DDP-wrapped model (optimizer built on the wrapper, before wrapping, or on `ddp.module`) | trains like the plain model, plain layer names; DataParallel / FSDP: TypeError naming what to use |
| `SINGD(model.parameters())` (the parameters, not the model) | TypeError: pass the model |
| frozen weights, trainable biases (BitFit) | those layers are not preconditioned; their biases take SGD steps (= torch.optim.SGD) |
"""

import copy
import gc
import weakref

import pytest
import torch
from helpers import destroy_process_group, flat_parameters, train
from torch import nn

import kfac_tn

OPTIMIZERS = {
    "singd": lambda m: kfac_tn.SINGD(m, lr=0.05, lr_cov=0.1, T=1),
    "kfac": lambda m: kfac_tn.KFAC(m, lr=0.05, damping=1e-2, inverse_update_freq=1),
}


class _Tied(nn.Module):
    """The same Linear applied twice (weight tying)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))


def _step(model, opt, X, y):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(X), y)
    loss.backward()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_tying_contributes_both_uses_and_trains(name):
    torch.manual_seed(0)
    model = _Tied()
    opt = OPTIMIZERS[name](model)
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    losses = [_step(model, opt, X, y) for _ in range(15)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_inputs_changing_shape_between_steps(name):
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    y = torch.randint(0, 3, (4,))
    for size in (8, 11, 6, 8):
        assert torch.isfinite(torch.tensor(_step(model, opt, torch.randn(4, 3, size, size), y)))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_eval_mode_and_no_grad_capture_nothing(name):
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    X = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        model(X)
    model.eval()
    model(X).sum().backward()
    pending = opt.H_Ks if name == "singd" else opt._pending
    assert not pending


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_model_moved_after_construction_is_a_clear_error(name):
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    model.double()
    X, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(RuntimeError, match=r"Layer '0' moved from cpu/torch\.float32 to cpu/torch\.float64"):
        _step(model, opt, X, y)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_frozen_bias_is_left_alone(name):
    model = _conv_net()
    model[0].bias.requires_grad_(False)
    bias = model[0].bias.detach().clone()
    opt = OPTIMIZERS[name](model)
    X, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    for _ in range(2):
        _step(model, opt, X, y)
    assert torch.equal(model[0].bias, bias)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.used(x)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_layer_without_gradient_is_skipped(name):
    torch.manual_seed(0)
    model = _Branchy()
    before = model.unused.weight.detach().clone()
    opt = OPTIMIZERS[name](model)
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.warns(UserWarning) if name == "singd" else _no_warning():
        _step(model, opt, X, y)
    assert torch.equal(model.unused.weight, before)


def _no_warning():
    import contextlib

    return contextlib.nullcontext()


def _pending(opt):
    """Statistics waiting for the next step (SINGD: H_Ks, KFAC: _pending)."""
    return opt.H_Ks if isinstance(opt, kfac_tn.SINGD) else opt._pending


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_deepcopy_of_the_model_feeds_nothing_to_the_optimizer(name):
    """A teacher copy / MAML inner loop: backward passes through the copy are not ours."""
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    _step(model, opt, X, y)
    clone = copy.deepcopy(model)
    nn.functional.cross_entropy(clone(X), y).backward()
    assert not _pending(opt)
    assert clone[0].weight.grad is not None
    _step(model, opt, X, y)  # the original still trains
    _step(clone, OPTIMIZERS[name](clone), X, y)  # and so does the copy, with its own optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_deleted_optimizer_is_freed_and_its_hooks_go(name):
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    _step(model, opt, X, y)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None  # the model's hooks do not keep it alive
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    _step(model, sgd, X, y)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_remove_hooks_detaches_the_optimizer(name):
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    opt.remove_hooks()
    assert not any(m._forward_hooks for m in model.modules())
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    nn.functional.cross_entropy(model(X), y).backward()
    assert not _pending(opt)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_rebuilding_the_optimizer_after_moving_the_model(name):
    """The documented recipe: move the model, then build the optimizer (again)."""
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    _step(model, opt, X, y)
    model.double()
    opt = OPTIMIZERS[name](model)  # the old one is dropped here
    losses = [_step(model, opt, X.double(), y) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_two_live_optimizers_on_one_model_each_capture_their_own():
    model = _conv_net()
    first, second = kfac_tn.SINGD(model, T=1), kfac_tn.KFAC(model)
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    nn.functional.cross_entropy(model(X), y).backward()
    assert set(first.H_Ks) == set(second._pending) == {"0", "4"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_only_the_parameters_given_change(name):
    """``params=[weight]``: the layer's bias is not the optimizer's to update."""
    model = _conv_net()
    first = model[0]
    ctor = {"singd": kfac_tn.SINGD, "kfac": kfac_tn.KFAC}[name]
    opt = ctor(model, params=[first.weight, model[4].weight, model[4].bias], lr=0.05)
    bias, weight = first.bias.detach().clone(), first.weight.detach().clone()
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    for _ in range(2):
        _step(model, opt, X, y)
    assert torch.equal(bias, first.bias) and not torch.equal(weight, first.weight)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bitfit_biases_take_the_steps_of_torch_sgd(name):
    """Frozen weights, trainable biases: no layer is preconditioned and every bias follows
    torch.optim.SGD(lr, momentum, weight_decay) exactly (an independent oracle for the
    momentum and weight-decay arithmetic of both optimizers)."""
    def bitfit():
        model = _conv_net()
        for p in model.parameters():
            p.requires_grad_(p.dim() == 1)
        return model

    hyper = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    ours_model, ref_model = bitfit(), bitfit()
    ctor = {"singd": kfac_tn.SINGD, "kfac": kfac_tn.KFAC}[name]
    ours = ctor(ours_model, **hyper)
    ref = torch.optim.SGD([p for p in ref_model.parameters() if p.requires_grad], **hyper)
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    for _ in range(4):
        _step(ours_model, ours, X, y)
        _step(ref_model, ref, X, y)
    for a, b in zip(ours_model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class _Decoder(nn.Module):
    """A U-Net-style upsampling: ConvTranspose2d called with ``output_size=``, or the same
    layer built with the ``output_padding`` that call implies."""

    def __init__(self, output_padding):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=output_padding)
        self.head = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        if self.up.output_padding == (0, 0):
            y = self.up(x, output_size=[2 * x.shape[-2], 2 * x.shape[-1]])
        else:
            y = self.up(x)
        return self.head(torch.tanh(y).flatten(1))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_conv_transpose_called_with_output_size(name):
    """Both forms compute the same function, so both must train the same way."""
    X, y = torch.randn(4, 3, 4, 4), torch.randint(0, 3, (4,))
    runs = []
    for output_padding in (0, 1):
        model = _Decoder(output_padding)
        opt = OPTIMIZERS[name](model)
        for _ in range(3):
            _step(model, opt, X, y)
        runs.append(flat_parameters(model))
    torch.testing.assert_close(runs[0], runs[1])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_with_unscale_and_clipping_equals_the_unscaled_run(name):
    """torch's AMP recipe: scale(loss).backward(); unscale_(opt); clip; step(opt)."""
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    init = 2.0**10
    make = {"singd": lambda m: kfac_tn.SINGD(m, lr=0.05, lr_cov=0.1, T=1, init_grad_scale=init),
            "kfac": lambda m: kfac_tn.KFAC(m, lr=0.05, damping=1e-2, inverse_update_freq=1)}[name]
    runs = []
    for scaled in (False, True):
        model = _conv_net()
        opt = make(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=init) if scaled else None
        for _ in range(3):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            if scaler is None:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                continue
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.set_current_grad_scale(scaler.get_scale())
            scaler.step(opt)
            scaler.update()
        runs.append(flat_parameters(model))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_after_unscale_without_the_scale_is_a_clear_error(name):
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    scaler.scale(nn.functional.cross_entropy(model(X), y)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="set_current_grad_scale"):
        scaler.step(opt)


class _Attention(nn.Module):
    """MultiheadAttention applies its ``out_proj`` Linear functionally (no forward call)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(6, 8), nn.Linear(8, 3)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.att(h, h, h)[0].mean(1))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_layer_whose_forward_never_runs_is_named_once(name):
    import warnings

    model = _Attention()
    ctor = {"singd": lambda m: kfac_tn.SINGD(m, T=1, warn_unsupported=False),
            "kfac": lambda m: kfac_tn.KFAC(m, warn_unsupported=False)}[name]
    opt = ctor(model)
    X, y = torch.randn(4, 5, 6), torch.randint(0, 3, (4,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            _step(model, opt, X, y)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "'att.out_proj' has never run its forward()" in messages[0]


class _Checkpointed(nn.Module):
    def __init__(self, checkpointed):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
        self.checkpointed = checkpointed

    def forward(self, x):
        if self.checkpointed:
            from torch.utils.checkpoint import checkpoint

            return self.head(checkpoint(self.body, x, use_reentrant=False))
        return self.head(self.body(x))


def _trajectory(model, opt, X, y, steps=3):
    return train(model, opt, X, y, steps)


def _summed_steps(model, opt, batches):
    """One step per entry of ``batches``, a list of micro-batches ``(X, y)``, summed losses."""
    import warnings

    for micro_batches in batches:
        opt.zero_grad()
        for X, y in micro_batches:
            nn.functional.cross_entropy(model(X), y, reduction="sum").backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (SINGD: no statistics at an empty step)
            opt.step()
    return flat_parameters(model)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_empty_batch_contributes_nothing(name):
    """An empty micro-batch next to a full one, and a step on an empty batch alone (zero
    gradients, no statistics): without momentum, the trajectory of the same steps without
    them; with momentum μ, the empty step moves the parameters by μ times the previous
    step's move, as torch.optim.SGD's momentum does on a zero gradient."""
    gen = torch.Generator().manual_seed(3)
    X1, X2 = torch.randn(2, 5, 3, 6, 6, generator=gen)
    y1, y2 = torch.randint(0, 3, (2, 5), generator=gen)
    empty = (X1[:0], y1[:0])
    no_momentum = {"singd": lambda m: kfac_tn.SINGD(m, lr=0.05, lr_cov=0.1, T=1, momentum=0.0),
                   "kfac": lambda m: kfac_tn.KFAC(m, lr=0.05, damping=1e-2, inverse_update_freq=1, momentum=0.0)}
    runs = []
    for batches in ([[(X1, y1)], [(X2, y2)]], [[(X1, y1), empty], [empty], [empty, (X2, y2)]]):
        model = _conv_net()
        runs.append(_summed_steps(model, no_momentum[name](model), batches))
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=0)
    model = _conv_net()
    opt = OPTIMIZERS[name](model)  # momentum 0.9
    before = flat_parameters(model)
    first = _summed_steps(model, opt, [[(X1, y1)]])
    second = _summed_steps(model, opt, [[empty]])
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    torch.testing.assert_close(second - first, 0.9 * (first - before))


class _ConvHead(nn.Module):
    """Conv2d, Conv1d and a Linear head, for batched and unbatched inputs alike."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv2d, self.conv1d, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv1d(4, 5, 2), nn.Linear(25, 3)

    def forward(self, x):  # [(B,) 3, 6, 6]
        x = torch.relu(self.conv2d(x))  # [(B,) 4, 6, 6]
        rows = torch.relu(self.conv1d(x[..., 0, :]))  # [(B,) 5, 5]
        return self.head(rows.flatten(-2))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_unbatched_call_is_a_batch_of_one(name):
    """One sample without its batch dimension (Linear ``[d]``, Conv1d ``[C, L]``, Conv2d
    ``[C, H, W]``, as torch accepts): the trajectory of the same sample as a batch of one."""
    gen = torch.Generator().manual_seed(4)
    X, y = torch.randn(3, 3, 6, 6, generator=gen), torch.randint(0, 3, (3,), generator=gen)
    runs = []
    for batched in (True, False):
        model = _ConvHead()
        opt = OPTIMIZERS[name](model)
        for x, target in zip(X, y):
            opt.zero_grad()
            out = model(x.unsqueeze(0)) if batched else model(x)
            nn.functional.cross_entropy(out, target.unsqueeze(0) if batched else target).backward()
            opt.step()
        runs.append(flat_parameters(model))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=1e-7)


def test_singd_on_a_lazy_layer_asks_for_one_forward_pass_first():
    model = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"0.weight, 0.bias not yet .*run one forward pass"):
        kfac_tn.SINGD(model)
    model(torch.randn(2, 4))
    kfac_tn.SINGD(model)  # initialized: fine


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_activation_checkpointing_changes_nothing(name):
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    runs = [_trajectory(m, OPTIMIZERS[name](m), X, y) for m in (_Checkpointed(False), _Checkpointed(True))]
    torch.testing.assert_close(runs[1], runs[0])


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_channels_last_changes_nothing(name):
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    plain = _conv_net()
    ref = _trajectory(plain, OPTIMIZERS[name](plain), X, y)
    model = _conv_net().to(memory_format=torch.channels_last)
    got = _trajectory(model, OPTIMIZERS[name](model), X.to(memory_format=torch.channels_last), y)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_states_move_between_a_compiled_and_the_plain_model(name):
    """The layers of ``torch.compile(model)`` are the model's own: same names, same state."""
    model = _conv_net()
    plain = OPTIMIZERS[name](model)
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    _step(model, plain, X, y)
    plain.remove_hooks()
    compiled = OPTIMIZERS[name](torch.compile(model))  # not run here: compiling takes long on a CPU
    compiled.load_state_dict(plain.state_dict())
    assert compiled.state_dict()["state"].keys() == plain.state_dict()["state"].keys()
    layers = compiled.Ks if name == "singd" else compiled.kfac_state
    assert set(layers) == {"0", "4"}


class _CompiledStep:
    """An optimizer whose ``step`` is ``torch.compile(opt.step)``."""

    def __init__(self, opt):
        self.opt, self.step = opt, torch.compile(opt.step, backend="aot_eager")

    def zero_grad(self):
        self.opt.zero_grad()


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("step_compiled", [False, True])
def test_a_compiled_model_trains_like_the_eager_one_without_recompiling(name, step_compiled):
    """The hooks and the step run eagerly under torch.compile (no guards on the optimizer's
    step counter or on which layer fires; the step is fused already): after the first step
    nothing is compiled again, and the trajectory equals the eager model's (KFAC's
    compiled step used to keep stale pending factors)."""
    from torch._dynamo.utils import counters

    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    eager = _conv_net()
    ref = _trajectory(eager, OPTIMIZERS[name](eager), X, y, steps=5)
    torch._dynamo.reset()
    counters.clear()
    model = _conv_net()
    compiled = torch.compile(model, backend="aot_eager")
    opt = OPTIMIZERS[name](compiled)
    if step_compiled:
        opt = _CompiledStep(opt)
    _step(compiled, opt, X, y)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(4):
        _step(compiled, opt, X, y)
    assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    got = flat_parameters(model)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("built_on", ["the DDP wrapper", "plain model, wrapped later", "ddp.module"])
def test_a_distributed_data_parallel_model_trains_like_the_plain_one(name, built_on, tmp_path):
    """One gloo rank: an optimizer on a DDP-wrapped model (built on the wrapper, before
    wrapping or on ``ddp.module``) gives the plain model's trajectory and the plain layer
    names; DataParallel and FSDP are clear errors."""
    import torch.distributed as dist

    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    plain = _conv_net()
    reference = OPTIMIZERS[name](plain)
    ref = _trajectory(plain, reference, X, y)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = _conv_net()
        if built_on == "plain model, wrapped later":
            opt = OPTIMIZERS[name](model)
            ddp = nn.parallel.DistributedDataParallel(model)
        else:
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = OPTIMIZERS[name](ddp if built_on == "the DDP wrapper" else ddp.module)
        got = _trajectory(ddp, opt, X, y)
        assert opt._capture.ddp_synced
        assert opt.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
        with pytest.raises(TypeError, match="use DistributedDataParallel"):
            OPTIMIZERS[name](nn.DataParallel(_conv_net()))
        sharded = nn.Module()  # what FSDP(module) looks like to the optimizer
        sharded._fsdp_wrapped_module = _conv_net()
        with pytest.raises(TypeError, match="FullyShardedDataParallel is not supported"):
            OPTIMIZERS[name](sharded)
        del ddp, opt
    finally:
        destroy_process_group()
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_passing_the_parameters_instead_of_the_model_is_a_clear_error(name):
    with pytest.raises(TypeError, match="must be the model"):
        OPTIMIZERS[name](_conv_net().parameters())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_warnings_point_at_the_users_line(name):
    """A skipped step's warning is raised from deferred device flags deep inside the
    optimizer; it must be attributed to the caller's ``opt.step()``, not to internals."""
    model = _conv_net()
    opt = OPTIMIZERS[name](model)
    X, y = torch.randn(4, 3, 6, 6), torch.randint(0, 3, (4,))
    X[0, 0, 0, 0] = float("inf")
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    with pytest.warns(UserWarning) as record:
        opt.step()
    assert {w.filename for w in record} == {__file__}
