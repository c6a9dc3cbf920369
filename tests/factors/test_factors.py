"""Layer-level input/grad-output factors against unfold references and curvlinops (float64)."""

import pytest
import torch
from conv_cases import conv_layers, reference_input_factor
from curvlinops import KFACLinearOperator
from curvlinops.kfac import FisherType, KFACType
from hypothesis import given, settings
from torch import nn

import kfac_tn


@given(conv_layers(), __import__("hypothesis").strategies.sampled_from(["expand", "reduce"]))
@settings(max_examples=80, deadline=None)
def test_input_factor_matches_unfold_reference(case, approx):
    layer, x = case
    ours = kfac_tn.input_factor(layer, x, approx)
    ref = reference_input_factor(layer, x, approx)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref)


@given(conv_layers(), __import__("hypothesis").strategies.sampled_from([5, 30]),
       __import__("hypothesis").strategies.sampled_from(["expand", "reduce"]))
@settings(max_examples=60, deadline=None)
def test_accelerator_routes_match_unfold_reference(case, block, approx):
    """The accelerator routes (windowed-view unfolding, one chunk, unfold + GEMM for KFC,
    the averaged unfolded input by one Kronecker-pattern product), which CI cannot reach on
    a GPU, against the independent unfold reference: whole factor, diagonal blocks, diagonal,
    rows (torch's im2col for 2-d convolutions)."""
    layer, x = case
    ref = reference_input_factor(layer, x, approx)
    with kfac_tn.use_routes("accelerator"):
        ours = kfac_tn.input_factor(layer, x, approx)
        blocks = kfac_tn.factors.input_factor_blocks(layer, x, block, approx)
        diagonal, scale = kfac_tn.factors.input_factor_diagonal_sum(layer, x, approx)
        rows = kfac_tn.factors.input_rows(layer, x, approx)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(rows.transpose(1, 2) @ rows, ref)
    for got, want in zip(blocks, _diagonal_blocks(ref, block)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(diagonal * scale, ref.diagonal(dim1=1, dim2=2)[:, : diagonal.shape[1]])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_weight_sharing(approx, bias):
    layer = nn.Linear(4, 3, bias=bias).double()
    x = torch.randn(5, 2, 6, 4, dtype=torch.float64)
    rows = x.reshape(5, 12, 4)
    if bias:
        rows = torch.cat([rows, torch.ones(5, 12, 1, dtype=torch.float64)], dim=-1)
    if approx == "expand":
        ref = torch.einsum("npi,npj->ij", rows, rows) / 60
    else:
        mean = rows.mean(1)
        ref = mean.T @ mean / 5
    torch.testing.assert_close(kfac_tn.input_factor(layer, x, approx), ref.unsqueeze(0))
    # the diagonal's weight part, scale folded out (the diagonal bank's statistics)
    diagonal, scale = kfac_tn.factors.input_factor_diagonal_sum(layer, x, approx)
    torch.testing.assert_close(diagonal * scale, ref.diagonal()[:4].unsqueeze(0))
    if approx == "expand":  # the default
        torch.testing.assert_close(kfac_tn.factors.input_factor_diagonal_sum(layer, x), (diagonal, scale))


def _curvlinops_factors(model, X, y, approx):
    loss_func = nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]
    kfac = KFACLinearOperator(
        model, loss_func, params, [(X, y)], fisher_type=FisherType.EMPIRICAL,
        kfac_approx=KFACType.EXPAND if approx == "expand" else KFACType.REDUCE,
        check_deterministic=False, separate_weight_and_bias=False,
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    return state["input_covariances"], state["gradient_covariances"]


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factors_match_curvlinops_on_conv2d_and_linear(approx):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 5, (2, 3), stride=(2, 1), dilation=(1, 2), bias=False),
        nn.Flatten(),
        nn.Linear(5 * 4 * 4, 6),
    ).double()
    X = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 6, (7,))
    inputs, grads = {}, {}
    for name, module in model.named_children():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            def hook(mod, inp, out, name=name):
                inputs[name] = inp[0].detach()
                out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
            module.register_forward_hook(hook)
    nn.CrossEntropyLoss()(model(X), y).backward()
    ref_a, ref_g = _curvlinops_factors(model, X, y, approx)
    for name in inputs:
        layer = model.get_submodule(name)
        a = kfac_tn.input_factor(layer, inputs[name], approx)
        g = kfac_tn.grad_output_factor(layer, grads[name], approx, loss_average="batch")
        torch.testing.assert_close(a[0], ref_a[name])
        torch.testing.assert_close(g[0], ref_g[name])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
