"""Warnings attributed to the user's line, not to kfac_tn's or torch's internals."""

from __future__ import annotations

import os
import sys
import warnings

import torch

_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(module.__file__)) + os.sep
    for module in (sys.modules["kfac_tn"], torch)
)


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` at the innermost calling frame outside kfac_tn and torch (e.g. the
    user's ``opt.step()``, also when the warning is raised from deferred device flags)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)


def unsupported_message(layers: list[str]) -> str:
    """The warning for trainable parameters of layers without Kronecker factors."""
    return (f"Found un-supported parameter(s) that this optimizer does not train, in layer(s) "
            f"{', '.join(layers)}. Train them with a second optimizer stepped next to this one, e.g. "
            "torch.optim.SGD([p for p in model.parameters() if all(p is not q for g in opt.param_groups "
            "for q in g['params'])], lr=...); or pass warn_unsupported=False to silence this warning.")


def warn_non_finite(names: list[str], step: int) -> None:
    """One warning per layer (named once) whose update was skipped for its statistics."""
    for name in dict.fromkeys(names):
        warn_user(f"Non-finite curvature statistics in layer {name!r} at step {step}; skipping "
                  "its pre-conditioner update (K, C and their momenta are unchanged).")
