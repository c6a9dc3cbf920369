"""Model registry: CIFAR-style ResNet18 and VGG19 (with BatchNorm), small ConvNeXt- and
MobileNetV2-style networks, a small U-Net for dense prediction, DeepOBS's two
Fashion-MNIST problems (``fmnist_2c2d``, ``fmnist_vae``), and small test models.

Classifiers map ``[B, in_channels, H, W]`` to ``[B, num_classes]``; dense-prediction
models (``dense_prediction = True``) map it to ``[B, num_classes, H, W]`` (one value per
output channel and pixel); the VAE (``variational = True``) maps images to
``(reconstructions, mean, log_std)``, see :func:`vae_loss`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a (1×1 stride-s) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x)).relu_()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu_()


class ResNet18(nn.Module):
    """ResNet18 for 32×32 inputs (3×3 stem, no max-pool), as commonly used on CIFAR.
    ``width``: channels of the first stage (64; the stages have 1, 2, 4, 8 times that)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, c_in = [], width
        for c_out, stride in ((width, 1), (2 * width, 2), (4 * width, 2), (8 * width, 2)):
            layers.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out)))
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.bn1(self.conv1(x)).relu_())
        return self.fc(self.pool(x).flatten(1))


VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


class VGG19(nn.Module):
    """VGG19 with BatchNorm for 32×32 inputs (one linear classifier). ``width``: channels of
    the first block (64; the later blocks have 2, 4, 8, 8 times that)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                v = v * width // 64
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(8 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class SmallCNN(nn.Module):
    """A few-layer CNN for tests and quick runs (every conv flavour is supported)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MixedCNN(nn.Module):
    """Every layer kind in one small network: BatchNorm, a depthwise 3×3 and a pointwise
    stride-2 convolution, an up-sampling ConvTranspose2d, a Conv1d over the flattened
    positions and a Linear head (inputs ``[B, C, 16, 16]``)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 1, stride=2), nn.ReLU())
        self.up = nn.Sequential(nn.ConvTranspose2d(32, 16, 2, stride=2), nn.ReLU())
        self.sequence = nn.Sequential(nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(16))
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.up(self.down(self.stem(x)))
        return self.head(self.sequence(x.flatten(2)).flatten(1))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a ``[B, C, H, W]`` tensor (ConvNeXt's)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7×7, LayerNorm, pointwise 4× expansion with GELU, pointwise projection, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 7, padding=3, groups=c), LayerNorm2d(c),
            nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ConvNeXtCIFAR(nn.Module):
    """A small ConvNeXt-style network for 32×32 inputs: patchify stem (2×2, stride 2),
    ConvNeXt blocks, LayerNorm + 2×2 stride-2 down-sampling, global pooling, LayerNorm, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, dims: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, dims[0], 2, stride=2), LayerNorm2d(dims[0])]
        for i, c in enumerate(dims):
            if i:
                layers += [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], c, 2, stride=2)]
            layers.append(ConvNeXtBlock(c))
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.features(x).mean((2, 3))))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1×1 expansion, depthwise 3×3 (stride s), 1×1 linear projection."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.body = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2CIFAR(nn.Module):
    """A small MobileNetV2-style network for 32×32 inputs (inverted residuals, depthwise 3×3,
    stride 2 down-sampling)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        settings = [(16, 24, 2, 4), (24, 24, 1, 4), (24, 32, 2, 4), (32, 32, 1, 4), (32, 64, 2, 4)]
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
            *[InvertedResidual(*s) for s in settings],
            nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6(inplace=True),
        )
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


class UNetSmall(nn.Module):
    """A small U-Net: two stride-2 3×3 down-sampling convolutions, two ConvTranspose2d
    up-sampling layers called with ``output_size=`` (as decoders do, so that any input size
    comes back), skip connections by concatenation, BatchNorm + ReLU, a 1×1 head."""

    dense_prediction = True

    def __init__(self, num_classes: int = 3, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())

        w = width
        self.enc1 = nn.Sequential(block(in_channels, w), block(w, w))
        self.enc2 = nn.Sequential(block(w, 2 * w, 2), block(2 * w, 2 * w))
        self.bottleneck = nn.Sequential(block(2 * w, 4 * w, 2), block(4 * w, 4 * w))
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 3, stride=2, padding=1)
        self.dec2 = nn.Sequential(block(4 * w, 2 * w), block(2 * w, 2 * w))
        self.up1 = nn.ConvTranspose2d(2 * w, w, 3, stride=2, padding=1)
        self.dec1 = nn.Sequential(block(2 * w, w), block(w, w))
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        s1 = self.enc1(x)
        s2 = self.enc2(s1)
        up = self.up2(self.bottleneck(s2), output_size=s2.shape[-2:]).relu()
        up = self.up1(self.dec2(torch.cat([up, s2], 1)), output_size=s1.shape[-2:]).relu()
        return self.head(self.dec1(torch.cat([up, s1], 1)))


def _truncated_normal_(tensor: Tensor, std: float) -> Tensor:
    """TensorFlow's truncated normal: N(0, std²) redrawn outside two standard deviations."""
    return nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)


