"""Train a registered model with SGD, stock SINGD, kfac_tn's SINGD or kfac_tn's KFAC.

Classification (cross-entropy, accuracy) or, for data sets with image targets
(``digits_denoise``) and dense-prediction models (``unet_small``), per-pixel regression
(mean squared error, PSNR).

    python -m experiments.train --config configs/train_resnet18_singd_tn_synthetic.yaml [key=value ...] [--resume]

Writes ``metrics.csv`` / ``metrics.json`` (one row per epoch) and ``last.pt`` (written
atomically: temp file, then rename; every ``output.checkpoint_every`` epochs, default 1,
and after the last) to the config's ``output.dir``. A checkpoint holds the model and the
optimizer's whole state: for dense SINGD/KFAC about the size of the preconditioner (e.g.
~0.8 GB for ResNet18, ~1.5 GB for VGG19). ``--resume``
continues from ``last.pt`` exactly: model, optimizer (with the preconditioner), RNG
states and epoch. BatchNorm and other parameters without Kronecker factors are
trained by a fallback SGD with the same lr/momentum/weight decay.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from experiments.config import ConfigError, apply_overrides, check_keys, compose, load_yaml
from experiments.data import DATASETS, DENSE_DATASETS, RECONSTRUCTION_DATASETS, DataError, load_data
from experiments.models import MODELS, build_model
from experiments.optimizers import (
    HYPERPARAMETER_TYPES,
    OPTIMIZERS,
    build_optimizer,
    optimizer_arguments,
)
from experiments.reporting import write_rows

ROOT = Path(__file__).resolve().parents[1]

TOP = {"model": str, "data": dict, "optimizer": dict, "training": dict, "output": dict}
DATA = {"name": str, "data_dir": str, "image_size": int, "num_classes": int, "n_train": int, "n_test": int}
TRAINING = {"epochs": int, "batch_size": int, "seed": int, "device": str, "amp": bool,
            "max_steps_per_epoch": int, "threads": int}
OUTPUT = {"dir": str, "checkpoint_every": int}
OPTIMIZER = {"name": str, **HYPERPARAMETER_TYPES}


DEFAULT_CONFIG = ROOT / "configs" / "train.yaml"


def load_config(path: str | None, overrides: list[str]) -> dict:
    """The training config, validated (errors name the key or value): ``path`` taken as it
    is with the overrides applied, or (``None``) ``configs/train.yaml`` composed with the
    model, optimizer and data groups it or the overrides choose (see ``config.compose``)."""
    config = compose(DEFAULT_CONFIG, overrides) if path is None else apply_overrides(load_yaml(path), overrides)
    check_keys(config, TOP, "config")
    for key in ("model", "optimizer"):
        if key not in config:
            raise ConfigError(f"config.{key} is required.")
    if config["model"] not in MODELS:
        raise ConfigError(f"config.model {config['model']!r} is unknown; available: {sorted(MODELS)}.")
    data, training, opt = config.setdefault("data", {}), config.setdefault("training", {}), config["optimizer"]
    config.setdefault("output", {})
    check_keys(data, DATA, "config.data")
    check_keys(training, TRAINING, "config.training")
    check_keys(config["output"], OUTPUT, "config.output")
    check_keys(opt, OPTIMIZER, "config.optimizer")
    if data.get("name", "synthetic") not in DATASETS:
        raise ConfigError(f"config.data.name {data['name']!r} is unknown; available: {DATASETS}.")
    if getattr(MODELS[config["model"]], "variational", False) or data.get("name") in RECONSTRUCTION_DATASETS:
        raise ConfigError(f"config.model {config['model']!r} / config.data.name {data.get('name')!r}: the VAE "
                          "problem is trained by python -m experiments.benchmark --problem fmnist_vae.")
    dense_model = getattr(MODELS[config["model"]], "dense_prediction", False)
    if dense_model != (data.get("name", "synthetic") in DENSE_DATASETS):
        need = "a dense-prediction data set " + str(DENSE_DATASETS) if dense_model else "a classification data set"
        raise ConfigError(f"config.model {config['model']!r} needs {need}; config.data.name is "
                          f"{data.get('name', 'synthetic')!r}.")
    if opt.get("name") not in OPTIMIZERS:
        raise ConfigError(f"config.optimizer.name {opt.get('name')!r} is unknown; available: {OPTIMIZERS}.")
    takes = optimizer_arguments(opt["name"])
    for key in opt:
        if key != "name" and key not in takes:
            raise ConfigError(f"config.optimizer.{key} is not an argument of {opt['name']}; it takes {sorted(takes)}.")
    if config["output"].get("checkpoint_every", 1) < 0:
        raise ConfigError("config.output.checkpoint_every must be >= 0 (0: only after the last epoch).")
    for key in ("epochs", "batch_size"):
        if training.get(key, 1) < 1:
            raise ConfigError(f"config.training.{key} must be >= 1, got {training[key]}.")
    return config


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomically(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


#: the targets' range of the dense-prediction data (images in [-1, 1]), for PSNR
PEAK_TO_PEAK = 2.0


def loss_of(out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for class labels, mean squared error (per element) for image targets."""
    if y.is_floating_point():
        loss = torch.nn.functional.mse_loss(out, y, reduction="sum")
        return loss / y[0].numel() if reduction == "sum" else loss / y.numel()
    return torch.nn.functional.cross_entropy(out, y, reduction=reduction)


