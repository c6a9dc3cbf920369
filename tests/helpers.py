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


def kfac_test_model() -> nn.Module:
    """float64 Conv2d + grouped ConvTranspose2d + Linear (A of 28, 9 per group and 201 rows;
    G of 4, 1 and 5), seeded: the KFAC tests' network."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(4, 2, 2, stride=2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * 10 * 10, 5),
    ).double()


def kfac_test_batch(seed: int = 1) -> tuple[Tensor, Tensor]:
    """A float64 batch ``[6, 3, 5, 5]`` and 5-class labels for :func:`kfac_test_model`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 5, (6,), generator=gen)


def block_mask(d: int, max_dim: int | None) -> Tensor:
    """``[d, d]`` bool: the entries inside the documented diagonal blocks of a factor with
    ``d`` rows under ``max_factor_dim = max_dim`` (``n = ⌈d / max⌉`` blocks of ``⌈d / n⌉``, the
    last one shorter; all true for ``None`` or ``d ≤ max``)."""
    if max_dim is None or d <= max_dim:
        return torch.ones(d, d, dtype=torch.bool)
    n = -(-d // max_dim)
    which = torch.arange(d) // -(-d // n)
    return which[:, None] == which[None, :]
