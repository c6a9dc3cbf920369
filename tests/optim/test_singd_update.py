"""SINGD's update rule alone (:func:`update_pairs_`, :mod:`kfac_tn.optim.natural_gradient`),
against singd 0.0.5's own formulas written with its structured matrices: the Riemannian
step of ``SINGD._update_preconditioner`` and the products of ``_compute_natural_gradient``."""

import copy
import itertools

import pytest
import torch
from singd.optim.optimizer import SINGD as StockSINGD
from singd.structures.dense import DenseMatrix
from torch import nn

from kfac_tn.optim.natural_gradient import (
    block_natural_gradient,
    diagonal_natural_gradient,
    stacked_natural_gradient,
)
from kfac_tn.optim.riemannian_update import FactorPair, update_pairs_
from kfac_tn.optim.structured_products import stock_projector
from kfac_tn.optim.symmetric_sum import SymmetricSum
from kfac_tn.runtime.workspace import Workspace

STRUCTURES = StockSINGD.SUPPORTED_STRUCTURES
#: hierarchical and Toeplitz matrices refuse float64 in singd's products
DTYPES = {name: torch.float32 if name.startswith(("hier", "tri")) else torch.float64 for name in STRUCTURES}
DIMS = [(40, 7), (33, 36)]  # (d_K, d_C) of two blocks: every part of every structure is used


def _matrix(cls, d, dtype, gen, scale=0.1):
    X = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return cls.from_dense((torch.eye(d, dtype=torch.float64) + scale * X).to(dtype))


def _statistics(cls, d, dtype, gen):
    S = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64) / d
    return cls.from_dense((S @ S.T).to(dtype)), S.to(dtype)


def _stock_step(K, C, H_K, H_C, m_K, m_C, *, grad_unscaling, damping, kfac_like, alpha1, normalize, beta):
    """singd 0.0.5's ``_update_preconditioner`` on copies: returns ``(K, C, m_K, m_C)``."""
    K_tK, C_tC = K.from_inner(), C.from_inner()
    scale = 0.5 * (1.0 - alpha1 if normalize else 1.0)
    dtype_K, dtype_C = K.to_dense().dtype, C.to_dense().dtype
    new_m_K = K.zeros(K.shape[0], dtype=dtype_K)
    new_m_K.add_(H_K, alpha=1.0 if kfac_like else grad_unscaling * H_C.average_trace())
    new_m_K.add_(K_tK, alpha=damping * (1.0 if kfac_like else C_tC.average_trace()))
    new_m_K.diag_add_(-1.0).mul_(scale)
    new_m_C = C.zeros(C.shape[0], dtype=dtype_C)
    new_m_C.add_(H_C, alpha=grad_unscaling if kfac_like else grad_unscaling * H_K.average_trace())
    new_m_C.add_(C_tC, alpha=damping * (1.0 if kfac_like else K_tK.average_trace()))
    new_m_C.diag_add_(-1.0).mul_(scale)
    if alpha1 != 0.0:
        new_m_C.add_(m_C, alpha=alpha1)
        new_m_K.add_(m_K, alpha=alpha1)
    beta_K = beta_C = beta
    if normalize:
        beta_K /= max(1.0, new_m_K.infinity_vector_norm())
        beta_C /= max(1.0, new_m_C.infinity_vector_norm())
    K_new, C_new = copy.deepcopy(K), copy.deepcopy(C)
    K_new.add_(K @ new_m_K, alpha=-beta_K)
    C_new.add_(C @ new_m_C, alpha=-beta_C)
    return K_new, C_new, new_m_K, new_m_C


def _dense(M):
    return M.to_dense().double()


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
@pytest.mark.parametrize(("kfac_like", "alpha1", "normalize", "grad_unscaling", "thin"),
                         [(False, 0.5, False, 1.0, False), (False, 0.0, True, 0.25, True), (True, 0.0, False, 1.0, False),
                          (False, 0.9, True, 1.0, False)])
