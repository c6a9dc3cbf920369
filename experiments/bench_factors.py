"""Benchmark KFAC input factors: kfac_tn's kernels vs the generic evaluation of their
tensor network vs F.unfold-based vs singd 0.0.5.

Cases: the distinct convolutions of CIFAR ResNet18 and VGG19 (batch 32, 32×32
images), ConvNeXt-base's stem and first depthwise 7×7 convolution for a
(32, 3, 256, 256) input, MobileNetV2's depthwise 3×3 (144 channels, 56×56, stride 1
and 2), and a Conv2d(64, 64, 3, padding=1) on
(32, 64, 56, 56). Each (case, implementation, approximation) runs in a fresh
process; time is the median of 7 calls, memory the peak extra MiB (see measure.py).

    python -m experiments.bench_factors [--cases 3x3 stem] [--out results/bench_factors]

Prints a table and writes ``<out>.csv`` and ``<out>.json``. Uses CUDA when present.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from experiments.reporting import run_worker, write_rows

ROOT = Path(__file__).resolve().parents[1]


# name -> (in, out, kernel, stride, padding, groups, input shape)
CASES = {
    "3x3": (64, 64, 3, 1, 1, 1, (32, 64, 56, 56)),
    "convnext_stem": (3, 128, 4, 4, 0, 1, (32, 3, 256, 256)),
    "convnext_dw7x7": (128, 128, 7, 1, 3, 128, (32, 128, 64, 64)),
    "mobilenetv2_dw3x3": (144, 144, 3, 1, 1, 144, (32, 144, 56, 56)),
    "mobilenetv2_dw3x3_s2": (144, 144, 3, 2, 1, 144, (32, 144, 56, 56)),
    "resnet18_conv1": (3, 64, 3, 1, 1, 1, (32, 3, 32, 32)),
    "resnet18_l1": (64, 64, 3, 1, 1, 1, (32, 64, 32, 32)),
    "resnet18_l2_down": (64, 128, 3, 2, 1, 1, (32, 64, 32, 32)),
    "resnet18_l2": (128, 128, 3, 1, 1, 1, (32, 128, 16, 16)),
    "resnet18_l2_short": (64, 128, 1, 2, 0, 1, (32, 64, 32, 32)),
    "resnet18_l3_down": (128, 256, 3, 2, 1, 1, (32, 128, 16, 16)),
    "resnet18_l3": (256, 256, 3, 1, 1, 1, (32, 256, 8, 8)),
    "resnet18_l3_short": (128, 256, 1, 2, 0, 1, (32, 128, 16, 16)),
    "resnet18_l4_down": (256, 512, 3, 2, 1, 1, (32, 256, 8, 8)),
    "resnet18_l4": (512, 512, 3, 1, 1, 1, (32, 512, 4, 4)),
    "resnet18_l4_short": (256, 512, 1, 2, 0, 1, (32, 256, 8, 8)),
    "vgg19_c1": (3, 64, 3, 1, 1, 1, (32, 3, 32, 32)),
    "vgg19_c2": (64, 64, 3, 1, 1, 1, (32, 64, 32, 32)),
    "vgg19_c3": (64, 128, 3, 1, 1, 1, (32, 64, 16, 16)),
    "vgg19_c4": (128, 128, 3, 1, 1, 1, (32, 128, 16, 16)),
    "vgg19_c5": (128, 256, 3, 1, 1, 1, (32, 128, 8, 8)),
    "vgg19_c6": (256, 256, 3, 1, 1, 1, (32, 256, 8, 8)),
    "vgg19_c9": (256, 512, 3, 1, 1, 1, (32, 256, 4, 4)),
    "vgg19_c10": (512, 512, 3, 1, 1, 1, (32, 512, 4, 4)),
    "vgg19_c13": (512, 512, 3, 1, 1, 1, (32, 512, 2, 2)),
}
IMPLEMENTATIONS = ("kfac_tn", "network", "unfold", "singd")
APPROXIMATIONS = ("reduce", "expand")


def _factor_fn(impl: str, approx: str, layer, x):
    import torch
    import torch.nn.functional as F

    if impl == "kfac_tn":
        import kfac_tn

        return lambda: kfac_tn.input_factor(layer, x, approx)
    if impl == "network":  # the generic evaluation of the defining tensor network (opt_einsum, cached)
        from kfac_tn.tensor_network import contract, expressions, layer_conv_dims

        dims = layer_conv_dims(layer, x.shape)
        network = expressions.kfc if approx == "expand" else expressions.kfac_reduce
        return lambda: contract(network(x, dims, layer.groups))
    if impl == "unfold":
        G = layer.groups

        def unfold_factor():
            u = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            N, _, O = u.shape
            u = u.unflatten(1, (G, -1))  # [N, G, d, O]
            if approx == "reduce":
                m = u.mean(-1)
                return torch.einsum("ngi,ngj->gij", m, m) / N
            rows = u.permute(1, 0, 3, 2).reshape(G, N * O, -1)
            return torch.bmm(rows.transpose(1, 2), rows) / (N * O)

        return unfold_factor
    if impl == "singd":
        from singd.optim.utils import process_input
        from singd.structures.dense import DenseMatrix

        eye = DenseMatrix.eye(1, dtype=x.dtype, device=x.device)  # from_mat_inner is a classmethod
        return lambda: eye.from_mat_inner(process_input(x, layer, approx).T)
    raise ValueError(impl)


def case_setup(case: str):
    """``(device, layer, input)`` of a case (seeded; CUDA when present), with the worker's
    thread count (``BENCH_THREADS``, default 2)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c_in, c_out, k, s, p, g, shape = CASES[case]
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(c_in, c_out, k, s, p, groups=g, bias=False).to(device)
    return device, layer, torch.randn(*shape, device=device)


