"""SINGD's natural gradient ``C Cᵀ ∇ K Kᵀ`` of one layer block ``∇ [d_C, d_K]``.

Same products as singd 0.0.5's ``(K @ K.rmatmat(∇ᵀ))ᵀ`` then ``C @ C.rmatmat(·)`` (for
its block-diagonal structures ``rmatmat`` multiplies by the blocks untransposed, which is
kept for parity), batched and without singd's temporaries:

- diagonal K, C: ``diag(c²) ∇ diag(k²)``, two passes (:func:`diagonal_natural_gradient`
  for a layer of a diagonal bank, all its groups at once; :func:`diagonal_natural_gradients_`
  for many layers by foreach calls);
- cached projectors ``K Kᵀ`` / ``C Cᵀ`` (dense or block-diagonal): one product per side;
- the blocks of a grouped layer with dense K, C: four batched products
  (:func:`stacked_natural_gradient`).
"""

from __future__ import annotations

import torch
from singd.structures.base import StructuredMatrix
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from torch import Tensor, nn

from kfac_tn.factors.layers import TRANSPOSED_CONV_TYPES
from kfac_tn.optim.matrix_tensors import stored_diagonal
from kfac_tn.optim.structured_products import left_multiply, right_multiply, rmatmat_transposes
from kfac_tn.optim.weight_blocks import from_matrix_blocks, gradient_blocks
from kfac_tn.runtime.routes import launch_bound
from kfac_tn.runtime.workspace import Workspace


def block_natural_gradient(
    grad: Tensor, K: StructuredMatrix, C: StructuredMatrix, KKT: Tensor | StructuredMatrix | None = None,
    CCT: Tensor | StructuredMatrix | None = None, dtype_K: torch.dtype | None = None,
    dtype_C: torch.dtype | None = None, workspace: Workspace | None = None, results: Workspace | None = None,
) -> Tensor:
    """``C Cᵀ ∇ K Kᵀ`` (singd's products) for ``grad`` ``∇ [d_C, d_K]``, in ``grad``'s dtype.

    ``KKT``/``CCT``: cached projectors (a symmetric ``d × d`` tensor for dense K, C, a
    matrix of the same structure for block-diagonal ones), or None to multiply by K, C
    twice. The products run in ``dtype_K`` then ``dtype_C`` (None: ``grad``'s).
    Intermediates go to ``workspace`` (not on accelerator routes, whose caching allocator
    is cheaper than its bookkeeping), the result to ``results`` (both optional).
    """
    if workspace is not None and launch_bound(grad.device):
        workspace = None
    g = grad.to(dtype_K) if dtype_K is not None else grad
    if isinstance(K, DiagonalMatrix) and isinstance(C, DiagonalMatrix):
        k2, c2 = stored_diagonal(K).square(), stored_diagonal(C).square()
        out = results.take(tuple(g.shape), g) if results is not None else None
        nat = torch.mul(g, k2, out=out).to(dtype_C or g.dtype).mul_(c2.unsqueeze(1))
        return nat.to(grad.dtype)
    if KKT is None:
        nat = right_multiply(g, K, not rmatmat_transposes(K), workspace)
        nat = right_multiply(nat, K, True, workspace)
    else:
        nat = right_multiply(g, KKT, True, workspace)
    nat = nat.to(dtype_C) if dtype_C is not None else nat
    if CCT is None:
        nat = left_multiply(C, left_multiply(C, nat, rmatmat_transposes(C), workspace), False, results)
    else:
        nat = left_multiply(CCT, nat, False, results)
    return nat.to(grad.dtype)


def stacked_natural_gradient(grads: list[Tensor], Ks: list[DenseMatrix], Cs: list[DenseMatrix], grad_scale: float = 1.0,
                             dtype_K: torch.dtype | None = None, dtype_C: torch.dtype | None = None) -> list[Tensor]:
    """``C_b C_bᵀ (∇_b / grad_scale) K_b K_bᵀ`` of the ``G`` blocks ``∇_b [d_C, d_K]`` of a
    grouped layer with dense K, C, by four batched products instead of four per block."""
    g = torch.stack(grads)
    if grad_scale != 1.0:
        g = g / grad_scale
    g = g.to(dtype_K) if dtype_K is not None else g
    K = torch.stack([M.to_dense() for M in Ks])
    C = torch.stack([M.to_dense() for M in Cs])
    nat = torch.bmm(torch.bmm(g, K), K.transpose(1, 2))
    nat = nat.to(dtype_C) if dtype_C is not None else nat
    nat = torch.bmm(C, torch.bmm(C.transpose(1, 2), nat))
    return list(nat.to(grads[0].dtype).unbind(0))


