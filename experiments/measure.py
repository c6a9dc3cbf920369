"""Time and peak-memory measurement of one call, on CPU (peak RSS) or CUDA.

CPU memory: reset the kernel's peak-RSS counter (``/proc/self/clear_refs``), call,
then read ``VmHWM`` minus the resident size before the call. Run in a fresh process
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc returns freed blocks of 64 KiB and
more to the OS at once, and the peak is the tensors' own. CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated
memory before the call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 7) -> tuple[float, float]:
    """Median seconds and maximum extra MiB over ``repeats`` calls (after one warm-up)."""
    fn()
    times, extra = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            extra.append((torch.cuda.max_memory_allocated() - before) / 2**20)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_kib("VmRSS")
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
            extra.append((_status_kib("VmHWM") - before) / 1024)
        del out
    return statistics.median(times), max(extra)
