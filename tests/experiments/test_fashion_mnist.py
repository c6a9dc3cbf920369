"""Fashion-MNIST from idx files, DeepOBS's two problems on it, and the time-to-accuracy
benchmark, on tiny idx files written here (the suite needs no data package)."""

import gzip
import json
import math
import struct

import pytest
import torch

import kfac_tn
from experiments import benchmark
from experiments.data import DataError, load_data, read_idx
from experiments.models import build_model, vae_loss


def _idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 8, array.dim()) + b"".join(struct.pack(">I", n) for n in array.shape)
    payload = header + bytes(array.flatten().tolist())
    (gzip.open if compress else open)(path, "wb").write(payload)


def write_fashion_mnist(folder, n_train=300, n_test=40):
    """idx files whose image ``i`` holds ``i mod 251`` in its first pixel, ``i // 251`` in
    its second, and a fixed pattern elsewhere; labels ``i mod 10``. Images gzipped, labels
    not (both forms occur)."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(5)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8)
        images[:, 0, 0] = torch.arange(n) % 251
        images[:, 0, 1] = torch.arange(n) // 251
        _idx(folder / f"{stem}-images-idx3-ubyte.gz", images, True)
        _idx(folder / f"{stem}-labels-idx1-ubyte", (torch.arange(n) % 10).to(torch.uint8), False)
    return folder


def _index(X):
    return (X[:, 0, 0, 0] * 255).round().long() + 251 * (X[:, 0, 0, 1] * 255).round().long()


def test_the_training_images_split_once_into_train_and_valid(tmp_path):
    folder = write_fashion_mnist(tmp_path / "f")
    train, test, classes = load_data("fashion_mnist", str(folder))
    train2, valid, _ = load_data("fashion_mnist", str(folder), split="valid", seed=7)  # the run seed: same split
    assert classes == 10 and train.tensors[0].shape == (250, 1, 28, 28) and len(valid) == 50 and len(test) == 40
    ids, valid_ids = _index(train.tensors[0]), _index(valid.tensors[0])
    assert torch.equal(ids, _index(train2.tensors[0]))
    assert sorted(ids.tolist() + valid_ids.tolist()) == list(range(300))  # disjoint, nothing lost
    assert torch.equal(train.tensors[1], ids % 10) and torch.equal(valid.tensors[1], valid_ids % 10)
    assert torch.equal(_index(test.tensors[0]), torch.arange(40))
    raw = read_idx(folder / "t10k-images-idx3-ubyte.gz")
    torch.testing.assert_close(test.tensors[0][:, 0], raw.float() / 255)  # [0, 1], no normalisation
    images, _, channels = load_data("fashion_mnist_images", str(folder))
    assert channels == 1 and torch.equal(images.tensors[0], images.tensors[1])


def test_missing_or_broken_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist.*data\.data_dir"):
        load_data("fashion_mnist", str(tmp_path / "nowhere"))
    folder = write_fashion_mnist(tmp_path / "f")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.*apt-get install"):
        load_data("fashion_mnist", str(folder))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 40) + bytes(39))
    with pytest.raises(DataError, match="header says"):
        load_data("fashion_mnist", str(folder))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(DataError, match="idx header"):
        load_data("fashion_mnist", str(folder))
    with pytest.raises(DataError, match="no validation split"):
        load_data("digits", split="valid")


def test_deepobs_networks_have_their_published_sizes_and_every_layer_is_preconditioned():
    net = build_model("fmnist_2c2d", 10, 1)
    assert sum(p.numel() for p in net.parameters()) == 3_274_634  # DeepOBS's fmnist_2c2d
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    biases = [m.bias for m in net.modules() if hasattr(m, "bias") and m.bias is not None]
    assert all(torch.all(b == 0.05) for b in biases)
    weights = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))])
    assert weights.abs().max() <= 0.1 and 0.043 < weights.std() < 0.045  # truncated at 2σ: std 0.88·0.05
    vae = build_model("fmnist_vae", 1, 1)
    images, mean, log_std = vae(torch.rand(2, 1, 28, 28))
    assert images.shape == (2, 1, 28, 28) and mean.shape == log_std.shape == (2, 8)
    assert 0 < images.min() and images.max() < 1
    layers = kfac_tn.KFAC(vae).layers
    assert len(layers) == 11 and sum(isinstance(m, torch.nn.ConvTranspose2d) for m in layers.values()) == 3


def test_vae_up_sampling_pads_like_tensorflow_same():
    """A stride-1 4×4 transposed convolution 'same' (TensorFlow) is the full one cropped by
    1 at the start: the gradient of a 'same' convolution padded (1, 2)."""
    vae = build_model("fmnist_vae", 1, 1)
    x = torch.randn(2, 64, 14, 14)
    w = vae.up2.weight.detach()
    full = torch.nn.functional.conv_transpose2d(x, w)  # [.., 17, 17]
    torch.testing.assert_close(vae.up2(x)[..., :14, :14], full[..., 1:15, 1:15] + vae.up2.bias.view(1, -1, 1, 1))


def test_vae_loss_is_the_reconstruction_error_plus_the_gaussian_kl():
    images = torch.rand(3, 1, 28, 28)
    recon = images + 0.1
    mean = torch.tensor([[1.0, -2.0]]).expand(3, 2)
    log_std = torch.tensor([[0.0, 0.5]]).expand(3, 2)
    kl = 0.5 * (1.0 + 0.0 - 0.0) + 0.5 * (4.0 + torch.e - 1.0 - 1.0)  # ½(μ² + σ² − 1 − log σ²) per dimension
    torch.testing.assert_close(vae_loss((recon, mean, log_std), images), torch.tensor(784 * 0.01 + kl))


def test_benchmark_tunes_runs_seeds_and_reuses_finished_runs(tmp_path, monkeypatch, capsys):
    folder = write_fashion_mnist(tmp_path / "f")
    out = tmp_path / "out"
    args = ["--problem", "fmnist_2c2d", "--data-dir", str(folder), "--optimizers", "momentum", "kfac_defaults",
            "--budget", "0.6", "--tune-budget", "0.3", "--eval-every", "0.3", "--seeds", "0", "1", "--out", str(out),
            "--threads", "1"]
    benchmark.main(args)
    rows = json.loads((out / "summary.json").read_text())
    assert [r["optimizer"] for r in rows] == ["momentum", "kfac_defaults"] and all(r["seeds"] == 2 for r in rows)
    curves = json.loads((out / "curves.json").read_text())
    assert json.loads(rows[0]["hyper"])["lr"] in benchmark.SETTINGS["momentum"].grid["lr"]
    assert curves["chosen"]["kfac_defaults"] == {}
    assert len(list((out / "runs").glob("*-valid-*"))) == 3  # the momentum grid; kfac_defaults has none
    assert (out / "curves.png").stat().st_size > 0
    for curve in curves["curves"]["momentum"]:
        assert curve[0]["seconds"] == 0 and curve[-1]["seconds"] >= 0.6 and 0 <= curve[-1]["accuracy"] <= 1
    monkeypatch.setattr(benchmark, "train_run", lambda *a, **k: pytest.fail("a kept run was trained again"))
    benchmark.main(args)
    assert "momentum" in capsys.readouterr().out


def test_summary_reports_first_crossings_and_seeds_that_missed():
    problem = benchmark.PROBLEMS["fmnist_2c2d"]
    def run(points, loss_ratio=1.5):
        return {"curve": [{"seconds": s, "epoch": e, "accuracy": a} for s, e, a in points],
                "seconds_per_step": 0.2, "peak_mib": 10.0, "diverged": False, "first_loss": 2.0,
                "worst_loss_window": 2.0 * loss_ratio}
    runs = [run([(0, 0, 0.1), (10, 1, 0.905), (20, 2, 0.915), (30, 3, 0.91)]),
            run([(0, 0, 0.1), (12, 1.2, 0.902), (24, 2.4, 0.899)], 2.5),
            run([(0, 0, 0.1), (8, 0.8, 0.91), (16, 1.6, 0.921)])]
    row = benchmark.summarize(problem, "x", {}, runs)
    assert row["seconds_to_0.9"] == 10 and row["epochs_to_0.9"] == 1 and row["seeds_at_0.9"] == 3
    assert row["seconds_to_0.91"] == 14 and row["seeds_at_0.91"] == 2  # median of 20 and 8
    assert row["seconds_to_0.92"] == 16 and row["seeds_at_0.92"] == 1
    assert row["best_accuracy"] == pytest.approx((0.915 + 0.902 + 0.921) / 3)
    assert row["max_loss_ratio"] == 2.5


def test_train_script_takes_fashion_mnist_and_rejects_the_vae(tmp_path):
    from experiments.config import ConfigError
    from experiments.train import load_config, train

    folder = write_fashion_mnist(tmp_path / "f")
    config = load_config(None, ["model=fmnist_2c2d", "data.name=fashion_mnist", f"data.data_dir={folder}",
                                "optimizer.name=kfac", "training.epochs=1", "training.batch_size=64",
                                f"output.dir={tmp_path / 'out'}"])
    history = train(config, progress=False)
    assert len(history) == 1 and 0 <= history[0]["test_acc"] <= 1
    path = tmp_path / "vae.yaml"
    path.write_text("model: fmnist_vae\ndata: {name: fashion_mnist_images}\noptimizer: {name: kfac}\n")
    with pytest.raises(ConfigError, match=r"experiments\.benchmark --problem fmnist_vae"):
        load_config(str(path), [])


def test_epoch_budget_stops_on_its_step_and_cosine_reaches_zero_at_the_end(tmp_path, monkeypatch):
    """``epochs=``: the run ends after round(epochs · batches per epoch) steps, whatever the
    seconds; a cosine schedule steps with lr·(1 + cos(π k/K))/2 at step k of K, every group."""
    folder = write_fashion_mnist(tmp_path / "f", n_train=400)
    batches = len(load_data("fashion_mnist", str(folder), split="test")[0]) // 128
    problem = benchmark.PROBLEMS["fmnist_2c2d"]
    setting = benchmark.Setting("sgd", {"momentum": 0.0}, schedule="cosine")
    seen = []
    build = benchmark.build

    def recording_build(*args):
        opt = build(*args)
        step = opt.step
        opt.step = lambda: (seen.append([g["lr"] for g in opt.param_groups]), step())
        return opt

    monkeypatch.setattr(benchmark, "build", recording_build)
    result = benchmark.train_run(problem, setting, {"lr": 0.2}, 0, math.inf, "test", 1e9, str(folder), epochs=2.5)
    K = round(2.5 * batches)
    assert result["steps"] == K and len(seen) == K and len(result["curve"]) == 2  # start and end
    assert batches >= 2 and result["curve"][-1]["epoch"] == pytest.approx(K / batches)
    expected = [0.2 * (1 + math.cos(math.pi * k / K)) / 2 for k in range(K)]
    assert all(lrs == pytest.approx([e] * len(lrs)) for lrs, e in zip(seen, expected))
    with pytest.raises(ValueError, match="schedule"):
        benchmark.Setting("sgd", schedule="linear")
