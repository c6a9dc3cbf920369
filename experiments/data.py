"""Data sets for the experiments, none of which needs a download.

- ``synthetic``: random CIFAR-shaped images and labels (the default; reproducible).
- ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images, shipped with the
  package), upsampled to ``image_size`` and repeated over 3 channels; a real, small
  data set to show convergence offline.
- ``digits_denoise``: a dense-prediction task from the same images: the input is a
  digit with Gaussian noise (σ = 0.5 on the [-1, 1] scale, drawn once per image from the
  seed), the target the clean digit ``[3, S, S]``; for ``unet_small``.
- ``cifar10`` / ``cifar100``: the official "python version" folders (``data_batch_1``…
  ``data_batch_5`` and ``test_batch``; or ``train`` and ``test``), read with pickle.
- ``fashion_mnist``: Zalando's Fashion-MNIST (28×28 grey images in [0, 1], ``[N, 1, 28,
  28]``, 10 classes) from its idx files (``train-images-idx3-ubyte[.gz]`` …), by default
  from Debian's ``dataset-fashion-mnist`` (:data:`FASHION_MNIST_DIR`). Its training set
  is split once (a fixed permutation, independent of the run's seed) into 50,000 training
  and 10,000 validation images (DeepOBS's sizes); ``split="valid"`` evaluates on those.
- ``fashion_mnist_images``: the same images as targets (for the ``fmnist_vae``).
"""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

DATASETS = ("synthetic", "digits", "digits_denoise", "cifar10", "cifar100", "fashion_mnist", "fashion_mnist_images")
#: data sets whose targets are images (per-pixel regression), not class labels
DENSE_DATASETS = ("digits_denoise",)
#: data sets whose targets are their inputs (auto-encoders)
RECONSTRUCTION_DATASETS = ("fashion_mnist_images",)
SPLITS = ("test", "valid")
NOISE_STD = 0.5
#: where Debian's dataset-fashion-mnist package puts the idx files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_VALID = 10_000
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: idx type codes (the third byte of the magic number) this reader takes
_IDX_DTYPES = {0x08: torch.uint8}


class DataError(ValueError):
    """A data folder is missing or malformed."""


def _synthetic(n_train: int, n_test: int, num_classes: int, image_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n = n_train + n_test
    X = torch.randn(n, 3, image_size, image_size, generator=gen)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:]), num_classes


