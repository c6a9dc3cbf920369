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
- Accelerators: a step has no host sync. Diagonal and block-diagonal K, C of a param
  group live in one bank (:mod:`diagonal_bank`, :mod:`block_bank`) updated by a few
  batched kernels; other structures are updated per layer with device scalars
  (:mod:`riemannian_update`); parameters by foreach kernels (:mod:`parameter_update`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from math import sqrt
from typing import Any

import torch
import torch.distributed as dist
from singd.optim.optimizer import SINGD as StockSINGD
from singd.structures.base import StructuredMatrix
from singd.structures.blockdiagonal import BlockDiagonalMatrixTemplate
from singd.structures.dense import DenseMatrix
from torch import Tensor, nn

from kfac_tn.capture import LayerCapture, supported_layers, supported_parameters, unsupported_layers
from kfac_tn.factors import (
    SUPPORTED_LAYERS,
    grad_output_factor_blocks,
    grad_output_factor_diagonal_sum,
    input_factor_blocks,
    input_factor_diagonal_sum,
)
from kfac_tn.factors.layers import TRANSPOSED_CONV_TYPES, as_called
from kfac_tn.factors.subsampled import sample_count
from kfac_tn.optim.block_bank import BlockBank
from kfac_tn.optim.deferred import DeferredFlags
from kfac_tn.optim.diagonal_bank import DiagonalBank
from kfac_tn.optim.distributed import (
    all_ranks_ok,
    all_reduce_flat,
    all_reduce_flat_async,
    assign_greedy,
    broadcast_flat,
    is_distributed,
    reduce_gradients_,
    worker_groups,
)
from kfac_tn.optim.factor_statistics import (
    grad_output_H,
    grad_output_statistics,
    input_H,
    input_statistics,
    sandwich_statistics,
)
from kfac_tn.optim.layer_matrices import LayerMatricesAttribute, as_blocks
from kfac_tn.optim.matrix_tensors import (
    cast,
    matrix_dtype,
    singd_computes_in,
    statistics_tensors,
    stored_elements,
)
from kfac_tn.optim.natural_gradient import (
    block_natural_gradient,
    diagonal_natural_gradient,
    diagonal_natural_gradients_,
    diagonal_operands,
    diagonal_views,
    stacked_natural_gradient,
)
from kfac_tn.optim.parameter_update import apply_updates_, gradients_finite, momentum_buffers
from kfac_tn.optim.riemannian_update import FactorPair, update_pairs_
from kfac_tn.optim.sharding import (
    assign_owners,
    broadcast_from_owners,
    gather_layer_states,
    reduce_to_owner_async,
    reduce_to_owners,
)
from kfac_tn.optim.singd_state import (  # noqa: F401  (stock_state_dict: public here too)
    MATRIX_STATE,
    layer_state,
    matrix_from_state,
    stock_state_dict,
)
from kfac_tn.optim.structure_budget import budget_groups
from kfac_tn.optim.structured_products import (
    stock_projector,
)
from kfac_tn.optim.symmetric_sum import SymmetricSum
from kfac_tn.optim.user_warnings import unsupported_message, warn_non_finite, warn_user
from kfac_tn.optim.validation import (
    check_layout,
    check_model,
    check_sharding,
    fraction,
    one_of,
    singd_hyperparameters,
    unwrap_model,
)
from kfac_tn.optim.weight_blocks import block_dims, from_matrix_blocks, gradient_blocks, num_blocks
from kfac_tn.runtime.workspace import Workspace

GROUPED_CONV = ("exact", "average")
NATURAL_GRADIENT_CACHE = ("memory", "time", "none")


class SINGD(StockSINGD):
    """Structured inverse-free natural gradient descent (SINGD) on tensor-network factors.

    A drop-in for ``singd.optim.optimizer.SINGD`` 0.0.5 (same arguments, defaults and
    update rule; its own test suite passes). Per supported layer it keeps Kronecker
    factors ``K`` (input side) and ``C`` (output side) with ``K Kᵀ ≈ A⁻¹`` and
    ``C Cᵀ ≈ G⁻¹``, updated every ``T`` steps without inverting anything, and steps along
    ``C Cᵀ ∇W K Kᵀ``.

    Args:
        model: the network (an ``nn.Module``); its Linear, Conv1d/2d/3d and
            ConvTranspose1d/2d/3d layers are hooked, keyed by module name.
        params: parameters or param groups (default: those of the supported layers).
            A group may override every argument below except ``model``.
        lr: learning rate (default 0.001). Typical 0.01-0.1 with ``momentum=0.9``.
        momentum: SGD momentum on the preconditioned gradient, in [0, 1).
        damping: λ added to the curvature estimates (default 0.001); larger is more
            SGD-like and more stable (0.001-0.1).
        alpha1: Riemannian momentum of K and C, in [0, 1) (default 0.5; 0 with
            ``kfac_like``).
        weight_decay: L2 penalty added to the gradient.
        T: steps between updates of K and C (default 10). 1 costs most; 5-10 is typical.
        loss_average: ``"batch"`` (loss averaged over the batch, default),
            ``"batch+sequence"`` (also over positions) or ``None`` (summed loss).
        lr_cov: learning rate of K and C (default 0.01), or a function of the step.
        structures: ``(structure of K, structure of C)``, each one of ``"dense"``
            (exact, d² memory), ``"diagonal"`` (d), ``"block30diagonal"`` (30×30 blocks),
            ``"hierarchical15_15"`` (singd's hierarchical matrix), ``"triltoeplitz"`` /
            ``"triutoeplitz"`` (triangular Toeplitz, d numbers); see
            ``SINGD.SUPPORTED_STRUCTURES``. Hierarchical and Toeplitz ones need float32
            (or lower) storage.
        kfac_approx: ``"expand"`` (weight-sharing positions as extra samples) or
            ``"reduce"`` (positions averaged first: much cheaper for convolutions).
        warn_unsupported: warn about trainable parameters of other layers (BatchNorm,
            embeddings, ...), which this optimizer does not train.
        kfac_like: SINGD's KFAC-like variant (requires ``alpha1=0``).
        preconditioner_dtype: ``(dtype of K, dtype of C)``; ``None`` follows the layer.
        init_grad_scale: initial loss scale when a GradScaler is used.
        normalize_lr_cov: scale ``lr_cov`` by the curvature estimates' norm.
        grouped_conv: ``"exact"`` (one K, C per channel group, default) or ``"average"``
            (singd's convention: input averaged over groups, one shared K and one C over
            all output channels).
        natural_gradient_cache: keep ``K Kᵀ`` / ``C Cᵀ`` between preconditioner updates
            where that saves FLOPs: ``"memory"`` (default: dense caches only when no
            larger than the layer's other factor), ``"time"`` (every dense cache that
            saves FLOPs, at up to one extra K-sized matrix per layer), or ``"none"``.
            Block-diagonal K/C are cached unless ``"none"`` (as small as K/C themselves).
        update_worker_fraction: with torch.distributed, the fraction of ranks that compute
            each layer's K/C update (KAISA's knob). ``1.0`` (default, as stock): every
            rank updates every layer, nothing extra is sent. ``1/world``: each layer's
            update runs on one rank. In between: groups of ``round(fraction·world)``
            ranks get layers by a greedy cost model (d_K³ + d_C³ per block), each group's
            leader broadcasts the new K, C and momenta. Every rank holds all K/C.
        subsample: randomized KFAC-expand statistics from a random subset of output
            positions (a fraction in (0, 1] or a count; a fresh subset per layer call and
            statistics step from torch's global generator; unbiased, see
            :mod:`kfac_tn.factors.subsampled`). Each layer's randomized A and G are formed
            densely (d² and D², also for diagonal or block-diagonal K/C, whose fused banks
            are then not used). Needs ``kfac_approx="expand"``. ``None`` (default): all
            positions.
        shard_preconditioner: with torch.distributed, keep each layer's K, C and momenta
            on one rank only (owners balance the bytes, :mod:`kfac_tn.optim.sharding`):
            about 1/world of the preconditioner memory per rank. Statistics go to the
            owner, which updates K, C and broadcasts the layer's natural gradient; results
            equal the unsharded run up to rounding. ``Ks``/``Cs``/... show the layers this
            rank owns; :meth:`state_dict` gathers the whole state on every rank (a
            world-size independent checkpoint), :meth:`load_state_dict` keeps the owned
            layers. Per-layer storage (no fused banks); excludes ``update_worker_fraction``.
            No effect without an initialized process group.
        max_dense_dim: kfac_tn's cost control (not in stock): a layer whose ``K`` or ``C``
            would exceed this dimension gets ``large_structure`` on that side, in a param
            group of its own (:func:`kfac_tn.budget_groups`; ``opt.param_groups`` show which
            layer got what, under ``"layers"``). E.g. ``fmnist_2c2d``'s 3136→1024 Linear: dense
            SINGD's step 3.6× SGD's, 1.2–1.8× with ``max_dense_dim=1024``. ``None`` (default):
            ``structures`` everywhere, as stock. Needs ``params=None``.
        large_structure: the structure of factors above ``max_dense_dim``
            (``"block30diagonal"``, ``"diagonal"``, ``"triltoeplitz"``, ``"triutoeplitz"``).
    """

    SUPPORTED_MODULES = SUPPORTED_LAYERS
    # singd's {layer name: matrix} (a list of blocks for a layer with several) over the
    # per-layer block lists kept internally
    Ks = LayerMatricesAttribute("_K_blocks")
    Cs = LayerMatricesAttribute("_C_blocks")
    m_Ks = LayerMatricesAttribute("_m_K_blocks")
    m_Cs = LayerMatricesAttribute("_m_C_blocks")
    H_Ks = LayerMatricesAttribute("_H_K_blocks")
    H_Cs = LayerMatricesAttribute("_H_C_blocks")

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
        subsample: float | int | None = None,
        shard_preconditioner: bool = False,
        max_dense_dim: int | None = None,
        large_structure: str = "block30diagonal",
    ):
        check_model(model)
        model = unwrap_model(model)
        lazy = [name for name, p in model.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:  # stock's constructor keys parameters by their storage, which lazy ones lack
            raise ValueError(f"SINGD needs initialized parameters; {', '.join(lazy)} not yet (a lazy layer, "
                             "e.g. LazyLinear): run one forward pass, e.g. model(example_batch), before building "
                             "the optimizer (kfac_tn.KFAC accepts lazy layers as they are).")
        if max_dense_dim is not None:  # kfac_tn's cost control; stock has no such argument
            if params is not None:
                raise ValueError("max_dense_dim builds the param groups itself: leave params=None, or pass "
                                 "params=kfac_tn.budget_groups(model, max_dense_dim, ...) with your own groups.")
            params = budget_groups(model, max_dense_dim, tuple(structures), large_structure, grouped_conv)
        singd_hyperparameters(
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
        if subsample is not None:
            sample_count(1, subsample)  # validates it
        self.subsample = subsample
        check_sharding(shard_preconditioner, update_worker_fraction)
        self.shard_preconditioner = shard_preconditioner
        self._owner_of: dict[str, int] | None = None  # sharded: layer -> owning rank
        self._cache: dict[str, dict[str, list[Tensor | None]]] = {}
        self._dims_cache: dict[tuple, Tensor] = {}
        self._warned_never_called: set[str] = set()
        # scratch memory, freed after each step: one for the statistics (backward pass,
        # when activations are alive: kept small), one for step()'s products
        self._stats_workspace = Workspace()
        self._step_workspace = Workspace()
        self._natural_gradient_workspace = Workspace()  # a step's results, until the update
        self._in_flight: list = []
        self._banks: list[tuple[int, DiagonalBank | BlockBank]] = []  # (param group index, bank)
        self._bank_of: dict[str, DiagonalBank | BlockBank] = {}
        self._storage: dict[str, str] = {}  # layer -> where its K and C are kept (describe())
        self._diagonal_views: dict[str, tuple[Tensor, ...]] = {}  # per diagonal-bank layer: views of K², C²
        self._deferred = DeferredFlags()
        try:
            super().__init__(
                model, params, lr, momentum, damping, alpha1, weight_decay, T, loss_average, lr_cov,
                structures, kfac_approx, warn_unsupported, kfac_like, preconditioner_dtype,
                init_grad_scale, normalize_lr_cov,
            )
        except Exception:  # a half-built optimizer must not leave its hooks on the model
            if hasattr(self, "_capture"):
                self._capture.remove()
            raise
        self._own_params = {id(p) for group in self.param_groups for p in group["params"]}
        layer_params = {id(p) for module in self.module_names for p in module.parameters()}
        self._unpreconditioned = [[p for p in group["params"] if id(p) not in layer_params]
                                  for group in self.param_groups]
        for group in self.param_groups:  # param groups may override the defaults
            singd_hyperparameters(
                supported_structures=self.SUPPORTED_STRUCTURES,
                **{k: group[k] for k in ("lr", "momentum", "damping", "alpha1", "weight_decay",
                                         "T", "lr_cov", "structures", "kfac_approx", "loss_average")},
            )
            if subsample is not None and group["kfac_approx"] != "expand":
                raise ValueError("subsample samples output positions of KFAC-expand statistics: "
                                 "use kfac_approx='expand'.")

    # ------------------------------------------------------------------ set-up
    @property
    def _group_average(self) -> bool:
        return self.grouped_conv == "average"

    def _install_hooks(self, model: nn.Module):
        layers = supported_layers(model, [p for group in self.param_groups for p in group["params"]])
        module_names = {mod: name for name, mod in layers.items()}
        self._capture = LayerCapture(
            layers,
            on_backward=self._on_backward,
            is_due=self._statistics_due,
        )
        return module_names, self._capture.handles

    def _on_backward(self, name: str, module: nn.Module, x: Tensor, grad_output: Tensor) -> None:
        self._accumulate_H_terms(module, (x,), grad_output)

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model: no more statistics are captured.

        Deleting the optimizer has the same effect (its hooks hold it only weakly and
        remove themselves at the next forward pass).
        """
        self._capture.remove()

    def _statistics_due(self, name: str, module: nn.Module) -> bool:
        check_layout(name, module, self._layouts[name])
        return self.steps % self._get_param_group_entry(module, "T") == 0

    def _initialize_buffers(self) -> None:
        self._layouts = {name: (m.weight.device, m.weight.dtype) for m, name in self.module_names.items()}
        if self.shard_preconditioner and is_distributed():
            self._owner_of = assign_owners(self._state_bytes(), dist.get_world_size())
        banked: dict[tuple, dict[str, tuple[int, int, int]]] = {}
        for module, name in self.module_names.items():
            if not self._owns(name):
                continue
            dim_K, dim_C = block_dims(module, self._group_average)
            (dtype_K, dtype_C), dev = self._get_preconditioner_dtypes_and_device(module)
            structures = self._get_param_group_entry(module, "structures")
            G = num_blocks(module, self._group_average)
            for structure, dtype in zip(structures, (dtype_K, dtype_C)):
                if not singd_computes_in(self.SUPPORTED_STRUCTURES[structure], dtype):
                    raise ValueError(
                        f"Structure {structure!r} (layer {name!r}) cannot be stored in {dtype}: singd "
                        "0.0.5's structured products reject it. Pass preconditioner_dtype=(torch.float32, "
                        "torch.float32), or use a dense, diagonal or block-diagonal structure (these run "
                        "in float64)."
                    )
            kind, why = self._bank_kind(structures, dtype_K, dtype_C)
            self._storage[name] = why if kind is not None else f"per layer ({why})"
            if kind is not None:
                key = (kind, self.param_to_group_idx[module.weight.data_ptr()], dtype_K, dev)
                banked.setdefault(key, {})[name] = (G, dim_K, dim_C)
                continue
            K_cls = self.SUPPORTED_STRUCTURES[structures[0]]
            C_cls = self.SUPPORTED_STRUCTURES[structures[1]]
            blocks = range(G)
            self._K_blocks[name] = [K_cls.eye(dim_K, dtype=dtype_K, device=dev) for _ in blocks]
            self._C_blocks[name] = [C_cls.eye(dim_C, dtype=dtype_C, device=dev) for _ in blocks]
            if self._get_param_group_entry(module, "alpha1") != 0.0:
                self._m_K_blocks[name] = [K_cls.zeros(dim_K, dtype=dtype_K, device=dev) for _ in blocks]
                self._m_C_blocks[name] = [C_cls.zeros(dim_C, dtype=dtype_C, device=dev) for _ in blocks]
            self._cache[name] = {"KKT": [None for _ in blocks], "CCT": [None for _ in blocks]}
        for (kind, group_idx, dtype, dev), layers in banked.items():
            momenta = self.param_groups[group_idx]["alpha1"] != 0.0
            if kind == "diagonal":
                bank = DiagonalBank(layers, dtype, dev, momenta)
            else:
                bank = BlockBank(layers, self.SUPPORTED_STRUCTURES[kind], dtype, dev, momenta)
            self._banks.append((group_idx, bank))
            for name in layers:
                self._bank_of[name] = bank
            self._bind_bank_views(bank)
        # singd's order of layers in its state (the banks were filled last)
        order = list(self.module_names.values())
        for store in (self._K_blocks, self._C_blocks, self._m_K_blocks, self._m_C_blocks):
            items = dict(store)
            store.clear()
            store.update({name: items[name] for name in order if name in items})

    def _owns(self, name: str) -> bool:
        """Whether this rank holds layer ``name``'s preconditioner (always, unless sharded)."""
        return self._owner_of is None or self._owner_of[name] == dist.get_rank()

    def _state_bytes(self) -> dict[str, float]:
        """Per layer: bytes of its K, C and momenta, which sharding balances over ranks."""
        out = {}
        for module, name in self.module_names.items():
            dim_K, dim_C = block_dims(module, self._group_average)
            (dtype_K, dtype_C), _ = self._get_preconditioner_dtypes_and_device(module)
            K_cls, C_cls = (self.SUPPORTED_STRUCTURES[s] for s in self._get_param_group_entry(module, "structures"))
            per_block = (stored_elements(K_cls, dim_K) * dtype_K.itemsize + stored_elements(C_cls, dim_C) * dtype_C.itemsize)
            momenta = 2 if self._get_param_group_entry(module, "alpha1") != 0.0 else 1
            out[name] = float(num_blocks(module, self._group_average) * per_block * momenta)
        return out

    def _bank_kind(self, structures, dtype_K: torch.dtype, dtype_C: torch.dtype) -> tuple[str | None, str]:
        """``(kind, why)``: the structure whose bank holds a layer's K and C (``"diagonal"``
        or a block-diagonal structure's name), or None for per-layer storage, and why (see
        :meth:`describe`): banks need one structure and one dtype for K and C, and every
        rank updating every layer."""
        K_structure, C_structure = structures
        if K_structure != C_structure:
            return None, "K and C have different structures"
        if dtype_K != dtype_C:
            return None, "K and C have different dtypes"
        if self.update_worker_fraction != 1.0:
            return None, "update_worker_fraction < 1"
        if self.subsample is not None:  # randomized statistics come as dense A and G
            return None, "subsample"
        if self.shard_preconditioner:
            return None, "shard_preconditioner"
        if K_structure == "diagonal" or issubclass(self.SUPPORTED_STRUCTURES[K_structure],
                                                   BlockDiagonalMatrixTemplate):
            return K_structure, f"in the {K_structure} bank"
        return None, f"{K_structure} has no bank"

    def describe(self) -> str:
        """One line per layer: the structures and dimensions of its K and C, its groups,
        update period T, and where K and C are kept (one of the banks that update all
        their layers at once, or per layer, and why)."""
        lines = []
        for module, name in self.module_names.items():
            dim_K, dim_C = block_dims(module, self._group_average)
            K_structure, C_structure = self._get_param_group_entry(module, "structures")
            G = num_blocks(module, self._group_average)
            groups = f" × {G} groups" if G > 1 else ""
            kept = self._storage.get(name, "on another rank")
            lines.append(f"{name}: K {dim_K} {K_structure}, C {dim_C} {C_structure}{groups}, "
                         f"T {self._get_param_group_entry(module, 'T')}; {kept}")
        return "\n".join(lines)

    def _bind_bank_views(self, bank: DiagonalBank | BlockBank) -> None:
        """``Ks, Cs, m_Ks, m_Cs`` of the bank's layers: singd matrices viewing its buffers."""
        for name in bank.layout:
            self._K_blocks[name], self._C_blocks[name] = bank.matrices(bank.values, name)
            if bank.momenta is not None:
                self._m_K_blocks[name], self._m_C_blocks[name] = bank.matrices(bank.momenta, name)

    def _get_trainable_parameters(self, model: nn.Module, warn_unsupported: bool) -> list[nn.Parameter]:
        """The trainable parameters of the supported layers (singd's rule); one warning that
        names the other layers with trainable parameters and how to train them."""
        unsupported = unsupported_layers(model)
        if unsupported and warn_unsupported:
            warn_user(unsupported_message(unsupported))
        return supported_parameters(model)

    def preconditioner_dims(self, module: nn.Module) -> tuple[int, int]:  # type: ignore[override]
        """``(dim_K, dim_C)`` of each of the layer's blocks."""
        return block_dims(module, self._group_average)

    # ------------------------------------------------------------ statistics
    def _accumulate_H_terms(self, module: nn.Module, inputs: tuple[Tensor], grad_output: Tensor) -> None:
        """Statistics of one backward pass, in at least float32 whatever K/C are stored in."""
        name = self.module_names[module]  # (its layout was checked when its forward ran)
        group = self.param_groups[self.param_to_group_idx[module.weight.data_ptr()]]
        loss_average, kfac_approx = group["loss_average"], group["kfac_approx"]
        (dtype_K, dtype_C), _ = self._get_preconditioner_dtypes_and_device(module)
        stat_K, stat_C = torch.promote_types(dtype_K, torch.float32), torch.promote_types(dtype_C, torch.float32)
        a = inputs[0].data.to(stat_K)
        g = grad_output.data.to(stat_C)
        prev_grad_scale = self._get_grad_scale(self.steps - 1)
        # ranks' statistics are averaged: A (and H_K) is an average, but G sums over the
        # batch for a summed loss, so its rank shares enter W times (stock singd sums both)
        g_share = float(dist.get_world_size()) if not loss_average and is_distributed() else 1.0
        layer = as_called(module, a, grad_output.shape)  # e.g. a ConvTranspose called with output_size=
        bank = self._bank_of.get(name)
        if bank is not None:
            ga = self._group_average
            if isinstance(bank, DiagonalBank):
                sum_A, scale_A = input_factor_diagonal_sum(layer, a, kfac_approx, ga)
                sum_G, scale_G = grad_output_factor_diagonal_sum(layer, g, kfac_approx, loss_average, ga)
                bank.add_statistics(name, sum_A, scale_A, sum_G, scale_G * g_share / prev_grad_scale)
            else:
                self._stats_workspace.reset()
                blocks, last = input_factor_blocks(layer, a, bank.block, kfac_approx, ga,
                                                   workspace=self._stats_workspace)
                for group, (b, r) in enumerate(zip(blocks, last)):
                    bank.add_statistics(name, 0, group, b, r, 1.0)
                self._stats_workspace.reset()
                blocks, last = grad_output_factor_blocks(layer, g, bank.block, kfac_approx, loss_average, ga,
                                                         workspace=self._stats_workspace)
                for group, (b, r) in enumerate(zip(blocks, last)):
                    bank.add_statistics(name, 1, group, b, r, g_share / prev_grad_scale)
            if name not in self._H_K_blocks:
                self._H_K_blocks[name], self._H_C_blocks[name] = bank.matrices(bank.stats, name)
            return
        if prev_grad_scale != 1.0 or g_share != 1.0:
            g = g * sqrt(g_share / prev_grad_scale)
        if self._owner_of is not None:
            self._reduce_statistics_to_owner(name, layer, a, g, kfac_approx, loss_average)
            return
        Ks = [cast(K, stat_K) for K in self._K_blocks[name]]
        Cs = [cast(C, stat_C) for C in self._C_blocks[name]]
        ga, ws = self._group_average, self._stats_workspace
        H_K = input_H(layer, a, Ks, kfac_approx, ga, self.subsample, ws)
        H_C = grad_output_H(layer, g, Cs, kfac_approx, loss_average, ga, self.subsample, ws)
        if is_distributed():
            # factors of different ranks cannot be summed: densify, then one bucket per layer
            H_K = [SymmetricSum(dense=H.to_dense()) if isinstance(H, SymmetricSum) else H for H in H_K]
            H_C = [SymmetricSum(dense=H.to_dense()) if isinstance(H, SymmetricSum) else H for H in H_C]
            tensors = [t for H in H_K + H_C for t in statistics_tensors(H)]
            finish = all_reduce_flat_async(tensors, dist.ReduceOp.AVG)
            # overlaps the rest of the backward pass; completed at the next step()
            self._in_flight.append((name, H_K, H_C, finish))
            return
        self._add_statistics(name, H_K, H_C)

    def _reduce_statistics_to_owner(self, name: str, layer: nn.Module, a: Tensor, g: Tensor, approx: str,
                                    loss_average: str | None) -> None:
        """Sharded: this rank's preconditioner-free statistics of a layer, sent (averaged
        over ranks) to the layer's owner, who sandwiches them with K and C at the step."""
        structures = self._get_param_group_entry(layer, "structures")
        K_cls, C_cls = (self.SUPPORTED_STRUCTURES[s] for s in structures)
        ga = self._group_average
        raw_K = input_statistics(layer, a, K_cls, approx, ga, self.subsample)
        raw_C = grad_output_statistics(layer, g, C_cls, approx, loss_average, ga, self.subsample)
        finish = reduce_to_owner_async(raw_K + raw_C, self._owner_of[name], average=True)
        # complete the earlier layers' reductions (they ran while this layer's statistics
        # were formed): non-owners free their copies now, not at the step
        self._finish_reductions()
        self._in_flight.append((name, raw_K, raw_C, finish))

    def _add_statistics(self, name: str, H_K: list, H_C: list) -> None:
        if name in self._H_K_blocks:
            for acc, new in zip(self._H_K_blocks[name], H_K):
                acc.add_(new)
            for acc, new in zip(self._H_C_blocks[name], H_C):
                acc.add_(new)
        else:
            self._H_K_blocks[name], self._H_C_blocks[name] = H_K, H_C

    # ---------------------------------------------------------------- update
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
        bank = self._bank_of.get(name)
        if isinstance(bank, BlockBank) and self.natural_gradient_cache != "none":
            K_projectors, C_projectors = bank.projectors(name)
            return (K_projectors if key == "KKT" else C_projectors)[b]
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
        grad_scale = self._gradient_scale()
        T = self._get_param_group_entry(module, "T")
        dim_K, dim_C = block_dims(module, self._group_average)
        dtype_K, dtype_C = self._get_param_group_entry(module, "preconditioner_dtype")
        # intermediate products live in the step workspace until the next layer; the
        # results in the natural-gradient workspace until the parameter update of the step
        ws, results = self._step_workspace, self._natural_gradient_workspace
        ws.reset()
        Ks, Cs = self._K_blocks[name], self._C_blocks[name]
        if len(grads) > 1 and all(isinstance(M, DenseMatrix) for M in Ks + Cs):  # grouped: batched
            return from_matrix_blocks(module, stacked_natural_gradient(grads, Ks, Cs, grad_scale, dtype_K, dtype_C),
                                      has_bias)
        out = []
        for b, grad in enumerate(grads):
            K, C = Ks[b], Cs[b]
            out.append(block_natural_gradient(
                grad / grad_scale if grad_scale != 1.0 else grad, K, C,
                self._projector(name, "KKT", b, K, T, dim_K, dim_C), self._projector(name, "CCT", b, C, T, dim_C, dim_K),
                dtype_K, dtype_C, ws, results))
        return from_matrix_blocks(module, out, has_bias)

    def _finish_reductions(self) -> None:
        """Wait for the statistics' all-reduces launched in the backward pass, then add them."""
        in_flight, self._in_flight = self._in_flight, []
        for name, H_K, H_C, finish in in_flight:
            finish()
            if self._owner_of is not None:  # sharded: raw statistics, sandwiched by the owner
                if name not in self._K_blocks:
                    continue
                Ks, Cs = self._K_blocks[name], self._C_blocks[name]
                H_K = sandwich_statistics([cast(K, H_K[0].dtype) for K in Ks], H_K, self.subsample)
                H_C = sandwich_statistics([cast(C, H_C[0].dtype) for C in Cs], H_C, self.subsample)
            self._add_statistics(name, H_K, H_C)

    @torch.compiler.disable  # under torch.compile(opt.step): eager, already fused; no recompiles
    def step(self, closure: Callable[[], Tensor] | None = None) -> None:
        """Precondition the gradients and update the parameters.

        A step whose gradients contain inf/NaN is skipped with a warning, exactly as
        with a GradScaler that found infs: parameters, K, C and momenta stay as they
        are, and the statistics gathered for this step are dropped. The step needs no host
        sync on any structure (with a GradScaler: reading its scale): skips are decided
        on the device and their warnings follow once the flags reached the host.
        """
        if closure is not None:
            raise NotImplementedError("Closure not supported.")
        self._finish_reductions()
        for module, name in self.module_names.items():
            check_layout(name, module, self._layouts[name])
        try:
            self._device_step()
        finally:
            self._stats_workspace.release()
            self._step_workspace.release()
            self._natural_gradient_workspace.release()

    def _device_step(self) -> None:
        """:meth:`step` without host syncs: the skip decisions are device flags."""
        # GradScaler.step sets found_inf; grad_scale is None when unscale_ already ran
        # (the gradient-clipping recipe): the gradients are unscaled, the statistics not
        self._grads_unscaled = hasattr(self, "found_inf") and getattr(self, "grad_scale", None) is None
        if self.steps not in self._grad_scales:
            if self._grads_unscaled:
                raise RuntimeError(
                    "GradScaler.unscale_() ran on this optimizer before step(), so the loss scale of the "
                    "curvature statistics is unknown: call opt.set_current_grad_scale(scaler.get_scale()) "
                    "before scaler.step(opt).")
            grad_scale = getattr(self, "grad_scale", None)  # set by GradScaler.step: its one sync
            self.set_current_grad_scale(1.0 if grad_scale is None else float(grad_scale))
        self._deferred.poll()
        ok = self._gradients_ok(getattr(self, "found_inf", None))
        if is_distributed():
            for _, bank in self._banks:  # G shares of a summed loss were scaled by W (see above)
                all_reduce_flat([bank.stats], dist.ReduceOp.AVG)
        for group_idx, bank in self._banks:
            self._update_bank(group_idx, bank, ok)
        self._update_layers(ok)
        for group_idx, group in enumerate(self.param_groups):
            hyper = dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"], ok=ok)
            params, steps = [], []
            modules = [(module, name) for module, name in self.module_names.items()
                       if module.weight.grad is not None and self.param_to_group_idx[module.weight.data_ptr()] == group_idx]
            # (skipped: layers that took no part in this step's loss, or are in another group)
            if self._owner_of is not None:  # sharded: the owners' natural gradients of the whole batch
                all_pairs = self._sharded_natural_gradients(modules, group["loss_average"] is not None)
            else:
                banked = self._bank_natural_gradients(modules)
                all_pairs = [banked[name] if name in banked else self._natural_gradient_pairs(module, name)
                             for module, name in modules]
            for pairs in all_pairs:
                for p, nat in pairs:
                    if id(p) in self._own_params:  # a bias not given to the optimizer stays put
                        params.append(p)
                        steps.append(nat)
            # sharded: the preconditioned directions are those of the whole batch already
            reduce_from = len(steps) if self._owner_of is not None else 0
            for p in self._unpreconditioned[group_idx]:  # e.g. BitFit biases: SGD directions
                if p.grad is not None:
                    params.append(p)
                    steps.append(p.grad.clone())  # the update works in place on its steps
            if params:  # one foreach update for the whole group
                if is_distributed():
                    reduce_gradients_(steps[reduce_from:], group["loss_average"] is not None,
                                      self._capture.ddp_synced)
                apply_updates_([p.data for p in params], steps, momentum_buffers(self.state, params, group["momentum"]),
                               workspaces=self._natural_gradient_workspace.in_use(), **hyper)
                self._natural_gradient_workspace.reset()
        self._deferred.post(~ok, self._warn_skipped_step)
        self.steps += 1
        self._remove_used_grad_scales()

    def _natural_gradient_pairs(self, module: nn.Module, name: str) -> list[tuple[nn.Parameter, Tensor]]:
        """``(parameter, natural gradient)`` of a layer's parameters that have gradients."""
        if isinstance(self._bank_of.get(name), DiagonalBank):
            return self._bank_natural_gradient(module, name)
        nats = self._compute_natural_gradient(module)
        return [(p, n) for p, n in zip((module.weight, module.bias), nats) if p is not None and p.grad is not None]

    def _sharded_natural_gradients(self, modules: list[tuple[nn.Module, str]], averaged_loss: bool) -> list[list]:
        """Sharded: each layer's gradients (of the whole batch) to its owner, the owner's
        natural gradient to every rank; ``(parameter, natural gradient)`` per layer."""
        rank = dist.get_rank()
        grads: dict[int, list[Tensor]] = {}
        for module, name in modules:
            grads.setdefault(self._owner_of[name], []).extend(
                p.grad for p in (module.weight, module.bias) if p is not None and p.grad is not None)
        if self._capture.ddp_synced:  # averaged by DDP already (a summed loss: scaled)
            reduce_gradients_(grads.get(rank, []), averaged_loss, ddp_synced=True)
        else:
            reduce_to_owners(grads, average=averaged_loss)
        out, nats = [], {}
        for module, name in modules:
            owner = self._owner_of[name]
            if owner == rank:
                pairs = self._natural_gradient_pairs(module, name)
            else:  # filled by the owner's broadcast
                pairs = [(p, torch.empty_like(p.grad)) for p in (module.weight, module.bias)
                         if p is not None and p.grad is not None]
            nats.setdefault(owner, []).extend(n for _, n in pairs)
            out.append(pairs)
        broadcast_from_owners(nats)
        return out

    def _warn_no_statistics(self, name: str) -> None:
        """A due layer without statistics: say why (once if its forward never ran)."""
        if name not in self._capture.seen:
            if name not in self._warned_never_called:
                self._warned_never_called.add(name)
                warn_user(f"Layer {name!r} has never run its forward() (it is used through a functional call, "
                          "e.g. MultiheadAttention.out_proj), so it gets no curvature statistics: its "
                          "pre-conditioner stays the identity and its parameters take plain gradient steps. "
                          "This warning is shown once.")
            return
        warn_user(
            f"No curvature statistics were captured for layer {name!r} at step {self.steps} "
            "(no backward pass through it, an empty batch, eval mode or torch.no_grad()); its pre-conditioner "
            "is left unchanged.")

    def _gradient_scale(self) -> float:
        """The factor the gradients still carry (1 once GradScaler.unscale_ ran)."""
        return 1.0 if getattr(self, "_grads_unscaled", False) else self._get_grad_scale(self.steps)

    def _update_layers(self, ok: Tensor) -> None:
        """Update the due non-banked layers' pre-conditioners (spread over ranks if asked)."""
        modules = [m for m, name in self.module_names.items() if name not in self._bank_of and self._owns(name)
                   and self.steps % self._get_param_group_entry(m, "T") == 0]
        groups = worker_groups(self.update_worker_fraction) if is_distributed() else [[0]]
        if len(groups) > 1:
            owners = self._update_owners(len(groups))
            mine = next(i for i, members in enumerate(groups) if dist.get_rank() in members)
            mine_modules = []
            for module in modules:
                name = self.module_names[module]
                if owners[name] == mine:
                    mine_modules.append(module)
                else:  # another group updates it; drop the local copy of the statistics
                    self._H_K_blocks.pop(name, None)
                    self._H_C_blocks.pop(name, None)
            self._update_preconditioners(mine_modules, ok)
            self._broadcast_preconditioners([self.module_names[m] for m in modules], owners, groups)
        else:
            self._update_preconditioners(modules, ok)

    def _update_preconditioners(self, modules: list[nn.Module], ok: Tensor) -> None:
        """Riemannian updates of these layers' K, C blocks, without host syncs.

        The scalars of every block of a parameter group (traces, step sizes, skip flags)
        are formed together by a few vector kernels (:func:`step_scalars`). A block is
        skipped on the device (K, C, momenta keep their bits) unless ``ok`` (the step's
        gradient flag) holds and every statistic and trace that feeds K/C is finite;
        layers skipped for their statistics are reported once the flags reach the host.
        """
        by_group: dict[int, list] = {}
        for module in modules:
            name = self.module_names[module]
            H_Ks, H_Cs = self._H_K_blocks.pop(name, None), self._H_C_blocks.pop(name, None)
            if H_Ks is None or H_Cs is None:
                self._warn_no_statistics(name)
                continue
            group_idx = self.param_to_group_idx[module.weight.data_ptr()]
            for b, (K, C, H_K, H_C) in enumerate(zip(self._K_blocks[name], self._C_blocks[name], H_Ks, H_Cs)):
                by_group.setdefault(group_idx, []).append((name, b, K, C, H_K, H_C))
        for group_idx, blocks in by_group.items():
            self._update_blocks(self.param_groups[group_idx], blocks, ok)

    def _update_blocks(self, group: dict, blocks: list, ok: Tensor) -> None:
        """One parameter group's blocks ``(name, b, K, C, H_K, H_C)``: see :meth:`_update_preconditioners`."""
        alpha1 = group["alpha1"]
        pairs = []
        for name, b, K, C, H_K, H_C in blocks:
            m_Ks, m_Cs = self._m_K_blocks.get(name), self._m_C_blocks.get(name)
            pairs.append(FactorPair(K, C, H_K, H_C, m_Ks[b] if m_Ks is not None else None,
                                    m_Cs[b] if m_Cs is not None else None))
        dims = self._block_dims(blocks)
        momenta, finite = update_pairs_(pairs, ok, dims, normalize=group["normalize_lr_cov"],
                                        workspace=self._step_workspace, **self._update_scalars(group))
        for (name, b, *_), (m_K, m_C) in zip(blocks, momenta):
            if alpha1 != 0.0:
                self._m_K_blocks[name][b], self._m_C_blocks[name][b] = m_K, m_C
        for name in dict.fromkeys(name for name, *_ in blocks):
            self._invalidate(name)
        block_names, step = [name for name, *_ in blocks], self.steps

        def report(values: list, block_names=block_names, step=step) -> None:
            warn_non_finite([n for n, skipped in zip(block_names, values) if skipped], step)

        # a step skipped for its gradients is reported once, by step()
        self._deferred.post(~finite & ok, report)

    def _update_scalars(self, group: dict) -> dict[str, Any]:
        """The Python scalars of singd 0.0.5's update rule at this step, for one param group."""
        alpha1, lr_cov = group["alpha1"], group["lr_cov"]
        return dict(
            grad_unscaling=self._get_grad_scale(self.steps - 1) / self._get_grad_scale(self.steps) ** 2,
            damping=group["damping"], kfac_like=group["kfac_like"], alpha1=alpha1,
            scale=0.5 * (1.0 - alpha1 if group["normalize_lr_cov"] else 1.0),
            beta=lr_cov(self.steps) if callable(lr_cov) else lr_cov,
        )

    def _block_dims(self, blocks: list) -> Tensor:
        """``[B, 4]`` of ``(d_K, d_C, d_K, d_C)`` per block, on the device in the dtype of the
        blocks' traces (cached per block list: a layer's dtypes and device are fixed)."""
        key = tuple((name, b) for name, b, *_ in blocks)
        dims = self._dims_cache.get(key)
        if dims is None:
            dtypes = [matrix_dtype(M) for _, _, K, C, _, _ in blocks for M in (K, C)]
            dtypes += [statistics_tensors(H)[0].dtype for *_, H_K, H_C in blocks for H in (H_K, H_C)]
            device = next(t for _, t in blocks[0][2].named_tensors()).device
            rows = [(K.shape[0], C.shape[0], K.shape[0], C.shape[0]) for _, _, K, C, _, _ in blocks]
            dims = self._dims_cache[key] = torch.tensor(
                rows, dtype=functools.reduce(torch.promote_types, dtypes), device=device)
        return dims

    @staticmethod
    def _warn_skipped_step(not_ok: bool) -> None:
        if not_ok:
            warn_user("Encountered inf in gradients. Skipping update.")

    def _gradients_ok(self, found_inf: Tensor | None) -> Tensor:
        """0-d bool on the device: no inf/NaN in any gradient (and none found by a GradScaler),
        on any rank."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        device = self.param_groups[0]["params"][0].device
        ok = torch.ones((), dtype=torch.bool, device=device)
        if grads:
            ok = gradients_finite(grads)
        if found_inf is not None:
            ok = ok & (found_inf == 0)
        return all_ranks_ok(ok, self._capture.ddp_synced)

    def _update_bank(self, group_idx: int, bank: DiagonalBank | BlockBank, ok: Tensor) -> None:
        """Update every due layer of one bank at once (see :meth:`DiagonalBank.update_`,
        :meth:`BlockBank.update_`)."""
        group = self.param_groups[group_idx]
        if self.steps % group["T"] != 0:
            return
        present = []
        for name in bank.layout:
            if self._H_K_blocks.pop(name, None) is None:
                self._warn_no_statistics(name)
            else:
                present.append(name)
            self._H_C_blocks.pop(name, None)
        if present:
            skipped = bank.update_(present=bank.segments.mask(frozenset(present)), ok=ok,
                                   normalize=group["normalize_lr_cov"], **self._update_scalars(group))
            segments, step = bank.segments, self.steps

            def report(flags: list, segments=segments, step=step) -> None:
                warn_non_finite(segments.flagged(flags), step)

            self._deferred.post(skipped, report)
        bank.clear_statistics()

    def _bank_natural_gradients(self, modules: list[tuple[nn.Module, str]]) -> dict[str, list]:
        """``{name: (parameter, C² ⊙ ∇ ⊙ K²) pairs}`` of the diagonal-bank layers among ``modules``
        (not transposed) by three foreach calls for all of them
        (:func:`diagonal_natural_gradients_`), into the natural-gradient workspace; the other
        layers are left to :meth:`_natural_gradient_pairs`."""
        operands, outs, pairs_of = [], [], {}
        results = self._natural_gradient_workspace
        for module, name in modules:
            bank = self._bank_of.get(name)
            if not isinstance(bank, DiagonalBank) or isinstance(module, TRANSPOSED_CONV_TYPES):
                continue
            views = self._diagonal_views.get(name)
            if views is None:  # [G, d_K], [G, d_C] views of the persistent K², C² (cached)
                views = self._diagonal_views[name] = diagonal_views(
                    module, bank.K_view(bank.squares, name), bank.C_view(bank.squares, name))
            pairs = pairs_of[name] = []
            for p, g, k2_p, c2_p in diagonal_operands(module, views):
                out = results.take(tuple(g.shape), g, torch.promote_types(g.dtype, k2_p.dtype))
                operands.append((g, k2_p, c2_p))
                outs.append(out)
                pairs.append((p, out.view(p.shape)))
        if outs:
            grads, k2s, c2s = (list(column) for column in zip(*operands))
            diagonal_natural_gradients_(outs, grads, k2s, c2s, self._gradient_scale())
        return {name: [(p, n.to(p.dtype)) for p, n in pairs] for name, pairs in pairs_of.items()}

    def _bank_natural_gradient(self, module: nn.Module, name: str) -> list[tuple[nn.Parameter, Tensor]]:
        """``(parameter, C² ⊙ ∇ ⊙ K²)`` pairs of one banked layer (diagonal K, C) on its own: the
        transposed convolutions, whose blocks are not rows of the weight (the other layers of a
        diagonal bank go through :meth:`_bank_natural_gradients`)."""
        bank = self._bank_of[name]
        k2, c2 = bank.K_view(bank.squares, name), bank.C_view(bank.squares, name)  # [G, d_K], [G, d_C]
        grad_scale = self._gradient_scale()
        out = diagonal_natural_gradient(module, k2, c2, self._group_average, self._natural_gradient_workspace)
        return [(p, (n / grad_scale if grad_scale != 1.0 else n).to(p.dtype)) for p, n in out]

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
                for store in (self._K_blocks, self._C_blocks, self._m_K_blocks, self._m_C_blocks):
                    for matrix in store.get(name, []):
                        tensors.extend(t for _, t in matrix.named_tensors())
            if tensors:
                broadcast_flat(tensors, src=members[0])

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """singd's state with every matrix as plain tensors (``{"type", "tensors"}``), so
        that ``torch.load``'s default ``weights_only=True`` reads a saved checkpoint. Like
        singd's, one entry per layer; a layer with several blocks has a list of them.
        :func:`stock_state_dict` turns it into stock singd's format."""
        self._finish_reductions()
        state = torch.optim.Optimizer.state_dict(self)
        state["steps"], state["_grad_scales"] = self.steps, self._grad_scales
        for key, private in MATRIX_STATE.items():
            state[key] = {name: layer_state(Ms) for name, Ms in getattr(self, private).items()}
        if self._owner_of is not None:  # sharded: every rank's layers, on every rank
            device = next(iter(self.module_names)).weight.device
            state.update(gather_layer_states({key: state[key] for key in MATRIX_STATE},
                                             list(self.module_names.values()), device))
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict`, or stock singd's (its matrix objects, one
        per layer); a state of another model is an error. Without ``H_Ks``/``H_Cs`` it has
        no pending statistics."""
        state_dict = dict(state_dict)
        for key in ("Ks", "Cs", "m_Ks", "m_Cs"):  # (pending statistics H_Ks, H_Cs may be left out)
            if not isinstance(state_dict.get(key), dict):
                raise ValueError(f"State dict has no {key!r}: not a kfac_tn.SINGD state.")
        for key in MATRIX_STATE:
            state_dict[key] = {
                name: [matrix_from_state(e, self.SUPPORTED_STRUCTURES) for e in as_blocks(entry)]
                for name, entry in state_dict.get(key, {}).items()
            }
        layers = {name: module for module, name in self.module_names.items()}
        for side, key in enumerate(("Ks", "Cs")):
            theirs = state_dict[key]
            if set(theirs) != set(layers):
                raise ValueError(
                    f"State dict is for other layers: it has {sorted(theirs)}, this optimizer {sorted(layers)}."
                )
            for name, blocks in theirs.items():
                module = layers[name]
                dim = block_dims(module, self._group_average)[side]
                cls = self.SUPPORTED_STRUCTURES[self._get_param_group_entry(module, "structures")[side]]
                if len(blocks) != num_blocks(module, self._group_average) or any(
                    a.to_dense().shape != (dim, dim) or type(a) is not cls for a in blocks
                ):
                    raise ValueError(f"State dict {key}[{name!r}] does not match layer {name!r}'s shape or structure.")
        if self._owner_of is not None:  # sharded: keep the layers this rank owns
            for key in MATRIX_STATE:
                state_dict[key] = {name: Ms for name, Ms in state_dict[key].items() if self._owns(name)}
        super().load_state_dict(state_dict)
        for name in self._cache:
            self._invalidate(name)
        for _, bank in self._banks:
            self._load_bank(bank)

    def _load_bank(self, bank: DiagonalBank | BlockBank) -> None:
        """Copy the loaded K, C, momenta and pending statistics of a bank's layers into its
        buffers and point the layers' block lists back at them."""
        loaded = {key: dict(getattr(self, private)) for key, private in MATRIX_STATE.items()}
        targets = (("Ks", "Cs", bank.values), ("m_Ks", "m_Cs", bank.momenta), ("H_Ks", "H_Cs", bank.stats))
        bank.clear_statistics()
        for name in bank.layout:
            for key_K, key_C, buffer in targets:
                if buffer is None or name not in loaded[key_K]:
                    continue
                views_K, views_C = bank.matrices(buffer, name)
                for view, matrix in zip(views_K + views_C, loaded[key_K][name] + loaded[key_C][name]):
                    for (_, target), (_, source) in zip(view.named_tensors(), matrix.named_tensors()):
                        target.copy_(source)
                if key_K == "H_Ks":
                    self._H_K_blocks[name], self._H_C_blocks[name] = views_K, views_C
        bank.loaded_()
        self._bind_bank_views(bank)
