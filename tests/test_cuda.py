"""On a CUDA device: no host syncs in a SINGD step, and the same trajectory as on the CPU.

Skipped without CUDA (CI is CPU-only); ``scripts/gpu_benchmarks.sh`` runs them on a lent
GPU. The sync check uses torch's own detector (``torch.cuda.set_sync_debug_mode``),
independent of the launch proxy's CPU count.
"""

import warnings

import pytest
import torch
from torch import nn

import kfac_tn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STRUCTURES = ["diagonal", "block30diagonal", "dense", "hierarchical15_15"]


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    ).to(device)


def _data(device):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(6, 3, 7, 7, generator=gen).to(device), torch.randint(0, 5, (6,), generator=gen).to(device)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_singd_step_has_no_host_sync(structure, approx):
    model, (X, y) = _model("cuda"), _data("cuda")
    opt = kfac_tn.SINGD(model, lr=0.1, lr_cov=0.1, T=1, structures=(structure, structure), kfac_approx=approx)
    for step in range(3):  # the first step sets up workspaces and cached masks
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        if step == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            loss.backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("structure", ["diagonal", "block30diagonal", "dense"])
def test_cuda_trajectory_equals_cpu(structure):
    results = []
    for device in ("cpu", "cuda"):
        model, (X, y) = _model(device), _data(device)
        model.double()
        X = X.double()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = kfac_tn.SINGD(model, lr=0.1, lr_cov=0.1, T=2, structures=(structure, structure))
            for _ in range(4):
                opt.zero_grad()
                nn.functional.cross_entropy(model(X), y).backward()
                opt.step()
        results.append(torch.cat([p.detach().flatten().cpu() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-11)