def _hits(out: torch.Tensor, y: torch.Tensor) -> float:
    """Correct predictions (classification) or nothing (regression)."""
    return 0.0 if y.is_floating_point() else float((out.argmax(1) == y).sum().item())


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio [dB] of a mean squared error on targets in [-1, 1]."""
    return 10 * math.log10(PEAK_TO_PEAK**2 / max(mse, 1e-12))


def _metrics(prefix: str, loss: float, hits: float, dense: bool) -> dict:
    """``{prefix}_loss`` and ``{prefix}_acc`` (classification) or ``{prefix}_psnr``."""
    return {f"{prefix}_loss": loss, f"{prefix}_psnr": psnr(loss)} if dense else {
        f"{prefix}_loss": loss, f"{prefix}_acc": hits}


def _evaluate(model, loader, device) -> tuple[float, float]:
    """Mean loss and accuracy (0 for regression) over ``loader``."""
    model.eval()
    total, correct, loss_sum = 0, 0.0, 0.0
    with torch.no_grad():
        for X, y in loader:
            X, y = X.to(device), y.to(device)
            out = model(X)
            loss_sum += loss_of(out, y, reduction="sum").item()
            correct += _hits(out, y)
            total += len(y)
    model.train()
    return loss_sum / max(total, 1), correct / max(total, 1)


def _init_distributed() -> tuple[int, int]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): (rank, world)."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), world


def train(config: dict, resume: bool = False, progress: bool = True) -> list[dict]:
    """Run the training described by ``config``; returns the per-epoch metrics.

    Under ``torchrun --nproc_per_node N`` each process trains a replica on its shard of
    every batch (``batch_size`` per process); the optimizers all-reduce statistics and
    gradients, the fallback SGD's gradients are all-reduced here, and rank 0 writes
    metrics and checkpoints.
    """
    from tqdm import tqdm

    from kfac_tn.optim.distributed import all_reduce_flat

    rank, world = _init_distributed()

    training, data_cfg, opt_cfg = config["training"], config["data"], dict(config["optimizer"])
    out_dir = Path(config["output"].get("dir", "results/train"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(training.get("threads", torch.get_num_threads()))
    seed = training.get("seed", 0)
    torch.manual_seed(seed)
    random.seed(seed)
    device = _device(training.get("device"))
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    train_set, test_set, classes = load_data(
        data_cfg.get("name", "synthetic"), data_cfg.get("data_dir"), data_cfg.get("image_size", 32),
        data_cfg.get("num_classes", 10), data_cfg.get("n_train", 512), data_cfg.get("n_test", 128), seed,
    )
    in_channels = train_set.tensors[0].shape[1]
    model = build_model(config["model"], num_classes=classes, in_channels=in_channels).to(device)
    dense = data_cfg.get("name", "synthetic") in DENSE_DATASETS
    name = opt_cfg.pop("name")
    try:
        optimizer = build_optimizer(model, name, **opt_cfg)
    except (ValueError, TypeError) as err:  # the constructor's own checks name the argument
        raise ConfigError(f"config.optimizer ({name}): {err}") from err
    amp = training.get("amp", False)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    batch_size = training.get("batch_size", 32)
    test_loader = DataLoader(test_set, batch_size=256)
    checkpoint = out_dir / "last.pt"
    history: list[dict] = []
    start_epoch = 0
    if resume:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}.")
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        history, start_epoch = state["history"], state["epoch"] + 1
        if start_epoch >= training.get("epochs", 1) and rank == 0:
            print(f"Nothing to resume: {checkpoint} already holds epoch {start_epoch} of "
                  f"{training.get('epochs', 1)}. Raise training.epochs to train longer.", flush=True)
    max_steps = training.get("max_steps_per_epoch")
    epochs = training.get("epochs", 1)
    every = config["output"].get("checkpoint_every", 1)
    for epoch in range(start_epoch, epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed + epoch))
        shard = torch.utils.data.Subset(train_set, order[rank::world].tolist())
        loader = DataLoader(shard, batch_size=batch_size)
        steps = min(len(loader), max_steps) if max_steps else len(loader)
        bar = tqdm(loader, total=steps, desc=f"epoch {epoch}", disable=not progress or rank > 0, leave=False)
        loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
        for step, (X, y) in enumerate(bar):
            if step >= steps:
                break
            X, y = X.to(device), y.to(device)
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                out = model(X)
                loss = loss_of(out, y)
            scaler.scale(loss).backward()
            if world > 1 and optimizer.fallback is not None:
                grads = [p.grad for g in optimizer.fallback.param_groups for p in g["params"] if p.grad is not None]
                all_reduce_flat(grads)
            for opt in optimizer.optimizers:
                scaler.step(opt)
            scaler.update()
            loss_sum += loss.item() * len(y)
            correct += _hits(out, y)
            seen += len(y)
            elapsed = time.perf_counter() - start
            shown = {} if dense else {"acc": f"{correct / seen:.3f}"}
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", **shown, s_per_step=f"{elapsed / (step + 1):.2f}")
        test_loss, test_acc = _evaluate(model, test_loader, device)
        history.append({
            "epoch": epoch,
            **_metrics("train", loss_sum / max(seen, 1), correct / max(seen, 1), dense),
            **_metrics("test", test_loss, test_acc, dense),
            "seconds_per_step": (time.perf_counter() - start) / max(steps, 1),
        })
        if rank > 0:
            continue
        write_rows(history, out_dir / "metrics")
        h = history[-1]
        metric, unit = ("psnr", " dB") if dense else ("acc", "")
        print(f"epoch {epoch + 1}/{epochs}: train loss {h['train_loss']:.4f} {metric} {h['train_' + metric]:.3f}{unit}"
              f" | test loss {h['test_loss']:.4f} {metric} {h['test_' + metric]:.3f}{unit}"
              f" | {h['seconds_per_step']:.3f} s/step", flush=True)
        if (every and (epoch + 1) % every == 0) or epoch + 1 == epochs:
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "rng": _rng_state(), "epoch": epoch,
                             "history": history, "config": config}, checkpoint)
    if rank == 0 and start_epoch < epochs:
        size = checkpoint.stat().st_size / 2**20 if checkpoint.is_file() else 0.0
        print(f"wrote {out_dir / 'metrics.csv'}, {out_dir / 'metrics.json'} and {checkpoint} ({size:.1f} MiB: "
              "model, optimizer state with the preconditioner, RNG states)", flush=True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None,
                        help="a complete config file (default: configs/train.yaml with its groups)")
    parser.add_argument("--resume", action="store_true", help="continue from output.dir/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch lines stay)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. training.epochs=3")
    args = parser.parse_intermixed_args()
    try:
        config = load_config(args.config, args.overrides)
        train(config, resume=args.resume, progress=not args.no_progress)
    except (ConfigError, DataError) as err:
        sys.exit(f"error: {err}")
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
