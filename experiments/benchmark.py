"""Time-to-accuracy benchmark on real data, after DeepOBS's protocol at a small scale.

    python -m experiments.benchmark --problem fmnist_2c2d            # full: tuning + 3 seeds
    python -m experiments.benchmark --problem fmnist_2c2d --quick    # a few minutes, no tuning
    python -m experiments.benchmark --problem fmnist_vae --optimizers adam kfac

For every optimizer: its learning rate (and damping or KL clip, for second-order ones) is tuned on a
short log grid, each point trained for ``--tune-budget`` seconds (seed 0) and scored on
the validation images carved from the training set; the best point then trains with each
of ``--seeds`` for ``--budget`` seconds of training time (evaluation excluded), evaluated
on the test set every ``--eval-every`` seconds. Reported per optimizer: wall-clock and
epochs until a test accuracy is first reached (each problem's ``targets``; for the VAE: test
losses),
the best test metric within the budget, seconds per step and the peak memory above the
process's resident size before the run. Writes ``<out>/summary.{csv,json}``,
``<out>/curves.json`` and ``<out>/curves.png`` (test metric against seconds and against
epochs, the band spans the seeds). Every run is kept in ``<out>/runs/`` and reused when
the command is repeated (resumable; ``--fresh`` retrains). ``--quick`` skips the tuning
(each optimizer's preset point), runs one seed with a short budget and a subset of the
optimizers.

Problems (DeepOBS's, on Fashion-MNIST from Debian's ``dataset-fashion-mnist``, see
``experiments.data``): ``fmnist_2c2d`` (batch 128, cross-entropy, test accuracy) and
``fmnist_vae`` (batch 64, DeepOBS's VAE loss, test loss); with a local CIFAR-10 copy
(``--data-dir``) also ``cifar10_resnet18`` and ``cifar10_vgg19`` (batch 128).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from experiments.data import DataError, load_data
from experiments.measure import current_bytes, peak_bytes, reset_peak
from experiments.models import build_model, vae_loss
from experiments.optimizers import Combined, build_optimizer
from experiments.reporting import write_rows


@dataclass(frozen=True)
class Problem:
    """A model, its data and loss; ``metric``: ``"accuracy"`` (higher is better) or ``"loss"``."""

    model: str
    data: str
    batch_size: int
    metric: str
    targets: tuple[float, ...]
    num_classes: int = 10
    in_channels: int = 1


PROBLEMS = {
    "fmnist_2c2d": Problem("fmnist_2c2d", "fashion_mnist", 128, "accuracy", (0.90, 0.91, 0.92)),
    "fmnist_vae": Problem("fmnist_vae", "fashion_mnist_images", 64, "loss", (50.0, 40.0, 35.0), 1),
    "cifar10_resnet18": Problem("resnet18", "cifar10", 128, "accuracy", (0.80, 0.85, 0.90), 10, 3),
    "cifar10_vgg19": Problem("vgg19", "cifar10", 128, "accuracy", (0.80, 0.85, 0.90), 10, 3),
}


@dataclass(frozen=True)
class Setting:
    """An optimizer of :mod:`experiments.optimizers` (``name``; ``adam``: torch's Adam) with
    fixed arguments and a tuning grid (``grid[key]``: candidate values, the first the preset).
    ``schedule="cosine"``: every group's learning rate decays as ``lr·(1 + cos(π·progress))/2``,
    progress the run's fraction of its budget (of its epochs, or else of its seconds)."""

    name: str
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    schedule: str | None = None

    def __post_init__(self) -> None:
        if self.schedule not in (None, "cosine"):
            raise ValueError(f"schedule must be None or 'cosine', got {self.schedule!r}")


_SINGD_LR = (0.1, 0.03, 0.3)  # SGD-like learning rates (momentum 0.9): SINGD starts from K = C = I
#: kfac_tn's cost controls for a large dense layer (blocks of at most 256, Cholesky inverses)
_KFAC_COST = {"max_factor_dim": 256, "inverse_method": "cholesky"}
SETTINGS = {
    "sgd": Setting("sgd", {"momentum": 0.0}, {"lr": (0.158, 0.05, 0.5)}),  # DeepOBS's tuned lr first
    "momentum": Setting("sgd", {"momentum": 0.9}, {"lr": (0.01, 0.003, 0.03)}),
    "adam": Setting("adam", {}, {"lr": (1e-3, 3e-4, 3e-3)}),
    "singd_stock": Setting("singd_stock", {"momentum": 0.9, "T": 10, "kfac_approx": "reduce",
                                           "structures": ["dense", "dense"]}, {"lr": _SINGD_LR}),
    **{f"singd_{s}_{a}": Setting("singd_tn", {"momentum": 0.9, "T": 10 if s == "dense" else 1, "kfac_approx": a,
                                              "structures": [s, s]}, {"lr": _SINGD_LR})
       for s in ("dense", "diagonal", "block30diagonal") for a in ("expand", "reduce")},
    # dense SINGD whose factors above 1024 rows are block30diagonal (kfac_tn.budget_groups);
    # damping 1e-3 (stock's default) diverged after 80-140 s in all three seeds: larger ones
    "singd_budget": Setting("singd_tn", {"momentum": 0.9, "T": 10, "kfac_approx": "reduce",
                                         "structures": ["dense", "dense"], "max_dense_dim": 1024}, {"lr": _SINGD_LR}),
    **{f"singd_budget_damping{d:g}": Setting("singd_tn", {"momentum": 0.9, "T": 10, "kfac_approx": "reduce",
                                                          "structures": ["dense", "dense"], "max_dense_dim": 1024,
                                                          "damping": d}, {"lr": (0.03,)}) for d in (1e-2, 1e-1)},
    # KFAC's defaults are this grid's best point
    "kfac": Setting("kfac", {**_KFAC_COST, "kfac_approx": "reduce"},
                    {"lr": (0.01, 0.03, 0.003), "damping": (1e-2, 1e-3), "kl_clip": (1e-2, 1e-3)}),
    "kfac_expand": Setting("kfac", {**_KFAC_COST, "kfac_approx": "expand", "factor_update_freq": 5},
                           {"lr": (0.01, 0.03), "damping": (1e-2, 1e-3), "kl_clip": (1e-2,)}),
    "kfac_exact": Setting("kfac", {"inverse_method": "cholesky", "max_factor_dim": None, "kfac_approx": "reduce"},
                          {"lr": (0.01,), "damping": (1e-2,), "kl_clip": (1e-2,)}),  # no blocks: their price
    "kfac_defaults": Setting("kfac"),  # every default, untuned: the out-of-the-box check
    # the defaults with looser KL clips: the bound lr²⟨d, g⟩ ≤ κ scales with the loss (a VAE's
    # loss sums 784 pixels), so a clip tuned on a classifier can hold a step back elsewhere
    "kfac_kl_clip": Setting("kfac", {}, {"kl_clip": (0.1, 1.0), "lr": (0.003, 0.01)}),
    # budget-aware runs (run them with --epochs): cosine decay to zero over the budget, and for
    # KFAC an L2 penalty that acts after preconditioning (lr·wd per step, like SGD's 0.1·5e-4);
    # KFAC's are presets (a 30 s tuning run cannot see a penalty that pays after epochs)
    "adam_cosine": Setting("adam", {}, {"lr": (1e-3, 3e-3)}, schedule="cosine"),
    "kfac_cosine": Setting("kfac", {}, schedule="cosine"),
    "kfac_cosine_wd": Setting("kfac", {"weight_decay": 1e-2}, schedule="cosine"),
}
QUICK_OPTIMIZERS = ("sgd", "momentum", "adam", "kfac_defaults", "singd_dense_reduce")


def build(setting: Setting, model: nn.Module, hyper: dict[str, Any]) -> Combined:
    """The optimizer of ``setting`` at the grid point ``hyper``."""
    kwargs = {**setting.fixed, **hyper}
    if setting.name == "adam":
        return Combined(torch.optim.Adam(model.parameters(), **kwargs), None)
    return build_optimizer(model, setting.name, **kwargs)


def _loss(problem: Problem, out: Any, y: Tensor) -> Tensor:
    return vae_loss(out, y) if problem.metric == "loss" else nn.functional.cross_entropy(out, y)


@torch.no_grad()
def evaluate(problem: Problem, model: nn.Module, X: Tensor, y: Tensor, batch: int = 1000) -> dict[str, float]:
    """Mean loss and (classification) accuracy on ``(X, y)``; torch's RNG states are restored
    afterwards, so evaluating (the VAE samples) does not change the training run."""
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if X.is_cuda else None
    model.eval()
    loss, hits = 0.0, 0
    for start in range(0, len(X), batch):
        out = model(X[start : start + batch])
        target = y[start : start + batch]
        loss += float(_loss(problem, out, target)) * len(target)
        if problem.metric == "accuracy":
            hits += int((out.argmax(1) == target).sum())
    model.train()
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state_all(cuda_rng)
    result = {"loss": loss / len(X)}
    if problem.metric == "accuracy":
        result["accuracy"] = hits / len(X)
    return result


@functools.lru_cache(maxsize=2)
def _data(name: str, data_dir: str | None, split: str):
    return load_data(name, data_dir, split=split)


def train_run(problem: Problem, setting: Setting, hyper: dict[str, Any], seed: int, budget: float,
              split: str, eval_every: float, data_dir: str | None = None, device: str = "cpu",
              epochs: float | None = None) -> dict[str, Any]:
    """Train for ``budget`` seconds of step time (or for ``epochs`` epochs, when given) on
    ``device`` (the data set lives there whole); the curve of the held-out ``split``."""
    device = torch.device(device)
    train, held_out, classes = _data(problem.data, data_dir, split)
    X, y = (t.to(device) for t in train.tensors)
    Xh, yh = (t.to(device) for t in held_out.tensors)
    torch.manual_seed(seed)
    model = build_model(problem.model, num_classes=classes, in_channels=X.shape[1]).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = build(setting, model, hyper)
    baseline = current_bytes(device)
    reset_peak(device)
    batches_per_epoch = len(X) // problem.batch_size
    if batches_per_epoch == 0:
        raise DataError(f"{problem.data} has {len(X)} training samples, fewer than one batch of {problem.batch_size}.")
    max_steps = math.inf if epochs is None else max(1, round(epochs * batches_per_epoch))
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # Combined: every inner optimizer's
    order = torch.Generator().manual_seed(seed)
    curve, seconds, steps, diverged = [], 0.0, 0, False
    losses: list[float] = []
    window, worst_window = [], 0.0  # the training loss's running mean over 10 steps, and its maximum
    first_loss = math.nan
    next_eval = 0.0
    while True:
        done = seconds >= budget or steps >= max_steps
        if seconds >= next_eval or done or diverged:
            point = evaluate(problem, model, Xh, yh)
            curve.append({"seconds": seconds, "step": steps, "epoch": steps / batches_per_epoch,
                          "train_loss": statistics.fmean(losses) if losses else float("nan"), **point})
            losses = []
            next_eval += eval_every
            if done or diverged:
                break
        if steps % batches_per_epoch == 0:
            perm = torch.randperm(len(X), generator=order).to(device)
        index = perm[(steps % batches_per_epoch) * problem.batch_size:][: problem.batch_size]
        if setting.schedule == "cosine":
            progress = steps / max_steps if epochs is not None else min(seconds / budget, 1.0)
            for g, lr in zip(optimizer.param_groups, base_lrs):
                g["lr"] = lr * (1 + math.cos(math.pi * progress)) / 2
        start = time.perf_counter()
        xb, yb = X[index], y[index]
        optimizer.zero_grad()
        loss = _loss(problem, model(xb), yb)
        loss.backward()
        optimizer.step()
        value = loss.item()  # (on a GPU: waits for the step, so the clock times it)
        seconds += time.perf_counter() - start
        steps += 1
        losses.append(value)
        window = (window + [value])[-10:]
        if len(window) == 10:
            worst_window = max(worst_window, statistics.fmean(window))
        first_loss = value if steps == 1 else first_loss
        diverged = not math.isfinite(value)
    return {"curve": curve, "steps": steps, "seconds": seconds, "seconds_per_step": seconds / max(steps, 1),
            "peak_mib": (peak_bytes(device) - baseline) / 2**20, "diverged": diverged,
            "first_loss": first_loss, "worst_loss_window": worst_window}


def _key(problem: str, optimizer: str, hyper: dict[str, Any], split: str, seed: int, budget: float,
         device: str = "cpu", epochs: float | None = None) -> str:
    point = "_".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(hyper.items()))
    length = f"{budget:g}s" if epochs is None else f"{epochs:g}ep"
    return f"{problem}-{optimizer}-{point or 'preset'}-{split}-s{seed}-{length}" + ("" if device == "cpu" else f"-{device}")


