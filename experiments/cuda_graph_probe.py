"""Probe: does a whole T = 1 training step (forward, backward, SINGD step) capture in a CUDA graph?

    python -m experiments.cuda_graph_probe [--model resnet18] [--batch-size 32] [--out PREFIX]

Needs CUDA (``scripts/gpu_benchmarks.sh`` runs it). Per optimizer (SGD; kfac_tn SINGD with
diagonal, block30diagonal and dense K, C; expand; T = 1; BatchNorm parameters by the fallback
SGD, as in every experiment): three warm-up steps on a side stream, one step captured with
``torch.cuda.graph`` (torch's whole-network recipe), then ``--replays`` replays on fresh
batches copied into the static input. An eager twin (same initial weights and batches)
takes the same steps; the table gives the largest parameter difference between the two, and
the CUDA time per step of eager steps and of replays. A configuration that does not capture
is reported with its error instead of stopping the probe: the table says what still breaks
capture. Prints a markdown table and writes ``<out>.json``.

Known limits of a captured SINGD step: Python-side state is frozen at capture (``opt.steps``
does not advance in replays, so ``T > 1``, a scheduled ``lr_cov`` and GradScaler do not
fit a single graph), and skipped steps are not reported as warnings in replays.
"""

from __future__ import annotations

import argparse
import copy
import json
import traceback
from pathlib import Path

import torch
from torch import nn

from experiments.models import build_model
from experiments.optimizers import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
RUNS = [("sgd", None), ("singd_tn", "diagonal"), ("singd_tn", "block30diagonal"), ("singd_tn", "dense")]


def _optimizer(model: nn.Module, name: str, structure: str | None):
    kwargs = dict(lr=0.01, momentum=0.9)
    if structure is not None:
        kwargs.update(T=1, kfac_approx="expand", structures=(structure, structure), damping=1e-3)
    return build_optimizer(model, name, **kwargs)


def _train_step(model: nn.Module, opt, X: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()


def _cuda_ms(fn, repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def probe(model_name: str, name: str, structure: str | None, batch_size: int, replays: int) -> dict:
    """Capture one step, replay it, compare with an eager twin; see the module docstring."""
    torch.manual_seed(0)
    model = build_model(model_name).cuda()
    twin = copy.deepcopy(model)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(batch_size, 3, 32, 32, device="cuda", generator=gen),
                torch.randint(0, 10, (batch_size,), device="cuda", generator=gen)) for _ in range(3 + replays)]
    row = {"optimizer": name, "structure": structure or "", "captured": False, "error": ""}
    opt, twin_opt = _optimizer(model, name, structure), _optimizer(twin, name, structure)
    static_X, static_y = batches[0][0].clone(), batches[0][1].clone()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for X, y in batches[:3]:
                static_X.copy_(X)
                static_y.copy_(y)
                _train_step(model, opt, static_X, static_y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            nn.functional.cross_entropy(model(static_X), static_y).backward()
            opt.step()
        row["captured"] = True
    except Exception as error:  # reported in the table: what breaks capture
        row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        traceback.print_exc()
        return row
    # the capture itself ran no step: the eager twin takes the three warm-up steps, then the
    # graph replays and the twin steps on the same batches
    for X, y in batches[:3]:
        _train_step(twin, twin_opt, X, y)
    for X, y in batches[3:]:
        static_X.copy_(X)
        static_y.copy_(y)
        graph.replay()
        _train_step(twin, twin_opt, X, y)
    torch.cuda.synchronize()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    flat_twin = torch.cat([p.detach().flatten() for p in twin.parameters()])
    row["max_abs_diff"] = float((flat - flat_twin).abs().max())
    row["max_abs_param"] = float(flat_twin.abs().max())
    X, y = batches[-1]
    row["eager_ms"] = _cuda_ms(lambda: _train_step(twin, twin_opt, X, y), 10)
    row["graph_ms"] = _cuda_ms(graph.replay, 10)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--replays", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "results" / "cuda_graph_probe"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("cuda_graph_probe needs a CUDA device.")
    rows = [probe(args.model, name, structure, args.batch_size, args.replays) for name, structure in RUNS]
    print(f"\n{args.model}, batch {args.batch_size}, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    print("| optimizer | structure | captured | max abs diff vs eager (max abs param) | eager ms/step | graph ms/step | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        diff = f"{r['max_abs_diff']:.2e} ({r['max_abs_param']:.2f})" if r["captured"] else ""
        times = (f"{r['eager_ms']:.2f} | {r['graph_ms']:.2f}") if r["captured"] else " | "
        print(f"| {r['optimizer']} | {r['structure']} | {r['captured']} | {diff} | {times} | {r['error']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out.with_suffix('.json')}")
    return rows


if __name__ == "__main__":
    main()