def test_grad_output_factor_grouped_conv(approx, loss_average):
    layer = nn.Conv1d(3, 6, 3, groups=3).double()
    g = torch.randn(5, 6, 7, dtype=torch.float64)
    scale = {None: 1, "batch": 5, "batch+sequence": 35}[loss_average]
    blocks = g.unflatten(1, (3, 2))  # [N, G, D, P]
    if approx == "expand":
        ref = torch.einsum("ngdp,ngep->gde", blocks, blocks)
    else:
        s = blocks.sum(-1)
        ref = torch.einsum("ngd,nge->gde", s, s)
    out = kfac_tn.grad_output_factor(layer, g, approx, loss_average)
    torch.testing.assert_close(out, scale * ref)


def test_clear_errors():
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(TypeError, match="Unsupported layer BatchNorm2d"):
        kfac_tn.input_factor(nn.BatchNorm2d(3), torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="Unknown approx 'diag'"):
        kfac_tn.input_factor(conv, torch.randn(2, 3, 5, 5), "diag")
    with pytest.raises(ValueError, match="batched input"):
        kfac_tn.input_factor(conv, torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="3 input channels, the input has 2"):
        kfac_tn.input_factor(conv, torch.randn(2, 2, 5, 5))
    with pytest.raises(ValueError, match="no output"):
        kfac_tn.input_factor(conv, torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="Linear has 4 inputs"):
        kfac_tn.input_factor(nn.Linear(4, 2), torch.randn(2, 5))
    with pytest.raises(ValueError, match="grad_output must be"):
        kfac_tn.grad_output_factor(conv, torch.randn(2, 5, 3, 3))
    with pytest.raises(ValueError, match="Unknown loss_average 'sum'"):
        kfac_tn.grad_output_factor(conv, torch.randn(2, 4, 3, 3), loss_average="sum")


@given(conv_layers(max_dims=2), __import__("hypothesis").strategies.sampled_from(["expand", "reduce"]))
@settings(max_examples=40, deadline=None)
def test_rows_and_diagonal_are_views_of_the_factor(case, approx):
    layer, x = case
    for group_average in (False, True):
        factor = kfac_tn.input_factor(layer, x, approx, group_average)
        rows = kfac_tn.factors.input_rows(layer, x, approx, group_average)
        torch.testing.assert_close(rows.transpose(1, 2) @ rows, factor)
        pieces = list(kfac_tn.factors.input_row_chunks(layer, x, approx, group_average, chunk_bytes=64))
        torch.testing.assert_close(sum(p.transpose(1, 2) @ p for p in pieces), factor)
        diag = kfac_tn.factors.input_factor_diagonal(layer, x, approx, group_average)
        torch.testing.assert_close(diag, factor.diagonal(dim1=1, dim2=2))


def test_group_average_matches_singd_convention():
    """singd/curvlinops average a grouped conv's input over groups: one shared block."""
    from singd.optim.utils import process_input

    torch.manual_seed(0)
    layer = nn.Conv2d(6, 4, 3, padding=1, groups=2).double()
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    for approx in ("expand", "reduce"):
        a = process_input(x.clone(), layer, approx)
        ours = kfac_tn.input_factor(layer, x, approx, group_average=True)
        torch.testing.assert_close(ours[0], a.T @ a)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_average", [None, "batch", "batch+sequence"])
def test_grad_output_diagonal_and_rows(approx, loss_average):
    for layer, g in [
        (nn.Conv2d(4, 6, 3, groups=2).double(), torch.randn(3, 6, 4, 5, dtype=torch.float64)),
        (nn.Linear(3, 5).double(), torch.randn(3, 2, 4, 5, dtype=torch.float64)),
    ]:
        for ga in (False, True):
            full = kfac_tn.grad_output_factor(layer, g, approx, loss_average, ga)
            diag = kfac_tn.factors.grad_output_factor_diagonal(layer, g, approx, loss_average, ga)
            torch.testing.assert_close(diag, full.diagonal(dim1=1, dim2=2))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_factor_views_never_modify_the_input(approx):
    """The input is the layer's saved activation: writing to it would corrupt gradients."""
    layers = [(nn.Linear(4, 3, bias=False), torch.randn(5, 2, 4)), (nn.Conv1d(2, 3, 1, bias=False), torch.randn(5, 2, 6))]
    for layer, x in layers:
        x0 = x.clone()
        kfac_tn.factors.input_rows(layer, x, approx)
        list(kfac_tn.factors.input_row_chunks(layer, x, approx))
        kfac_tn.factors.input_factor_diagonal(layer, x, approx)
        kfac_tn.factors.input_factor_blocks(layer, x, 2, approx)
        kfac_tn.input_factor(layer, x, approx)
        assert torch.equal(x, x0)