def _cached_run(out: Path, fresh: bool, key: str, *args: Any) -> dict[str, Any]:
    """``train_run(*args)``, or its result kept under ``<out>/runs/<key>.json``."""
    path = out / "runs" / f"{key}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    result = train_run(*args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return result


def score(problem: Problem, result: dict[str, Any]) -> float:
    """The tuning score of a run (higher is better): its last held-out accuracy, or minus
    its last held-out loss; a diverged run scores -inf."""
    last = result["curve"][-1]
    if result["diverged"] or not math.isfinite(last["loss"]):
        return -math.inf
    return last["accuracy"] if problem.metric == "accuracy" else -last["loss"]


def grid_points(setting: Setting, quick: bool) -> list[dict[str, Any]]:
    """Every combination of the grid (quick: the preset only)."""
    points: list[dict[str, Any]] = [{}]
    for key, values in setting.grid.items():
        points = [{**p, key: v} for p in points for v in (values[:1] if quick else values)]
    return points


def reached(problem: Problem, curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation at which ``target`` was reached (accuracy ≥ or loss ≤), or None."""
    for point in curve:
        value = point[problem.metric]
        if (value >= target) if problem.metric == "accuracy" else (value <= target):
            return point
    return None


def summarize(problem: Problem, name: str, hyper: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of the summary table: medians over the seeds that reached each target."""
    best = [max(p[problem.metric] for p in r["curve"]) if problem.metric == "accuracy"
            else min(p[problem.metric] for p in r["curve"]) for r in runs]
    row: dict[str, Any] = {"optimizer": name, "hyper": json.dumps(hyper), "seeds": len(runs),
                           "seconds_per_step": statistics.fmean(r["seconds_per_step"] for r in runs),
                           "peak_mib": max(r["peak_mib"] for r in runs),
                           f"best_{problem.metric}": statistics.fmean(best),
                           f"best_{problem.metric}_std": statistics.pstdev(best),
                           f"final_{problem.metric}": statistics.fmean(r["curve"][-1][problem.metric] for r in runs),
                           "diverged": sum(r["diverged"] for r in runs),
                           "max_loss_ratio": max(r["worst_loss_window"] / r["first_loss"] for r in runs)}
    for target in problem.targets:
        hits = [reached(problem, r["curve"], target) for r in runs]
        done = [h for h in hits if h is not None]
        row[f"seconds_to_{target:g}"] = statistics.median(h["seconds"] for h in done) if done else None
        row[f"epochs_to_{target:g}"] = statistics.median(h["epoch"] for h in done) if done else None
        row[f"seeds_at_{target:g}"] = len(done)
    return row


def _format(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def print_table(problem: Problem, rows: list[dict[str, Any]]) -> None:
    metric = problem.metric
    head = ["optimizer", "s/step", "peak MiB", f"best {metric}", *[f"s to {t:g}" for t in problem.targets],
            *[f"ep to {t:g}" for t in problem.targets], "hyper"]
    print(" | ".join(head))
    for r in rows:
        cells = [r["optimizer"], f"{r['seconds_per_step']:.3f}", f"{r['peak_mib']:.0f}",
                 f"{r[f'best_{metric}']:.4f} ± {r[f'best_{metric}_std']:.4f}",
                 *[_format(r[f"seconds_to_{t:g}"]) + (f" ({r[f'seeds_at_{t:g}']}/{r['seeds']})"
                   if r[f"seeds_at_{t:g}"] < r["seeds"] else "") for t in problem.targets],
                 *[_format(r[f"epochs_to_{t:g}"]) for t in problem.targets], r["hyper"]]
        print(" | ".join(cells), flush=True)


def plot(problem: Problem, curves: dict[str, list[list[dict[str, Any]]]], path: Path) -> None:
    """Test metric against seconds and epochs; line: mean over seeds, band: min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in curves.items():
        for ax, x_key in zip(axes, ("seconds", "epoch")):
            length = min(len(c) for c in runs)
            xs = [statistics.fmean(c[i][x_key] for c in runs) for i in range(length)]
            values = [[c[i][problem.metric] for c in runs] for i in range(length)]
            line, = ax.plot(xs, [statistics.fmean(v) for v in values], label=name)
            ax.fill_between(xs, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.2)
    for ax, x_label in zip(axes, ("training seconds (evaluation excluded)", "epochs")):
        ax.set(xlabel=x_label, ylabel=f"test {problem.metric}", title=f"{problem.model} on {problem.data}")
        if problem.metric == "accuracy":
            ax.set_ylim(max(0.0, min(problem.targets) - 0.12), min(1.0, max(problem.targets) + 0.02))
        else:
            ax.set_ylim(min(problem.targets) - 3, max(problem.targets) + 25)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="fmnist_2c2d", choices=sorted(PROBLEMS))
    parser.add_argument("--optimizers", nargs="*", choices=sorted(SETTINGS), default=None,
                        help=f"default: all (quick: {' '.join(QUICK_OPTIMIZERS)})")
    parser.add_argument("--quick", action="store_true", help="no tuning, one seed, 20 s budget")
    parser.add_argument("--budget", type=float, default=None, help="seconds of training per final run (150)")
    parser.add_argument("--epochs", type=float, default=None,
                        help="epochs per final run, instead of --budget's seconds (its cosine schedules span them)")
    parser.add_argument("--tune-budget", type=float, default=30.0, help="seconds of training per tuning run")
    parser.add_argument("--eval-every", type=float, default=None, help="seconds between evaluations (10)")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="final-run seeds (0 1 2)")
    parser.add_argument("--data-dir", default=None, help="the data set's folder (default: the package's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when there is one)")
    parser.add_argument("--out", default=None, help="output folder (results/benchmark/<problem>)")
    parser.add_argument("--fresh", action="store_true", help="retrain runs that are kept in <out>/runs")
    parser.add_argument("--tune-only", action="store_true", help="stop after the tuning (prints the chosen points)")
    args = parser.parse_args(argv)
    if args.epochs is not None and (args.budget is not None or args.epochs <= 0):
        parser.error("--epochs takes a positive number of epochs and replaces --budget")
    problem = PROBLEMS[args.problem]
    names = args.optimizers or list(QUICK_OPTIMIZERS if args.quick else SETTINGS)
    budget = math.inf if args.epochs else args.budget or (20.0 if args.quick else 150.0)
    eval_every = args.eval_every or (5.0 if args.quick else 10.0)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    out = Path(args.out or f"results/benchmark/{args.problem}{'_quick' if args.quick else ''}")
    torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        load_data(problem.data, args.data_dir, split="valid" if not args.quick else "test")
    except DataError as err:
        raise SystemExit(f"error: {err}") from err
    from tqdm import tqdm

    tuning = {n: grid_points(SETTINGS[n], args.quick) for n in names}
    tuned = sum(len(points) for points in tuning.values() if len(points) > 1)
    bar = tqdm(total=tuned + len(names) * len(seeds), desc=args.problem)
    chosen: dict[str, dict[str, Any]] = {}
    for name, points in tuning.items():
        if len(points) == 1:
            chosen[name] = points[0]
            continue
        scores = {}
        for point in points:
            bar.set_postfix_str(f"tuning {name} {point}")
            result = _cached_run(out, args.fresh, _key(args.problem, name, point, "valid", 0, args.tune_budget, device),
                                 problem, SETTINGS[name], point, 0, args.tune_budget, "valid", args.tune_budget,
                                 args.data_dir, device)
            scores[json.dumps(point)] = score(problem, result)
            bar.update(1)
        chosen[name] = json.loads(max(scores, key=scores.get))
        if all(v == -math.inf for v in scores.values()):
            bar.write(f"{name}: every grid point diverged; its final runs use the first ({chosen[name]})")
        bar.write(f"{name}: " + ", ".join(f"{p} {v:.4f}" for p, v in sorted(scores.items(), key=lambda kv: -kv[1])))
    if args.tune_only:
        bar.close()
        print(json.dumps(chosen, indent=1))
        return
    rows, curves = [], {}
    for name in names:
        runs = []
        for seed in seeds:
            bar.set_postfix_str(f"{name} seed {seed}")
            key = _key(args.problem, name, chosen[name], "test", seed, budget, device, args.epochs)
            runs.append(_cached_run(out, args.fresh, key, problem, SETTINGS[name], chosen[name], seed, budget,
                                    "test", eval_every, args.data_dir, device, args.epochs))
            bar.update(1)
        rows.append(summarize(problem, name, chosen[name], runs))
        curves[name] = [r["curve"] for r in runs]
    bar.close()
    print_table(problem, rows)
    write_rows(rows, out / "summary")
    (out / "curves.json").write_text(json.dumps({"problem": args.problem, "budget": None if args.epochs else budget, "epochs": args.epochs, "seeds": seeds,
                                                 "chosen": chosen, "curves": curves}))
    plot(problem, curves, out / "curves.png")
    print(f"wrote {out / 'summary.csv'}, {out / 'summary.json'}, {out / 'curves.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
