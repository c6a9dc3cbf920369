"""KFAC's Kronecker factors (A, G) of a model on one batch: an analysis API.

Conventions are those of curvlinops' ``KFACLinearOperator`` built with
``separate_weight_and_bias=False`` (A carries the bias as its last row/column), extended
to every layer kind of :data:`kfac_tn.SUPPORTED_LAYERS`; A and G are shaped
``[blocks, d, d]`` as :func:`kfac_tn.input_factor` returns them (one block per channel
group, or one with ``group_average=True``, curvlinops' convention for grouped convs).
"""

from __future__ import annotations

from math import sqrt

import torch
from torch import Tensor, nn

from kfac_tn.capture import LayerCapture, supported_layers
from kfac_tn.factors import grad_output_factor, input_factor
from kfac_tn.factors.layers import as_called

FISHER_TYPES = ("empirical", "type-2", "mc")
LOSSES = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)
DEFAULT_SEED = 2147483647  # curvlinops' default, so MC samples agree with it


def _validate(loss_func: nn.Module, approx: str, fisher: str, mc_samples: int) -> None:
    if not isinstance(loss_func, LOSSES):
        raise TypeError(
            f"Unsupported loss {type(loss_func).__name__}; use MSELoss, CrossEntropyLoss or BCEWithLogitsLoss."
        )
    if loss_func.reduction not in ("mean", "sum"):
        raise ValueError(f"loss reduction must be 'mean' or 'sum', got {loss_func.reduction!r}.")
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}.")
    if fisher not in FISHER_TYPES:
        raise ValueError(f"fisher must be one of {FISHER_TYPES}, got {fisher!r}.")
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}.")


