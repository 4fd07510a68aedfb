"""One training loop (in-memory data for now): SGD with momentum, cosine learning rate, an
optional PILoT regularizer, non-finite losses stopped with a message."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .pilot import PILoT


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # "cosine" (to 0 at the end) or "constant"
    seed: int = 0

    def lr_at(self, step: int, total: int) -> float:
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * step / total))
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    pilot: PILoT | None = None,
) -> list[dict]:
    """Train `model` on (x, y) with cross-entropy; returns one log dict per epoch."""
    groups = pilot.param_groups(cfg.weight_decay) if pilot else [
        {"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    g = torch.Generator().manual_seed(cfg.seed)
    per_epoch = math.ceil(len(x) / cfg.batch_size)
    total, step, logs = cfg.epochs * per_epoch, 0, []
    model.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        loss_sum = 0.0
        for i in range(per_epoch):
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            lr = cfg.lr_at(step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite loss {loss.item()} at epoch {epoch}, step {step}: lower the "
                    "learning rate or alpha"
                )
            loss.backward()
            if pilot:
                pilot.step(lr=lr)
            opt.step()
            loss_sum += loss.item()
            step += 1
        log = {"epoch": epoch + 1, "loss": loss_sum / per_epoch, "lr": lr}
        if pilot:
            log.update({k: v for k, v in pilot.stats().items() if k in ("alpha", "A", "l1")})
        logs.append(log)
    return logs


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)