def worker(case: str, impl: str, approx: str) -> dict:
    from experiments.measure import measure

    device, layer, x = case_setup(case)
    seconds, mib = measure(_factor_fn(impl, approx, layer, x), device)
    return {"case": case, "impl": impl, "approx": approx, "device": device.type,
            "ms": 1e3 * seconds, "extra_mib": mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--impls", nargs="*", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--approx", nargs="*", default=list(APPROXIMATIONS), choices=APPROXIMATIONS)
    parser.add_argument("--out", default="results/bench_factors")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    rows = []
    for case in args.cases:
        for approx in args.approx:
            for impl in args.impls:
                row = run_worker("experiments.bench_factors", [case, impl, approx])
                if row is None:
                    continue
                rows.append(row)
                print(f"{case:20s} {approx:7s} {impl:8s} {row['ms']:9.2f} ms {row['extra_mib']:9.1f} MiB", flush=True)
    _report(rows, Path(args.out))


def _report(rows: list[dict], out: Path) -> None:
    by_key = {(r["case"], r["approx"], r["impl"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["case"], r["approx"], "unfold"))
        r["speedup_vs_unfold"] = ref["ms"] / r["ms"] if ref else None
        r["memory_vs_unfold"] = r["extra_mib"] / ref["extra_mib"] if ref and ref["extra_mib"] > 0 else None
    write_rows(rows, out)
    print("\n| case | approx | impl | ms | extra MiB | speed-up vs unfold | memory vs unfold |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        sp = f"{r['speedup_vs_unfold']:.2f}×" if r["speedup_vs_unfold"] else "–"
        mem = f"{r['memory_vs_unfold']:.2f}×" if r["memory_vs_unfold"] is not None else "–"
        print(f"| {r['case']} | {r['approx']} | {r['impl']} | {r['ms']:.2f} | {r['extra_mib']:.1f} | {sp} | {mem} |")
    print(f"\nwrote {out.with_suffix('.csv')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
