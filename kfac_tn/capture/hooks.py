"""Capture layer inputs and output gradients with hooks, only when statistics are due.

A forward hook on each watched module keeps a detached alias of the input (autograd
holds it anyway for the weight gradient) and registers a tensor hook on the output,
so the callback sees ``(name, module, input, grad_output)`` during the backward pass.
Tensor hooks, not module backward hooks, so in-place activations after the layer
(``ReLU(inplace=True)``) work. Nothing is captured under ``torch.no_grad()``, in eval
mode, from an empty batch, or when ``is_due`` says no; nothing is kept after the callback ran.
An unbatched call (one sample without its batch dimension, as torch allows) is a batch of one.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

Callback = Callable[[str, nn.Module, Tensor, Tensor], None]

class LayerCapture:
    """Hooks on named modules that call ``on_backward(name, module, x, grad_output)`` in
    every backward pass through a call of a module (``x`` is the call's input, detached;
    the same tensor object for every backward pass through that call). Nothing is
    captured under ``torch.no_grad()``, in eval mode (unless ``training_only=False``) or
    when ``is_due(name, module)`` says no.

    The hooks hold only weak references to the callbacks' owner (the optimizer): a
    model never keeps an optimizer alive, and once the optimizer is gone its hooks
    remove themselves at the next forward pass. They fire only for the very modules
    they were registered for: a ``copy.deepcopy`` of the model carries copies of the
    hooks, which ignore the copied modules.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        on_backward: Callback,
        is_due: Callable[[str, nn.Module], bool] = lambda name, module: True,
        training_only: bool = True,
    ) -> None:
        self._on_backward = _weak(on_backward)
        self._training_only = training_only
        self._is_due = _weak(is_due)
        self._module_ids = {name: id(module) for name, module in modules.items()}
        #: layers whose forward() has run at least once (others are only used functionally)
        self.seen: set[str] = set()
        #: whether the latest training forward ran inside DistributedDataParallel with gradient
        #: synchronisation on: its backward averaged the gradients over the ranks
        self.ddp_synced = False
        self.handles: list[RemovableHandle] = [
            module.register_forward_hook(self._forward_hook(name)) for name, module in modules.items()
        ]

    def _forward_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if id(module) != self._module_ids[name]:
                return  # a deep copy of the model: not ours to watch
            on_backward, is_due = self._on_backward(), self._is_due()
            if on_backward is None or is_due is None:  # the optimizer is gone
                self.remove()
                return
            self.seen.add(name)
            if not torch.is_grad_enabled() or (self._training_only and not module.training):
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            ddp = getattr(DistributedDataParallel, "_active_ddp_module", None)
            # whether DDP all-reduces the gradients of this forward's backward (not in no_sync())
            self.ddp_synced = ddp is not None and ddp.require_backward_grad_sync
            if not is_due(name, module):
                return
            if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
                raise ValueError(f"Layer {name!r} must be called with exactly one tensor input.")
            x = inputs[0].detach()
            if x.numel() == 0:  # an empty batch: no samples, no statistics (the step goes on)
                return
            unbatched = _unbatched(module, x)
            if unbatched:  # one sample without a batch dimension, as torch allows: a batch of one
                x = x.unsqueeze(0)
            callback = self._on_backward

            def tensor_hook(grad_output: Tensor) -> None:
                live = callback()
                if live is not None:
                    g = grad_output.detach()
                    live(name, module, x, g.unsqueeze(0) if unbatched else g)

            output.register_hook(tensor_hook)

        return torch.compiler.disable(hook)  # eager under torch.compile: no guards on optimizer state

    def remove(self) -> None:
        """Remove all hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def _unbatched(module: nn.Module, x: Tensor) -> bool:
    """Whether ``x`` is one sample without its batch dimension: ``[d_in]`` for a Linear,
    ``[C, *spatial]`` for an N-d (transposed) convolution, whose weight has N + 2 dimensions."""
    if isinstance(module, nn.Linear):
        return x.dim() == 1
    weight = getattr(module, "weight", None)
    return isinstance(module, nn.modules.conv._ConvNd) and weight is not None and x.dim() == weight.dim() - 1


def _weak(function: Callable) -> Callable[[], Callable | None]:
    """A weak reference to a bound method (a strong one to any other callable)."""
    if hasattr(function, "__self__") and hasattr(function, "__func__"):
        return weakref.WeakMethod(function)
    return lambda: function
