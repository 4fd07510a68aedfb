"""The one training loop for every method: SGD with momentum, cosine / step / constant learning
rate with optional warm-up, per-epoch evaluation, JSONL + CSV logs with the method's diagnostics,
an atomically written checkpoint every epoch, and exact resume."""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .data import ImageData
from .methods import Method


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # "cosine" (to 0), "step" (×gamma at milestones), "constant"
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # linear warm-up from 0
    seed: int = 0
    eval_batch_size: int = 1000
    extra: dict[str, Any] = field(default_factory=dict)  # recorded, not interpreted (e.g. method)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1 and weight_decay >= 0")
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"lr_schedule must be cosine, step or constant, got "
                             f"{self.lr_schedule!r}")

    def lr_at(self, step: int, total: int, steps_per_epoch: int) -> float:
        warm = self.warmup_epochs * steps_per_epoch
        if step < warm:
            return self.lr * (step + 1) / warm
        frac = (step - warm) / max(1.0, total - warm)
        if self.lr_schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * frac))
        if self.lr_schedule == "step":
            return self.lr * self.gamma ** sum(frac >= m for m in self.milestones)
        return self.lr


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    was = model.training
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in data.batches(batch_size))
    model.train(was)
    return correct / len(data)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers see the old or the new file, never half of one


def train(
    model: nn.Module,
    method: Method,
    train_data: ImageData,
    test_data: ImageData | None,
    cfg: TrainConfig,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    lr_scale: float = 1.0,
) -> list[dict]:
    """Train `model` with `method`; returns the per-epoch log.

    With `out_dir`, writes log.jsonl, log.csv, config.json and checkpoint.pt there every epoch.
    An existing checkpoint is continued with resume=True (if it has the same configuration; a
    finished run returns at once) and refused otherwise, so nothing is overwritten silently.
    Shuffling and augmentation depend only on (seed, epoch), so a resumed run is bit-identical
    on CPU. `lr_scale` multiplies the learning rate (the paper's 0.2 for
    m ⊙ w is lr_scale=2 on lr 0.1).
    """
    cfg.validate()
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    method.attach(model, steps_per_epoch, cfg.epochs)
    method.setup()
    opt = torch.optim.SGD(method.param_groups(cfg.weight_decay), lr=cfg.lr,
                          momentum=cfg.momentum)
    config = {**asdict(cfg), "method": method.name, "hparams": method.hp, "lr_scale": lr_scale,
              "train_size": len(train_data), "dataset": train_data.name}
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    history: list[dict] = []
    start = 0
    if out:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists():
            if not resume:
                raise ValueError(f"{ckpt_path} exists: resume it (--resume / resume=True) or "
                                 "choose another output folder")
            start, history = _resume(ckpt_path, config, model, opt, method)
        (out / "config.json").write_text(json.dumps(config, indent=1, default=str))
    step = start * steps_per_epoch
    model.train()
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        method.start_epoch(epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        batches = train_data.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
        bar = tqdm(batches, total=steps_per_epoch, desc=f"{method.name} epoch {epoch + 1}/"
                   f"{cfg.epochs}", disable=not progress, leave=False, mininterval=1)
        for x, y in bar:
            lr = cfg.lr_at(step, total, steps_per_epoch) * lr_scale
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            pen = method.penalty()
            full = loss + pen if pen is not None else loss
            if not torch.isfinite(full):
                last = f"; last good checkpoint: {ckpt_path}" if ckpt_path else ""
                raise FloatingPointError(
                    f"non-finite loss ({full.item()}) at epoch {epoch + 1}, step {step} of "
                    f"{method.name}: lower the learning rate or the regularization{last}")
            full.backward()
            method.before_step(lr)
            opt.step()
            method.after_step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            step += 1
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen,
               "train_acc": correct / seen,
               "test_acc": evaluate(model, test_data, cfg.eval_batch_size) if test_data else None,
               "seconds": time.time() - t0, **method.stats()}
        method.end_epoch(epoch, row)
        history.append(row)
        if progress:
            tqdm.write(f"{method.name} epoch {row['epoch']}: loss {row['train_loss']:.4f} "
                       f"test_acc {row['test_acc']} ({row['seconds']:.0f}s)")
        if out:
            _write_logs(out, history)
            _atomic_save({"epoch": epoch + 1, "config": config, "model": model.state_dict(),
                          "optimizer": opt.state_dict(), "method": method.state_dict(),
                          "history": history}, ckpt_path)
    return history


def _resume(path: Path, config: dict, model, opt, method) -> tuple[int, list[dict]]:
    try:
        ck = torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); move it "
                         "away to start over (it is never overwritten silently)") from e
    saved = json.loads(json.dumps(ck["config"], default=str))
    now = json.loads(json.dumps(config, default=str))
    if saved != now:
        diff = {k: (saved.get(k), now.get(k)) for k in set(saved) | set(now)
                if saved.get(k) != now.get(k)}
        raise ValueError(f"checkpoint {path} was made with another configuration "
                         f"(saved vs now: {diff}); use another output folder or move it away")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    method.load_state_dict(ck["method"])
    return ck["epoch"], ck["history"]


def _write_logs(out: Path, history: list[dict]) -> None:
    tmp = out / "log.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    os.replace(tmp, out / "log.jsonl")
    keys = list(dict.fromkeys(k for r in history for k in r))
    tmp = out / "log.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "log.csv")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ImageData, batches: int = 20,
                   batch_size: int = 256) -> nn.Module:
    """Re-estimate BatchNorm running statistics (cumulative average over `batches` training
    batches, no augmentation) — e.g. after pruning."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, _) in enumerate(data.batches(batch_size, shuffle=True, seed=1, augment=False)):
        if i >= batches:
            break
        model(x)
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.eval()
    return model
