import os

import pytest

# PILoTSGD's fused step compiles once per process (seconds); the tests use the eager step, and
# tests/test_optim.py checks the compiled one against it
os.environ.setdefault("MIRRORPRUNE_COMPILE", "0")
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TiedNet(nn.Module):
    """Encoder/decoder with the decoder's weight tied to the encoder's (transposed use)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 6)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


def conv_net(dim: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
    return nn.Sequential(conv(2, 4, 3, padding=1), bn(4), nn.ReLU(), conv(4, 3, 3),
                         nn.Flatten(), nn.LazyLinear(5))
