"""``ToTensor``, ``Normalize`` and ``Compose`` for uint8 ``[H, W]`` image tensors."""

from __future__ import annotations

import torch


class ToTensor:
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.unsqueeze(0).to(torch.float32) / 255


class Normalize:
    def __init__(self, mean, std) -> None:
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


class Compose:
    def __init__(self, transforms) -> None:
        self.transforms = transforms

    def __call__(self, image):
        for t in self.transforms:
            image = t(image)
        return image
