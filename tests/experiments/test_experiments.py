"""End-to-end checks of the experiment scripts on tiny models and data."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.compare import load_config as load_compare_config
from experiments.config import ConfigError
from experiments.data import DataError, load_data
from experiments.train import load_config, train

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path, optimizer, **extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: small_cnn\n"
        "data: {name: synthetic, n_train: 48, n_test: 16, image_size: 8}\n"
        f"optimizer: {{name: {optimizer}, lr: 0.01, momentum: 0.9}}\n"
        "training: {epochs: 2, batch_size: 16, seed: 0, device: cpu}\n"
        f"output: {{dir: {tmp_path / 'out'}}}\n"
    )
    return load_config(str(path), [f"{k}={v}" for k, v in extra.items()])


@pytest.mark.parametrize("optimizer", ["sgd", "singd_stock", "singd_tn", "kfac"])
def test_train_runs_and_writes_metrics(tmp_path, optimizer):
    history = train(_config(tmp_path, optimizer, **{"optimizer.T": 1} if "singd" in optimizer else {}), progress=False)
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    out = tmp_path / "out"
    assert (out / "metrics.csv").is_file() and (out / "metrics.json").is_file() and (out / "last.pt").is_file()


@pytest.mark.parametrize("optimizer", ["singd_tn", "kfac"])
def test_resume_continues_exactly(tmp_path, optimizer):
    straight = train(_config(tmp_path / "a", optimizer), progress=False)
    train(_config(tmp_path / "b", optimizer, **{"training.epochs": 1}), progress=False)
    resumed = train(_config(tmp_path / "b", optimizer), resume=True, progress=False)
    assert resumed[-1]["train_loss"] == straight[-1]["train_loss"]
    a = torch.load(tmp_path / "a" / "out" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "out" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    if optimizer == "kfac":  # an independent oracle: a literal KFAC over the same batches
        expected = _reference_kfac_run(epochs=2, batch_size=16, lr=0.01, momentum=0.9)
        for key, value in expected.items():
            torch.testing.assert_close(b[key].double(), value, rtol=1e-3, atol=1e-4)


def _reference_kfac_run(epochs, batch_size, lr, momentum):
    """The parameters after ``train`` on ``_config``'s data with kfac_tn.KFAC's defaults,
    by tests/reference_kfac.py in float64 (BatchNorm by SGD, as the experiments' fallback)."""
    import random

    from reference_kfac import ReferenceKFAC
    from torch.utils.data import DataLoader, Subset

    from experiments.models import build_model

    torch.manual_seed(0)
    random.seed(0)
    train_set, _, classes = load_data("synthetic", None, 8, 10, 48, 16, 0)
    model = build_model("small_cnn", num_classes=classes).double()
    oracle = ReferenceKFAC(model, lr=lr, momentum=momentum)
    for epoch in range(epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(epoch))
        for X, y in DataLoader(Subset(train_set, order.tolist()), batch_size=batch_size):
            oracle.step(X.double(), y)
    return {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    "override, match",
    [
        ("optimizer.betas=1", "Unknown key 'betas' in config.optimizer"),
        ("model=resnet50", "config.model 'resnet50' is unknown"),
        ("data.name=imagenet", "config.data.name 'imagenet' is unknown"),
        ("training.epochs=0", "epochs must be >= 1"),
        ("optimizer.lr=fast", "config.optimizer.lr = 'fast' has the wrong type"),
    ],
)
def test_config_errors_name_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, "sgd", **dict([override.split("=")]))


def test_cifar_folder_reading_and_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_data("cifar10", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="needs data_dir"):
        load_data("cifar10")
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, 4))}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    train_set, test_set, classes = load_data("cifar10", str(tmp_path))
    assert classes == 10 and len(train_set) == 20 and len(test_set) == 4
    assert train_set[0][0].shape == (3, 32, 32)
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a valid CIFAR python pickle"):
        load_data("cifar10", str(tmp_path))


def test_digits_data_ships_with_scikit_learn():
    train_set, test_set, classes = load_data("digits", image_size=16)
    assert classes == 10 and len(train_set) + len(test_set) == 1797
    assert train_set[0][0].shape == (3, 16, 16)


