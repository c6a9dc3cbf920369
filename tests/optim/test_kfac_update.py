"""KFAC's update rule alone (:mod:`kfac_tn.optim.kfac_update`), against the formulas
written out densely: Kronecker solves with ``torch.kron``, the running average as a loop."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import kfac_tn
from kfac_tn.optim.kfac_update import (
    absorb_,
    damped_eigh,
    damping_split,
    invert,
    kl_clip_,
    precondition,
)


def _psd(B, d, gen, rank=None):
    X = torch.randn(B, d, rank or d, generator=gen, dtype=torch.float64)
    return X @ X.transpose(1, 2) / d


@settings(max_examples=30, deadline=None)
@given(d_A=st.integers(1, 6), d_G=st.integers(1, 5), B=st.integers(1, 3), damping=st.sampled_from([1e-3, 0.1, 2.0]),
       pi_damping=st.booleans(), method=st.sampled_from(["eigh", "cholesky"]), seed=st.integers(0, 2**16))
def test_precondition_solves_the_damped_kronecker_system(d_A, d_G, B, damping, pi_damping, method, seed):
    """``(G + δ_G I)⁻¹ V (A + δ_A I)⁻¹`` is the solution of ``((G + δ_G I) ⊗ (A + δ_A I)) x = vec V``
    with ``δ_A δ_G = λ`` and ``δ_A / δ_G = π² = (tr A / d_A) / (tr G / d_G)`` (or 1)."""
    gen = torch.Generator().manual_seed(seed)
    A, G = _psd(B, d_A, gen, rank=max(1, d_A - 1)), _psd(B, d_G, gen)  # A may be singular
    V = [torch.randn(d_G, d_A, generator=gen, dtype=torch.float64) for _ in range(B)]
    out = precondition(invert(A, G, damping, pi_damping, method, torch.float64), V, torch.float64)
    for b in range(B):
        pi = math.sqrt((A[b].trace() / d_A) / (G[b].trace() / d_G)) if pi_damping else 1.0
        delta_A, delta_G = pi * math.sqrt(damping), math.sqrt(damping) / pi
        system = torch.kron(G[b] + delta_G * torch.eye(d_G, dtype=torch.float64),
                            A[b] + delta_A * torch.eye(d_A, dtype=torch.float64))
        expected = torch.linalg.solve(system, V[b].flatten()).view(d_G, d_A)
        torch.testing.assert_close(out[b], expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["eigh", "cholesky"])
def test_blocked_factor_takes_pi_from_its_unpadded_trace(method):
    """A of d_A = 7 kept as 2 blocks of 4 (one padding entry, the identity): π² is
    ``(tr A / 7) / (tr G / d_G)``, as for the block-diagonal dense A, not over the padding."""
    from kfac_tn.optim.factor_blocks import diagonal_blocks

    gen = torch.Generator().manual_seed(5)
    A, G = 3.0 * _psd(1, 7, gen), _psd(1, 3, gen)
    masked = A[0].clone()
    masked[:4, 4:] = masked[4:, :4] = 0
    V = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    blocks = diagonal_blocks(A, 2, 4)  # [1, 2, 4, 4]
    (out,) = precondition(invert(blocks, G, 0.1, True, method, torch.float64, dims=(7, 3)), [V], torch.float64)
    pi = math.sqrt((masked.trace() / 7) / (G[0].trace() / 3))
    delta_A, delta_G = pi * math.sqrt(0.1), math.sqrt(0.1) / pi
    expected = torch.linalg.solve(G[0] + delta_G * torch.eye(3, dtype=torch.float64), V) @ torch.linalg.inv(
        masked + delta_A * torch.eye(7, dtype=torch.float64))
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-10)


def test_precondition_keeps_the_gradient_dtype_and_computes_in_the_inverse_dtype():
    gen = torch.Generator().manual_seed(0)
    A, G = _psd(1, 4, gen), _psd(1, 3, gen)
    V = torch.randn(3, 4, generator=gen).to(torch.bfloat16)
    inverse = invert(A.float(), G.float(), 0.1, False, "eigh", torch.float64)
    assert all(t.dtype == torch.float64 for t in inverse.values())
    (out,) = precondition(inverse, [V], torch.float64)
    assert out.dtype == torch.bfloat16
    expected = torch.linalg.solve(G[0] + 0.1**0.5 * torch.eye(3, dtype=torch.float64),
                                  V.double()) @ torch.linalg.inv(A[0] + 0.1**0.5 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(out, expected.to(torch.bfloat16))


def test_damping_split_of_degenerate_traces_falls_back_to_pi_one():
    """A zero G (a layer whose outputs got no gradient) gives π = 1, not inf or NaN."""
    A, G = torch.eye(3)[None] * 4, torch.zeros(1, 2, 2)
    d_A, d_G = damping_split(A, G, 0.01, pi_damping=True)
    assert d_A.item() == pytest.approx(0.1) and d_G.item() == pytest.approx(0.1)


def test_damped_eigh_reconstructs_the_symmetric_part_with_non_negative_eigenvalues():
    gen = torch.Generator().manual_seed(1)
    M = _psd(2, 5, gen, rank=2)
    M = M + 1e-9 * torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)  # slightly asymmetric, rank 2
    evals, evecs = damped_eigh(M, torch.float64)
    assert (evals >= 0).all()
    sym = (M + M.transpose(1, 2)) / 2
    torch.testing.assert_close(evecs @ torch.diag_embed(evals) @ evecs.transpose(1, 2), sym, atol=1e-8, rtol=0)


@pytest.mark.parametrize("failure", ["error", "nan_eigenvalues", "nan_eigenvectors"])
def test_damped_eigh_repeats_a_failed_float32_decomposition_in_float64(failure, monkeypatch):
    """LAPACK's float32 eigh may raise or, silently, return NaN (MKL's batched solver did on a
    2 × 201 × 201 KFAC factor): the result is then float64's decomposition, cast back."""
    gen = torch.Generator().manual_seed(2)
    M = _psd(3, 6, gen).float()  # full rank: eigenvectors unique up to sign
    real_eigh = torch.linalg.eigh

    def failing_float32_eigh(X):
        if X.dtype != torch.float32:
            return real_eigh(X)
        if failure == "error":
            raise torch.linalg.LinAlgError("did not converge")
        evals, evecs = real_eigh(X)
        (evals if failure == "nan_eigenvalues" else evecs)[1, 2] = float("nan")
        return evals, evecs

    monkeypatch.setattr(torch.linalg, "eigh", failing_float32_eigh)
    evals, evecs = damped_eigh(M, torch.float32)
    assert evals.dtype == evecs.dtype == torch.float32
    sym = ((M + M.transpose(1, 2)) / 2).double()
    expected_evals, expected_evecs = real_eigh(sym)
    torch.testing.assert_close(evals, expected_evals.clamp_min(0).float())
    torch.testing.assert_close(evecs.double().abs(), expected_evecs.abs(), atol=1e-6, rtol=0)  # signs: LAPACK's


