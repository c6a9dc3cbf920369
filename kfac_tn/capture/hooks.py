"""Capture layer inputs and output gradients with hooks, only when statistics are due.

A forward hook on each watched module keeps a detached alias of the input (autograd
holds it anyway for the weight gradient) and registers a tensor hook on the output,
so the callback sees ``(name, module, input, grad_output)`` during the backward pass.
Tensor hooks, not module backward hooks, so in-place activations after the layer
(``ReLU(inplace=True)``) work. Nothing is captured under ``torch.no_grad()``, in eval
mode, or when ``is_due`` says no; nothing is kept after the callback ran.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

Callback = Callable[[str, nn.Module, Tensor, Tensor], None]


class LayerCapture:
    """Hooks on named modules that call ``on_backward`` with input and grad_output."""

    def __init__(
        self,
        modules: dict[str, nn.Module],
        on_backward: Callback,
        is_due: Callable[[str, nn.Module], bool] = lambda name, module: True,
    ) -> None:
        self._on_backward = on_backward
        self._is_due = is_due
        self.handles: list[RemovableHandle] = [
            module.register_forward_hook(self._forward_hook(name)) for name, module in modules.items()
        ]

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not (torch.is_grad_enabled() and module.training):
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            if not self._is_due(name, module):
                return
            if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
                raise ValueError(f"Layer {name!r} must be called with exactly one tensor input.")
            x = inputs[0].detach()

            def tensor_hook(grad_output: Tensor) -> None:
                self._on_backward(name, module, x, grad_output.detach())

            output.register_hook(tensor_hook)

        return hook

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
