"""Scratch memory reused across calls, so hot loops do not allocate (and fault in) pages.

Temporaries of the factor and pre-conditioner code (unfolded chunks, transposed
gradients, products) are short-lived and of a few recurring sizes. A :class:`Workspace`
hands out views of one flat buffer per device and dtype, front to back; :meth:`reset`
makes the whole buffer available again (previously handed-out views must be dead by
then), :meth:`release` frees it. A request that does not fit gets a fresh buffer large
enough for everything handed out since the last reset, which the next reset adopts.
The largest amount ever in use is remembered across :meth:`release`, so that the first
buffer after a release is allocated (and its pages faulted in) once, at full size.
"""

from __future__ import annotations

from math import prod

import torch
from torch import Tensor


class Workspace:
    """Bump allocator over flat per-(device, dtype) buffers; see the module docstring."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._used: dict[tuple[torch.device, torch.dtype], int] = {}
        self._high_water: dict[tuple[torch.device, torch.dtype], int] = {}

    def take(self, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialized contiguous tensor of ``shape`` with ``like``'s device and dtype
        (or ``dtype``)."""
        key = (like.device, dtype or like.dtype)
        numel = prod(shape)
        used = self._used.get(key, 0)
        buffer = self._buffers.get(key)
        if buffer is None or used + numel > buffer.numel():
            # keep handed-out views valid: a new, larger buffer for this and later requests
            buffer = like.new_empty(max(used + numel, self._high_water.get(key, 0)), dtype=key[1])
            self._buffers[key] = buffer
        self._used[key] = used + numel
        self._high_water[key] = max(self._high_water.get(key, 0), used + numel)
        return buffer[used : used + numel].view(shape)

    def in_use(self) -> list[Tensor]:
        """The handed-out parts of the current buffers (flat views), one per device/dtype."""
        return [self._buffers[key][:used] for key, used in self._used.items() if used]

    def reset(self) -> None:
        """Make every buffer available again (views handed out before must be dead)."""
        self._used.clear()

    def release(self) -> None:
        """Free all buffers (their high-water marks are kept)."""
        self._buffers.clear()
        self._used.clear()
