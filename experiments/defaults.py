"""Do the optimizers' defaults (and the README's example values) train without tuning?

Short runs on scikit-learn's digits (shipped, upscaled to 16×16, 3 channels), three
seeds each: SGD, ``kfac_tn.KFAC`` with its defaults, the same without its KL clip, with its
defaults before the Fashion-MNIST tuning (``docs/benchmark.md``), and
``kfac_tn.SINGD`` with the README's example values. BatchNorm parameters (not
preconditioned) take ``torch.optim.SGD`` steps with the same lr and momentum.

    python -m experiments.defaults            # ~1 min on 2 cores; table + docs/results/defaults.json
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

import kfac_tn
from experiments.data import load_data
from experiments.models import build_model

#: name → (optimizer factory on (model, its preconditioned parameters), fallback lr)
RUNS = {
    "SGD lr=0.1": (lambda m, ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 0.1),
    "KFAC defaults": (lambda m, ps: kfac_tn.KFAC(m, warn_unsupported=False), 0.01),
    "KFAC defaults, kl_clip=None": (lambda m, ps: kfac_tn.KFAC(m, kl_clip=None, warn_unsupported=False), 0.01),
    # the defaults before the Fashion-MNIST tuning (docs/benchmark.md), for comparison
    "KFAC old defaults": (lambda m, ps: kfac_tn.KFAC(m, lr=0.01, damping=1e-3, kl_clip=1e-3, kfac_approx="expand",
                                                   inverse_method="eigh", max_factor_dim=None,
                                                   warn_unsupported=False), 0.01),
    "SINGD README values": (
        lambda m, ps: kfac_tn.SINGD(m, lr=0.03, damping=0.1, T=10, kfac_approx="reduce", max_dense_dim=1024,
                                    warn_unsupported=False), 0.03),
}


def run(model_name: str, label: str, seed: int, steps: int, batch_size: int) -> dict:
    train, test, classes = load_data("digits", image_size=16)
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=classes)
    make, fallback_lr = RUNS[label]
    norms = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    others = [p for p in model.parameters() if all(p is not q for q in norms)]
    optimizers = [make(model, others if label.startswith("SGD") else None)]
    optimizers.append(torch.optim.SGD(norms, lr=fallback_lr, momentum=0.9))
    X, y = train.tensors
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        batch = torch.randint(0, len(X), (batch_size,), generator=generator)
        for opt in optimizers:
            opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X[batch]), y[batch])
        loss.backward()
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        Xt, yt = test.tensors
        accuracy = (model(Xt).argmax(1) == yt).float().mean().item()
    final = sum(losses[-10:]) / 10
    return {"model": model_name, "optimizer": label, "seed": seed, "first_loss": losses[0],
            "final_loss": final, "max_loss": max(losses), "diverged": not math.isfinite(final),
            "test_accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["mixed_cnn", "small_cnn"])
    parser.add_argument("--out", default="docs/results/defaults.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # skipped-step warnings of diverging runs
    rows = [run(m, label, seed, args.steps, args.batch_size)
            for m in args.models for label in RUNS for seed in range(args.seeds)]
    print(f"{args.steps} steps of batch {args.batch_size} on digits 16x16, seeds 0..{args.seeds - 1}")
    print(f"{'model':<10} {'optimizer':<28} {'final loss per seed':<26} {'test acc per seed':<22} "
          f"{'max/first loss':<18} diverged")
    for m in args.models:
        for label in RUNS:
            mine = [r for r in rows if r["model"] == m and r["optimizer"] == label]
            loss = " ".join(f"{r['final_loss']:.3g}" for r in mine)
            acc = " ".join(f"{r['test_accuracy']:.2f}" for r in mine)
            jump = " ".join(f"{r['max_loss'] / r['first_loss']:.2f}" for r in mine)
            print(f"{m:<10} {label:<28} {loss:<26} {acc:<22} {jump:<18} {sum(r['diverged'] for r in mine)}/{len(mine)}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "batch_size": args.batch_size, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
