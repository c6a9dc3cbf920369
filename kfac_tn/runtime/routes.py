"""The one place that decides between CPU and accelerator kernel routes.

The same exact math can be evaluated by many small kernels or by a few large ones.
On a CPU (few cores, no launch cost) small kernels near the caches win; on an
accelerator every launch costs microseconds and small kernels leave the device idle,
so few large kernels win (measured on an H200, see docs/results/gpu). Where the two
differ, kfac_tn asks :func:`launch_bound`:

| computation | CPU route | accelerator route |
|---|---|---|
| KFAC-expand input factor (:mod:`kfc`) | depthwise-like (<= 4 channels per group): group by group in cache-sized pieces; else cost model: shift Grams or unfold + GEMM | unfold + GEMM |
| batch chunks of streamed contractions (:mod:`chunking`) | a few MiB | >= 64 MiB |
| unfolding (:func:`windowed_unfold`) | per tap, except few channels per group with >= 25 taps (depthwise 5×5, 7×7: one windowed view, 3-4× faster there) | one copy from a windowed view |
| symmetric products ``KᵀK``, ``S Sᵀ`` (``structured_products``) | lower block triangle, recursing to ~256 rows (~56% of a GEMM's time) | one GEMM |
| unfolded input of 2-d convolutions with symmetric zero padding (:mod:`unfold_gram`) | tap copies or one windowed view, as above | torch's im2col (``F.unfold``): one call per batch chunk, rows already in the factor's order |
| averaged unfolded input ū (:mod:`averaged_input`, KFAC-reduce and diagonals) | one product (or strided sum) per spatial dimension | one product with the Kronecker pattern ``Π̄_1 ⊗ … ⊗ Π̄_N`` (up to 2¹⁸ entries, 64 cached) |

:func:`use_routes` overrides the choice, e.g. to count the accelerator route's kernel
launches on a CPU (``experiments/launch_proxy.py``) or to test both routes anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

ROUTES = ("cpu", "accelerator")
_forced: str | None = None


def launch_bound(device: torch.device) -> bool:
    """Whether work on ``device`` should take the accelerator routes (few large kernels)."""
    if _forced is not None:
        return _forced == "accelerator"
    return device.type != "cpu"


def windowed_unfold(device: torch.device, channels_per_group: int, taps: int) -> bool:
    """Whether to unfold from one windowed view of the input (one copy) instead of tap by
    tap: always on accelerators (one kernel); on a CPU when the per-tap copies would move
    tiny strided pieces, i.e. few channels per group and many taps (depthwise 7×7: 0.96 s
    instead of 3.87 s for a batch of 32 at 64×64; depthwise 3×3 is faster per tap)."""
    return launch_bound(device) or (channels_per_group <= 8 and taps >= 25)


@contextmanager
def use_routes(kind: str | None) -> Iterator[None]:
    """Take ``kind``'s routes (``"cpu"`` or ``"accelerator"``) on every device inside the
    block; ``None`` restores the per-device choice."""
    global _forced
    if kind is not None and kind not in ROUTES:
        raise ValueError(f"Unknown route kind {kind!r}; use one of {ROUTES} or None.")
    previous, _forced = _forced, kind
    try:
        yield
    finally:
        _forced = previous
