"""Launch proxy: compute ops and host syncs per training step, counted on a CPU.

    python -m experiments.launch_proxy [--models resnet18 vgg19] [--batch-size 4] [--host-width 4] [--out PREFIX]

On a GPU a step of a small or medium CNN is bound by kernel launches and by host-device
synchronisations, not by FLOPs. Both can be counted without a GPU: every ATen operator
dispatched during the forward pass, backward pass and ``step()`` is one kernel launch
(view and metadata-only ops excluded, they launch nothing; a ``_foreach_*`` op is one
launch where CUDA takes its fast path, else one per tensor), and every
``aten::_local_scalar_dense`` is a device-to-host copy that drains the GPU queue
(``.item()``, ``float(tensor)``, ``bool(tensor)``, a tensor in an ``if``).

Each configuration is counted over one full period of T steps after ``T + 1`` warm-up
steps (so that the preconditioner updates and their amortisation are both included),
and reported per step next to SGD's and stock singd's. kfac_tn takes the kernel routes
it takes on a GPU (``kfac_tn.use_routes("accelerator")``: unfold + GEMM for KFC, large
batch chunks, one GEMM per symmetric product), so the counts are the GPU's. ``torch.optim.SGD`` (the SGD
baseline, and the fallback for BatchNorm parameters in every run) uses its ``foreach``
implementation, as it does by default on a GPU. ``extra`` is the number of ops
above an SGD step; ``ratio`` compares kfac_tn's extra with stock's.

Host time: a GPU step that is bound by launches also pays the host's time to issue them
(Python, hooks, dispatch). It is measured as the wall time per step (median over 40 T-step
periods) of the same network with ``--host-width`` channels in its first stage (1 instead
of 64: the kernels do almost no arithmetic), batch 1, 32×32 inputs, one thread, kfac_tn on
its accelerator routes. Prints a markdown table and writes ``<out>.csv`` / ``<out>.json``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from experiments.models import MODELS, build_model
from experiments.optimizers import build_optimizer
from experiments.reporting import write_rows
from kfac_tn import use_routes

ROOT = Path(__file__).resolve().parents[1]


#: the configurations compared: (label, kwargs)
CONFIGURATIONS = [
    ("diagonal/expand T=1", {"structures": ["diagonal", "diagonal"], "kfac_approx": "expand", "T": 1}),
    ("block30diagonal/expand T=1", {"structures": ["block30diagonal", "block30diagonal"], "kfac_approx": "expand", "T": 1}),
    ("dense/expand T=1", {"structures": ["dense", "dense"], "kfac_approx": "expand", "T": 1}),
    ("dense/reduce T=10", {"structures": ["dense", "dense"], "kfac_approx": "reduce", "T": 10}),
]

#: ops that launch no kernel: views, metadata, aliasing
_FREE = {
    "view", "_unsafe_view", "reshape", "as_strided", "t", "transpose", "permute", "expand",
    "squeeze", "unsqueeze", "slice", "select", "diagonal", "alias", "detach", "unfold",
    "split", "split_with_sizes", "chunk", "unbind", "narrow", "view_as", "expand_as",
    "flatten", "unflatten", "lift_fresh", "_reshape_alias", "movedim", "numpy_T",
    "is_same_size", "_has_compatible_shallow_copy_type", "size", "stride", "sym_size",
    "sym_stride", "sym_numel", "is_nonzero", "_to_copy_noop", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "set_", "resize_", "result_type",
    "promote_types",
}


def _foreach_launches(args: tuple) -> int:
    """Launches of a ``torch._foreach_*`` op on CUDA: one (its fast path) when the tensors
    of its lists match in shape, stride and dtype position by position, else one per
    tensor (CUDA falls back to a loop of single-tensor kernels, e.g. for broadcasting)."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    if not lists:
        return 1
    for tensors in zip(*lists):
        first = tensors[0]
        if any(t.shape != first.shape or t.stride() != first.stride() or t.dtype != first.dtype for t in tensors):
            return len(lists[0])
    return 1


class LaunchCounter(TorchDispatchMode):
    """Counts dispatched compute ops (kernel launches) and ``_local_scalar_dense`` (syncs)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.syncs += 1
        elif name not in _FREE:
            self.ops[name] += _foreach_launches(args) if name.startswith("_foreach_") else 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _optimizer_kwargs(optimizer: str, hyper: dict) -> dict:
    """lr 0.01 and momentum 0.9 for every optimizer, plus the configuration's (not for SGD)."""
    return {"lr": 0.01, "momentum": 0.9, **(hyper if optimizer != "sgd" else {})}


def count(model_name: str, optimizer: str, hyper: dict, batch_size: int, seed: int = 0) -> dict:
    """Ops and syncs per step of one configuration, averaged over one T period, with
    kfac_tn on its accelerator routes (``kfac_tn.use_routes("accelerator")``)."""
    with use_routes("accelerator"):
        return _count(model_name, optimizer, hyper, batch_size, seed)


