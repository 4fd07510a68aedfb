"""Models with the paper's Kaiming-normal initialization. (Now: MLPs.)"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def kaiming_init(model: nn.Module) -> nn.Module:
    """Kaiming-normal weights (fan-in, ReLU gain) and zero biases for Linear and Conv layers."""
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
    return model


def mlp(sizes: Sequence[int]) -> nn.Sequential:
    """ReLU MLP with layer widths `sizes` (input first, classes last), Kaiming-initialized."""
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must list at least two positive widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return kaiming_init(nn.Sequential(*layers))