def _as_rows(loss_func: nn.Module, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten extra output axes into rows: ``[N·P, C]`` (classes on axis 1 for CE)."""
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return output.movedim(1, -1).reshape(-1, output.shape[1]), target.reshape(-1)
    return output.reshape(-1, output.shape[-1]), target.reshape(-1, target.shape[-1])


def _hessian_sqrt(loss_func: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    """Per-row S with S Sᵀ = ∇²_f loss of that row (reduction 'sum' per row), ``[R, C, C]``."""
    R, C = output.shape
    c = 1.0 / C if loss_func.reduction == "mean" and not isinstance(loss_func, nn.CrossEntropyLoss) else 1.0
    if isinstance(loss_func, nn.MSELoss):
        return torch.eye(C, dtype=output.dtype, device=output.device).expand(R, C, C) * sqrt(2 * c)
    if isinstance(loss_func, nn.CrossEntropyLoss):
        p = output.softmax(dim=1)
        return torch.diag_embed(p.sqrt()) - p.unsqueeze(2) * p.sqrt().unsqueeze(1)
    if not set(target.unique().tolist()) <= {0, 1}:
        raise NotImplementedError("type-2 with BCEWithLogitsLoss needs binary targets (0 or 1).")
    p = output.sigmoid()
    return torch.diag_embed((p * (1 - p)).sqrt() * sqrt(c))


def _sample_labels(loss_func: nn.Module, output: Tensor, generator: torch.Generator) -> Tensor:
    """A label from the model's predictive distribution (as curvlinops draws it)."""
    if isinstance(loss_func, nn.MSELoss):
        noise = torch.randn(output.shape, device=output.device, dtype=output.dtype, generator=generator)
        return output.detach() + sqrt(0.5) * noise
    if isinstance(loss_func, nn.CrossEntropyLoss):
        return output.softmax(dim=1).multinomial(num_samples=1, generator=generator).squeeze(-1)
    return output.sigmoid().bernoulli(generator=generator)


def _adjusted_loss(loss_func: nn.Module, output: Tensor, target: Tensor) -> Tensor:
    loss = loss_func(output, target)
    if isinstance(loss_func, (nn.MSELoss, nn.BCEWithLogitsLoss)) and loss_func.reduction == "mean":
        loss = loss * sqrt(output.shape[1])  # these losses also average over outputs
    return loss


def kfac_factors(
    model: nn.Module,
    loss_func: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    approx: str = "expand",
    fisher: str = "empirical",
    mc_samples: int = 1,
    group_average: bool = False,
    seed: int = DEFAULT_SEED,
) -> dict[str, tuple[Tensor, Tensor]]:
    """KFAC factors of every supported layer of ``model`` on the batch ``(inputs, targets)``.

    Args:
        model: the network; its supported layers (Linear, Conv*, ConvTranspose*) with a
            trainable weight get factors (the optimizers' rule, ``capture.supported_layers``).
        loss_func: ``MSELoss``, ``CrossEntropyLoss`` or ``BCEWithLogitsLoss`` with
            ``reduction`` ``'mean'`` or ``'sum'``.
        inputs, targets: one batch; outputs with extra axes (e.g. per position) are
            flattened into rows, each row one loss term.
        approx: ``"expand"`` or ``"reduce"``.
        fisher: ``"empirical"`` (gradients of the loss), ``"type-2"`` (exact GGN via the
            loss Hessian's square root) or ``"mc"`` (``mc_samples`` labels sampled from
            the model's predictive distribution, with a generator seeded by ``seed``).
        group_average: one shared block per grouped convolution (curvlinops' convention).

    Returns:
        ``{module name: (A, G)}`` with A ``[blocks, d_in(+1), d_in(+1)]`` and
        G ``[blocks, d_out, d_out]``.
    """
    _validate(loss_func, approx, fisher, mc_samples)
    modules = supported_layers(model)
    if not modules:
        raise ValueError("The model has no supported layers with trainable parameters.")
    A: dict[str, Tensor] = {}
    G: dict[str, Tensor] = {}
    inputs_seen: dict[int, Tensor] = {}  # id(x) -> x of every call whose A was added

    def on_backward(name: str, module: nn.Module, x: Tensor, grad_output: Tensor) -> None:
        module = as_called(module, x, grad_output.shape)  # e.g. a ConvTranspose called with output_size=
        if id(x) not in inputs_seen:  # A once per call (several backward passes for type-2 / MC)
            inputs_seen[id(x)] = x
            a = input_factor(module, x, approx, group_average)
            A[name] = A[name] + a if name in A else a
        g = grad_output_factor(module, grad_output, approx, None, group_average)
        G[name] = G[name] + g if name in G else g

    capture = LayerCapture(modules, on_backward, training_only=False)  # analysis: eval mode too
    params = [p for m in modules.values() for p in m.parameters(recurse=False) if p.requires_grad]
    try:
        output = model(inputs)
        rows, target_rows = _as_rows(loss_func, output, targets)
        N = inputs.shape[0]
        terms = rows.shape[0]
        if terms % N:
            raise ValueError(f"{terms} loss terms are not divisible by the batch size {N}.")
        per_example = terms // N
        samples = 1
        if fisher == "empirical":
            torch.autograd.grad(_adjusted_loss(loss_func, rows, target_rows), params)
        elif fisher == "type-2":
            sqrt_h = _hessian_sqrt(loss_func, rows.detach(), target_rows)
            if loss_func.reduction == "mean":
                sqrt_h = sqrt_h / terms
            for c in range(sqrt_h.shape[-1]):
                torch.autograd.grad((rows * sqrt_h[:, :, c]).sum(), params, retain_graph=c < sqrt_h.shape[-1] - 1)
        else:
            samples = mc_samples
            generator = torch.Generator(device=rows.device).manual_seed(seed)
            for i in range(mc_samples):
                labels = _sample_labels(loss_func, rows, generator)
                torch.autograd.grad(_adjusted_loss(loss_func, rows, labels), params, retain_graph=i < mc_samples - 1)
    finally:
        capture.remove()
    correction = 1.0 / samples if loss_func.reduction == "sum" else terms**2 / (N * samples * per_example)
    return {name: (A[name], G[name] * correction) for name in modules if name in A and name in G}
