"""Helpers shared by the tests: a parameter vector, a training loop, labelled data."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def flat_parameters(model: nn.Module) -> Tensor:
    """All parameters of ``model`` as one detached vector."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def train(model: nn.Module, opt, X: Tensor, y: Tensor, steps: int = 1) -> Tensor:
    """``steps`` steps of ``opt`` on the mean cross-entropy of ``(X, y)``; the parameters after."""
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return flat_parameters(model)


def labelled_data(
    shape: tuple[int, ...], classes: int = 5, seed: int = 1, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Inputs of ``shape`` (drawn in float32, then cast to ``dtype``) and labels in
    ``range(classes)`` from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype), torch.randint(0, classes, (shape[0],), generator=gen)


def watch_layer(module: nn.Module) -> tuple[dict, object]:
    """Record ``module``'s input (``seen["x"]``) and output gradient (``seen["g"]``) of the
    next forward/backward; returns ``(seen, hook handle)``."""
    seen: dict = {}

    def watch(module, inputs, output):
        seen["x"] = inputs[0]
        output.register_hook(lambda g: seen.update(g=g))

    return seen, module.register_forward_hook(watch)


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` after the gloo worker threads dropped their finished
    work. torch 2.13 can deadlock otherwise: the group's destructor joins those threads while
    holding the GIL, and a thread destroying its last work item waits for the GIL. Drop DDP
    wrappers (they hold the group too) before calling this."""
    import gc
    import time

    import torch.distributed as dist

    gc.collect()
    time.sleep(0.1)  # releases the GIL: the worker threads finish destroying their work
    dist.destroy_process_group()