def _diagonal_blocks(full, block):
    """Reference: ``[G, d // B, B, B]`` and ``[G, r, r]`` cut out of the whole factor."""
    G, n = full.shape[0], full.shape[1] // block
    blocks = full.new_empty(G, n, block, block)
    for i in range(n):
        blocks[:, i] = full[:, i * block : (i + 1) * block, i * block : (i + 1) * block]
    return blocks, full[:, n * block :, n * block :]


@given(
    conv_layers(),
    __import__("hypothesis").strategies.sampled_from(["expand", "reduce"]),
    __import__("hypothesis").strategies.sampled_from([1, 2, 5, 30]),
    __import__("hypothesis").strategies.sampled_from([64, 2**23]),
)
@settings(max_examples=60, deadline=None)
def test_factor_blocks_are_the_diagonal_blocks_of_the_factors(case, approx, block, chunk_bytes):
    """Block-diagonal statistics: only A's and G's diagonal blocks, batch chunks or not."""
    layer, x = case
    g = torch.randn_like(layer(x))
    for group_average in (False, True):
        full = kfac_tn.input_factor(layer, x, approx, group_average)
        got = kfac_tn.factors.input_factor_blocks(layer, x, block, approx, group_average, chunk_bytes)
        for ours, ref in zip(got, _diagonal_blocks(full, block)):
            torch.testing.assert_close(ours, ref)
        for loss_average in (None, "batch+sequence"):
            full = kfac_tn.grad_output_factor(layer, g, approx, loss_average, group_average)
            got = kfac_tn.factors.grad_output_factor_blocks(layer, g, block, approx, loss_average, group_average)
            for ours, ref in zip(got, _diagonal_blocks(full, block)):
                torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_factor_blocks(approx, bias):
    layer = nn.Linear(29, 31, bias=bias).double()  # with bias: d = 30, one full block, no last
    x = torch.randn(4, 3, 29, dtype=torch.float64)
    g = torch.randn(4, 3, 31, dtype=torch.float64)
    for block in (1, 7, 30):
        got = kfac_tn.factors.input_factor_blocks(layer, x, block, approx)
        for ours, ref in zip(got, _diagonal_blocks(kfac_tn.input_factor(layer, x, approx), block)):
            torch.testing.assert_close(ours, ref)
        got = kfac_tn.factors.grad_output_factor_blocks(layer, g, block, approx)
        for ours, ref in zip(got, _diagonal_blocks(kfac_tn.grad_output_factor(layer, g, approx), block)):
            torch.testing.assert_close(ours, ref)


def test_factor_blocks_reject_a_bad_block_size():
    layer, x = nn.Conv2d(2, 3, 3), torch.randn(2, 2, 5, 5)
    for block in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="block must be a positive integer"):
            kfac_tn.factors.input_factor_blocks(layer, x, block)
        with pytest.raises(ValueError, match="block must be a positive integer"):
            kfac_tn.factors.grad_output_factor_blocks(layer, torch.randn(2, 3, 3, 3), block)


@pytest.mark.parametrize("kernel", [2, 4, (2, 3)])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_same_padding_with_even_kernels(kernel, approx):
    """padding='same' with an even kernel pads one more on the right than on the left;
    fixed cases (hypothesis only reaches them by chance), on both kernel routes."""
    torch.manual_seed(0)
    dims = 2 if isinstance(kernel, tuple) else 1
    conv = (nn.Conv2d if dims == 2 else nn.Conv1d)(3, 4, kernel, padding="same", bias=True).double()
    x = torch.randn(2, 3, *([7] * dims), dtype=torch.float64)
    ref = reference_input_factor(conv, x, approx)
    for routes in ("cpu", "accelerator"):
        with kfac_tn.use_routes(routes):
            torch.testing.assert_close(kfac_tn.input_factor(conv, x, approx), ref)
            for got, want in zip(kfac_tn.factors.input_factor_blocks(conv, x, 5, approx), _diagonal_blocks(ref, 5)):
                torch.testing.assert_close(got, want)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_grad_output_blocks_with_an_uneven_last_chunk(approx):
    """Batch 5 in chunks of 2: the last chunk (1 sample) must count."""
    conv = nn.Conv2d(3, 7, 3, padding=1).double()
    g = torch.randn(5, 7, 4, 4, dtype=torch.float64)
    per_sample = g[0].numel() * g.element_size()
    full = kfac_tn.grad_output_factor(conv, g, approx, "batch")
    got = kfac_tn.factors.grad_output_factor_blocks(conv, g, 3, approx, "batch", chunk_bytes=2 * per_sample)
    for ours, ref in zip(got, _diagonal_blocks(full, 3)):
        torch.testing.assert_close(ours, ref)


