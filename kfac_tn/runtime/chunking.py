"""How many samples the streamed contractions process at once, per device.

On a CPU, chunks of a few MiB of temporaries keep the working set near the caches and
the page-fault cost low. Accelerators run a few large kernels far better than many
small ones, so there chunks hold at least :data:`ACCELERATOR_CHUNK_BYTES`.
"""

from __future__ import annotations

from torch import Tensor

from kfac_tn.runtime.routes import launch_bound

#: minimum bytes of temporaries per chunk on accelerators (CUDA and others)
ACCELERATOR_CHUNK_BYTES = 2**26


def batch_chunk(x: Tensor, per_sample_bytes: int, chunk_bytes: int) -> int:
    """Samples per chunk of ``x`` (batch first) for temporaries of ``per_sample_bytes`` each."""
    if launch_bound(x.device):
        chunk_bytes = max(chunk_bytes, ACCELERATOR_CHUNK_BYTES)
    return max(1, min(x.shape[0], chunk_bytes // max(per_sample_bytes, 1)))
