"""SINGD with tensor-network Kronecker factors, for every convolution flavour.

A drop-in for ``singd.optim.optimizer.SINGD`` (singd 0.0.5): same constructor
arguments, defaults, update rule, state and GradScaler protocol (it subclasses it and
reuses its structured matrices). What differs:

- Layers: Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d. Grouped convolutions get one
  exact ``K, C`` pair per group (``grouped_conv="exact"``) or singd's group-averaged
  input with one shared pair (``grouped_conv="average"``, identical to stock on Conv2d).
- Statistics: ``H_K = structure(Kᵀ A K)`` from the tensor-network factors instead of
  the unfolded input. Per layer the cheapest exact form is used: the factor's diagonal
  alone for diagonal ``K``; its diagonal blocks alone for block-diagonal ``K``;
  ``(X K)ᵀ(X K)`` with the few rows ``X`` of the reduce factor
  (or of a small unfolded input); otherwise the factor A (shift Grams, no unfolding)
  sandwiched by ``K``'s structured products. ``H_C`` likewise from the gradient rows or
  their Gram matrix, whichever is cheaper.
- Natural gradient ``C Cᵀ ∇W K Kᵀ``: for dense structures, ``K Kᵀ`` / ``C Cᵀ`` can be
  cached between preconditioner updates when that saves FLOPs (``T·dim_C > 0.6·dim_K``),
  halving the per-step products (see ``natural_gradient_cache``); for block-diagonal
  ones they are cached (as small as ``K``, ``C`` themselves) and applied by batched GEMMs.
- Memory: dense statistics wait for the update as thin factors ``S`` (``H = S Sᵀ``), and
  the dense update works in place in the momentum buffer, one layer at a time.
- No statistics in eval mode or under ``torch.no_grad()``; non-finite statistics skip
  the update of that layer's pre-conditioner with a warning instead of corrupting it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from math import sqrt
from typing import Any
from warnings import warn

import torch
import torch.distributed as dist
from singd.optim.optimizer import SINGD as StockSINGD
from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from singd.structures.dense import DenseMatrix
from singd.structures.diagonal import DiagonalMatrix
from torch import Tensor, nn

from kfac_tn.capture import LayerCapture
from kfac_tn.factors import (
    SUPPORTED_LAYERS,
    grad_output_factor_blocks,
    grad_output_factor_diagonal,
    grad_output_rows,
    input_factor,
    input_factor_blocks,
    input_factor_diagonal,
    input_row_chunks,
    input_rows,
)
from kfac_tn.factors.layers import num_positions
from kfac_tn.optim.distributed import (
    all_reduce_flat,
    all_reduce_flat_async,
    assign_greedy,
    broadcast_flat,
    is_distributed,
    worker_groups,
)
from kfac_tn.optim.pending import SymmetricSum
from kfac_tn.optim.structured_products import (
    block_sandwich,
    inner_with,
    left_multiply,
    right_multiply,
    right_multiply_update_,
    rmatmat_transposes,
    sandwich,
    stock_projector,
    symmetric_addmm_,
)
from kfac_tn.optim.validation import (
    check_layout,
    fraction,
    in_unit_interval,
    non_negative,
    one_of,
    positive_int,
    reject_wrappers,
)
from kfac_tn.optim.weight_blocks import block_dims, from_matrix_blocks, gradient_blocks, num_blocks
from kfac_tn.tensor_network.workspace import Workspace

GROUPED_CONV = ("exact", "average")
NATURAL_GRADIENT_CACHE = ("memory", "time", "none")


class SINGD(StockSINGD):
    """Structured inverse-free natural gradient descent on tensor-network factors.

    Takes every argument of ``singd.optim.optimizer.SINGD`` (same meaning, same
    defaults) plus:

    Args:
        grouped_conv: ``"exact"`` (one K, C per channel group) or ``"average"``
            (singd's convention: input averaged over groups, one shared K and one C over
            all output channels).
        natural_gradient_cache: keep ``K Kᵀ`` / ``C Cᵀ`` between preconditioner updates
            where that saves FLOPs: ``"memory"`` (default: dense caches only when no
            larger than the layer's other factor), ``"time"`` (every dense cache that
            saves FLOPs, at up to one extra K-sized matrix per layer), or ``"none"``.
            Block-diagonal K/C are cached unless ``"none"`` (as small as K/C themselves).
        update_worker_fraction: with torch.distributed, the fraction of ranks that compute
            each layer's K/C update (KAISA's knob). ``1.0`` (COMM-OPT, default, as stock):
            every rank updates every layer, nothing extra is sent. ``1/world`` (MEM-OPT
            style): each layer's update runs on one rank. In between (hybrid): ranks form
            groups of ``round(fraction·world)``; layers go to groups by a greedy
            longest-first cost model (d_K³ + d_C³ per block), each group's leader
            broadcasts the new K, C and momenta (one bucket per group). Every rank still
            holds all K/C and forms its own natural gradients.
    """

    SUPPORTED_MODULES = SUPPORTED_LAYERS

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | list[dict[str, Any]] | None = None,
        lr: float = 0.001,
        momentum: float = 0.9,
        damping: float = 0.001,
        alpha1: float = 0.5,
        weight_decay: float = 0.0,
        T: int = 10,
        loss_average: str | None = "batch",
        lr_cov: float | Callable[[int], float] = 1e-2,
        structures: tuple[str, str] = ("dense", "dense"),
        kfac_approx: str = "expand",
        warn_unsupported: bool = True,
        kfac_like: bool = False,
        preconditioner_dtype: tuple[torch.dtype | None, torch.dtype | None] = (None, None),
        init_grad_scale: float = 1.0,
        normalize_lr_cov: bool = False,
        grouped_conv: str = "exact",
        natural_gradient_cache: str = "memory",
        update_worker_fraction: float = 1.0,
    ):
        reject_wrappers(model)
        _validate_hyperparameters(
            lr=lr, momentum=momentum, damping=damping, alpha1=alpha1, weight_decay=weight_decay,
            T=T, lr_cov=lr_cov, structures=structures, kfac_approx=kfac_approx,
            loss_average=loss_average, init_grad_scale=init_grad_scale,
            supported_structures=self.SUPPORTED_STRUCTURES,
        )
        one_of("grouped_conv", grouped_conv, GROUPED_CONV)
        self.grouped_conv = grouped_conv
        one_of("natural_gradient_cache", natural_gradient_cache, NATURAL_GRADIENT_CACHE)
        self.natural_gradient_cache = natural_gradient_cache
        fraction("update_worker_fraction", update_worker_fraction)
        self.update_worker_fraction = float(update_worker_fraction)
        self._cache: dict[str, dict[str, list[Tensor | None]]] = {}
        # scratch memory, freed after each step: one for the statistics (backward pass,
        # when activations are alive: kept small), one for step()'s products
        self._stats_workspace = Workspace()
        self._step_workspace = Workspace()
        self._in_flight: list = []
        super().__init__(
            model, params, lr, momentum, damping, alpha1, weight_decay, T, loss_average, lr_cov,
            structures, kfac_approx, warn_unsupported, kfac_like, preconditioner_dtype,
            init_grad_scale, normalize_lr_cov,
        )
        for group in self.param_groups:  # param groups may override the defaults
            _validate_hyperparameters(
                supported_structures=self.SUPPORTED_STRUCTURES,
                **{k: group[k] for k in ("lr", "momentum", "damping", "alpha1", "weight_decay",
                                         "T", "lr_cov", "structures", "kfac_approx", "loss_average")},
            )

    # ------------------------------------------------------------------ set-up
    @property
    def _group_average(self) -> bool:
        return self.grouped_conv == "average"

    def _install_hooks(self, model: nn.Module):
        param_ids = {p.data_ptr() for group in self.param_groups for p in group["params"]}
        module_names = {
            mod: name
            for name, mod in model.named_modules()
            if isinstance(mod, self.SUPPORTED_MODULES)
            and any(p.data_ptr() in param_ids for p in mod.parameters())
        }
        self._capture = LayerCapture(
            {name: mod for mod, name in module_names.items()},
            on_backward=lambda name, module, x, g: self._accumulate_H_terms(module, (x,), g),
            is_due=self._statistics_due,
        )
        return module_names, self._capture.handles

    def _statistics_due(self, name: str, module: nn.Module) -> bool:
        check_layout(name, module, self._layouts[name])
        return self.steps % self._get_param_group_entry(module, "T") == 0

    def _initialize_buffers(self) -> None:
        self._layouts = {name: (m.weight.device, m.weight.dtype) for m, name in self.module_names.items()}
        for module, name in self.module_names.items():
            dim_K, dim_C = block_dims(module, self._group_average)
            (dtype_K, dtype_C), dev = self._get_preconditioner_dtypes_and_device(module)
            structures = self._get_param_group_entry(module, "structures")
            K_cls = self.SUPPORTED_STRUCTURES[structures[0]]
            C_cls = self.SUPPORTED_STRUCTURES[structures[1]]
            blocks = range(num_blocks(module, self._group_average))
            self.Ks[name] = [K_cls.eye(dim_K, dtype=dtype_K, device=dev) for _ in blocks]
            self.Cs[name] = [C_cls.eye(dim_C, dtype=dtype_C, device=dev) for _ in blocks]
            if self._get_param_group_entry(module, "alpha1") != 0.0:
                self.m_Ks[name] = [K_cls.zeros(dim_K, dtype=dtype_K, device=dev) for _ in blocks]
                self.m_Cs[name] = [C_cls.zeros(dim_C, dtype=dtype_C, device=dev) for _ in blocks]
            self._cache[name] = {"KKT": [None for _ in blocks], "CCT": [None for _ in blocks]}

    def preconditioner_dims(self, module: nn.Module) -> tuple[int, int]:  # type: ignore[override]
        """``(dim_K, dim_C)`` of each of the layer's blocks."""
        return block_dims(module, self._group_average)

    # ------------------------------------------------------------ statistics
    def _H_K(self, module: nn.Module, x: Tensor, Ks: list[StructuredMatrix], approx: str) -> list:
        """``Kᵀ A K`` per block by the cheapest exact route (structured, or pending if dense)."""
        ga = self._group_average
        if all(isinstance(K, DiagonalMatrix) for K in Ks):
            diag = input_factor_diagonal(module, x, approx, ga)  # [G, d]
            return [K.from_inner(X=d.clamp_min(0).sqrt().unsqueeze(1)) for K, d in zip(Ks, diag)]
        if _same_block_structure(Ks):
            self._stats_workspace.reset()
            blocks, last = input_factor_blocks(
                module, x, Ks[0].BLOCK_DIM, approx, ga, workspace=self._stats_workspace
            )
            return [block_sandwich(K, b, r) for K, b, r in zip(Ks, blocks, last)]
        dim_K = block_dims(module, ga)[0]
        rows_count = x.shape[0] if approx == "reduce" else x.shape[0] * num_positions(module, x)
        if approx == "reduce" or _factored_is_cheaper(rows_count, dim_K, Ks[0]):
            if isinstance(Ks[0], DenseMatrix):
                rows = input_rows(module, x, approx, ga)  # [G, R, d]
                return [_inner_with(K, r.T) for K, r in zip(Ks, rows)]
            # other structures: Mᵀ Xᵀ X M is additive over rows, so stream the unfolded input
            H = None
            for rows in input_row_chunks(module, x, approx, ga):
                part = [K.from_inner(X=r.T) for K, r in zip(Ks, rows)]
                H = part if H is None else [h.add_(p) for h, p in zip(H, part)]
            return H
        A = input_factor(module, x, approx, ga)  # [G, d, d]
        return [_sandwich(K, a) for K, a in zip(Ks, A)]

    def _H_C(self, module: nn.Module, g: Tensor, Cs: list[StructuredMatrix], approx: str, loss_average) -> list:
        ga = self._group_average
        if all(isinstance(C, DiagonalMatrix) for C in Cs):
            diag = grad_output_factor_diagonal(module, g, approx, loss_average, ga)  # [G, D]
            return [C.from_inner(X=d.sqrt().unsqueeze(1)) for C, d in zip(Cs, diag)]
        if _same_block_structure(Cs):
            self._stats_workspace.reset()
            blocks, last = grad_output_factor_blocks(
                module, g, Cs[0].BLOCK_DIM, approx, loss_average, ga, workspace=self._stats_workspace
            )
            return [block_sandwich(C, b, r) for C, b, r in zip(Cs, blocks, last)]
        rows = grad_output_rows(module, g, approx, loss_average, ga)  # [G, R, D]
        if _factored_is_cheaper(rows.shape[1], rows.shape[2], Cs[0]):
            return [_inner_with(C, r.T) for C, r in zip(Cs, rows)]
        grams = torch.bmm(rows.transpose(1, 2), rows)
        return [_sandwich(C, gram) for C, gram in zip(Cs, grams)]

    def _accumulate_H_terms(self, module: nn.Module, inputs: tuple[Tensor], grad_output: Tensor) -> None:
        """Statistics of one backward pass, in at least float32 whatever K/C are stored in."""
        name = self.module_names[module]
        check_layout(name, module, self._layouts[name])
        loss_average = self._get_param_group_entry(module, "loss_average")
        kfac_approx = self._get_param_group_entry(module, "kfac_approx")
        (dtype_K, dtype_C), _ = self._get_preconditioner_dtypes_and_device(module)
        stat_K, stat_C = torch.promote_types(dtype_K, torch.float32), torch.promote_types(dtype_C, torch.float32)
        a = inputs[0].data.to(stat_K)
        g = grad_output.data.to(stat_C)
        prev_grad_scale = self._get_grad_scale(self.steps - 1)
        if prev_grad_scale != 1.0:
            g = g / sqrt(prev_grad_scale)
        Ks = [_cast(K, stat_K) for K in self.Ks[name]]
        Cs = [_cast(C, stat_C) for C in self.Cs[name]]
        H_K = self._H_K(module, a, Ks, kfac_approx)
        H_C = self._H_C(module, g, Cs, kfac_approx, loss_average)
        if is_distributed():
            # factors of different ranks cannot be summed: densify, then one bucket per layer
            H_K = [SymmetricSum(dense=H.to_dense()) if isinstance(H, SymmetricSum) else H for H in H_K]
            H_C = [SymmetricSum(dense=H.to_dense()) if isinstance(H, SymmetricSum) else H for H in H_C]
            tensors = [t for H in H_K + H_C for t in _tensors(H)]
            finish = all_reduce_flat_async(tensors, dist.ReduceOp.AVG if loss_average else dist.ReduceOp.SUM)
            # overlaps the rest of the backward pass; completed at the next step()
            self._in_flight.append((name, H_K, H_C, finish))
            return
        self._add_statistics(name, H_K, H_C)

    def _add_statistics(self, name: str, H_K: list, H_C: list) -> None:
        if name in self.H_Ks:
            for acc, new in zip(self.H_Ks[name], H_K):
                acc.add_(new)
            for acc, new in zip(self.H_Cs[name], H_C):
                acc.add_(new)
        else:
            self.H_Ks[name], self.H_Cs[name] = H_K, H_C

    # ---------------------------------------------------------------- update
    def _update_preconditioner(self, module: nn.Module) -> None:
        T = self._get_param_group_entry(module, "T")
        if self.steps % T != 0:
            return
        name = self.module_names[module]
        H_Ks, H_Cs = self.H_Ks.pop(name, None), self.H_Cs.pop(name, None)
        if H_Ks is None or H_Cs is None:
            warn(
                f"No curvature statistics were captured for layer {name!r} at step {self.steps} "
                "(no backward pass through it, eval mode or torch.no_grad()); its pre-conditioner "
                "is left unchanged.", stacklevel=2)
            return
        if not _all_finite(H_Ks + H_Cs):
            warn(
                f"Non-finite curvature statistics in layer {name!r} at step {self.steps}; skipping "
                "its pre-conditioner update (K, C and their momenta are unchanged).", stacklevel=2)
            return
        prev_grad_scale = self._get_grad_scale(self.steps - 1)
        grad_unscaling = prev_grad_scale / self._get_grad_scale(self.steps) ** 2
        kfac_like = self._get_param_group_entry(module, "kfac_like")
        damping = self._get_param_group_entry(module, "damping")
        alpha1 = self._get_param_group_entry(module, "alpha1")
        normalize = self._get_param_group_entry(module, "normalize_lr_cov")
        scale = 0.5 * (1.0 - alpha1 if normalize else 1.0)
        lr_cov = self._get_param_group_entry(module, "lr_cov")
        beta1 = lr_cov(self.steps) if callable(lr_cov) else lr_cov
        for b, (K, C, H_K, H_C) in enumerate(zip(self.Ks[name], self.Cs[name], H_Ks, H_Cs)):
            self._step_workspace.reset()
            tr_KK, tr_CC = _average_trace_inner(K), _average_trace_inner(C)
            tr_HK, tr_HC = H_K.average_trace(), H_C.average_trace()
            m_K = self.m_Ks[name][b] if alpha1 != 0.0 else None
            m_C = self.m_Cs[name][b] if alpha1 != 0.0 else None
            new_m_K = _riemannian_step(
                K, H_K, m_K,
                a_H=1.0 if kfac_like else grad_unscaling * tr_HC,
                a_MM=damping * (1.0 if kfac_like else tr_CC),
                scale=scale, alpha1=alpha1, beta=beta1, normalize=normalize, workspace=self._step_workspace,
            )
            new_m_C = _riemannian_step(
                C, H_C, m_C,
                a_H=grad_unscaling if kfac_like else grad_unscaling * tr_HK,
                a_MM=damping * (1.0 if kfac_like else tr_KK),
                scale=scale, alpha1=alpha1, beta=beta1, normalize=normalize, workspace=self._step_workspace,
            )
            if alpha1 != 0.0:
                self.m_Ks[name][b], self.m_Cs[name][b] = new_m_K, new_m_C
        self._invalidate(name)

    def _invalidate(self, name: str) -> None:
        cache = self._cache.get(name)
        if cache is not None:
            for key in cache:
                cache[key] = [None] * len(cache[key])

    def _cache_pays(self, T: int, dim: int, other: int) -> bool:
        """Whether to keep ``M Mᵀ`` (d × d) between updates for the natural gradient.

        It costs ~0.6·d³ per update and saves d²·d' multiply-adds per step, so it saves
        time when ``T·d' > 0.6·d``. ``"time"`` caches whenever that holds; ``"memory"``
        (default) only when the cache is no larger than the other factor (d <= d'), so
        the persistent state grows by at most the smaller factor; ``"none"`` never.
        """
        if self.natural_gradient_cache == "none" or T * other <= 0.6 * dim:
            return False
        return self.natural_gradient_cache == "time" or dim <= other

    def _projector(
        self, name: str, key: str, b: int, M: StructuredMatrix, T: int, dim: int, other: int
    ) -> Tensor | StructuredMatrix | None:
        """Cached :func:`stock_projector` (``M @ M.rmatmat(·)``) for the natural gradient.

        Dense: a ``d × d`` tensor, where :meth:`_cache_pays`. Block-diagonal: a matrix of
        the same structure (no larger than ``M`` itself, which is small), unless
        ``natural_gradient_cache="none"``: one batched product per step instead of two.
        None where there is no cache.
        """
        if isinstance(M, DenseMatrix):
            if not self._cache_pays(T, dim, other):
                return None
        elif not isinstance(M, BlockDiagonalMatrixTemplate) or self.natural_gradient_cache == "none":
            return None
        cache = self._cache[name][key]
        if cache[b] is None:
            cache[b] = stock_projector(M)
        return cache[b]

    def _compute_natural_gradient(self, module: nn.Module) -> tuple[Tensor, ...]:
        name = self.module_names[module]
        has_bias = module.bias is not None
        grads = gradient_blocks(module, self._group_average)
        grad_scale = self._get_grad_scale(self.steps)
        T = self._get_param_group_entry(module, "T")
        dim_K, dim_C = block_dims(module, self._group_average)
        dtype_K, dtype_C = self._get_param_group_entry(module, "preconditioner_dtype")
        # dense and block-diagonal products write into the workspace: the results live
        # until the next layer's natural gradient (the caller applies them before asking)
        ws = self._step_workspace
        ws.reset()
        out = []
        for b, grad in enumerate(grads):
            if grad_scale != 1.0:
                grad = grad / grad_scale
            K, C = self.Ks[name][b], self.Cs[name][b]
            KKT = self._projector(name, "KKT", b, K, T, dim_K, dim_C)
            CCT = self._projector(name, "CCT", b, C, T, dim_C, dim_K)
            g = grad.to(dtype_K) if dtype_K is not None else grad
            if isinstance(K, DiagonalMatrix) and isinstance(C, DiagonalMatrix):
                # C Cᵀ G K Kᵀ = diag(c²) G diag(k²): two passes instead of four products
                k2, c2 = _diagonal(K).square(), _diagonal(C).square()
                nat = torch.mul(g, k2, out=ws.take(tuple(g.shape), g)).to(dtype_C or g.dtype).mul_(c2.unsqueeze(1))
                out.append(nat.to(grad.dtype))
                continue
            # stock: (K @ K.rmatmat(gᵀ))ᵀ, then C @ C.rmatmat(·); same products, batched
            # (dense caches are symmetric tensors, block-diagonal ones K K per block)
            if KKT is None:
                nat = right_multiply(g, K, not rmatmat_transposes(K), ws)
                nat = right_multiply(nat, K, True, ws)
            else:
                nat = right_multiply(g, KKT, True, ws)
            nat = nat.to(dtype_C) if dtype_C is not None else nat
            if CCT is None:
                nat = left_multiply(C, left_multiply(C, nat, rmatmat_transposes(C), ws), False, ws)
            else:
                nat = left_multiply(CCT, nat, False, ws)
            out.append(nat.to(grad.dtype))
        if is_distributed():
            loss_average = self._get_param_group_entry(module, "loss_average")
            all_reduce_flat(out, dist.ReduceOp.AVG if loss_average else dist.ReduceOp.SUM)
        return from_matrix_blocks(module, out, has_bias)

    def _finish_reductions(self) -> None:
        """Wait for the statistics' all-reduces launched in the backward pass, then add them."""
        in_flight, self._in_flight = self._in_flight, []
        for name, H_K, H_C, finish in in_flight:
            finish()
            self._add_statistics(name, H_K, H_C)

    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        """Precondition the gradients and update the parameters.

        A step whose gradients contain inf/NaN is skipped with a warning, exactly as
        with a GradScaler that found infs: parameters, K, C and momenta stay as they
        are, and the statistics gathered for this step are dropped.
        """
        self._finish_reductions()
        for module, name in self.module_names.items():
            check_layout(name, module, self._layouts[name])
        own_check = not hasattr(self, "found_inf") and not self._gradients_finite()
        if own_check:
            self.found_inf = True
        try:
            super().step(closure)
        finally:
            self._stats_workspace.release()
            self._step_workspace.release()
            if own_check:
                del self.found_inf

    def _step(self) -> None:
        """Update the pre-conditioners (spread over ranks if asked), then the parameters."""
        modules = list(self.module_names)
        groups = worker_groups(self.update_worker_fraction) if is_distributed() else [[0]]
        if len(groups) > 1:
            owners = self._update_owners(len(groups))
            mine = next(i for i, members in enumerate(groups) if dist.get_rank() in members)
            updated = []
            for module in modules:
                if self.steps % self._get_param_group_entry(module, "T") != 0:
                    continue
                name = self.module_names[module]
                if owners[name] == mine:
                    self._update_preconditioner(module)
                else:  # another group updates it; drop the local copy of the statistics
                    self.H_Ks.pop(name, None)
                    self.H_Cs.pop(name, None)
                updated.append(name)
            self._broadcast_preconditioners(updated, owners, groups)
        else:
            for module in modules:
                self._update_preconditioner(module)
        for module in modules:
            if module.weight.grad is None:  # the layer took no part in this step's loss
                continue
            natural_gradients = self._compute_natural_gradient(module)
            parameters = [module.weight] if module.bias is None else [module.weight, module.bias]
            weight_decay = self._get_param_group_entry(module, "weight_decay")
            momentum = self._get_param_group_entry(module, "momentum")
            lr = self._get_param_group_entry(module, "lr")
            for p, step in zip(parameters, natural_gradients):
                if p.grad is None:  # e.g. a frozen bias: its (zero) column only shaped the solve
                    continue
                if weight_decay != 0.0:
                    step.add_(p.data, alpha=weight_decay)
                if momentum != 0.0:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p.data)
                    step = state["momentum_buffer"].mul_(momentum).add_(step)
                p.data.add_(step, alpha=-lr)

    def _update_owners(self, n_groups: int) -> dict[str, int]:
        """Layer → group that updates it (greedy on d_K³ + d_C³ per block), cached."""
        if getattr(self, "_owners", None) is None or self._owners_groups != n_groups:
            costs = {}
            for module, name in self.module_names.items():
                dim_K, dim_C = block_dims(module, self._group_average)
                costs[name] = float(num_blocks(module, self._group_average)) * (dim_K**3 + dim_C**3)
            self._owners, self._owners_groups = assign_greedy(costs, n_groups), n_groups
        return self._owners

    def _broadcast_preconditioners(self, names: list[str], owners: dict[str, int], groups: list[list[int]]) -> None:
        """Send each updated layer's K, C and momenta from its group's leader to every rank."""
        for index, members in enumerate(groups):
            tensors = []
            for name in names:
                if owners[name] != index:
                    continue
                self._invalidate(name)
                for store in (self.Ks, self.Cs, self.m_Ks, self.m_Cs):
                    for matrix in store.get(name, []):
                        tensors.extend(t for _, t in matrix.named_tensors())
            if tensors:
                broadcast_flat(tensors, src=members[0])

    def _gradients_finite(self) -> bool:
        sums = [p.grad.sum() for group in self.param_groups for p in group["params"] if p.grad is not None]
        return not sums or bool(torch.isfinite(torch.stack(sums)).all())

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        self._finish_reductions()
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`; a state of another model is an error."""
        for key in ("Ks", "Cs"):
            theirs = state_dict.get(key)
            if theirs is None:
                raise ValueError(f"State dict has no {key!r}: not a kfac_tn.SINGD state.")
            if set(theirs) != set(self.Ks):
                raise ValueError(
                    f"State dict is for other layers: it has {sorted(theirs)}, this optimizer "
                    f"{sorted(self.Ks)}."
                )
            for name, blocks in theirs.items():
                mine = getattr(self, key)[name]
                if len(blocks) != len(mine) or any(
                    a.to_dense().shape != b.to_dense().shape or type(a) is not type(b)
                    for a, b in zip(blocks, mine)
                ):
                    raise ValueError(f"State dict {key}[{name!r}] does not match layer {name!r}'s shape or structure.")
        super().load_state_dict(dict(state_dict))
        for name in self._cache:
            self._invalidate(name)


def _inner_with(M: StructuredMatrix, X: Tensor):
    """Pending ``Mᵀ X Xᵀ M``: thin factor for dense M when it is smaller than d × d."""
    if isinstance(M, DenseMatrix) and 2 * X.shape[1] <= X.shape[0]:
        return SymmetricSum(factor=M.rmatmat(X))
    H = inner_with(M, X)
    return SymmetricSum(dense=H.to_dense()) if isinstance(M, DenseMatrix) else H


def _sandwich(M: StructuredMatrix, A: Tensor):
    H = sandwich(M, A)
    return SymmetricSum(dense=H.to_dense()) if isinstance(M, DenseMatrix) else H


def _average_trace_inner(M: StructuredMatrix) -> Tensor:
    """``tr(Mᵀ M) / d``; for dense and block-diagonal M the squared Frobenius norm."""
    if isinstance(M, (DenseMatrix, BlockDiagonalMatrixTemplate)):
        tensors = [t for _, t in M.named_tensors()]
        return sum(torch.linalg.vector_norm(t).square() for t in tensors) / M.shape[0]
    return M.from_inner().average_trace()


def _riemannian_step(
    M: StructuredMatrix, H, m_old: StructuredMatrix | None, *, a_H, a_MM, scale: float,
    alpha1: float, beta: float, normalize: bool, workspace: Workspace | None = None,
) -> StructuredMatrix:
    """``m = scale·(a_H·H + a_MM·MᵀM − I) + alpha1·m_old``; ``M ← M − β·M m``. Returns m.

    Dense M: in place in ``m_old``'s buffer (symmetric block products, row-blocked
    ``M m``), so the update needs no d × d temporaries. Other structures: singd's
    structured arithmetic, as stock.
    """
    if isinstance(M, DenseMatrix):
        mat = M.to_dense()
        if m_old is not None:
            buf = m_old.to_dense().mul_(alpha1)
        else:
            buf = torch.zeros_like(mat)
        symmetric_addmm_(buf, mat.T, mat, alpha=float(scale * a_MM))
        H.add_to_(buf, alpha=float(scale * a_H))
        buf.diagonal().sub_(scale)
        new_m = m_old if m_old is not None else DenseMatrix(buf)
        if normalize:
            beta = beta / max(1.0, float(new_m.infinity_vector_norm()))
        right_multiply_update_(mat, buf, beta, workspace=workspace)
        return new_m
    if isinstance(M, BlockDiagonalMatrixTemplate) and type(H) is type(M):
        return _block_riemannian_step(M, H, m_old, a_H=a_H, a_MM=a_MM, scale=scale, alpha1=alpha1,
                                      beta=beta, normalize=normalize)
    dim = M.shape[0]
    new_m = M.zeros(dim, dtype=_dtype(M), device=_device(M))
    new_m.add_(H, alpha=a_H)
    new_m.add_(M.from_inner(), alpha=a_MM)
    new_m.diag_add_(-1.0).mul_(scale)
    if m_old is not None:
        new_m.add_(m_old, alpha=alpha1)
    if normalize:
        beta = beta / max(1.0, float(new_m.infinity_vector_norm()))
    M.add_(M @ new_m, alpha=-beta)
    return new_m


def _block_riemannian_step(
    M: BlockDiagonalMatrixTemplate, H: BlockDiagonalMatrixTemplate, m_old, *, a_H, a_MM, scale: float,
    alpha1: float, beta: float, normalize: bool,
) -> BlockDiagonalMatrixTemplate:
    """:func:`_riemannian_step` for block-diagonal M, batched over blocks, in place in m_old.

    ``MᵀM`` is singd 0.0.5's ``from_inner()`` of a block-diagonal matrix, which is
    ``M Mᵀ`` per block; reproduced as is for parity with stock singd.
    """
    new_m = m_old if m_old is not None else M.zeros(M.shape[0], dtype=_dtype(M), device=_device(M))
    Ms, Hs, ms = dict(M.named_tensors()), dict(H.named_tensors()), dict(new_m.named_tensors())
    if m_old is not None:
        for key in ("_blocks", "_last"):
            ms[key].mul_(alpha1)
    for key in ("_blocks", "_last"):
        mat, buf = Ms[key], ms[key]
        batched = mat.unsqueeze(0) if mat.dim() == 2 else mat
        buf_b = buf.unsqueeze(0) if buf.dim() == 2 else buf
        buf_b.add_(Hs[key].to(buf.dtype).view_as(buf_b), alpha=float(scale * a_H))
        buf_b.baddbmm_(batched, batched.transpose(1, 2), alpha=float(scale * a_MM))
        buf_b.diagonal(dim1=1, dim2=2).sub_(scale)
    if normalize:
        beta = beta / max(1.0, float(new_m.infinity_vector_norm()))
    for key in ("_blocks", "_last"):
        mat, buf = Ms[key], ms[key]
        mat.sub_(mat @ buf, alpha=beta)
    return new_m


def _cast(M: StructuredMatrix, dtype: torch.dtype) -> StructuredMatrix:
    """``M`` itself if already in ``dtype``, else a shallow copy with its tensors cast."""
    if _dtype(M) == dtype:
        return M
    cast = copy.copy(M)
    for name, tensor in M.named_tensors():
        setattr(cast, name, tensor.to(dtype))
    return cast


def _tensors(H) -> list[Tensor]:
    """The tensors that hold statistics ``H`` (structured matrix or dense SymmetricSum)."""
    if isinstance(H, SymmetricSum):
        return [H.dense]
    return [t for _, t in H.named_tensors()]


def _diagonal(M: DiagonalMatrix) -> Tensor:
    """The stored diagonal of a ``DiagonalMatrix`` (``to_dense`` would build d × d)."""
    return dict(M.named_tensors())["_mat_diag"]


def _dtype(M: StructuredMatrix) -> torch.dtype:
    return next(t for _, t in M.named_tensors()).dtype


def _device(M: StructuredMatrix) -> torch.device:
    return next(t for _, t in M.named_tensors()).device


def _factored_is_cheaper(rows: int, dim: int, M: StructuredMatrix) -> bool:
    """Whether ``(X M)ᵀ(X M)`` from ``rows`` rows beats forming ``Mᵀ (XᵀX) M``.

    Dense M: 3·R·d² against R·d² + 4·d³ multiply-adds, so rows win up to R = 2d. Other
    structures have cheap products either way; rows are used while they take no more
    memory than the d × d factor.
    """
    return rows <= (2 * dim if isinstance(M, DenseMatrix) else dim)


def _same_block_structure(Ms: list[StructuredMatrix]) -> bool:
    """Whether all blocks are singd block-diagonal matrices of one block size."""
    return all(isinstance(M, BlockDiagonalMatrixTemplate) for M in Ms) and len({M.BLOCK_DIM for M in Ms}) == 1


def _all_finite(Hs: list) -> bool:
    """Whether statistics hold no inf/NaN: one reduction per tensor, one host sync in all.

    A sum is finite iff no entry is inf/NaN (barring overflow).
    """
    sums = []
    for H in Hs:
        tensors = H.tensors() if isinstance(H, SymmetricSum) else [t for _, t in H.named_tensors()]
        sums.extend(t.sum().float() for t in tensors if t.numel())
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def _validate_hyperparameters(
    *, lr, momentum, damping, alpha1, weight_decay, T, lr_cov, structures, kfac_approx,
    loss_average, supported_structures, init_grad_scale=1.0,
) -> None:
    """ValueError naming the first invalid hyper-parameter."""
    for name, value in (("lr", lr), ("momentum", momentum), ("damping", damping),
                        ("weight_decay", weight_decay), ("init_grad_scale", init_grad_scale)):
        non_negative(name, value)
    in_unit_interval("alpha1", alpha1)
    if not callable(lr_cov):
        non_negative("lr_cov", lr_cov)
    positive_int("T", T)
    if not isinstance(structures, (tuple, list)) or len(structures) != 2:
        raise ValueError(f"structures must be a pair of structure names, got {structures!r}.")
    for s in structures:
        if s not in supported_structures:
            raise ValueError(f"Unknown structure {s!r} in structures; use one of {sorted(supported_structures)}.")
    one_of("kfac_approx", kfac_approx, ("expand", "reduce"))
    one_of("loss_average", loss_average, (None, "batch", "batch+sequence"))