def test_update_pairs_is_singds_riemannian_step(structure, kfac_like, alpha1, normalize, grad_unscaling, thin):
    """Two blocks of different sizes updated together equal singd's step of each alone;
    dense statistics may come as thin factors ``S Sᵀ`` (:class:`SymmetricSum`)."""
    cls, dtype = STRUCTURES[structure], DTYPES[structure]
    gen = torch.Generator().manual_seed(3)
    hyper = dict(grad_unscaling=grad_unscaling, damping=1e-2, kfac_like=kfac_like, alpha1=alpha1, beta=0.3)
    pairs, expected = [], []
    for d_K, d_C in DIMS:
        K, C = _matrix(cls, d_K, dtype, gen), _matrix(cls, d_C, dtype, gen)
        (H_K, S_K), (H_C, S_C) = _statistics(cls, d_K, dtype, gen), _statistics(cls, d_C, dtype, gen)
        m_K, m_C = _matrix(cls, d_K, dtype, gen, scale=0.05), _matrix(cls, d_C, dtype, gen, scale=0.05)
        expected.append(_stock_step(K, C, H_K, H_C, m_K, m_C, normalize=normalize, **hyper))
        if thin and cls is DenseMatrix:
            H_K, H_C = SymmetricSum(factor=S_K), SymmetricSum(factor=S_C)
        pairs.append(FactorPair(K, C, H_K, H_C, m_K, m_C))
    dims = torch.tensor([(d_K, d_C, d_K, d_C) for d_K, d_C in DIMS], dtype=dtype)
    scale = 0.5 * (1.0 - alpha1 if normalize else 1.0)
    momenta, finite = update_pairs_(pairs, torch.tensor(True), dims, scale=scale, normalize=normalize, **hyper)
    assert finite.tolist() == [True, True]
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for pair, (m_K, m_C), (K, C, m_K_ref, m_C_ref) in zip(pairs, momenta, expected):
        torch.testing.assert_close(_dense(pair.K), _dense(K), **tol)
        torch.testing.assert_close(_dense(pair.C), _dense(C), **tol)
        if alpha1 == 0.0:
            assert m_K is None and m_C is None
        else:
            torch.testing.assert_close(_dense(m_K), _dense(m_K_ref), **tol)
            torch.testing.assert_close(_dense(m_C), _dense(m_C_ref), **tol)


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_update_pairs_skips_blocks_with_non_finite_statistics_and_steps_with_bad_gradients(structure):
    """A block with a NaN statistic keeps K, C and momenta bit for bit and is flagged; the
    other block is updated. With ``ok`` false no block changes."""
    cls, dtype = STRUCTURES[structure], DTYPES[structure]
    gen = torch.Generator().manual_seed(4)
    hyper = dict(grad_unscaling=1.0, damping=1e-3, kfac_like=False, alpha1=0.3, beta=0.1, scale=0.6, normalize=False)
    dims = torch.tensor([(d_K, d_C, d_K, d_C) for d_K, d_C in DIMS], dtype=dtype)
    for ok in (True, False):
        pairs = []
        for d_K, d_C in DIMS:
            pairs.append(FactorPair(_matrix(cls, d_K, dtype, gen), _matrix(cls, d_C, dtype, gen),
                                    _statistics(cls, d_K, dtype, gen)[0], _statistics(cls, d_C, dtype, gen)[0],
                                    _matrix(cls, d_K, dtype, gen), _matrix(cls, d_C, dtype, gen)))
        next(t for _, t in pairs[0].H_C.named_tensors() if t.numel()).view(-1)[0] = float("nan")
        before = [[_dense(M).clone() for M in (p.K, p.C, p.m_K, p.m_C)] for p in pairs]
        momenta, finite = update_pairs_(pairs, torch.tensor(ok), dims, **hyper)
        assert finite.tolist() == [False, True]
        for i, (pair, (m_K, m_C)) in enumerate(zip(pairs, momenta)):
            after = [_dense(M) for M in (pair.K, pair.C, m_K, m_C)]
            unchanged = [torch.equal(a, b) for a, b in zip(after, before[i])]
            assert all(unchanged) if (i == 0 or not ok) else not any(unchanged[:2])
            assert all(torch.isfinite(a).all() for a in after)


def _stock_natural_gradient(grad, K, C):
    """singd 0.0.5's products: ``(K @ K.rmatmat(∇ᵀ))ᵀ``, then ``C @ C.rmatmat(·)``."""
    nat = (K @ K.rmatmat(grad.T)).T
    return C @ C.rmatmat(nat)


@pytest.mark.parametrize("structures", list(itertools.product(sorted(STRUCTURES), repeat=2)))
def test_block_natural_gradient_is_singds(structures, stock_float64):
    """Every pair of structures, with and without cached projectors ``K Kᵀ``, ``C Cᵀ``."""
    (K_cls, C_cls), dtype = (STRUCTURES[s] for s in structures), min((DTYPES[s] for s in structures),
                                                                     key=lambda t: t.itemsize)
    gen = torch.Generator().manual_seed(5)
    (d_K, d_C), = DIMS[:1]
    K, C = _matrix(K_cls, d_K, dtype, gen, scale=0.3), _matrix(C_cls, d_C, dtype, gen, scale=0.3)
    grad = torch.randn(d_C, d_K, generator=gen, dtype=dtype)
    expected = _stock_natural_gradient(grad, K, C)
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block_natural_gradient(grad, K, C), expected, **tol)
    torch.testing.assert_close(block_natural_gradient(grad, K, C, stock_projector(K), stock_projector(C)), expected, **tol)


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_block_natural_gradient_runs_K_then_C_products_in_their_dtypes(structure):
    """float32 K, float64 C, float64 gradient: the K products round to float32, the C
    products do not (the result is no float32 number cast to float64)."""
    gen = torch.Generator().manual_seed(9)
    cls = STRUCTURES[structure]
    K, C = _matrix(cls, 6, torch.float32, gen, scale=0.3), _matrix(cls, 4, torch.float64, gen, scale=0.3)
    grad = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    K_dense, C_dense = K.to_dense(), C.to_dense()
    after_K = (grad.float() @ K_dense @ K_dense.T).double()  # singd's products, K's part in float32
    expected = C_dense @ C_dense.T @ after_K
    ours = block_natural_gradient(grad, K, C, dtype_K=torch.float32, dtype_C=torch.float64)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ours, ours.float().double())  # C's products kept float64's precision