class FMNIST2C2D(nn.Module):
    """DeepOBS's ``fmnist_2c2d`` network (Schneider et al., ICLR 2019), for ``[B, 1, 28, 28]``:
    conv 32 5×5 'same' + ReLU + max-pool 2, conv 64 5×5 'same' + ReLU + max-pool 2, dense
    3136→1024 + ReLU, dense 1024→10; weights truncated-normal (std 0.05), biases 0.05."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(7 * 7 * 64, 1024), nn.ReLU(), nn.Linear(1024, num_classes),
        )
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                _truncated_normal_(m.weight, 0.05)
                nn.init.constant_(m.bias, 0.05)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FMNISTVAE(nn.Module):
    """DeepOBS's ``fmnist_vae`` network for ``[B, 1, 28, 28]`` images in [0, 1].

    Encoder: three 4×4 convolutions with 64 channels ('same'; strides 2, 2, 1), leaky ReLU
    (slope 0.3) and dropout 0.2 each, then dense 3136→``latent`` for the mean and for
    ``log_std`` (halved). Decoder: dense ``latent``→24→49 (leaky ReLU), a 7×7 image
    up-sampled by three 4×4 ConvTranspose2d with 64 channels ('same' as TensorFlow pads
    it: strides 2, 1, 1; ReLU; dropout 0.2), dense 12544→784 with a sigmoid. Xavier-uniform
    weights, zero biases. ``forward`` returns ``(reconstruction [B, 1, 28, 28], mean
    [B, latent], log_std [B, latent])``; ``z = mean + ε·exp(log_std)`` draws ε from torch's
    global generator.
    """

    variational = True

    def __init__(self, num_classes: int = 1, in_channels: int = 1, latent: int = 8) -> None:
        super().__init__()
        if num_classes != in_channels:
            raise ValueError(f"fmnist_vae reconstructs its input: num_classes ({num_classes}) must equal "
                             f"in_channels ({in_channels}).")
        self.in_channels = in_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.3), nn.Dropout(0.2),
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.LeakyReLU(0.3), nn.Dropout(0.2),
            nn.ZeroPad2d((1, 2, 1, 2)), nn.Conv2d(64, 64, 4), nn.LeakyReLU(0.3), nn.Dropout(0.2),  # 'same'
            nn.Flatten(),
        )
        self.mean = nn.Linear(7 * 7 * 64, latent)
        self.log_std = nn.Linear(7 * 7 * 64, latent)
        self.expand = nn.Sequential(nn.Linear(latent, 24), nn.LeakyReLU(0.3), nn.Linear(24, 49), nn.LeakyReLU(0.3))
        self.up1 = nn.ConvTranspose2d(1, 64, 4, stride=2, padding=1)  # 7 -> 14
        self.up2 = nn.ConvTranspose2d(64, 64, 4, padding=1)  # 14 -> 15, TensorFlow keeps rows 0..13
        self.up3 = nn.ConvTranspose2d(64, 64, 4, padding=1)
        self.dropout = nn.Dropout(0.2)
        self.out = nn.Linear(14 * 14 * 64, 28 * 28 * in_channels)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(x)
        mean, log_std = self.mean(h), 0.5 * self.log_std(h)
        z = mean + torch.randn_like(log_std) * log_std.exp()
        y = self.expand(z).view(-1, 1, 7, 7)
        y = self.dropout(self.up1(y).relu())
        y = self.dropout(self.up2(y)[..., :14, :14].relu())
        y = self.dropout(self.up3(y)[..., :14, :14].relu())
        images = torch.sigmoid(self.out(y.flatten(1)))
        return images.view(-1, self.in_channels, 28, 28), mean, log_std


def vae_loss(outputs: tuple[Tensor, Tensor, Tensor], images: Tensor) -> Tensor:
    """DeepOBS's VAE loss, averaged over the batch: the squared reconstruction error summed
    over pixels plus ``KL(N(mean, exp(log_std)²) ‖ N(0, I))``."""
    reconstruction, mean, log_std = outputs
    error = (reconstruction - images).square().flatten(1).sum(1)
    kl = -0.5 * (1 + 2 * log_std - mean.square() - (2 * log_std).exp()).sum(1)
    return (error + kl).mean()


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18, "vgg19": VGG19, "small_cnn": SmallCNN, "mixed_cnn": MixedCNN,
    "convnext_cifar": ConvNeXtCIFAR, "mobilenetv2_cifar": MobileNetV2CIFAR, "unet_small": UNetSmall,
    "fmnist_2c2d": FMNIST2C2D, "fmnist_vae": FMNISTVAE,
}


def is_dense_prediction(model: nn.Module) -> bool:
    """Whether ``model`` predicts per pixel (``[B, C, H, W]``) rather than per image."""
    return getattr(model, "dense_prediction", False)


def build_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """Instantiate a registered model by name."""
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; available: {sorted(MODELS)}.")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)
