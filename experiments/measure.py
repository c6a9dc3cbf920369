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


def current_bytes(device: torch.device) -> int:
    """Memory in use now: allocated CUDA memory, or the process's resident size."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return _status_kib("VmRSS") * 1024


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_bytes(device: torch.device) -> int:
    """Peak memory since :func:`reset_peak`."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """``(seconds, result)`` of one call, waiting for the device's queue."""
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 7) -> tuple[float, float]:
    """Median seconds and maximum extra MiB over ``repeats`` calls (after one warm-up)."""
    fn()
    times, extra = [], []
    for _ in range(repeats):
        before = current_bytes(device)
        reset_peak(device)
        seconds, out = timed(fn, device)
        times.append(seconds)
        extra.append((peak_bytes(device) - before) / 2**20)
        del out
    return statistics.median(times), max(extra)