def test_stacked_natural_gradient_is_singds_per_block():
    gen = torch.Generator().manual_seed(6)
    Ks = [_matrix(DenseMatrix, 5, torch.float64, gen, 0.3) for _ in range(3)]
    Cs = [_matrix(DenseMatrix, 4, torch.float64, gen, 0.3) for _ in range(3)]
    grads = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    for ours, g, K, C in zip(stacked_natural_gradient(grads, Ks, Cs, grad_scale=8.0), grads, Ks, Cs):
        torch.testing.assert_close(ours, _stock_natural_gradient(g / 8.0, K, C))


@pytest.mark.parametrize("layer", [nn.Linear(5, 3), nn.Conv2d(4, 6, 3, groups=2), nn.Conv1d(2, 4, 2, groups=2, bias=False),
                                   nn.ConvTranspose2d(4, 6, 2, groups=2)])
def test_diagonal_natural_gradient_scales_each_block(layer):
    """``diag(c_b²) ∇_b diag(k_b²)`` per group ``b``, weights and bias, written back in the
    parameters' shapes (for a transposed conv, the blocks are ``[C_out/G, C_in/G·k]``)."""
    from kfac_tn.optim.weight_blocks import (
        block_dims,
        from_matrix_blocks,
        gradient_blocks,
        num_blocks,
    )

    layer = layer.double()
    gen = torch.Generator().manual_seed(7)
    for p in layer.parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    G, (d_K, d_C) = num_blocks(layer, False), block_dims(layer, False)
    k2, c2 = torch.rand(G, d_K, generator=gen, dtype=torch.float64), torch.rand(G, d_C, generator=gen, dtype=torch.float64)
    blocks = [torch.diag(c2[b]) @ g @ torch.diag(k2[b]) for b, g in enumerate(gradient_blocks(layer, False))]
    expected = from_matrix_blocks(layer, blocks, layer.bias is not None)
    grads = [p.grad.clone() for p in layer.parameters()]
    for results in (None, Workspace()):  # results in new tensors or in a workspace
        out = diagonal_natural_gradient(layer, k2, c2, group_average=False, results=results)
        assert [p for p, _ in out] == [p for p in (layer.weight, layer.bias) if p is not None]
        for (_, ours), theirs in zip(out, expected):
            torch.testing.assert_close(ours, theirs)
        assert all(torch.equal(p.grad, g) for p, g in zip(layer.parameters(), grads))  # gradients untouched


def test_diagonal_natural_gradients_of_many_layers_at_once():
    """The foreach form: ``diag(c_b²) ∇_b diag(k_b²) / s`` per group of each layer (weights
    ``[G, d_C, d_w]`` with ``[G, 1, d_w]``, ``[G, d_C, 1]``; biases ``[G, d_C]`` with ``[G, 1]``)."""
    from kfac_tn.optim.natural_gradient import diagonal_natural_gradients_

    gen = torch.Generator().manual_seed(8)
    shapes = [(2, 3, 4), (1, 5, 2)]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] + [
        torch.randn(2, 3, generator=gen, dtype=torch.float64)]
    k2 = [torch.rand(G, d_w + 1, generator=gen, dtype=torch.float64) for G, _, d_w in shapes]
    c2 = [torch.rand(G, d_C, generator=gen, dtype=torch.float64) for G, d_C, _ in shapes]
    k2s = [k2[0][:, None, :4], k2[1][:, None, :2], k2[0][:, 4:]]
    c2s = [c2[0].unsqueeze(2), c2[1].unsqueeze(2), c2[0]]
    outs = [torch.empty_like(g) for g in grads]
    diagonal_natural_gradients_(outs, grads, k2s, c2s, grad_scale=4.0)
    for b in range(2):
        torch.testing.assert_close(outs[0][b], torch.diag(c2[0][b]) @ grads[0][b] @ torch.diag(k2[0][b, :4]) / 4)
        torch.testing.assert_close(outs[2][b], c2[0][b] * grads[2][b] * k2[0][b, 4] / 4)
    torch.testing.assert_close(outs[1][0], torch.diag(c2[1][0]) @ grads[1][0] @ torch.diag(k2[1][0, :2]) / 4)
