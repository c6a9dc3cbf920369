"""Which layers of a model an optimizer or analysis preconditions: one rule for all."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from kfac_tn.factors import SUPPORTED_LAYERS


def supported_layers(model: nn.Module, params: Iterable[nn.Parameter] | None = None) -> dict[str, nn.Module]:
    """``{name: layer}`` of the supported layers (Linear, Conv*, ConvTranspose*) whose weight
    is trained: among ``params`` (by identity) if given, else ``requires_grad``. A layer whose
    weight is not trained (frozen, BitFit) is left out: its bias takes plain steps."""
    if params is None:
        trained = {id(p) for p in model.parameters() if p.requires_grad}
    else:
        trained = {id(p) for p in params}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, SUPPORTED_LAYERS) and id(m.weight) in trained}


def supported_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of the supported layers (the optimizers' default ``params``;
    a trainable bias of a frozen weight is included: it takes plain steps)."""
    return [p for m in model.modules() if isinstance(m, SUPPORTED_LAYERS)
            for p in m.parameters(recurse=False) if p.requires_grad]


def unsupported_layers(model: nn.Module) -> list[str]:
    """``"name (Type)"`` of every module that has trainable parameters of its own but is not
    a supported layer (BatchNorm, LayerNorm, embeddings, ...): the optimizers do not train them."""
    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules()
            if not isinstance(m, SUPPORTED_LAYERS) and any(p.requires_grad for p in m.parameters(recurse=False))]
