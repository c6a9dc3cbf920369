"""Convergence on scikit-learn's digits: SGD, stock SINGD, kfac_tn SINGD and KFAC.

    python -m experiments.convergence [--optimizers sgd kfac ...] [--model small_cnn]
        [--data digits] [--subsample 1 0.25 0.0625] [--out results/convergence] [key=value ...]

Trains ``small_cnn`` (or ``--model``) on digits (or ``--data``, e.g. ``unet_small`` on
``digits_denoise``) with each optimizer (configs/train.yaml composed with the groups
``model=<model> data.name=<data> optimizer.name=<name>``), then draws train loss and the
test metric (accuracy, or PSNR for dense prediction) per epoch for all of them into
``<out>.png`` and writes the per-epoch metrics to ``<out>.json``. ``--subsample`` runs the optimizers that
take randomized factors (kfac_tn's SINGD and KFAC) once per fraction of output
positions (1: exact).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.optimizers import OPTIMIZERS, optimizer_arguments
from experiments.train import load_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--subsample", nargs="*", type=float, default=[1.0],
                        help="fractions of output positions for optimizers with randomized factors")
    parser.add_argument("--out", default="results/convergence")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    args = parser.parse_intermixed_args()
    if any(not 0 < f <= 1 for f in args.subsample):
        parser.error("--subsample fractions must lie in (0, 1]")
    curves = {}
    for name in args.optimizers:
        fractions = args.subsample if "subsample" in optimizer_arguments(name) else [1.0]
        for fraction in fractions:
            extra = [] if fraction == 1.0 else [f"optimizer.subsample={fraction}"]
            config = load_config(None, [f"model={args.model}", f"data.name={args.data}", f"optimizer.name={name}",
                                        *extra, *args.overrides])
            label = config["optimizer"]["name"] + ("" if fraction == 1.0 else f" subsample {fraction:g}")
            curves[label] = train(config, progress=False)
            last = curves[label][-1]
            metric = "test_acc" if "test_acc" in last else "test_psnr"
            print(f"{label:24s} train loss {last['train_loss']:.3f}  {metric} {last[metric]:.3f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(curves, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for label, history in curves.items():
        epochs = [h["epoch"] + 1 for h in history]
        ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label=label)
        ax_acc.plot(epochs, [h.get("test_acc", h.get("test_psnr")) for h in history], marker="o", label=label)
    dense = any("test_psnr" in h[-1] for h in curves.values())
    ax_loss.set(xlabel="epoch", ylabel="train loss", yscale="log", title=f"{args.data}: train loss")
    ax_acc.set(xlabel="epoch", ylabel="test PSNR [dB]" if dense else "test accuracy",
               title=f"{args.data}: test {'PSNR' if dense else 'accuracy'}")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