def _digits(image_size: int, seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - scikit-learn is in the experiments extra
        raise DataError("The digits data set needs scikit-learn: pip install scikit-learn.") from err
    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    X = F.interpolate(X, size=(image_size, image_size), mode="bilinear", align_corners=False)
    X = ((X - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    X, y = X[perm], y[perm]
    n_test = len(y) // 5
    return (X[n_test:], y[n_test:]), (X[:n_test], y[:n_test]), 10


def _digits_denoise(image_size: int, seed: int):
    """Noisy digits as inputs, clean ones as targets; the third value is the number of
    output channels."""
    (train, _), (test, _), _ = _digits(image_size, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    noisy = [X + NOISE_STD * torch.randn(X.shape, generator=gen) for X in (train, test)]
    return (noisy[0], train), (noisy[1], test), train.shape[1]


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR file {path} is missing.")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as err:
        raise DataError(f"CIFAR file {path} is not a valid CIFAR python pickle: {err}") from err


def _cifar_arrays(batch: dict, label_key: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if "data" not in batch or label_key not in batch:
        raise DataError(f"CIFAR file {path} lacks 'data' or {label_key!r}.")
    data = torch.as_tensor(batch["data"])
    if data.dim() != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR file {path}: 'data' must be [N, 3072], got {tuple(data.shape)}.")
    X = data.reshape(-1, 3, 32, 32).float() / 255.0
    y = torch.as_tensor(batch[label_key], dtype=torch.long)
    if len(y) != len(X):
        raise DataError(f"CIFAR file {path}: {len(X)} images but {len(y)} labels.")
    return X, y


def _cifar(root: str | None, name: str):
    if root is None:
        raise DataError(f"Data set {name!r} needs data_dir: the folder of the CIFAR python version.")
    folder = Path(root)
    if not folder.is_dir():
        raise DataError(f"CIFAR folder {folder} does not exist.")
    if name == "cifar10":
        train_files, test_files, key, classes = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10
    else:
        train_files, test_files, key, classes = ["train"], ["test"], "fine_labels", 100
    parts = {}
    for split, files in (("train", train_files), ("test", test_files)):
        arrays = [_cifar_arrays(_unpickle(folder / f), key, folder / f) for f in files]
        parts[split] = (torch.cat([a[0] for a in arrays]), torch.cat([a[1] for a in arrays]))
    mean = parts["train"][0].mean((0, 2, 3), keepdim=True)
    std = parts["train"][0].std((0, 2, 3), keepdim=True)
    norm = {k: ((X - mean) / std, y) for k, (X, y) in parts.items()}
    return norm["train"], norm["test"], classes


def read_idx(path: Path) -> torch.Tensor:
    """The array in an idx file (``.gz`` or not): ``[N]`` labels or ``[N, H, W]`` images, uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"idx file {path} cannot be read: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"idx file {path} has no unsigned-byte idx header (magic 0x0000 08 ..).")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"idx file {path} is truncated in its header.")
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = math.prod(shape)
    if len(data) - header != count:
        raise DataError(f"idx file {path}: its header says {shape} ({count} bytes) but {len(data) - header} follow.")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(
        f"Fashion-MNIST file {stem}[.gz] is missing in {folder}. Install Debian's package "
        f"(apt-get install dataset-fashion-mnist, files in {FASHION_MNIST_DIR}) or set data.data_dir "
        "to a folder with the four idx files.")


def _fashion_mnist(root: str | None, split: str):
    folder = Path(root if root is not None else FASHION_MNIST_DIR)
    if not folder.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {folder} does not exist. Install Debian's package "
            f"(apt-get install dataset-fashion-mnist, files in {FASHION_MNIST_DIR}) or set data.data_dir.")
    parts = {}
    for part, (images, labels) in FASHION_MNIST_FILES.items():
        X, y = read_idx(_idx_file(folder, images)), read_idx(_idx_file(folder, labels))
        if X.dim() != 3 or y.dim() != 1 or len(X) != len(y):
            raise DataError(f"Fashion-MNIST {part} files in {folder}: images {tuple(X.shape)} and labels "
                            f"{tuple(y.shape)} do not match ([N, H, W] and [N]).")
        parts[part] = (X.unsqueeze(1).float().div_(255.0), y.long())
    X, y = parts["train"]
    n_valid = min(FASHION_MNIST_VALID, len(y) // 6)  # a sixth of a small training set (tests' files)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))  # one split for every run
    valid, train = perm[:n_valid], perm[n_valid:]
    held_out = (X[valid], y[valid]) if split == "valid" else parts["test"]
    return (X[train], y[train]), held_out, 10


def load_data(
    name: str,
    data_dir: str | None = None,
    image_size: int = 32,
    num_classes: int = 10,
    n_train: int = 512,
    n_test: int = 128,
    seed: int = 0,
    split: str = "test",
) -> tuple[TensorDataset, TensorDataset, int]:
    """Train and held-out sets and the number of classes (for ``DENSE_DATASETS``: of output
    channels per pixel; for ``RECONSTRUCTION_DATASETS``: of input channels, the targets
    being the inputs). ``split``: the held-out set, ``"test"`` or (``fashion_mnist*``) the
    ``"valid"`` images carved from the training set."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}.")
    if split == "valid" and not name.startswith("fashion_mnist"):
        raise DataError(f"Data set {name!r} has no validation split; only fashion_mnist* have one.")
    if name == "synthetic":
        train, test, classes = _synthetic(n_train, n_test, num_classes, image_size, seed)
    elif name == "digits":
        train, test, classes = _digits(image_size, seed)
    elif name == "digits_denoise":
        train, test, classes = _digits_denoise(image_size, seed)
    elif name in ("cifar10", "cifar100"):
        train, test, classes = _cifar(data_dir, name)
    elif name == "fashion_mnist":
        train, test, classes = _fashion_mnist(data_dir, split)
    elif name == "fashion_mnist_images":
        (X, _), (X_test, _), _ = _fashion_mnist(data_dir, split)
        train, test, classes = (X, X), (X_test, X_test), 1
    else:
        raise DataError(f"Unknown data set {name!r}; available: {DATASETS}.")
    return TensorDataset(*train), TensorDataset(*test), classes