def test_compare_runs_in_fresh_processes(tmp_path):
    config = tmp_path / "compare.yaml"
    config.write_text(
        "models: [small_cnn]\nbatch_size: 4\nwarmup: 1\nsteps: 2\nrepeats: 2\n"
        "common: {lr: 0.01}\n"
        "runs:\n  - {optimizer: sgd}\n  - {optimizer: singd_tn, T: 1, structures: [diagonal, dense]}\n"
        "  - {optimizer: singd_stock, T: 1, structures: [diagonal, dense]}\n"
        "  - {optimizer: kfac, inverse_update_freq: 1}\n"
    )
    out = tmp_path / "res"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.compare", "--config", str(config), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| small_cnn | singd_tn" in proc.stdout
    assert out.with_suffix(".csv").is_file() and out.with_suffix(".png").is_file()
    rows = json.loads(out.with_suffix(".json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [r["repeats"] for r in rows] == [2, 2, 2, 2] and all(len(r["mean_s_runs"]) == 2 for r in rows)
    assert rows[-1]["kind"] == "kfac" and rows[-1]["state_mib"] > 0  # KFAC's factors and inverses
    verdicts = json.loads((tmp_path / "res_verdicts.json").read_text())
    assert [(v["model"], v["setting"]) for v in verdicts] == [("small_cnn", "diagonal/dense T=1")]
    assert "| small_cnn | diagonal/dense T=1 |" in proc.stdout


def test_compare_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [resnet18]\nruns:\n  - {optimizer: adam}\n")
    bad.write_text("models: [resnet18]\nruns:\n  - {optimizer: sgd, T: 1}\n")
    with pytest.raises(ConfigError, match=r"runs\[0\].T is not an argument of sgd"):
        load_compare_config(str(bad), [])
    bad.write_text("models: [resnet18]\nruns:\n  - {optimizer: adam}\n")
    with pytest.raises(ConfigError, match="optimizer 'adam' is unknown"):
        load_compare_config(str(bad), [])
    with pytest.raises(ConfigError, match="does not exist"):
        load_compare_config(str(tmp_path / "none.yaml"), [])


def test_train_under_torchrun_with_two_processes(tmp_path):
    config = _config(tmp_path, "singd_tn", **{"optimizer.T": 1, "training.epochs": 1})
    path = tmp_path / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "experiments.train", "--config", str(path), "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_every_shipped_config_is_valid():
    from experiments.models import MODELS
    from experiments.optimizers import OPTIMIZERS

    datasets = [p.stem for p in (ROOT / "configs" / "data").glob("*.yaml")]
    assert {p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")} == set(MODELS)
    assert {p.stem for p in (ROOT / "configs" / "optimizer").glob("*.yaml")} == set(OPTIMIZERS)
    from experiments.data import DENSE_DATASETS

    for model in MODELS:
        for optimizer in OPTIMIZERS:
            for data in datasets:
                overrides = [f"model={model}", f"optimizer.name={optimizer}", f"data.name={data}"]
                if getattr(MODELS[model], "variational", False):
                    with pytest.raises(ConfigError, match=r"experiments\.benchmark --problem fmnist_vae"):
                        load_config(None, overrides)
                    continue
                if getattr(MODELS[model], "dense_prediction", False) != (data in DENSE_DATASETS):
                    with pytest.raises(ConfigError, match=f"config.model '{model}' needs a"):
                        load_config(None, overrides)
                    continue
                config = load_config(None, overrides)
                assert config["output"]["dir"] == f"results/train/{model}_{optimizer}_{data}"
    tuned = load_config(None, ["model=small_cnn", "optimizer.name=kfac", "data.name=digits", "optimizer.lr=0.02"])
    assert tuned["data"]["image_size"] == 16 and tuned["optimizer"]["kfac_approx"] == "expand"  # 'when' rules
    assert tuned["optimizer"]["inverse_update_freq"] == 5 and tuned["optimizer"]["lr"] == 0.02  # overrides last
    with pytest.raises(ConfigError, match="has no group file"):
        load_config(None, ["optimizer.name=adam"])
    for path in sorted((ROOT / "configs").glob("compare_*.yaml")):
        load_compare_config(str(path), [])


def test_optimizer_keys_are_checked_against_the_chosen_optimizer(tmp_path):
    with pytest.raises(ConfigError, match=r"optimizer\.ema_decay is not an argument of singd_tn"):
        _config(tmp_path, "singd_tn", **{"optimizer.ema_decay": 0.9})
    with pytest.raises(ConfigError, match=r"config.optimizer \(kfac\): lr must be a non-negative"):
        train(_config(tmp_path, "kfac", **{"optimizer.lr": -1}), progress=False)


def test_resuming_a_finished_run_says_so_and_checkpoint_cadence(tmp_path, capsys, monkeypatch):
    import experiments.train as train_module

    saved = []
    real_save = train_module.save_atomically
    monkeypatch.setattr(train_module, "save_atomically", lambda obj, path: (saved.append(obj["epoch"]),
                                                                           real_save(obj, path)))
    config = _config(tmp_path, "sgd", **{"training.epochs": 3, "output.checkpoint_every": 2})
    train(config, progress=False)
    out = capsys.readouterr().out
    assert "epoch 3/3: train loss" in out and "last.pt (" in out
    assert saved == [1, 2]  # after the second epoch and after the last
    train(config, resume=True, progress=False)
    assert "Nothing to resume" in capsys.readouterr().out


@pytest.mark.parametrize("model_name", ["convnext_cifar", "mobilenetv2_cifar", "mixed_cnn"])
@pytest.mark.parametrize("optimizer", ["singd_tn", "kfac"])
def test_networks_people_train_now_take_steps(model_name, optimizer):
    """ConvNeXt-style (patchify, depthwise 7×7, LayerNorm), MobileNetV2-style (inverted
    residuals, depthwise 3×3) and the mixed network train with both optimizers; their
    LayerNorm/BatchNorm parameters go to the fallback SGD."""
    import warnings

    from experiments.models import build_model
    from experiments.optimizers import build_optimizer

    torch.manual_seed(0)
    model = build_model(model_name)
    size = 16 if model_name == "mixed_cnn" else 32
    X, y = torch.randn(4, 3, size, size), torch.randint(0, 10, (4,))
    kwargs = dict(lr=0.01, T=1) if optimizer == "singd_tn" else dict(lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skipped steps, no unsupported-layer surprises
        opt = build_optimizer(model, optimizer, **kwargs)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            for o in opt.optimizers:
                o.zero_grad()
            torch.nn.functional.cross_entropy(model(X), y).backward()
            for o in opt.optimizers:
                o.step()
    assert opt.fallback is not None
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    # (a conv bias right before BatchNorm has zero gradient; weights before BatchNorm at 4x4
    # maps can move by less than float32 resolves in two steps)
    assert sum(moved) >= 0.8 * len(moved) and moved[-1] and moved[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_denoising_data_are_noisy_digits_with_clean_targets():
    digits, _, _ = load_data("digits", image_size=16)
    train_set, _, channels = load_data("digits_denoise", image_size=16)
    assert channels == 3 and len(train_set) == len(digits)
    noisy, clean = train_set.tensors
    torch.testing.assert_close(clean, digits.tensors[0])
    assert abs(float((noisy - clean).std()) - 0.5) < 0.01


@pytest.mark.parametrize("optimizer", ["sgd", "singd_tn", "kfac"])
def test_dense_prediction_trains_and_reports_psnr(tmp_path, optimizer):
    """unet_small on digits_denoise: mean squared error per pixel as the loss; the test
    loss equals F.mse_loss of the saved model over the test set, and PSNR is reported."""
    from experiments.models import build_model

    overrides = ["model=unet_small", "data.name=digits_denoise", f"optimizer.name={optimizer}",
                 "data.image_size=12", "training.epochs=1", "training.max_steps_per_epoch=2",
                 "training.device=cpu", f"output.dir={tmp_path}"]
    history = train(load_config(None, overrides), progress=False)
    last = history[-1]
    assert set(last) >= {"train_loss", "train_psnr", "test_loss", "test_psnr"} and "test_acc" not in last
    model = build_model("unet_small", num_classes=3)
    model.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=False)["model"])
    model.eval()
    _, test_set, _ = load_data("digits_denoise", image_size=12)
    noisy, clean = test_set.tensors
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(model(noisy), clean).item()
    assert last["test_loss"] == pytest.approx(mse, rel=1e-4)
    assert last["test_psnr"] == pytest.approx(10 * np.log10(4 / mse), rel=1e-4)
    with pytest.raises(ConfigError, match="needs a dense-prediction data set"):
        load_config(None, ["model=unet_small", "data.name=digits"])
    with pytest.raises(ConfigError, match="needs a classification data set"):
        load_config(None, ["model=small_cnn", "data.name=digits_denoise"])


def test_unet_transposed_convolutions_are_preconditioned_by_kfac_tn_only():
    """kfac_tn's optimizers precondition the U-Net's ConvTranspose2d layers (called with
    output_size=); stock singd 0.0.5 supports only Linear and Conv2d, so the experiments
    hand those layers to the fallback SGD."""
    from experiments.models import build_model
    from experiments.optimizers import build_optimizer

    model = build_model("unet_small")
    transposed = {id(p) for m in (model.up1, model.up2) for p in m.parameters()}
    for name in ("singd_tn", "kfac", "singd_stock"):
        opt = build_optimizer(model, name, lr=0.01)
        main = {id(p) for g in opt.main.param_groups for p in g["params"]}
        fallback = {id(p) for g in opt.fallback.param_groups for p in g["params"]}
        assert transposed <= (fallback if name == "singd_stock" else main)
