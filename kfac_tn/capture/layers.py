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
