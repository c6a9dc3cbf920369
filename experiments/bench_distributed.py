"""Data-parallel SINGD with and without a sharded preconditioner: per-rank state, peak
memory, bytes sent per step and step time against the world size.

    python -m experiments.bench_distributed [--models resnet18 vgg19] [--worlds 1 2 4]
        [--out results/bench_distributed]

For every model, world size and mode (``replicated``: every rank holds every K, C;
``sharded``: ``shard_preconditioner=True``) it launches
``torchrun --nproc_per_node <world> -m experiments.bench_distributed --worker ...`` (gloo
on a CPU, NCCL on GPUs). Each rank trains a CIFAR-shaped model with dense SINGD
(T = 2, expand) on its own random batch: one warm-up step, then ``--steps`` timed ones.
Per rank it records the persistent preconditioner state (K, C and momenta it holds), the
peak memory above the memory before the optimizer was built (CPU: peak RSS, see
measure.py; CUDA: max_memory_allocated), the payload of every collective it called per
step (the tensors handed to all_reduce / reduce / broadcast), the bytes it sends for them
with bandwidth-optimal algorithms (see ``_Payload``) and the mean seconds per step. Prints a table (maximum over
ranks), writes ``<out>.csv`` and ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments.reporting import write_rows

ROOT = Path(__file__).resolve().parents[1]
MODES = ("replicated", "sharded")


def _state_bytes(opt) -> int:
    """Bytes of the K, C and momenta this rank holds."""
    total = 0
    for store in (opt._K_blocks, opt._C_blocks, opt._m_K_blocks, opt._m_C_blocks):
        for blocks in store.values():
            for M in blocks:
                total += sum(t.numel() * t.element_size() for _, t in M.named_tensors())
    return total


class _Payload:
    """Counts the bytes of the tensors handed to torch.distributed's collectives, per kind,
    and the bytes a rank sends for them with bandwidth-optimal algorithms: an all-reduce
    of n bytes sends 2·n·(w−1)/w per rank (ring: reduce-scatter + all-gather), a reduce or
    a broadcast n·(w−1)/w (pipelined ring or tree), w the world size."""

    NAMES = ("all_reduce", "reduce", "broadcast")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.by_kind = dict.fromkeys(self.NAMES, 0)
        self.counting = False
        self._real = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self._real.items():
            setattr(dist, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def counted(tensor, *args, **kwargs):
            if self.counting:
                self.by_kind[name] += tensor.numel() * tensor.element_size()
            return fn(tensor, *args, **kwargs)

        return counted

    @property
    def bytes(self) -> int:
        return sum(self.by_kind.values())

    def wire_bytes(self, world: int) -> float:
        share = (world - 1) / world
        return share * (2 * self.by_kind["all_reduce"] + self.by_kind["reduce"] + self.by_kind["broadcast"])


def worker(model_name: str, mode: str, batch: int, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    import kfac_tn
    from experiments.measure import current_bytes, peak_bytes, reset_peak
    from experiments.models import build_model

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", "2")) // world))
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    gen = torch.Generator().manual_seed(rank)
    X = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    payload = _Payload()
    before = current_bytes(device)
    reset_peak(device)
    opt = kfac_tn.SINGD(model, lr=0.01, T=2, structures=("dense", "dense"), kfac_approx="expand",
                        warn_unsupported=False, shard_preconditioner=mode == "sharded")

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()

    step()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    payload.counting = True
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    payload.counting = False
    row = {"rank": rank, "state_mib": _state_bytes(opt) / 2**20, "peak_mib": (peak_bytes(device) - before) / 2**20,
           "sent_mib_per_step": payload.bytes / steps / 2**20,
           "wire_mib_per_step": payload.wire_bytes(world) / steps / 2**20,
           **{f"{kind}_mib_per_step": b / steps / 2**20 for kind, b in payload.by_kind.items()},
           "s_per_step": seconds,
           "layers_held": len(opt._K_blocks)}
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet18", "vgg19"])
    parser.add_argument("--worlds", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=4, help="samples per rank")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (T = 2: one preconditioner update)")
    parser.add_argument("--out", default="results/bench_distributed")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, mode, batch, steps, out = args.worker
        worker(model, mode, int(batch), int(steps), out)
        return
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    for model in args.models:
        totals = {}
        for world in args.worlds:
            for mode in args.modes:
                if world == 1 and mode == "sharded" and "replicated" in args.modes:
                    continue  # one rank holds everything either way
                with tempfile.TemporaryDirectory() as tmp:
                    out = os.path.join(tmp, "ranks.json")
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                           "-m", "experiments.bench_distributed", "--worker", model, mode, str(args.batch),
                           str(args.steps), out]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                    if proc.returncode or not os.path.exists(out):
                        print(f"{model} world {world} {mode} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                        continue
                    ranks = json.loads(Path(out).read_text())
                total = sum(r["state_mib"] for r in ranks)
                totals.setdefault(model, total if mode == "replicated" or world == 1 else None)
                row = {"model": model, "world": world, "mode": mode,
                       "state_mib_per_rank": max(r["state_mib"] for r in ranks),
                       "state_mib_all_ranks": total,
                       "peak_mib_per_rank": max(r["peak_mib"] for r in ranks),
                       "sent_mib_per_step_per_rank": max(r["sent_mib_per_step"] for r in ranks),
                       "wire_mib_per_step_per_rank": max(r["wire_mib_per_step"] for r in ranks),
                       **{f"{kind}_mib_per_step_per_rank": max(r[f"{kind}_mib_per_step"] for r in ranks)
                          for kind in _Payload.NAMES},
                       "s_per_step": max(r["s_per_step"] for r in ranks),
                       "layers_held": [r["layers_held"] for r in ranks]}
                rows.append(row)
                print(f"{model:9s} world {world} {mode:10s} state/rank {row['state_mib_per_rank']:8.1f} MiB "
                      f"peak {row['peak_mib_per_rank']:8.1f} MiB payload {row['sent_mib_per_step_per_rank']:8.1f} "
                      f"wire {row['wire_mib_per_step_per_rank']:8.1f} MiB/step {row['s_per_step']:.2f} s/step", flush=True)
        single = next((r["state_mib_per_rank"] for r in rows if r["model"] == model and r["world"] == 1), None)
        for r in rows:
            if r["model"] == model and single:
                r["state_vs_total_over_world"] = r["state_mib_per_rank"] / (single / r["world"])
    write_rows(rows, Path(args.out))
    print("\n| model | ranks | mode | state per rank [MiB] | vs total/world | peak per rank [MiB] | "
          "payload per step per rank [MiB] (all-reduce / reduce / broadcast) | sent on the wire [MiB] | s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r.get("state_vs_total_over_world")
        kinds = " / ".join(f"{r[f'{kind}_mib_per_step_per_rank']:.0f}" for kind in _Payload.NAMES)
        print(f"| {r['model']} | {r['world']} | {r['mode']} | {r['state_mib_per_rank']:.1f} | "
              f"{f'{ratio:.2f}×' if ratio else '–'} | {r['peak_mib_per_rank']:.1f} | "
              f"{r['sent_mib_per_step_per_rank']:.1f} ({kinds}) | {r['wire_mib_per_step_per_rank']:.1f} | "
              f"{r['s_per_step']:.2f} |")
    print(f"\nwrote {Path(args.out).with_suffix('.csv')} and {Path(args.out).with_suffix('.json')}")


if __name__ == "__main__":
    main()