def test_cholesky_of_a_singular_undamped_factor_names_the_factor():
    A, G = torch.zeros(1, 3, 3, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[None]
    with pytest.raises(torch.linalg.LinAlgError, match="damped A factor"):
        invert(A, G, 0.0, False, "cholesky", torch.float64)
    with pytest.raises(ValueError, match="method must be one of"):
        invert(A, G, 0.1, False, "svd", torch.float64)


def test_kfac_names_the_layer_whose_cholesky_failed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    opt = kfac_tn.KFAC(model, damping=0.0, inverse_method="cholesky")
    model(torch.zeros(4, 3)).sum().backward()  # A = 0: singular without damping
    with pytest.raises(torch.linalg.LinAlgError, match=r"layer '0'.*increase damping"):
        opt.step()


@settings(max_examples=20, deadline=None)
@given(uses=st.lists(st.booleans(), min_size=1, max_size=6), ema_decay=st.sampled_from([0.0, 0.5, 0.95]),
       seed=st.integers(0, 2**16))
def test_absorb_is_the_running_average_of_the_used_factors(uses, ema_decay, seed):
    """First used factors replace the zero start, later ones give ``ε old + (1 − ε) new``;
    unused ones (here NaN) leave the average's bits unchanged."""
    gen = torch.Generator().manual_seed(seed)
    averages = {"A": torch.zeros(1, 2, 2, dtype=torch.float64), "G": torch.zeros(1, 3, 3, dtype=torch.float64),
                "absorbed": torch.zeros((), dtype=torch.bool)}
    expected_A = expected_G = None
    for use in uses:
        A, G = _psd(1, 2, gen), _psd(1, 3, gen)
        if not use:
            A, G = torch.full_like(A, float("nan")), torch.full_like(G, float("inf"))
        before = averages["A"].clone()
        absorb_(averages, A, G, torch.tensor(use), ema_decay)
        if use:
            if expected_A is None:
                expected_A, expected_G = A, G
            else:
                expected_A = ema_decay * expected_A + (1 - ema_decay) * A
                expected_G = ema_decay * expected_G + (1 - ema_decay) * G
        else:
            assert torch.equal(averages["A"], before)
        assert bool(averages["absorbed"]) == (expected_A is not None)
        if expected_A is not None:
            torch.testing.assert_close(averages["A"], expected_A)
            torch.testing.assert_close(averages["G"], expected_G)


@pytest.mark.parametrize("kl_clip", [1e-6, 1e6])
def test_kl_clip_scales_by_the_predicted_kl(kl_clip):
    gen = torch.Generator().manual_seed(2)
    d = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    g = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    lrs = [0.1, 0.3]
    kl = abs(sum(lr**2 * float((di * gi).sum()) for di, gi, lr in zip(d, g, lrs)))
    nu = min(1.0, math.sqrt(kl_clip / kl))
    expected = [di * nu for di in d]
    kl_clip_(d, g, lrs, kl_clip)
    for ours, theirs in zip(d, expected):
        torch.testing.assert_close(ours, theirs)
    assert (nu < 1.0) == (kl_clip == 1e-6)