def _count(model_name: str, optimizer: str, hyper: dict, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(model_name)
    X = torch.randn(batch_size, 3, 32, 32)
    y = torch.randint(0, 10, (batch_size,))
    opt = build_optimizer(model, optimizer, foreach=True, **_optimizer_kwargs(optimizer, hyper))  # foreach: torch.optim's default on a GPU
    period = hyper.get("T", 1)

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(period + 1):
            step()
        counter = LaunchCounter()
        with counter:
            for _ in range(period):
                step()
    return {
        "ops_per_step": counter.total / period,
        "syncs_per_step": counter.syncs / period,
        "top_ops": dict(counter.ops.most_common(8)),
    }


def host_ms(model_name: str, optimizer: str, hyper: dict, width: int, periods: int = 40, seed: int = 0) -> float:
    """Wall time [ms] per step of ``model_name`` with ``width`` first-stage channels, batch 1,
    32×32, one thread, kfac_tn's accelerator routes (the host's share of a step): the median
    over ``periods`` T-step periods of their mean step time."""
    T = hyper.get("T", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with use_routes("accelerator"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            model = MODELS[model_name](width=width)
            X, y = torch.randn(1, 3, 32, 32), torch.randint(0, 10, (1,))
            opt = build_optimizer(model, optimizer, foreach=True, **_optimizer_kwargs(optimizer, hyper))
            times = []
            for _ in range(periods + 2):
                start = time.perf_counter()
                for _ in range(T):
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(X), y).backward()
                    opt.step()
                times.append((time.perf_counter() - start) / T)
    finally:
        torch.set_num_threads(threads)
    times = sorted(times[2:])
    return 1e3 * times[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "vgg19"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--configs", nargs="+", default=None, help="labels to run (default: all)")
    parser.add_argument("--optimizers", nargs="+", default=["singd_stock", "singd_tn"])
    parser.add_argument("--host-width", type=int, default=1, help="first-stage channels of the host-time nets")
    parser.add_argument("--out", default="results/launch_proxy")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = []
    for model_name in args.models:
        sgd = count(model_name, "sgd", {}, args.batch_size)
        rows.append({"model": model_name, "configuration": "sgd", "optimizer": "sgd",
                     "ops_per_step": sgd["ops_per_step"], "syncs_per_step": sgd["syncs_per_step"],
                     "extra_ops": 0.0, "extra_vs_stock": None,
                     "host_ms": host_ms(model_name, "sgd", {}, args.host_width)})
        for label, hyper in CONFIGURATIONS:
            if args.configs and label not in args.configs:
                continue
            stock_extra = None
            for optimizer in args.optimizers:
                result = count(model_name, optimizer, hyper, args.batch_size)
                extra = result["ops_per_step"] - sgd["ops_per_step"]
                if optimizer == "singd_stock":
                    stock_extra = extra
                rows.append({
                    "model": model_name, "configuration": label, "optimizer": optimizer,
                    "ops_per_step": result["ops_per_step"], "syncs_per_step": result["syncs_per_step"],
                    "extra_ops": extra,
                    "extra_vs_stock": extra / stock_extra if stock_extra and optimizer != "singd_stock" else None,
                    "host_ms": host_ms(model_name, optimizer, hyper, args.host_width),
                })
                print(f"{model_name:9s} {label:28s} {optimizer:12s} ops {result['ops_per_step']:8.1f} "
                      f"syncs {result['syncs_per_step']:6.1f}  host {rows[-1]['host_ms']:6.2f} ms  top {result['top_ops']}",
                      flush=True)
    write_rows(rows, Path(args.out))
    print(f"\nbatch {args.batch_size}; per step = one T period / T, forward + backward + step()")
    print(f"host ms: median step of the same net with {args.host_width} first-stage channels, batch 1, one thread")
    print("\n| net | configuration | optimizer | compute ops / step | extra over SGD | extra vs stock's | host syncs / step "
          "| host ms / step | × SGD's |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['extra_vs_stock']:.2f}x" if r["extra_vs_stock"] is not None else ""
        sgd_ms = next(q["host_ms"] for q in rows if q["model"] == r["model"] and q["optimizer"] == "sgd")
        print(f"| {r['model']} | {r['configuration']} | {r['optimizer']} | {r['ops_per_step']:.0f} | "
              f"{r['extra_ops']:.0f} | {ratio} | {r['syncs_per_step']:.1f} | {r['host_ms']:.1f} | "
              f"{r['host_ms'] / sgd_ms:.2f} |")
    print(f"\nwrote {Path(args.out).with_suffix('.csv')} and {Path(args.out).with_suffix('.json')}")


if __name__ == "__main__":
    main()
