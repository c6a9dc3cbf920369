"""Benchmark randomized KFAC-expand factors: time, memory and error against the fraction
of output positions sampled.

For each case (convolutions of CIFAR ResNet18, ConvNeXt's depthwise 7×7, MobileNetV2's
depthwise 3×3; batch 32, see bench_factors.CASES) and each fraction, a fresh process
times ``subsampled_input_factor`` / ``subsampled_grad_output_factor`` (median of 7 calls,
peak extra memory as in measure.py) and the exact ``input_factor`` / ``grad_output_factor``
(fraction 1), and reports the relative Frobenius error ``‖Â − A‖ / ‖A‖`` averaged over
5 draws. The output gradients are standard normal (spatially uncorrelated), so G's errors
are those of the least favourable case for position sampling.

    python -m experiments.bench_subsampled [--cases resnet18_l1 convnext_dw7x7] [--out results/bench_subsampled]

Prints a table, writes ``<out>.csv``, ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.bench_factors import CASES, case_setup
from experiments.reporting import run_worker, write_rows

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASES = ("resnet18_l1", "resnet18_l2", "resnet18_l3", "convnext_dw7x7", "mobilenetv2_dw3x3")
FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
DRAWS = 5


def worker(case: str, fraction: float) -> dict:
    import torch

    import kfac_tn
    from experiments.measure import measure
    from kfac_tn.factors import subsampled_grad_output_factor, subsampled_input_factor

    device, layer, x = case_setup(case)
    with torch.no_grad():
        grad_output = torch.randn_like(layer(x))
    generator = torch.Generator().manual_seed(1)
    if fraction == 1.0:
        input_fn = lambda: kfac_tn.input_factor(layer, x, "expand")  # noqa: E731
        grad_fn = lambda: kfac_tn.grad_output_factor(layer, grad_output, "expand")  # noqa: E731
    else:
        input_fn = lambda: subsampled_input_factor(layer, x, fraction, generator=generator)  # noqa: E731
        grad_fn = lambda: subsampled_grad_output_factor(layer, grad_output, fraction, generator=generator)  # noqa: E731
    a_seconds, a_mib = measure(input_fn, device)
    g_seconds, g_mib = measure(grad_fn, device)
    row = {"case": case, "fraction": fraction, "device": device.type,
           "A_ms": 1e3 * a_seconds, "A_extra_mib": a_mib, "G_ms": 1e3 * g_seconds, "G_extra_mib": g_mib}
    if fraction < 1.0:
        A, G = kfac_tn.input_factor(layer, x, "expand"), kfac_tn.grad_output_factor(layer, grad_output, "expand")
        row["A_error"] = sum(float((input_fn() - A).norm() / A.norm()) for _ in range(DRAWS)) / DRAWS
        row["G_error"] = sum(float((grad_fn() - G).norm() / G.norm()) for _ in range(DRAWS)) / DRAWS
    else:
        row["A_error"] = row["G_error"] = 0.0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=list(DEFAULT_CASES), choices=list(CASES))
    parser.add_argument("--fractions", nargs="*", type=float, default=list(FRACTIONS))
    parser.add_argument("--out", default="results/bench_subsampled")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], float(args.worker[1]))))
        return
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("fractions must lie in (0, 1]")
    fractions = sorted(set(args.fractions) | {1.0})
    rows = []
    for case in args.cases:
        for fraction in fractions:
            row = run_worker("experiments.bench_subsampled", [case, repr(fraction)])
            if row is None:
                continue
            rows.append(row)
            print(f"{case:20s} {fraction:6.4f}  A {row['A_ms']:8.1f} ms {row['A_extra_mib']:7.1f} MiB "
                  f"err {row['A_error']:.3f}   G {row['G_ms']:7.1f} ms err {row['G_error']:.3f}", flush=True)
    _report(rows, Path(args.out))


def _report(rows: list[dict], out: Path) -> None:
    exact = {r["case"]: r for r in rows if r["fraction"] == 1.0}
    for r in rows:
        ref = exact.get(r["case"])
        r["A_time_vs_exact"] = r["A_ms"] / ref["A_ms"] if ref else None
        r["G_time_vs_exact"] = r["G_ms"] / ref["G_ms"] if ref else None
    write_rows(rows, out)
    print("\n| case | fraction | A ms / MiB | A time vs exact | A error | G ms | G time vs exact | G error |")
    print("|---|---|---|---|---|---|---|---|")
    ratio = lambda v: f"{v:.2f}×" if v is not None else "–"  # noqa: E731
    for r in rows:
        print(f"| {r['case']} | {r['fraction']:.4g} | {r['A_ms']:.1f} / {r['A_extra_mib']:.1f} | "
              f"{ratio(r['A_time_vs_exact'])} | {r['A_error']:.3f} | {r['G_ms']:.1f} | "
              f"{ratio(r['G_time_vs_exact'])} | {r['G_error']:.3f} |")
    _plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.csv')}, {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_error) = plt.subplots(1, 2, figsize=(11, 4))
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = sorted((r for r in rows if r["case"] == case), key=lambda r: r["fraction"])
        fractions = [r["fraction"] for r in mine]
        line, = ax_time.plot(fractions, [r["A_time_vs_exact"] for r in mine], "o-", label=case)
        sampled = [r for r in mine if r["fraction"] < 1]
        ax_error.plot([r["fraction"] for r in sampled], [r["A_error"] for r in sampled], "o-", color=line.get_color(),
                      label=f"{case} A")
        ax_error.plot([r["fraction"] for r in sampled], [r["G_error"] for r in sampled], "x--",
                      color=line.get_color(), label=f"{case} G")
    ax_time.axhline(0.35, color="grey", lw=0.8, ls=":")
    ax_time.set(xscale="log", xlabel="fraction of output positions", ylabel="A time / exact A time",
                title="randomized A: time")
    ax_error.set(xscale="log", yscale="log", xlabel="fraction of output positions",
                 ylabel="relative Frobenius error", title="error (mean of 5 draws)")
    ax_time.legend(fontsize=7)
    ax_error.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
