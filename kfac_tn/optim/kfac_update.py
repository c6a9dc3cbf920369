"""KFAC's update rule as functions of tensors, without optimizer state or hooks.

Per layer block with factors ``A [d_A, d_A]``, ``G [d_G, d_G]`` and gradient ``V [d_G, d_A]``
(the optimizer's blocks are batched: ``A [B, d_A, d_A]``, ``G [B, d_G, d_G]``; a factor
kept block-diagonal is ``[B, n, b, b]``, see :mod:`kfac_tn.optim.factor_blocks`):

- running averages (:func:`absorb_`): ``A ← ε A + (1 − ε) A_new``, likewise G; the first
  factors replace the zero start; a factor that is not used keeps its bits;
- damping (:func:`damping_split`): ``δ_A = π √λ``, ``δ_G = √λ / π`` with ``π = 1`` or the
  π-correction of Martens & Grosse, ``π² = (tr A / d_A) / (tr G / d_G)``;
- inverses (:func:`invert`): the eigendecompositions of ``A``, ``G`` with the damping
  added to the eigenvalues, or the Cholesky inverses of ``A + δ_A I``, ``G + δ_G I``;
- preconditioning (:func:`precondition`): ``(G + δ_G I)⁻¹ V (A + δ_A I)⁻¹``;
- KL clipping (:func:`kl_clip_`): directions scaled by ``ν = min(1, √(κ / |Σ lr² ⟨d, g⟩|))``.

Every data-dependent scalar stays on the device (no host sync), except the check of a
Cholesky factorization, which runs only where one is computed (the optimizer checks all
layers of an inversion step at once: one sync per ``inverse_update_freq`` steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kfac_tn.optim.factor_blocks import is_blocked, multiply_left, multiply_right, trace_mean

INVERSE_METHODS = ("eigh", "cholesky")
#: per inversion method, the tensors an inversion produces
INVERSE_KEYS = {"eigh": ("eval_A", "Q_A", "eval_G", "Q_G"), "cholesky": ("A_inv", "G_inv")}


def damped_eigh(M: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of symmetric PSD blocks ``[B, d, d]``: eigenvalues ``[B, d]``
    (clamped at 0) and eigenvectors ``[B, d, d]``, in ``dtype``.

    LAPACK's float32 solver can fail on ill-conditioned factors, with an error or silently
    with NaN (MKL's batched solver on one thread, seen on a 2 × 201 × 201 factor); then the
    decomposition is repeated in float64 (and cast back), which is exact, not a fudge. The
    check costs one host sync per call (``torch.linalg.eigh`` has one on CUDA already).
    """
    M = M.to(dtype)
    M = (M + M.transpose(1, 2)) / 2
    try:
        evals, evecs = torch.linalg.eigh(M)
        failed = not bool(torch.isfinite(evals).all() & torch.isfinite(evecs).all())
    except torch.linalg.LinAlgError:
        failed = True
    if failed:
        evals, evecs = torch.linalg.eigh(M.double())
        evals, evecs = evals.to(dtype), evecs.to(dtype)
    # contiguous: ranks that receive a broadcast copy must multiply with the same layout
    return evals.clamp_min_(0).contiguous(), evecs.contiguous()


def damping_split(
    A: Tensor, G: Tensor, damping: float, pi_damping: bool, dims: tuple[int, int] | None = None
) -> tuple[Tensor, Tensor]:
    """``(δ_A, δ_G)``, each ``[B, 1]``, with ``δ_A δ_G = λ`` (``damping``) for blocks
    ``A [B, d_A, d_A]``, ``G [B, d_G, d_G]``; ``δ_A / δ_G = π²`` with ``pi_damping``, else 1.
    A block with a zero or non-finite trace ratio gets ``π = 1``. Block-diagonal factors
    (``[B, n, b, b]``) need their unpadded ``dims = (d_A, d_G)``; π is the whole factors'."""
    root = torch.full((A.shape[0], 1), damping**0.5, dtype=A.dtype, device=A.device)
    if not pi_damping:
        return root, root
    d_A, d_G = dims if dims is not None else (A.shape[-1], G.shape[-1])
    pi = (trace_mean(A, d_A) / trace_mean(G, d_G)).sqrt().nan_to_num(nan=1.0, posinf=1.0).clamp_min(1e-12)
    return root * pi, root / pi


