"""The one training loop for every method: SGD with momentum, cosine / step / constant learning
rate with optional warm-up, per-epoch evaluation, JSONL + CSV logs with the method's diagnostics,
an atomically written checkpoint every epoch, and exact resume.

Distributed: under `torchrun` (after `init_distributed()`), every rank draws the same global
batch and trains on its share of it with DistributedDataParallel; the loss is scaled so that
the averaged gradient is the global batch's mean gradient, i.e. the run equals a single-process
run with the same global batch up to float summation order (BatchNorm excepted: its batch
statistics are per rank). Every rank holds identical m, w, α and masks; only rank 0 logs and
writes files."""

from __future__ import annotations

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
from .errors import UsageError
from .files import load_torch, save_torch, write_json, write_rows, write_text
from .methods import Method
from .provenance import provenance


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
            raise UsageError(f"epochs and batch_size must be >= 1, got {self.epochs} and "
                             f"{self.batch_size}")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise UsageError("need lr > 0, 0 <= momentum < 1 and weight_decay >= 0")
        if self.lr_schedule not in ("cosine", "step", "constant"):
            raise UsageError(f"lr_schedule must be cosine, step or constant, got "
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


def init_distributed() -> tuple[int, int]:
    """Join the process group that `torchrun` describes (env WORLD_SIZE > 1; NCCL on GPUs, gloo
    on CPU) and return (rank, world size); (0, 1) when not launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    return _rank_world()


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return _rank_world()[0] == 0


def default_device() -> torch.device:
    """The GPU of this process (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct = sum(int((model(x.to(dev)).argmax(1) == y.to(dev)).sum())
                  for x, y in data.batches(batch_size))
    model.train(was)
    return correct / len(data)


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
    device: str | torch.device | None = None,
) -> list[dict]:
    """Train `model` with `method`; returns the per-epoch log.

    With `out_dir`, writes log.jsonl, log.csv, config.json and checkpoint.pt there every epoch.
    An existing checkpoint is continued with resume=True (if it has the same configuration; a
    finished run returns at once) and refused otherwise, so nothing is overwritten silently.
    Shuffling and augmentation depend only on (seed, epoch), so a resumed run is bit-identical
    on CPU. `lr_scale` multiplies the learning rate (the paper's 0.2 for
    m ⊙ w is lr_scale=2 on lr 0.1). `device`: default `default_device()`. Under torchrun
    (see `init_distributed`), `cfg.batch_size` is the global batch, split across the ranks.
    """
    cfg.validate()
    rank, world = _rank_world()
    if world > cfg.batch_size:
        raise UsageError(f"batch_size {cfg.batch_size} is smaller than the number of processes "
                         f"{world}: each needs at least one example per step")
    dev = torch.device(device) if device is not None else default_device()
    model.to(dev)
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    method.check_lr(cfg.lr * lr_scale)
    config = run_config(cfg, method, lr_scale, train_data.name, len(train_data))
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out else None
    ck = check_resume(out, config, method, resume) if out else None
    method.attach(model, steps_per_epoch, cfg.epochs)
    method.setup()
    opt = torch.optim.SGD(method.param_groups(cfg.weight_decay), lr=cfg.lr,
                          momentum=cfg.momentum)
    writer = out if rank == 0 else None
    progress = progress and rank == 0
    history: list[dict] = []
    start = 0
    if out:
        out.mkdir(parents=True, exist_ok=True)
        if ck is not None:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            method.load_state_dict(ck["method"])
            start, history = ck["epoch"], ck["history"]
        if writer:  # recorded, not compared: resuming elsewhere or on more processes is fine
            write_json(out / "config.json", {**config, "world_size": world,
                                             "provenance": provenance()})
    net: nn.Module = model
    if world > 1:
        # after any resume: constructing DDP broadcasts rank 0's parameters and synchronizes
        # the ranks, so none starts before every rank has read the checkpoint
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
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
            n_global = len(y)
            x, y = x.chunk(world)[rank].to(dev), y.chunk(world)[rank].to(dev)
            logits = net(x)
            loss = nn.functional.cross_entropy(logits, y)
            # DDP averages gradients over ranks: weight each rank's mean by its share of the
            # global batch, so the result is the global batch's mean gradient
            data_loss = loss * (len(y) * world / n_global) if world > 1 else loss
            pen = method.penalty()
            full = data_loss + pen if pen is not None else data_loss
            if not _all_finite(full, world):
                raise FloatingPointError(_nonfinite_message(full, model, method, epoch, step,
                                                            ckpt_path))
            full.backward()
            method.before_step(lr)
            opt.step()
            method.after_step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            step += 1
        loss_sum, correct, seen = _sum_over_ranks([loss_sum, correct, seen], world)
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            # e.g. a parameter the loss does not see: never checkpoint it
            raise FloatingPointError(_nonfinite_message(torch.tensor(loss_sum), model, method,
                                                        epoch, step, ckpt_path))
        row = {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen,
               "train_acc": correct / seen,
               "test_acc": evaluate(model, test_data, cfg.eval_batch_size) if test_data else None,
               "seconds": time.time() - t0, **method.stats()}
        method.end_epoch(epoch, row)
        history.append(row)
        if progress:
            tqdm.write(f"{method.name} epoch {row['epoch']}: loss {row['train_loss']:.4f} "
                       f"test_acc {row['test_acc']} ({row['seconds']:.0f}s)")
        if writer:
            # checkpoint first: the logs never show an epoch that a resume would train again
            save_torch({"epoch": epoch + 1, "config": config, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "method": method.state_dict(),
                        "history": history}, ckpt_path)
            _write_logs(out, history)
    return history


def _nonfinite_message(loss, model, method, epoch, step, ckpt_path) -> str:
    """Names the step, the non-finite parameters and the last good checkpoint."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    where = (f"non-finite values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
             if bad else "all parameters are still finite")
    last = (f"last good checkpoint: {ckpt_path}" if ckpt_path and ckpt_path.exists()
            else "no checkpoint written yet")
    what = f"non-finite loss ({loss.item()})" if not torch.isfinite(loss) else "non-finite weights"
    return (f"{what} at epoch {epoch + 1}, step {step} of "
            f"{method.name} ({where}); {last}. Lower the learning rate or the regularization "
            "strength and start again (or resume from the checkpoint)")


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every rank (so that all ranks stop together)."""
    ok = torch.isfinite(loss.detach()).float()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _sum_over_ranks(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def run_config(cfg: TrainConfig, method: Method, lr_scale: float, dataset: str,
               train_size: int | None) -> dict:
    """What a training run's checkpoint records and a resume must match."""
    return {**asdict(cfg), "method": method.name, "hparams": method.hp, "lr_scale": lr_scale,
            "train_size": train_size, "dataset": dataset}


def check_resume(out: str | Path, config: dict, method: Method, resume: bool
                 ) -> dict[str, Any] | None:
    """The checkpoint in `out` to continue (None if there is none), after checking that
    resuming is asked for and that it was made with `config` (keys whose value is None in
    `config` are not compared: unknown yet). UsageError, with the differences listed, if not;
    the file is never changed."""
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        return None
    if not resume:
        raise UsageError(f"{path} exists: resume it (--resume / resume=True) or choose another "
                         "output folder")
    ck = load_torch(path, "training checkpoint")
    if not isinstance(ck, dict) or not {"config", "model", "optimizer", "method", "epoch",
                                        "history"} <= set(ck):
        raise UsageError(f"{path} is not a training checkpoint of mirrorprune; move it away")
    saved = json.loads(json.dumps(ck["config"], default=str))
    now = json.loads(json.dumps(config, default=str))
    # a hyperparameter added to the method later, at its default, changes nothing
    saved["hparams"] = {**json.loads(json.dumps(method.defaults, default=str)),
                        **saved.get("hparams", {})}
    keys = [k for k in sorted(set(saved) | set(now)) if now.get(k, 0) is not None]
    diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    if diff:
        shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in
                          diff.items())
        raise UsageError(f"checkpoint {path} was made with another configuration ({shown}); "
                         "resume with the same options, or use another output folder")
    return ck


def _write_logs(out: Path, history: list[dict]) -> None:
    write_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    write_rows(out / "log.csv", history)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: ImageData, batches: int = 20,
                   batch_size: int = 256) -> nn.Module:
    """Re-estimate BatchNorm running statistics (cumulative average over `batches` training
    batches, augmented as in training) — e.g. after pruning.

    With the training augmentation, not without it: the network's BatchNorm layers were trained
    on the statistics of augmented (zero-padded, cropped) images; on ResNet-20 / CIFAR-10,
    re-estimating them from un-augmented images cost GMP's 90%-sparse model, which pruning
    does not change, 6 points (57.8% vs 63.7%, results/oneshot-cifar10-bnrecal before and
    after this change).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    dev = next(model.parameters()).device
    for i, (x, _) in enumerate(data.batches(batch_size, shuffle=True, seed=1)):
        if i >= batches:
            break
        model(x.to(dev))
    for m, (mom, _) in zip(bns, saved):
        m.momentum = mom
    model.eval()
    return model
