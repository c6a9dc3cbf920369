"""Device flags read on the host later, without draining the GPU queue.

The optimizers decide on the device whether a step or a block's update is skipped
(``torch.where`` on a flag), so a step needs no host sync. What the user should hear
about (a skipped step, a layer with non-finite statistics) is copied to host memory
asynchronously (pinned memory, ``non_blocking=True``) with an event, and reported as
soon as the event has completed: on a CPU at once, on a GPU at the latest in a later
step, or when :meth:`DeferredFlags.flush` is called. Inside a CUDA graph capture nothing is
copied or queried (either would break the capture): the skips still happen on the device,
but replays of the graph report none.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class DeferredFlags:
    """A queue of ``(host copy, event, callback)``; callbacks run once the copy landed."""

    def __init__(self) -> None:
        self._pending: list[tuple[Tensor, torch.cuda.Event | None, Callable[[list], None]]] = []

    def post(self, flags: Tensor, on_read: Callable[[list], None]) -> None:
        """Copy ``flags`` to the host without a sync; ``on_read(flags.tolist())`` later."""
        if flags.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return
            host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = flags.detach().clone(), None
        self._pending.append((host, event, on_read))
        self.poll()

    def poll(self) -> None:
        """Run the callbacks of every copy that has landed (never waits)."""
        if self._pending and self._pending[0][1] is not None and torch.cuda.is_current_stream_capturing():
            return
        while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
            host, _, on_read = self._pending.pop(0)
            on_read(host.tolist())

    def flush(self) -> None:
        """Wait for every pending copy and run its callback (one sync, if any are pending)."""
        for _, event, _ in self._pending:
            if event is not None:
                event.synchronize()
        self.poll()
