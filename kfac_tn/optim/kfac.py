"""Classic KFAC on the tensor-network factors, with torch.optim conventions.

Per layer block, running averages ``A ← ε A + (1 − ε) A_new`` and likewise G are
updated every ``factor_update_freq`` steps from hooks (KFAC-expand or -reduce factors
of :mod:`kfac_tn.factors`); every ``inverse_update_freq`` steps the damped factors are
inverted (eigendecomposition or Cholesky, in ``inverse_dtype``); every step the
gradient ``V`` of a layer block becomes ``(G + δ_G I)⁻¹ V (A + δ_A I)⁻¹`` with
Tikhonov damping ``δ_A = π √λ``, ``δ_G = √λ / π`` (π = 1, or the π-correction of
Martens & Grosse when ``pi_damping``), then weight decay, momentum and ``lr`` as in
SGD. Parameters of the optimizer that belong to no supported layer get the SGD step.

Several backward passes before one ``step`` (gradient accumulation) give the factors of
their micro-batches taken as one batch, and several uses of a layer within one pass
(weight sharing) count like positions of one call: see :mod:`kfac_tn.optim.factor_sums`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kfac_tn.capture import LayerCapture, supported_layers, supported_parameters, unsupported_layers
from kfac_tn.factors import (
    grad_output_factor,
    grad_output_factor_blocks,
    input_factor,
    input_factor_blocks,
)
from kfac_tn.factors.layers import as_called
from kfac_tn.factors.subsampled import (
    sample_count,
    subsampled_grad_output_factor,
    subsampled_input_factor,
)
from kfac_tn.optim.deferred import DeferredFlags
from kfac_tn.optim.distributed import (
    all_reduce_flat,
    assign_greedy,
    broadcast_flat,
    is_distributed,
    reduce_gradients_,
    worker_groups,
)
from kfac_tn.optim.factor_blocks import block_layout, diagonal_blocks, padded_blocks
from kfac_tn.optim.factor_sums import FactorSums
from kfac_tn.optim.kfac_update import (
    INVERSE_KEYS,
    INVERSE_METHODS,
    absorb_,
    cholesky_failure,
    invert_unchecked,
    kl_clip_,
    precondition,
)
from kfac_tn.optim.parameter_update import apply_updates_, gradients_finite, momentum_buffers
from kfac_tn.optim.sharding import (
    assign_owners,
    broadcast_from_owners,
    gather_layer_states,
    reduce_to_owners,
)
from kfac_tn.optim.user_warnings import unsupported_message, warn_user
from kfac_tn.optim.validation import (
    check_layout,
    check_model,
    check_sharding,
    fraction,
    in_unit_interval,
    non_negative,
    one_of,
    positive_int,
    unwrap_model,
)
from kfac_tn.optim.weight_blocks import block_dims, from_matrix_blocks, gradient_blocks, num_blocks


def _warn_skipped(flags: list[bool], step: int) -> None:
    """Warning for a skipped step, from its device flags ``[scaler found inf, skipped]``."""
    if flags[0]:
        warn_user(f"GradScaler found inf/NaN at step {step}: the step was skipped (parameters and optimizer "
                  "state as before it). Occasional skips are how a GradScaler finds its scale.")
    elif flags[1]:
        warn_user(f"Non-finite gradients at step {step}: the step was skipped (parameters and optimizer state "
                  "as before it). If this repeats, training has diverged: lower lr, raise damping or "
                  "lower kl_clip.")


class KFAC(torch.optim.Optimizer):
    """Kronecker-factored approximate curvature optimizer for Linear and every conv layer.

    The defaults (lr 0.003, damping 0.01, KL clip 0.01, KFAC-reduce, Cholesky inverses,
    factors above 256 rows kept as diagonal blocks) are the best point of a tuning grid on
    DeepOBS's ``fmnist_2c2d`` (``python -m experiments.benchmark``, ``docs/benchmark.md``);
    ``max_factor_dim=None, kfac_approx="expand"`` is classic, exact KFAC.

    Args:
        model: the network; its supported layers are hooked (keyed by module name).
        params: parameters or param groups (default: those of the supported layers).
            Per group: ``lr``, ``momentum``, ``weight_decay``, ``damping``.
        lr, momentum, weight_decay: as in SGD (weight decay is added after
            preconditioning).
        damping: Tikhonov damping λ (> 0 unless the factors are known to be regular).
        pi_damping: split λ between the factors with the π-correction.
        ema_decay: ε of the running averages of A and G, in [0, 1).
        factor_update_freq: steps between factor updates (statistics captured only then).
        inverse_update_freq: steps between inversions (a multiple is sensible).
        inverse_method: ``"cholesky"`` (default; the inverse of the damped factor) or
            ``"eigh"`` (the same inverse from an eigendecomposition, negative eigenvalues
            clamped at 0; several times slower).
        inverse_dtype: ``torch.float32`` or ``torch.float64`` for the inversion.
        kfac_approx: ``"expand"`` or ``"reduce"``; ``None`` (default): ``"reduce"``, or
            ``"expand"`` with ``subsample`` (it samples KFAC-expand's positions).
        loss_average: ``None`` (sum), ``"batch"`` or ``"batch+sequence"`` (see
            :func:`kfac_tn.grad_output_factor`).
        grouped_conv: ``"exact"`` (a block per group) or ``"average"``.
        warn_unsupported: warn about trainable layers that get no preconditioning.
        update_worker_fraction: with torch.distributed, the fraction of ranks that invert
            each layer's factors (KAISA's knob): 1.0 everywhere (default), else groups of
            ``round(fraction·world)`` ranks get layers by a greedy cost model (d_A³ + d_G³)
            and their leaders broadcast the inverses.
        subsample: randomized KFAC-expand factors from a random subset of output positions
            (a fraction in (0, 1] or a count; a fresh subset per layer call and statistics
            step from torch's global generator; unbiased, see
            :mod:`kfac_tn.factors.subsampled`). ``None`` (default): all positions.
        kl_clip: bound κ on the step's predicted KL change (kfac-pytorch's ``kl_clip``):
            the preconditioned directions ``d`` are scaled by
            ``ν = min(1, sqrt(κ / Σ lr² ⟨d, g⟩))`` before weight decay and momentum, which
            keeps early steps, taken with poorly estimated factors, from blowing up.
            ``None`` switches it off. Typical: 1e-3 to 1e-2 (default); with damping 1e-3
            a clip of 1e-2 let the loss jump to 7× its start on ``fmnist_2c2d``.
        max_factor_dim: keep a factor of dimension ``d`` above this bound as its
            ``n = ⌈d / max_factor_dim⌉`` diagonal blocks of ``⌈d / n⌉`` (Distributed
            Shampoo's ``max_preconditioner_dim``): only those blocks are computed, averaged,
            inverted and applied, so a large layer (e.g. a 3136→1024 Linear: A 3137×3137)
            costs ``d·B`` instead of ``d²`` per sample and per gradient row, and its
            inversion ``d·B²`` instead of ``d³``. ``None``: every factor dense (exact KFAC).
            Default 256: ``fmnist_2c2d``'s KFAC-reduce step 1.8× SGD's instead of 4.8× (dense).
            Which layer got what: :attr:`factor_blocks`, :meth:`describe`.
        shard_preconditioner: with torch.distributed, keep each layer's running A, G and
            inverses on one rank only (owners balance the bytes, :mod:`sharding`): the
            ranks' factors are reduced to the owner, which inverts them, preconditions the
            layer's (all-reduced) gradient and broadcasts the direction. Results equal the
            replicated run up to rounding; ``kfac_state`` holds this rank's layers;
            :meth:`state_dict` gathers every layer on every rank (a world-size independent
            checkpoint). Excludes ``update_worker_fraction``. No effect without an
            initialized process group.
    """

    # GradScaler hands the loss scale and found_inf to step() (see torch.amp.GradScaler)
    _step_supports_amp_scaling = True

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[nn.Parameter] | list[dict[str, Any]] | None = None,
        lr: float = 0.003,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        damping: float = 1e-2,
        pi_damping: bool = False,
        ema_decay: float = 0.95,
        factor_update_freq: int = 1,
        inverse_update_freq: int = 10,
        inverse_method: str = "cholesky",
        inverse_dtype: torch.dtype = torch.float32,
        kfac_approx: str | None = None,
        loss_average: str | None = "batch",
        grouped_conv: str = "exact",
        warn_unsupported: bool = True,
        update_worker_fraction: float = 1.0,
        kl_clip: float | None = 1e-2,
        subsample: float | int | None = None,
        shard_preconditioner: bool = False,
        max_factor_dim: int | None = 256,
    ) -> None:
        check_model(model)
        model = unwrap_model(model)
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("damping", damping)):
            non_negative(name, value)
        in_unit_interval("ema_decay", ema_decay)
        positive_int("factor_update_freq", factor_update_freq)
        positive_int("inverse_update_freq", inverse_update_freq)
        one_of("inverse_method", inverse_method, INVERSE_METHODS)
        one_of("inverse_dtype", inverse_dtype, (torch.float32, torch.float64))
        if kfac_approx is None:
            kfac_approx = "reduce" if subsample is None else "expand"
        one_of("kfac_approx", kfac_approx, ("expand", "reduce"))
        one_of("loss_average", loss_average, (None, "batch", "batch+sequence"))
        one_of("grouped_conv", grouped_conv, ("exact", "average"))
        fraction("update_worker_fraction", update_worker_fraction)
        self.update_worker_fraction = float(update_worker_fraction)
        if kl_clip is not None:
            non_negative("kl_clip", kl_clip)
            if kl_clip == 0:
                raise ValueError("kl_clip must be positive (or None to switch clipping off), got 0.")
        self.kl_clip = kl_clip
        if subsample is not None:
            if kfac_approx != "expand":
                raise ValueError("subsample samples output positions of KFAC-expand factors: use kfac_approx='expand'.")
            sample_count(1, subsample)  # validates it
        self.subsample = subsample
        check_sharding(shard_preconditioner, update_worker_fraction)
        self.shard_preconditioner = shard_preconditioner
        if max_factor_dim is not None:
            positive_int("max_factor_dim", max_factor_dim)
        self.max_factor_dim = max_factor_dim
        if params is None:
            params = supported_parameters(model)
            unsupported = unsupported_layers(model)
            if warn_unsupported and unsupported:
                warn_user(unsupported_message(unsupported))
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, damping=damping)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for key in ("lr", "momentum", "weight_decay", "damping"):
                non_negative(key, group[key])
        self.pi_damping, self.ema_decay = pi_damping, ema_decay
        self.factor_update_freq, self.inverse_update_freq = factor_update_freq, inverse_update_freq
        self.inverse_method, self.inverse_dtype = inverse_method, inverse_dtype
        self.kfac_approx, self.loss_average = kfac_approx, loss_average
        self.group_average = grouped_conv == "average"
        self.steps = 0
        group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self.layers: dict[str, nn.Module] = {}
        for name, m in supported_layers(model, group_of).items():  # not: frozen weights (BitFit: SGD)
            groups = {group_of[p] for p in m.parameters(recurse=False) if p in group_of}
            if len(groups) > 1:
                raise ValueError(f"Parameters of layer {name!r} are in different param groups {sorted(groups)}.")
            self.layers[name] = m
        self._group_index = {name: group_of[m.weight] for name, m in self.layers.items()}
        #: per layer, ``((n_A, b_A), (n_G, b_G))``: A and G kept as ``n`` diagonal blocks of
        #: ``b`` (``n = 1``: dense), see ``max_factor_dim``
        self.factor_blocks: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {
            name: tuple(block_layout(d, max_factor_dim) for d in block_dims(m, self.group_average))
            for name, m in self.layers.items()}
        self._layouts = {name: (m.weight.device, m.weight.dtype) for name, m in self.layers.items()}
        self.kfac_state: dict[str, dict[str, Tensor]] = {name: {} for name in self.layers}
        self._owner_of: dict[str, int] | None = None  # sharded: layer -> owning rank
        self._factored: set[str] = set()  # sharded: layers whose owner holds factors (known on every rank)
        if shard_preconditioner and is_distributed():
            sizes = {name: float(num_blocks(m, self.group_average) * sum(n * b * b for n, b in self.factor_blocks[name]))
                     for name, m in self.layers.items()}
            self._owner_of = assign_owners(sizes, dist.get_world_size())
        self._pending: dict[str, FactorSums] = {}
        self._deferred = DeferredFlags()
        self._loss_scale: float | None = None
        self._warned: set[str] = set()
        self._capture = LayerCapture(self.layers, self._accumulate, self._statistics_due)

    def describe(self) -> str:
        """One line per layer: its factors' dimensions and how each is kept (dense, or
        ``n`` diagonal blocks of ``b``), with the multiply-adds of one preconditioning."""
        lines = []
        for name, module in self.layers.items():
            dims = block_dims(module, self.group_average)
            kept = [f"{d} dense" if n == 1 else f"{d} as {n} blocks of {b}"
                    for d, (n, b) in zip(dims, self.factor_blocks[name])]
            (_, b_A), (_, b_G) = self.factor_blocks[name]
            cost = num_blocks(module, self.group_average) * dims[0] * dims[1] * (b_A + b_G)
            lines.append(f"{name}: A {kept[0]}, G {kept[1]} ({cost / 1e6:.1f} M multiply-adds per step)")
        return "\n".join(lines)

    def set_current_grad_scale(self, grad_scale: float) -> None:
        """The loss scale of this step's backward passes, for the gradient-clipping recipe
        (``scaler.unscale_(opt)``; clip; ``opt.set_current_grad_scale(scaler.get_scale())``;
        ``scaler.step(opt)``), where GradScaler does not pass it (same name as singd's)."""
        self._loss_scale = float(grad_scale)

    def remove_hooks(self) -> None:
        """Detach the optimizer from the model: no more statistics are captured.

        Deleting the optimizer has the same effect (its hooks hold it only weakly and
        remove themselves at the next forward pass).
        """
        self._capture.remove()

    # ----------------------------------------------------------- statistics
    def _statistics_due(self, name: str, module: nn.Module) -> bool:
        check_layout(name, module, self._layouts[name])
        return self.steps % self.factor_update_freq == 0

    def _accumulate(self, name: str, module: nn.Module, x: Tensor, grad_output: Tensor) -> None:
        check_layout(name, module, self._layouts[name])
        # statistics and their running averages in >= float32, whatever autocast ran in
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        grad_output = grad_output.to(torch.promote_types(grad_output.dtype, torch.float32))
        module = as_called(module, x, grad_output.shape)  # e.g. a ConvTranspose called with output_size=
        (n_A, b_A), (n_G, b_G) = self.factor_blocks[name]
        if self.subsample is not None:  # blocks cut from the randomized factors
            A = diagonal_blocks(subsampled_input_factor(module, x, self.subsample, self.group_average), n_A, b_A)
            G = diagonal_blocks(subsampled_grad_output_factor(module, grad_output, self.subsample,
                                                              self.loss_average, self.group_average), n_G, b_G)
        else:
            if n_A == 1:
                A = input_factor(module, x, self.kfac_approx, self.group_average)
            else:
                A = padded_blocks(*input_factor_blocks(module, x, b_A, self.kfac_approx, self.group_average), n_A)
            if n_G == 1:
                G = grad_output_factor(module, grad_output, self.kfac_approx, self.loss_average, self.group_average)
            else:
                G = padded_blocks(*grad_output_factor_blocks(module, grad_output, b_G, self.kfac_approx,
                                                             self.loss_average, self.group_average), n_G)
        if name not in self._pending:
            self._pending[name] = FactorSums(averaged_loss=self.loss_average is not None)
        self._pending[name].add(A, G, x.shape[0])

    def _owns(self, name: str) -> bool:
        """Whether this rank holds layer ``name``'s factors (always, unless sharded)."""
        return self._owner_of is None or self._owner_of[name] == dist.get_rank()

    def _all_reduce_pending(self) -> None:
        """Average A (an average) and G (summed for a summed loss) over ranks, one bucket
        each; sharded: reduced to each layer's owner, and dropped elsewhere."""
        names = sorted(self._pending)
        factors = [self._pending[n].factors() for n in names]
        average_G = self.loss_average is not None
        if self._owner_of is not None:
            for key, average in ((0, True), (1, average_G)):
                by_owner: dict[int, list[Tensor]] = {}
                for n, f in zip(names, factors):
                    by_owner.setdefault(self._owner_of[n], []).append(f[key])
                reduce_to_owners(by_owner, average)
            self._factored.update(names)  # the owners create their running averages now
            names_factors = [(n, f) for n, f in zip(names, factors) if self._owns(n)]
            self._pending = {n: self._pending[n] for n, _ in names_factors}
        else:
            for key, op in ((0, dist.ReduceOp.AVG), (1, dist.ReduceOp.AVG if average_G else dist.ReduceOp.SUM)):
                all_reduce_flat([f[key] for f in factors], op)
            names_factors = list(zip(names, factors))
        for n, (A, G) in names_factors:
            self._pending[n].replace(A, G)

    def _absorb_statistics(self, ok: Tensor) -> None:
        """Fold the pending factors into the running averages, on the device.

        A layer's factors enter only if they are finite and ``ok`` (the step's gradient
        flag) holds; otherwise its averages keep their bits (``torch.where`` and 0/1
        weights, no host sync) and a warning follows once the flag reached the host.
        ``state["absorbed"]`` (0-d bool) says whether any factors entered yet: the first
        ones replace the (zero) averages.
        """
        names, flags = [], []
        for name, pending in self._pending.items():
            A, G = pending.factors()
            finite = torch.isfinite(torch.stack([A.sum(), G.sum()])).all()
            use = finite & ok
            state = self.kfac_state[name]
            if "A" not in state:
                state["A"], state["G"] = torch.zeros_like(A), torch.zeros_like(G)
                state["absorbed"] = torch.zeros((), dtype=torch.bool, device=A.device)
            absorb_(state, A, G, use, self.ema_decay)
            names.append(name)
            flags.append(~finite & ok)
        self._pending = {}
        if names:
            step = self.steps

            def report(values: list, names=names, step=step) -> None:
                for name, skipped in zip(names, values):
                    if skipped:
                        warn_user(f"Non-finite KFAC factors in layer {name!r} at step {step}; they are not used.")

            self._deferred.post(torch.stack(flags), report)

    # ------------------------------------------------------------- inverses
    def _invert(self, name: str) -> Tensor | None:
        """Invert layer ``name``'s damped factors; its Cholesky failure flags (or None)."""
        damping = self.param_groups[self._group_index[name]]["damping"]
        state = self.kfac_state[name]
        dims = block_dims(self.layers[name], self.group_average)
        inverses, failed = invert_unchecked(state["A"], state["G"], damping, self.pi_damping, self.inverse_method,
                                            self.inverse_dtype, dims)
        state.update(inverses)
        return failed

    def _check_inversions(self, failures: dict[str, Tensor | None]) -> None:
        """One host sync for all layers inverted by Cholesky in this step; an error naming
        the first layer and factor that failed."""
        flags = {name: f for name, f in failures.items() if f is not None}
        if not flags or not bool(torch.stack(list(flags.values())).any()):
            return
        for name, f in flags.items():
            if bool(f.any()):
                damping = self.param_groups[self._group_index[name]]["damping"]
                raise torch.linalg.LinAlgError(
                    f"{cholesky_failure(f)} for layer {name!r}: increase damping (now {damping}) or use "
                    "inverse_method='eigh'.")

    def _update_inverses(self, force: bool) -> None:
        """Invert due factors, spread over rank groups if ``update_worker_fraction < 1``."""
        keys = INVERSE_KEYS[self.inverse_method]
        due = [n for n, st in self.kfac_state.items() if "A" in st and (force or keys[0] not in st)]
        groups = worker_groups(self.update_worker_fraction) if is_distributed() else [[0]]
        if len(groups) == 1:
            self._check_inversions({name: self._invert(name) for name in due})
            return
        costs = {n: float(sum(k * b**3 for k, b in self.factor_blocks[n])) for n, st in self.kfac_state.items()
                 if "A" in st}
        owners = assign_greedy(costs, len(groups))
        mine = next(i for i, members in enumerate(groups) if dist.get_rank() in members)
        failures = {}
        for name in due:
            if owners[name] == mine:
                failures[name] = self._invert(name)
            else:  # receive buffers of the right shape
                A, G = self.kfac_state[name]["A"], self.kfac_state[name]["G"]
                dt = self.inverse_dtype
                shapes = {"eval_A": A.shape[:-1], "Q_A": A.shape, "eval_G": G.shape[:-1], "Q_G": G.shape,
                          "A_inv": A.shape, "G_inv": G.shape}
                for key in keys:
                    self.kfac_state[name][key] = torch.empty(shapes[key], dtype=dt, device=A.device)
        self._check_inversions(failures)
        for index, members in enumerate(groups):
            tensors = [self.kfac_state[n][k] for n in due if owners[n] == index for k in keys]
            if tensors:
                broadcast_flat(tensors, src=members[0])

    # ------------------------------------------------------------------ step
    # under torch.compile(opt.step) the step runs eagerly (it is fused already; dynamo
    # lost the reset of the pending factors across its graph breaks: wrong factors)
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Precondition the gradients and update the parameters (skipped on inf/NaN)."""
        for name, module in self.layers.items():
            check_layout(name, module, self._layouts[name])
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._deferred.poll()
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        scaler_ok = ok = self._unscale(grads)
        if is_distributed():
            # every rank averages (or sums, for a summed loss) its gradients and statistics,
            # so all ranks apply the same update as one process on the concatenated batch
            reduce_gradients_(grads, self.loss_average is not None, self._capture.ddp_synced)
            self._all_reduce_pending()
        if grads:
            ok = ok & gradients_finite(grads)
        self._absorb_statistics(ok)
        self._update_inverses(force=self.steps % self.inverse_update_freq == 0)
        directions: dict[int, Tensor] = {}
        sent: dict[int, list[Tensor]] = {}  # sharded: each owner's directions, in layer order
        for name, module in self.layers.items():
            state = self.kfac_state[name]
            if module.weight.grad is not None and name not in self._capture.seen and name not in self._warned:
                self._warned.add(name)
                warn_user(f"Layer {name!r} has never run its forward() (it is used through a functional call, "
                          "e.g. MultiheadAttention.out_proj), so it gets no KFAC factors and takes SGD steps. "
                          "This warning is shown once.")
            if self._owner_of is not None and not self._owns(name):  # the owner's direction, if any
                if module.weight.grad is not None and name in self._factored:
                    with_grad = [p for p in (module.weight, module.bias) if p is not None and p.grad is not None]
                    for p in with_grad:
                        directions[id(p)] = torch.empty_like(p.grad)
                    sent.setdefault(self._owner_of[name], []).extend(directions[id(p)] for p in with_grad)
                continue
            if "A" not in state or module.weight.grad is None:
                continue
            has_bias = module.bias is not None
            blocks = gradient_blocks(module, self.group_average)
            nats = from_matrix_blocks(module, precondition(state, blocks, self.inverse_dtype), has_bias)
            for p, d in zip((module.weight, module.bias), nats):
                if p is not None and p.grad is not None:  # SGD's direction until factors entered
                    directions[id(p)] = torch.where(state["absorbed"], d, p.grad)
                    if self._owner_of is not None:
                        sent.setdefault(self._owner_of[name], []).append(directions[id(p)])
        if sent:
            broadcast_from_owners(sent)
        if self.kl_clip is not None:  # over the directions of the optimizer's parameters
            lr_of = {id(p): (p, group["lr"]) for group in self.param_groups for p in group["params"]}
            mine = [(d, *lr_of[i]) for i, d in directions.items() if i in lr_of]
            kl_clip_([d for d, _, _ in mine], [p.grad for _, p, _ in mine], [lr for *_, lr in mine], self.kl_clip)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            steps = [directions[id(p)] if id(p) in directions else p.grad.clone() for p in params]
            buffers = momentum_buffers(self.state, params, group["momentum"])
            apply_updates_(params, steps, buffers, lr=group["lr"], momentum=group["momentum"],
                           weight_decay=group["weight_decay"], ok=ok)
        self._deferred.post(torch.stack([~scaler_ok, ~ok]), partial(_warn_skipped, step=self.steps))
        self.steps += 1
        return loss

    def _unscale(self, grads: list[Tensor]) -> Tensor:
        """Undo a GradScaler's loss scale on gradients (1/s) and pending G (1/s²).

        Returns the 0-d bool "the scaler found no inf/NaN" (true without a scaler). Reading
        the scale is the step's one host sync with a GradScaler.
        """
        device = self.param_groups[0]["params"][0].device
        ok = torch.ones((), dtype=torch.bool, device=device)
        scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        loss_scale, self._loss_scale = self._loss_scale, None
        if found_inf is not None:
            ok = found_inf.to(device) == 0
        if scale is None and found_inf is None:
            return ok  # no GradScaler
        if scale is None:  # GradScaler.unscale_ ran (gradient clipping): G still carries s²
            if loss_scale is None:
                raise RuntimeError(
                    "GradScaler.unscale_() ran on this optimizer before step(), so the loss scale of the "
                    "pending statistics is unknown: call opt.set_current_grad_scale(scaler.get_scale()) "
                    "before scaler.step(opt).")
            inv = 1.0 / loss_scale
        else:
            inv = 1.0 / float(scale)
            if grads:
                torch._foreach_mul_(grads, inv)
        for pending in self._pending.values():
            pending.scale_G_(inv**2)
        return ok

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state; sharded (collective): every rank's layers, on every rank."""
        state = super().state_dict()
        pending = {n: p.state() for n, p in self._pending.items()}
        layers = {n: dict(s) for n, s in self.kfac_state.items()}
        if self._owner_of is not None:
            device = next(iter(self.layers.values())).weight.device
            owned = {n: s for n, s in layers.items() if self._owns(n)}
            layers = gather_layer_states({"layers": owned}, list(self.layers), device)["layers"]
        state["kfac"] = {"steps": self.steps, "layers": layers,
                         "pending": pending}  # a checkpoint between backward() and step() resumes exactly
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        kfac = state_dict.pop("kfac", None)
        if kfac is None:
            raise ValueError("State dict has no 'kfac' entry: not a kfac_tn.KFAC state.")
        if set(kfac["layers"]) != set(self.kfac_state):
            raise ValueError(
                f"State dict is for other layers: it has {sorted(kfac['layers'])}, this optimizer "
                f"{sorted(self.kfac_state)}."
            )
        for name, layer_state in kfac["layers"].items():
            if "A" in layer_state:
                groups = num_blocks(self.layers[name], self.group_average)
                expected = [(groups, b, b) if n == 1 else (groups, n, b, b) for n, b in self.factor_blocks[name]]
                found = [tuple(layer_state[k].shape) for k in ("A", "G")]
                if found != expected:
                    raise ValueError(
                        f"State dict factors of layer {name!r} have shapes {found}; this optimizer keeps "
                        f"{expected} (its layer shape and max_factor_dim={self.max_factor_dim}).")
        super().load_state_dict(state_dict)
        self.steps = kfac["steps"]
        self.kfac_state = {
            name: {k: v.to(self.layers[name].weight.device) for k, v in s.items()} for name, s in kfac["layers"].items()
        }
        if self._owner_of is not None:  # sharded: keep the layers this rank owns
            self._factored = {name for name, s in self.kfac_state.items() if "A" in s}
            self.kfac_state = {name: (s if self._owns(name) else {}) for name, s in self.kfac_state.items()}
        # inverses of the other method (a state saved with another inverse_method, e.g. eigh, the
        # default before 0.2) are dropped: this optimizer inverts its own at the next step
        other = {k for method, keys in INVERSE_KEYS.items() if method != self.inverse_method for k in keys}
        for layer_state in self.kfac_state.values():
            for key in other & set(layer_state):
                del layer_state[key]
        for layer_state in self.kfac_state.values():  # states saved before the flag existed
            if "A" in layer_state and "absorbed" not in layer_state:
                layer_state["absorbed"] = torch.ones((), dtype=torch.bool, device=layer_state["A"].device)
        self._pending = {
            name: FactorSums.from_state(p, self.loss_average is not None, self.layers[name].weight.device)
            for name, p in kfac.get("pending", {}).items()
        }
