"""Time and memory of SGD, stock SINGD and kfac_tn's SINGD per training step.

    python -m experiments.compare --config configs/compare_default.yaml [key=value ...]

Each (model, run) configuration runs in a fresh process on random CIFAR-shaped data
(class labels; per-pixel targets and mean squared error for dense-prediction models):
``warmup`` untimed steps, then ``steps`` timed ones (choose a multiple of T so the mean
amortises the preconditioner updates). Reports the median and mean seconds per step,
the peak memory above the memory held before the optimizer was built (CPU: peak RSS
via VmHWM, see measure.py; CUDA: max_memory_allocated), the persistent preconditioner
state, and ratios to SGD. Prints a markdown table, writes ``<out>.csv``, ``<out>.json``
and a bar chart ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from experiments.config import ConfigError, apply_overrides, check_keys, load_yaml
from experiments.optimizers import HYPERPARAMETER_TYPES, OPTIMIZERS, optimizer_arguments
from experiments.reporting import write_rows

ROOT = Path(__file__).resolve().parents[1]


TOP_KEYS = {
    "models": list, "batch_size": int, "image_size": int, "num_classes": int, "warmup": int,
    "steps": int, "threads": int, "device": str, "seed": int, "common": dict, "runs": list,
    "out": str, "repeats": int,
}
RUN_KEYS = {"optimizer": str, "label": str, "steps": int, **HYPERPARAMETER_TYPES}


def load_config(path: str, overrides: list[str]) -> dict:
    config = apply_overrides(load_yaml(path), overrides)
    check_keys(config, TOP_KEYS, "config")
    for key in ("models", "runs"):
        if not config.get(key):
            raise ConfigError(f"config.{key} must be a non-empty list.")
    from experiments.models import MODELS

    for model in config["models"]:
        if model not in MODELS:
            raise ConfigError(f"config.models has unknown model {model!r}; available: {sorted(MODELS)}.")
    check_keys(config.get("common", {}), HYPERPARAMETER_TYPES, "config.common")
    for i, run in enumerate(config["runs"]):
        if not isinstance(run, dict) or "optimizer" not in run:
            raise ConfigError(f"config.runs[{i}] must be a mapping with an 'optimizer' key.")
        check_keys(run, RUN_KEYS, f"config.runs[{i}]")
        if run["optimizer"] not in OPTIMIZERS:
            raise ConfigError(f"config.runs[{i}].optimizer {run['optimizer']!r} is unknown; use one of {OPTIMIZERS}.")
        takes = optimizer_arguments(run["optimizer"])
        for key in run:
            if key not in ("optimizer", "label", "steps") and key not in takes:
                raise ConfigError(f"config.runs[{i}].{key} is not an argument of {run['optimizer']}; "
                                  f"it takes {sorted(takes)}.")
    for key in ("batch_size", "steps", "image_size", "num_classes"):
        if key in config and config[key] < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {config[key]}.")
    return config


def _setting(run: dict) -> str:
    """The run's configuration without the optimizer: ``"expand diagonal/diagonal T=1"``."""
    if "label" in run:
        return run["label"]
    parts = []
    for key in ("kfac_approx", "structures", "T"):
        if key in run:
            value = run[key]
            parts.append("/".join(value) if isinstance(value, list) else f"{key}={value}" if key == "T" else str(value))
    return " ".join(parts)


def _label(run: dict) -> str:
    return " ".join(filter(None, [run["optimizer"], _setting(run)])) if "label" not in run else run["label"]


