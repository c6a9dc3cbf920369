"""Hyper-parameter checks that raise a ``ValueError`` naming the argument."""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Real
from typing import Any

import torch


def non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}.")


def in_unit_interval(name: str, value: Any, closed_right: bool = False) -> None:
    """``0 <= value < 1`` (or ``<= 1`` with ``closed_right``)."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and 0 <= value and (
        value <= 1 if closed_right else value < 1
    )
    if not ok:
        bound = "]" if closed_right else ")"
        raise ValueError(f"{name} must lie in [0, 1{bound}, got {value!r}.")


def fraction(name: str, value: Any) -> None:
    """``0 < value <= 1``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}.")


def check_sharding(shard_preconditioner: Any, update_worker_fraction: float) -> None:
    """``shard_preconditioner`` is a bool and excludes ``update_worker_fraction < 1``."""
    if not isinstance(shard_preconditioner, bool):
        raise ValueError(f"shard_preconditioner must be True or False, got {shard_preconditioner!r}.")
    if shard_preconditioner and update_worker_fraction != 1.0:
        raise ValueError("shard_preconditioner=True updates each layer on its owner only; it excludes "
                         "update_worker_fraction (leave it at 1.0).")


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")


def one_of(name: str, value: Any, options: Iterable[Any]) -> None:
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}.")


def check_model(model: Any) -> None:
    """TypeError unless ``model`` is an ``nn.Module`` (a common slip: its parameters)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"The first argument must be the model (an nn.Module), got {type(model).__name__}: pass "
            "the model itself, e.g. SINGD(model) or KFAC(model, params=model.parameters()); the "
            "optimizer needs its layers to place hooks."
        )


def unwrap_model(model: Any) -> Any:
    """The module whose layers the optimizer hooks: inside a ``torch.compile`` wrapper (its
    layers' names lose ``_orig_mod.``) and a ``DistributedDataParallel`` wrapper (they lose
    ``module.``), so states move between wrapped and plain models. DataParallel and
    FullyShardedDataParallel are rejected with what to use instead."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    for _ in range(3):  # compile(DDP(model)), DDP(compile(model)), ...
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
        elif isinstance(model, DistributedDataParallel):
            model = model.module
    if isinstance(model, DataParallel):
        raise TypeError(
            "DataParallel is not supported (its per-forward replicas bypass the optimizer's hooks): "
            "use DistributedDataParallel (one process per GPU), or the plain model with every process "
            "holding a replica."
        )
    if type(model).__name__ == "FullyShardedDataParallel" or hasattr(model, "_fsdp_wrapped_module"):
        raise TypeError(
            "FullyShardedDataParallel is not supported: its sharded, flattened parameters have no "
            "layer shapes to precondition. Use DistributedDataParallel or the plain model (every "
            "process holds a replica; the optimizer all-reduces statistics)."
        )
    return model


def check_layout(name: str, module: Any, expected: tuple) -> None:
    """RuntimeError if a layer's weight moved to another device/dtype after construction."""
    now = (module.weight.device, module.weight.dtype)
    if now != expected:
        raise RuntimeError(
            f"Layer {name!r} moved from {expected[0]}/{expected[1]} to {now[0]}/{now[1]} after the "
            "optimizer was built: build the optimizer after moving the model (and load the old "
            "optimizer's state_dict into the new one if needed)."
        )


def singd_hyperparameters(
    *, lr, momentum, damping, alpha1, weight_decay, T, lr_cov, structures, kfac_approx,
    loss_average, supported_structures, init_grad_scale=1.0,
) -> None:
    """ValueError naming the first invalid hyper-parameter of SINGD (singd 0.0.5's arguments)."""
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
