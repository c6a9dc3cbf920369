"""KFAC factors of one step's backward passes, combined as the whole batch would give them.

Uses of a layer within one backward pass (weight sharing, a siamese network) count like
positions of one call, as in curvlinops' KFAC: their A averaged, their G summed.

Backward passes before one step (gradient accumulation) are micro-batches ``i`` of
``B_i`` samples of one batch of ``N = Σ B_i``. With ``A_i``, ``G_i`` the factors of pass
``i`` (scaled for its own micro-batch, see :func:`kfac_tn.grad_output_factor`)::

    A = Σ_i B_i A_i / N,        G = r(N) Σ_i G_i / r(B_i),

``r(B) = B`` for an averaged loss (``loss_average`` set), ``1`` for a summed one. These
are exactly the factors of one pass over the whole batch of the loss whose gradient was
accumulated, whenever every micro-batch's loss weights its samples alike: ``sum_i / N``
(any sizes), ``mean_i / k`` or ``mean_i`` with equal sizes, ``sum_i`` for a summed loss.
(``mean_i`` over micro-batches of unequal sizes weights samples unequally; no one batch
has that gradient.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def backward_pass_id() -> int | None:
    """Id of the running backward pass (the autograd graph task), None if unknown."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current() if current is not None else None


class FactorSums:
    """Pending A, G of one layer, ``[groups, d, d]`` each, until the optimizer's step.

    Args:
        averaged_loss: whether the loss averages over the batch (``r(B) = B``), see above.
    """

    def __init__(self, averaged_loss: bool) -> None:
        self.averaged_loss = averaged_loss
        self.A: Tensor | float = 0.0  # Σ_i B_i A_i
        self.G: Tensor | float = 0.0  # Σ_i G_i / r(B_i)
        self.samples = 0  # N
        self._pass: dict[str, Any] | None = None  # the running backward pass

    def _r(self, batch: float) -> float:
        return float(batch) if self.averaged_loss else 1.0

    def add(self, A: Tensor, G: Tensor, batch: int) -> None:
        """Add the factors of one call of the layer on a batch of ``batch`` samples."""
        task = backward_pass_id()
        if self._pass is None or self._pass["task"] != task or task is None:
            self.fold()
            self._pass = {"task": task, "A": 0.0, "G": 0.0, "batch": 0, "calls": 0}
        p = self._pass
        p["A"], p["G"] = p["A"] + A, p["G"] + G
        p["batch"] += batch
        p["calls"] += 1

    def fold(self) -> None:
        """Close the running backward pass (its calls: A averaged, G summed)."""
        p, self._pass = self._pass, None
        if p is None:
            return
        batch = p["batch"] / p["calls"]
        self.A = self.A + p["A"] * (batch / p["calls"])
        self.G = self.G + p["G"] / self._r(batch)
        self.samples += batch

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, G)`` of all passes so far, as one batch of ``N`` samples."""
        self.fold()
        return self.A / self.samples, self.G * self._r(self.samples)

    def replace(self, A: Tensor, G: Tensor) -> None:
        """Make ``(A, G)`` the factors (e.g. after an all-reduce), keeping ``N``."""
        self.fold()
        self.A, self.G = A * self.samples, G / self._r(self.samples)

    def scale_G_(self, factor: float) -> None:
        """Multiply G by ``factor`` (e.g. 1/s² for a GradScaler's loss scale s)."""
        self.fold()
        self.G = self.G * factor

    def state(self) -> dict[str, Any]:
        self.fold()
        return {"A": self.A, "G": self.G, "samples": self.samples}

    @classmethod
    def from_state(cls, state: dict[str, Any], averaged_loss: bool, device: torch.device) -> FactorSums:
        sums = cls(averaged_loss)
        if "samples" not in state:  # saved by a version that averaged the passes' factors
            sums.samples = state["count"]
            sums.replace(state["A"].to(device) / state["count"], state["G"].to(device) / state["count"])
            return sums
        sums.A, sums.G, sums.samples = state["A"].to(device), state["G"].to(device), state["samples"]
        return sums