def diagonal_natural_gradients_(outs: list[Tensor], grads: list[Tensor], k2s: list[Tensor], c2s: list[Tensor],
                                 grad_scale: float = 1.0) -> None:
    """``outs[i] = grads[i] ⊙ k2s[i] ⊙ c2s[i] / grad_scale`` (broadcasting) for all ``i`` at once:
    three or four foreach calls instead of two products per tensor from Python. For layers
    with diagonal K, C: ``grads[i]`` a weight gradient viewed ``[G, d_C, d_w]`` with ``k2s[i]``
    ``[G, 1, d_w]`` and ``c2s[i]`` ``[G, d_C, 1]``, or a bias gradient ``[G, d_C]`` with
    ``[G, 1]`` and ``[G, d_C]``."""
    torch._foreach_copy_(outs, grads)
    torch._foreach_mul_(outs, k2s)
    torch._foreach_mul_(outs, c2s)
    if grad_scale != 1.0:
        torch._foreach_div_(outs, grad_scale)


def diagonal_views(module: nn.Module, k2: Tensor, c2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(k2_w [G, 1, d_w], c2_w [G, d_C, 1], k2_b [G, 1], c2_b [G, d_C])``: views of the squared
    diagonals ``k2 [G, d_K]``, ``c2 [G, d_C]`` of a (not transposed) layer that broadcast against
    its weight gradient viewed ``[G, d_C, d_w]`` and its bias gradient viewed ``[G, d_C]``."""
    d_w = module.weight.numel() // c2.numel()
    return k2[:, None, :d_w], c2.unsqueeze(2), k2[:, d_w:], c2


def diagonal_operands(module: nn.Module, views: tuple[Tensor, ...]) -> list[tuple[nn.Parameter, Tensor, Tensor, Tensor]]:
    """``(parameter, gradient view, k2 view, c2 view)`` of the layer's parameters that have
    gradients, for :func:`diagonal_natural_gradients_` (``views`` from :func:`diagonal_views`)."""
    k2_w, c2_w, k2_b, c2_b = views
    out = []
    for p, k2_p, c2_p in ((module.weight, k2_w, c2_w), (module.bias, k2_b, c2_b)):
        if p is not None and p.grad is not None:
            g = p.grad.reshape(c2_p.shape[0], c2_p.shape[1], -1) if p is module.weight else p.grad.view(c2_p.shape)
            out.append((p, g, k2_p, c2_p))
    return out


def diagonal_natural_gradient(module: nn.Module, k2: Tensor, c2: Tensor, group_average: bool,
                              results: Workspace | None = None) -> list[tuple[nn.Parameter, Tensor]]:
    """``(parameter, natural gradient)`` of a layer with diagonal K, C given their squared
    diagonals ``k2 [G, d_K]``, ``c2 [G, d_C]`` (one row per group): ``c² ⊙ ∇ ⊙ k²`` on the
    gradients in place of the ``[d_C, d_K]`` blocks (no block copies unless transposed),
    in the promoted dtype of the gradients and the squares."""
    weight, bias = module.weight, module.bias
    if isinstance(module, TRANSPOSED_CONV_TYPES):  # blocks are not rows of weight.flatten(1)
        blocks = [g * k2[b] * c2[b].unsqueeze(1) for b, g in enumerate(gradient_blocks(module, group_average))]
        nats = from_matrix_blocks(module, blocks, bias is not None)
        return [(p, n) for p, n in zip((weight, bias), nats) if p is not None and p.grad is not None]
    operands = diagonal_operands(module, diagonal_views(module, k2, c2))
    outs = [_result(g.shape, g, torch.promote_types(g.dtype, k2.dtype), results) for _, g, _, _ in operands]
    diagonal_natural_gradients_(outs, [g for _, g, _, _ in operands], [k for _, _, k, _ in operands],
                                [c for *_, c in operands])
    return [(p, out.view(p.shape)) for (p, *_), out in zip(operands, outs)]


def _result(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype, results: Workspace | None) -> Tensor:
    return like.new_empty(shape, dtype=dtype) if results is None else results.take(tuple(shape), like, dtype)