def _as_batch(M: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Blocks ``[B·n, b, b]`` and their damping ``[B·n, 1]`` of a dense or blocked factor."""
    if not is_blocked(M):
        return M, delta
    return M.flatten(0, 1), delta.repeat_interleave(M.shape[1], dim=0)


def invert(
    A: Tensor, G: Tensor, damping: float, pi_damping: bool, method: str, dtype: torch.dtype,
    dims: tuple[int, int] | None = None,
) -> dict[str, Tensor]:
    """The damped inverses of blocks ``A [B, d_A, d_A]``, ``G [B, d_G, d_G]`` in ``dtype``,
    keyed by :data:`INVERSE_KEYS` ``[method]``: ``"eigh"``: eigenvalues (damping added) and
    eigenvectors; ``"cholesky"``: ``(A + δ_A I)⁻¹``, ``(G + δ_G I)⁻¹``. A block-diagonal
    factor ``[B, n, b, b]`` (unpadded ``dims``, see :func:`damping_split`) is inverted block
    by block; its results keep the block axis (``[B, n, b]``, ``[B, n, b, b]``).

    Raises ``torch.linalg.LinAlgError`` naming the factor if a Cholesky factorization fails
    (one host sync, only for ``"cholesky"``; :func:`invert_unchecked` leaves the check to
    the caller, e.g. one for many layers).
    """
    out, failed = invert_unchecked(A, G, damping, pi_damping, method, dtype, dims)
    if failed is not None and bool(failed.any()):
        raise torch.linalg.LinAlgError(cholesky_failure(failed))
    return out


def cholesky_failure(failed: Tensor) -> str:
    """What failed, from :func:`invert_unchecked`'s flags ``[A failed, G failed]`` (one of
    them set; one host sync)."""
    return f"Cholesky of the damped {'A' if bool(failed[0]) else 'G'} factor failed"


def invert_unchecked(
    A: Tensor, G: Tensor, damping: float, pi_damping: bool, method: str, dtype: torch.dtype,
    dims: tuple[int, int] | None = None,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """:func:`invert` without its host sync: the inverses and, for ``"cholesky"``, the
    device flags ``[A failed, G failed]`` (``None`` for ``"eigh"``, which cannot fail so);
    a failed factor's inverse is garbage and must not be used."""
    if method not in INVERSE_METHODS:
        raise ValueError(f"method must be one of {INVERSE_METHODS}, got {method!r}.")
    deltas = damping_split(A, G, damping, pi_damping, dims)
    out, failed = {}, []
    for name, M, delta in (("A", A, deltas[0]), ("G", G, deltas[1])):
        batch, batch_delta = _as_batch(M, delta)
        if method == "eigh":
            evals, Q = damped_eigh(batch, dtype)
            results = {f"eval_{name}": evals + batch_delta.to(dtype), f"Q_{name}": Q}
        else:
            eye = torch.eye(M.shape[-1], dtype=dtype, device=M.device)
            L, info = torch.linalg.cholesky_ex(batch.to(dtype) + batch_delta.to(dtype).unsqueeze(-1) * eye)
            bad = info > 0
            failed.append(bad.any())
            L = torch.where(bad.view(-1, 1, 1), eye, L)  # (cholesky_inverse would raise on a CPU)
            results = {f"{name}_inv": torch.cholesky_inverse(L).contiguous()}
        for key, value in results.items():
            out[key] = value.unflatten(0, M.shape[:2]) if is_blocked(M) else value
    return out, (torch.stack(failed) if failed else None)


def precondition(inverse: dict[str, Tensor], blocks: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    """``(G + δ_G I)⁻¹ V_b (A + δ_A I)⁻¹`` for each gradient block ``V_b [d_G, d_A]`` from the
    output of :func:`invert` (dense or block-diagonal inverses); products in ``dtype``,
    results in each block's dtype."""
    out = []
    for b, V in enumerate(blocks):
        v = V.to(dtype)
        d_G, d_A = v.shape
        if "Q_A" in inverse:
            Q_A, Q_G = inverse["Q_A"][b], inverse["Q_G"][b]
            eval_A, eval_G = inverse["eval_A"][b].flatten(), inverse["eval_G"][b].flatten()
            # in the eigenbases every coordinate counts, padded ones too (sorted among the others)
            inner = multiply_right(multiply_left(Q_G.transpose(-2, -1), v, len(eval_G)), Q_A, len(eval_A))
            inner /= eval_G.unsqueeze(1) * eval_A.unsqueeze(0)
            nat = multiply_right(multiply_left(Q_G, inner, d_G), Q_A.transpose(-2, -1), d_A)
        else:
            nat = multiply_right(multiply_left(inverse["G_inv"][b], v), inverse["A_inv"][b])
        out.append(nat.to(V.dtype))
    return out


def absorb_(averages: dict[str, Tensor], A: Tensor, G: Tensor, use: Tensor, ema_decay: float) -> None:
    """Fold new factors into running averages ``averages["A"]``, ``["G"]`` in place.

    ``averages["absorbed"]`` (0-d bool) says whether factors entered before: the first ones
    replace the averages; later ones give ``ε·old + (1 − ε)·new``. Where ``use`` (0-d bool)
    is false, the averages keep their bits even if ``A``/``G`` hold inf/NaN. No host sync.
    """
    on = use.to(A.dtype)
    first = ~averages["absorbed"]
    # old weight: ε (0 for the first factors: the zero start times any value), 1 if unused
    keep = torch.where(use, torch.where(first, 0.0, ema_decay * on), 1.0)
    take = torch.where(first, on, on * (1 - ema_decay))
    for key, new in (("A", A), ("G", G)):
        averages[key].mul_(keep).addcmul_(torch.where(use, new, 0.0), take)
    averages["absorbed"] = averages["absorbed"] | use


def kl_clip_(directions: list[Tensor], grads: list[Tensor], lrs: list[float], kl_clip: float) -> None:
    """Scale ``directions`` ``d`` in place by ``ν = min(1, √(κ / |Σ lr² ⟨d, g⟩|))``.

    ``lr² ⟨d, g⟩`` is a step's squared Fisher norm under the damped Kronecker curvature
    (its predicted KL change), summed over the parameters; ν stays on the device.
    """
    if not directions:
        return
    inner = torch.stack([torch.vdot(d.flatten(), g.flatten().to(d.dtype)) * lr**2
                         for d, g, lr in zip(directions, grads, lrs, strict=True)]).sum()
    nu = (kl_clip / inner.abs()).sqrt().clamp(max=1.0)
    torch._foreach_mul_(directions, nu)
