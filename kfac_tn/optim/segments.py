"""Segment bookkeeping shared by the pre-conditioner banks.

A bank stores the K and C factors of many layers in shared buffers; each factor (of one
channel group) is a *segment*. The update needs, per step, a device mask of the
segments of the layers that have statistics; it is built once per set of layers.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Segments:
    """Segments of layers: ``first[name]`` and ``count[name]`` in ``0..total``."""

    def __init__(self, device: torch.device) -> None:
        self.first: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self.total = 0
        self.device = device
        self._masks: dict[frozenset, Tensor] = {}

    def add(self, name: str, count: int) -> int:
        """Register ``count`` segments of layer ``name``; returns the first one's index."""
        self.first[name], self.count[name] = self.total, count
        self.total += count
        return self.first[name]

    def mask(self, names: frozenset[str]) -> Tensor:
        """Bool ``[total]`` on the device: the segments of ``names`` (cached per set)."""
        mask = self._masks.get(names)
        if mask is None:
            host = torch.zeros(self.total, dtype=torch.bool)
            for name in names:
                host[self.first[name] : self.first[name] + self.count[name]] = True
            mask = self._masks[names] = host.to(self.device)
        return mask

    def flagged(self, flags: list[bool]) -> list[str]:
        """Layers with any segment flagged in ``flags`` (a host list of length ``total``)."""
        return [name for name, first in self.first.items() if any(flags[first : first + self.count[name]])]
