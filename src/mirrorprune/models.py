"""Models with the paper's Kaiming-normal initialization: CIFAR ResNet-20 / ResNet-18, VGG-16-BN,
LeNet-300-100, a small CNN, and MLPs. `create_model(name, ...)` builds any of them by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from .errors import UsageError


def kaiming_init(model: nn.Module) -> nn.Module:
    """Kaiming-normal weights (fan-in, ReLU gain), zero biases; BatchNorm at weight 1, bias 0."""
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)
    return model


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """ReLU MLP with layer widths `sizes` (input first, classes last), Kaiming-initialized."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise UsageError(f"sizes must list at least two positive widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return kaiming_init(nn.Sequential(*layers))


class BasicBlock(nn.Module):
    """3x3-3x3 residual block; a 1x1 conv + BN shortcut where the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem without max-pooling, stages of BasicBlocks, global pooling."""

    def __init__(self, widths: Sequence[int], blocks: int, num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        kaiming_init(self)

    def forward(self, x):
        x = self.layers(self.bn1(self.conv1(x)).relu())
        return self.fc(x.mean((2, 3)))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-20 of He et al. (2016) for CIFAR: 16/32/64 channels, 3 blocks per stage (0.27M)."""
    return ResNet((16, 32, 64), 3, num_classes, in_channels)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool): 64..512 channels, 2 blocks (11M)."""
    return ResNet((64, 128, 256, 512), 2, num_classes, in_channels)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """VGG-16 with BatchNorm, CIFAR variant: 13 conv layers, one linear classifier."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    layers: list[nn.Module] = []
    cin = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, int(v), 3, padding=1, bias=False),
                       nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            cin = int(v)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return kaiming_init(nn.Sequential(*layers))


def lenet_300_100(num_classes: int = 10, in_features: int = 784) -> nn.Sequential:
    """LeNet-300-100: a 784-300-100-10 ReLU MLP on flattened images."""
    return nn.Sequential(nn.Flatten(), *mlp((in_features, 300, 100, num_classes)))


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """Two 3x3 conv layers (32, 64 channels) with max-pooling, then 128-unit hidden layer."""
    return kaiming_init(nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, num_classes)))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20, "resnet18": resnet18, "vgg16_bn": vgg16_bn,
    "lenet_300_100": lenet_300_100, "small_cnn": small_cnn,
}


def create_model(name: str, num_classes: int = 10, input_shape: Sequence[int] = (3, 32, 32)
                 ) -> nn.Module:
    """A model by name for inputs of shape (C, H, W)."""
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    c, h, w = input_shape
    if name == "lenet_300_100":
        return lenet_300_100(num_classes, c * h * w)
    return MODELS[name](num_classes, c)
