"""``MNIST`` from local MNIST-format files (no downloads)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class MNIST(torch.utils.data.Dataset):
    def __init__(self, root: str, train: bool = True, download: bool = False, transform=None) -> None:
        folder = os.environ.get("KFAC_TN_MNIST_DIR")
        if not folder:
            raise RuntimeError("Set KFAC_TN_MNIST_DIR to a folder with MNIST-format *-ubyte.gz files.")
        prefix = "train" if train else "t10k"
        self.images = torch.from_numpy(_read_idx(Path(folder) / f"{prefix}-images-idx3-ubyte.gz").copy())
        self.labels = torch.from_numpy(_read_idx(Path(folder) / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[i])
