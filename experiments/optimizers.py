"""Build an optimizer by name; parameters it cannot precondition go to a fallback SGD.

Names: ``sgd``, ``singd_stock`` (singd 0.0.5), ``singd_tn`` (kfac_tn.SINGD) and
``kfac`` (kfac_tn.KFAC). BatchNorm and any other parameters of
layers without Kronecker factors are trained by ``torch.optim.SGD`` with the same
``lr``, ``momentum`` and ``weight_decay`` (the *fallback*, documented in the README).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

OPTIMIZERS = ("sgd", "singd_stock", "singd_tn", "kfac")
#: the type of every optimizer argument an experiment config may set (the one schema of the
#: training and comparison configs); which ones an optimizer takes: :func:`optimizer_arguments`
HYPERPARAMETER_TYPES = {
    "lr": (int, float), "momentum": (int, float), "weight_decay": (int, float), "damping": (int, float),
    "alpha1": (int, float), "T": int, "loss_average": str, "lr_cov": (int, float), "structures": list,
    "kfac_approx": str, "kfac_like": bool, "normalize_lr_cov": bool, "init_grad_scale": (int, float),
    "grouped_conv": str, "natural_gradient_cache": str, "update_worker_fraction": (int, float),
    "ema_decay": (int, float), "pi_damping": bool, "factor_update_freq": int, "inverse_update_freq": int,
    "inverse_method": str, "kl_clip": (int, float), "subsample": (int, float),
    "shard_preconditioner": bool, "max_factor_dim": int, "max_dense_dim": int, "large_structure": str,
}


class Combined:
    """A preconditioning optimizer plus the fallback SGD, stepped together."""

    def __init__(self, main: torch.optim.Optimizer, fallback: torch.optim.Optimizer | None) -> None:
        self.main, self.fallback = main, fallback
        self.optimizers = [o for o in (main, fallback) if o is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "fallback": self.fallback.state_dict() if self.fallback else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        if self.fallback is not None:
            self.fallback.load_state_dict(state["fallback"])


def optimizer_class(name: str) -> type:
    """The class behind an optimizer name (``sgd``: ``torch.optim.SGD``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; available: {OPTIMIZERS}.")
    if name == "sgd":
        return torch.optim.SGD
    if name == "singd_stock":
        from singd.optim.optimizer import SINGD
        return SINGD
    import kfac_tn

    return kfac_tn.SINGD if name == "singd_tn" else kfac_tn.KFAC


def optimizer_arguments(name: str) -> set[str]:
    """The hyper-parameters optimizer ``name`` takes (its constructor's keyword arguments)."""
    import inspect

    skip = {"self", "model", "params", "warn_unsupported", "foreach", "maximize", "differentiable", "fused",
            "dampening", "nesterov"}
    return {n for n in inspect.signature(optimizer_class(name).__init__).parameters if n not in skip}


def build_optimizer(model: nn.Module, name: str, foreach: bool | None = None, **kwargs: Any) -> Combined:
    """Optimizer ``name`` with hyper-parameters ``kwargs`` (its own argument names).

    ``foreach`` is passed to the ``torch.optim.SGD`` of ``sgd`` and of the fallback
    (None: torch's default, ``foreach`` kernels on CUDA, per-tensor loops on a CPU).
    """
    cls = optimizer_class(name)
    lr = kwargs.get("lr", 0.01)
    sgd_kwargs = {k: kwargs[k] for k in ("momentum", "weight_decay") if k in kwargs}
    sgd_kwargs["foreach"] = foreach
    if name == "sgd":
        return Combined(torch.optim.SGD(model.parameters(), lr=lr, **sgd_kwargs), None)
    if "structures" in kwargs:
        kwargs["structures"] = tuple(kwargs["structures"])
    main = cls(model, warn_unsupported=False, **kwargs)
    covered = {id(p) for g in main.param_groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in covered]
    fallback = torch.optim.SGD(rest, lr=lr, **sgd_kwargs) if rest else None
    return Combined(main, fallback)