def _state_mib(optimizer) -> float:
    """Persistent preconditioner state: SINGD's K, C and momenta; KFAC's factors and inverses."""
    tensors = [t for s in getattr(optimizer, "kfac_state", {}).values() for t in s.values()]
    for attr in ("Ks", "Cs", "m_Ks", "m_Cs"):
        for value in getattr(optimizer, attr, {}).values():
            for matrix in value if isinstance(value, list) else [value]:
                tensors += [t for _, t in matrix.named_tensors()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def hyperparameters(config: dict, run: dict) -> dict:
    """The run's optimizer arguments: ``common`` keys its optimizer takes, then its own."""
    takes = optimizer_arguments(run["optimizer"])
    common = {k: v for k, v in config.get("common", {}).items() if k in takes}
    return {**common, **{k: v for k, v in run.items() if k not in ("optimizer", "label", "steps")}}


def worker(config: dict, model_name: str, run: dict) -> dict:
    import warnings

    import torch

    from experiments.measure import current_bytes, peak_bytes, reset_peak, timed
    from experiments.models import build_model, is_dense_prediction
    from experiments.optimizers import build_optimizer
    from experiments.train import loss_of

    warnings.simplefilter("ignore")
    torch.set_num_threads(config.get("threads", 2))
    device = torch.device(config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(config.get("seed", 0))
    classes, size, batch = config.get("num_classes", 10), config.get("image_size", 32), config.get("batch_size", 32)
    model = build_model(model_name, num_classes=classes).to(device)
    X = torch.randn(batch, 3, size, size, device=device)
    if is_dense_prediction(model):  # per-pixel targets, mean squared error
        y = torch.randn(batch, classes, size, size, device=device)
    else:
        y = torch.randint(0, classes, (batch,), device=device)
    base = current_bytes(device)
    optimizer = build_optimizer(model, run["optimizer"], **hyperparameters(config, run))

    def step():
        optimizer.zero_grad()
        loss_of(model(X), y).backward()
        optimizer.step()

    for _ in range(config.get("warmup", 1)):
        step()
    reset_peak(device)
    times = [timed(step, device)[0] for _ in range(run.get("steps", config.get("steps", 10)))]
    return {
        "model": model_name, "optimizer": _label(run), "kind": run["optimizer"], "setting": _setting(run),
        "device": device.type, "batch_size": batch,
        "median_s": statistics.median(times), "mean_s": statistics.fmean(times),
        "peak_extra_mib": (peak_bytes(device) - base) / 2**20,
        "state_mib": _state_mib(optimizer.main) if run["optimizer"] != "sgd" else 0.0,
    }


def run_all(config: dict, config_path: str, overrides: list[str]) -> list[dict]:
    """Every run in a fresh process; with ``repeats: R`` the whole list R times, round
    robin (so that slow phases of the machine hit all runs alike), reporting per run the
    median over the repeats of each figure (``mean_s_runs`` keeps every repeat's mean)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    repeats = config.get("repeats", 1)
    if repeats < 1:
        raise ConfigError(f"config.repeats must be at least 1, got {repeats}.")
    samples: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(repeats):
        for model_name in config["models"]:
            for index, run in enumerate(config["runs"]):
                cmd = [sys.executable, "-m", "experiments.compare", "--config", str(Path(config_path).resolve()), "--worker",
                       model_name, str(index),
                       *overrides]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                if proc.returncode:
                    print(f"{model_name} / {_label(run)} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                samples.setdefault((model_name, index), []).append(row)
                print(f"{model_name:9s} {row['optimizer']:40s} median {row['median_s']:7.3f} s  mean "
                      f"{row['mean_s']:7.3f} s  peak +{row['peak_extra_mib']:8.1f} MiB  state "
                      f"{row['state_mib']:7.1f} MiB" + (f"  (repeat {repeat + 1}/{repeats})" if repeats > 1 else ""),
                      flush=True)
    return [_combine(samples[key]) for key in sorted(samples, key=lambda k: (config["models"].index(k[0]), k[1]))]


def _combine(rows: list[dict]) -> dict:
    """One row: the median over repeats of every figure, every repeat's mean and their
    relative spread ``(max − min) / median`` (None for one repeat)."""
    out = dict(rows[0])
    for key in ("median_s", "mean_s", "peak_extra_mib", "state_mib"):
        out[key] = statistics.median(r[key] for r in rows)
    out["repeats"] = len(rows)
    out["mean_s_runs"] = [r["mean_s"] for r in rows]
    out["spread"] = (max(out["mean_s_runs"]) - min(out["mean_s_runs"])) / out["mean_s"] if len(rows) > 1 else None
    return out


#: relative spread of a row's repeats above which its time is flagged as unreliable
NOISY = 0.2


def verdicts(rows: list[dict]) -> list[dict]:
    """Stock vs kfac_tn SINGD for every (model, setting) both ran: time and memory ratios,
    and whether the time difference holds in every repeat (conclusive) or not."""
    out = []
    by_key = {(r["model"], r["setting"], r["kind"]): r for r in rows}
    for (model, setting, kind), tn in by_key.items():
        stock = by_key.get((model, setting, "singd_stock"))
        if kind != "singd_tn" or stock is None:
            continue
        speedup = stock["mean_s"] / tn["mean_s"]
        memory = (tn["extra_over_sgd_mib"] / stock["extra_over_sgd_mib"]
                  if tn.get("extra_over_sgd_mib") is not None and stock.get("extra_over_sgd_mib") else None)
        if tn["repeats"] < 2 or stock["repeats"] < 2:
            verdict = "one run each: no spread known (use repeats >= 3)"
        elif min(stock["mean_s_runs"]) > max(tn["mean_s_runs"]):
            verdict = f"kfac_tn faster in every repeat ({speedup:.2f}x)"
        elif min(tn["mean_s_runs"]) > max(stock["mean_s_runs"]):
            verdict = f"stock faster in every repeat ({1 / speedup:.2f}x)"
        else:
            verdict = "within noise: the repeats overlap"
        noisy = max(r["spread"] or 0.0 for r in (tn, stock)) > NOISY
        out.append({"model": model, "setting": setting, "stock_s": stock["mean_s"], "kfac_tn_s": tn["mean_s"],
                    "speedup": speedup, "stock_above_sgd_mib": stock.get("extra_over_sgd_mib"),
                    "kfac_tn_above_sgd_mib": tn.get("extra_over_sgd_mib"), "memory_ratio": memory,
                    "verdict": verdict + (" (spread > 20%: the machine was busy)" if noisy else "")})
    return out


def report(rows: list[dict], out: Path) -> None:
    sgd = {r["model"]: r for r in rows if r["kind"] == "sgd"}
    for r in rows:
        ref = sgd.get(r["model"])
        r["time_ratio"] = r["mean_s"] / ref["mean_s"] if ref else None
        r["memory_ratio"] = r["peak_extra_mib"] / ref["peak_extra_mib"] if ref and ref["peak_extra_mib"] > 0 else None
        r["extra_over_sgd_mib"] = r["peak_extra_mib"] - ref["peak_extra_mib"] if ref else None
    write_rows(rows, out)
    repeats = max(r.get("repeats", 1) for r in rows)
    print(f"\nTime: mean s/step over the timed steps, median over {repeats} repeat(s) (round robin, fresh "
          "processes); spread = (max - min) / median of the repeats. Memory: peak above the memory "
          "held before the optimizer was built.")
    print("\n| net | optimizer | s/step | spread | × SGD | peak extra [MiB] | above SGD [MiB] | state [MiB] |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = f"{100 * r['spread']:.0f}%" if r.get("spread") is not None else "–"
        ratio = f"{r['time_ratio']:.2f}" if r["time_ratio"] else "–"
        above = f"{r['extra_over_sgd_mib']:.0f}" if r["extra_over_sgd_mib"] is not None else "–"
        print(f"| {r['model']} | {r['optimizer']} | {r['mean_s']:.3f} | {spread} | {ratio} | "
              f"{r['peak_extra_mib']:.0f} | {above} | {r['state_mib']:.0f} |")
    pairs = verdicts(rows)
    if pairs:
        print("\n| net | setting | stock s/step | kfac_tn s/step | speed-up | above SGD: stock / kfac_tn [MiB] | verdict |")
        print("|---|---|---|---|---|---|---|")
        for v in pairs:
            memory = (f"{v['stock_above_sgd_mib']:.0f} / {v['kfac_tn_above_sgd_mib']:.0f}"
                      if v["stock_above_sgd_mib"] is not None else "–")
            print(f"| {v['model']} | {v['setting']} | {v['stock_s']:.3f} | {v['kfac_tn_s']:.3f} | "
                  f"{v['speedup']:.2f}x | {memory} | {v['verdict']} |")
        Path(out.with_name(out.name + "_verdicts.json")).write_text(json.dumps(pairs, indent=1))
    if any((r.get("spread") or 0) > NOISY for r in rows):
        print(f"\nWarning: some rows vary by more than {100 * NOISY:.0f}% between repeats; their times are "
              "not reliable (another process was probably running).")
    _plot(rows, pairs, out.with_suffix(".png"))
    print(f"\nwrote {out.with_suffix('.csv')}, {out.with_suffix('.json')}, "
          f"{out.with_name(out.name + '_verdicts.json')} and {out.with_suffix('.png')}")


def _plot(rows: list[dict], pairs: list[dict], path: Path) -> None:
    """Per model and setting: stock vs kfac_tn time and memory above SGD, SGD's time as a
    dashed line, kfac_tn's ratio to stock written over its bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pairs:
        return
    sgd = {r["model"]: r["mean_s"] for r in rows if r["kind"] == "sgd"}
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.6 * len(pairs) + 3), 5))
    x = range(len(pairs))
    labels = [f"{v['model']}\n{v['setting']}" for v in pairs]
    panels = ((axes[0], "stock_s", "kfac_tn_s", "time per step [s]", "speedup"),
              (axes[1], "stock_above_sgd_mib", "kfac_tn_above_sgd_mib", "peak memory above SGD [MiB]", None))
    for ax, stock_key, tn_key, ylabel, ratio_key in panels:
        stock = [v[stock_key] or 0 for v in pairs]
        tn = [v[tn_key] or 0 for v in pairs]
        ax.bar([i - 0.2 for i in x], stock, 0.4, color="tab:orange", label="stock singd")
        ax.bar([i + 0.2 for i in x], tn, 0.4, color="tab:blue", label="kfac_tn")
        for i, v in enumerate(pairs):
            ratio = v["speedup"] if ratio_key else (tn[i] / stock[i] if stock[i] else None)
            if ratio is not None:
                text = f"{ratio:.2f}x faster" if ratio_key else f"{ratio:.2f}x"
                ax.annotate(text, (i + 0.2, tn[i]), ha="center", va="bottom", fontsize=8)
            if ratio_key and v["model"] in sgd:
                ax.hlines(sgd[v["model"]], i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                          label="SGD" if i == 0 else None)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.3 * max(stock + tn + ([max(sgd.values())] if ratio_key and sgd else [])))
        ax.legend(fontsize=8, loc="upper left", ncol=3)
    fig.suptitle("SINGD per training step: stock singd vs kfac_tn (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="default: configs/compare_default.yaml")
    parser.add_argument("--full", action="store_true",
                        help="ResNet18 and VGG19 at batch 128, more structures: configs/compare_full.yaml (GPU)")
    parser.add_argument("--out", default=None, help="output prefix (default: config's 'out' or results/compare)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=16")
    args = parser.parse_args()
    if args.config is None:
        args.config = str(ROOT / "configs" / ("compare_full.yaml" if args.full else "compare_default.yaml"))
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.worker:
        model_name, index = args.worker
        print(json.dumps(worker(config, model_name, config["runs"][int(index)])))
        return
    rows = run_all(config, args.config, args.overrides)
    if not rows:
        sys.exit("No configuration ran successfully.")
    report(rows, Path(args.out or config.get("out", "results/compare")))


if __name__ == "__main__":
    main()