def test_block_statistics_from_a_nan_filled_workspace_on_a_strided_transposed_conv():
    """A reused unfolding buffer must be zeroed where strided writes leave holes."""
    from kfac_tn.runtime.workspace import Workspace

    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ws = Workspace()
    ws.take((100_000,), x).fill_(float("nan"))
    ws.reset()
    ref = reference_input_factor(layer, x, "expand")
    got = kfac_tn.factors.input_factor_blocks(layer, x, 5, "expand", workspace=ws)
    for ours, want in zip(got, _diagonal_blocks(ref, 5)):
        torch.testing.assert_close(ours, want)


@pytest.mark.parametrize("kernel, stride, dilation", [(5, 1, 1), (7, 2, 1), (5, 1, 2), (3, 2, 1), (3, 1, 1)])
def test_depthwise_factors_on_a_cpu_equal_f_unfold(kernel, stride, dilation):
    """Depthwise convolutions take their own CPU routes (A group by group, kernels.group_gram;
    blocks from one windowed view with >= 25 taps, routes.windowed_unfold): A and its
    diagonal blocks equal F.unfold's, padding included."""
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 6, kernel, stride, padding=kernel // 2, dilation=dilation, groups=6).double()
    x = torch.randn(3, 6, 11, 11, dtype=torch.float64)
    u = nn.functional.unfold(x, kernel, dilation, kernel // 2, stride)  # [N, 6·K, O]
    N, _, O = u.shape
    u = u.unflatten(1, (6, -1))  # [N, G, K, O]
    u = torch.cat([u, torch.ones(N, 6, 1, O, dtype=u.dtype)], 2)  # bias row
    rows = u.permute(1, 0, 3, 2).reshape(6, N * O, -1)
    expected = rows.transpose(1, 2) @ rows / (N * O)
    torch.testing.assert_close(kfac_tn.input_factor(layer, x, "expand"), expected)
    blocks, last = kfac_tn.factors.input_factor_blocks(layer, x, 4, "expand")
    d = expected.shape[-1]
    for b in range(d // 4):
        torch.testing.assert_close(blocks[:, b], expected[:, 4 * b: 4 * b + 4, 4 * b: 4 * b + 4])
    r = d % 4
    torch.testing.assert_close(last[:, :r, :r], expected[:, d - r:, d - r:])


def test_im2col_route_in_several_batch_chunks(monkeypatch):
    """The accelerator's im2col route, one sample per chunk: the Gram, the rows and the
    feature-major chunks add up to the whole batch's (CI's inputs fit one chunk otherwise)."""
    from kfac_tn.kernels import unfold_gram
    from kfac_tn.tensor_network.geometry import layer_conv_dims

    monkeypatch.setattr("kfac_tn.runtime.chunking.ACCELERATOR_CHUNK_BYTES", 1)
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2, bias=False).double()
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    dims = layer_conv_dims(conv, x.shape)
    ref = reference_input_factor(conv, x, "expand")
    with kfac_tn.use_routes("accelerator"):
        assert unfold_gram.im2col_applies(x, dims)
        gram = unfold_gram.unfold_gram_kfc(x, dims, groups=2, chunk_bytes=1)
        rows = unfold_gram.unfolded_rows(x, dims, groups=2)
        features = list(unfold_gram.unfolded_feature_chunks(x, dims, groups=2, chunk_bytes=1))
    assert len(features) == 3
    torch.testing.assert_close(gram, ref)
    torch.testing.assert_close(rows.transpose(1, 2) @ rows / rows.shape[1], ref)
    columns = torch.cat(features, dim=2)
    torch.testing.assert_close(columns @ columns.transpose(1, 2) / columns.shape[2], ref)
