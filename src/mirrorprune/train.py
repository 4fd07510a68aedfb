"""The one training loop for every method: an optimizer by name (SGD with momentum by
default), cosine / step / constant learning rate with optional warm-up, per-epoch evaluation,
JSONL + CSV logs with the method's diagnostics, an atomically written checkpoint every epoch,
exact resume, and callbacks (`mirrorprune.callbacks`) for what experiments add.

Read top to bottom: `train` = `setup` (configuration checks, resume, optimizer, DDP), then per
epoch `train_epoch` (a `train_step` per batch) and `finish_epoch` (evaluation, logs,
checkpoint).

Distributed: under `torchrun` (after `init_distributed()`), every rank draws the same global
batch and trains on its share of it with DistributedDataParallel; the loss is scaled so that
the averaged gradient is the global batch's mean gradient, i.e. the run equals a single-process
run with the same global batch up to float summation order (BatchNorm excepted: its batch
statistics are per rank). Every rank holds identical m, w, α and masks; only rank 0 logs and
writes files."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .callbacks import Callback
from .config import with_defaults
from .data import ImageData
from .distributed import (
    all_finite,
    default_device,
    init_distributed,
    is_main,
    rank_world,
    sum_over_ranks,
)
from .errors import UsageError, warn_user
from .files import load_torch, save_torch, write_json, write_rows, write_text
from .methods import Method
from .provenance import provenance

__all__ = ["OPTIMIZERS", "PRECISIONS", "Run", "TrainConfig", "check_resume", "default_device",
           "evaluate", "finish_epoch", "init_distributed", "is_main", "model_format",
           "recalibrate_bn", "restore", "run_config", "setup", "to_input", "train",
           "train_epoch", "train_step"]


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
    optimizer: str = "sgd"  # a name in OPTIMIZERS
    # speed: bf16 autocasts forward and loss (weights, gradients and optimizer state stay
    # fp32); channels_last stores conv weights and inputs as NHWC; compile wraps the model in
    # torch.compile for training (the checkpoint holds the plain model)
    precision: str = "fp32"  # a name in PRECISIONS
    channels_last: bool = False
    compile: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # recorded, not interpreted (e.g. method)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError(f"epochs and batch_size must be >= 1, got {self.epochs} and "
                             f"{self.batch_size}")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise UsageError("need lr > 0, 0 <= momentum < 1 and weight_decay >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose one of "
                             f"{', '.join(OPTIMIZERS)}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}; choose one of "
                             f"{', '.join(PRECISIONS)}")
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


#: Autocast dtypes by name (None: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


#: Optimizers by name: (parameter groups, config) -> optimizer. Each group carries its own
#: weight decay (the method decides: m and w of PILoT get none). AdamW takes momentum as β1.
OPTIMIZERS: dict[str, Callable[[list[dict], TrainConfig], torch.optim.Optimizer]] = {
    "sgd": lambda groups, cfg: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum),
    "adamw": lambda groups, cfg: torch.optim.AdamW(groups, lr=cfg.lr,
                                                   betas=(cfg.momentum, 0.999)),
}


@dataclass
class Run:
    """One training run in progress: what the loop's parts and the callbacks share."""

    model: nn.Module
    method: Method
    cfg: TrainConfig
    config: dict  # what the checkpoint records (run_config)
    device: torch.device
    steps_per_epoch: int
    lr_scale: float = 1.0
    callbacks: Sequence[Callback] = ()
    out: Path | None = None
    rank: int = 0
    world: int = 1
    net: nn.Module | None = None  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer | None = None
    history: list[dict] = field(default_factory=list)
    start: int = 0  # first epoch to train (> 0 when resumed)
    step: int = 0  # optimizer steps taken

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    @property
    def finite_every(self) -> int:
        """Steps between checks that the loss is finite: every step on CPU, where the check is
        free; on accelerators every 50th (of the running sum), so steps never wait for the
        host — a non-finite loss then stops the run at most 49 steps later."""
        return 1 if self.device.type == "cpu" else 50

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs

    @property
    def checkpoint(self) -> Path | None:
        return self.out / "checkpoint.pt" if self.out else None


def to_input(x: torch.Tensor, device: torch.device, memory_format: torch.memory_format
             ) -> torch.Tensor:
    """A batch on `device`, images (4-d) in `memory_format`."""
    if x.dim() == 4:
        return x.to(device, memory_format=memory_format, non_blocking=True)
    return x.to(device, non_blocking=True)


def model_format(model: nn.Module) -> torch.memory_format:
    """channels_last if the model's conv weights are stored so (inputs should match)."""
    for p in model.parameters():
        if p.dim() == 4 and not p.is_contiguous():
            return (torch.channels_last if p.is_contiguous(memory_format=torch.channels_last)
                    else torch.contiguous_format)
    return torch.contiguous_format


@torch.no_grad()
def evaluate(model: nn.Module, data: ImageData, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode (in float32, whatever the training precision)."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    fmt = model_format(model)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    for x, y in data.batches(batch_size):
        correct += (model(to_input(x, dev, fmt)).argmax(1) == y.to(dev)).sum()
    model.train(was)
    return int(correct) / len(data)


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
    callbacks: Sequence[Callback] = (),
) -> list[dict]:
    """Train `model` with `method`; returns the per-epoch log.

    With `out_dir`, writes log.jsonl, log.csv, config.json and checkpoint.pt there every epoch.
    An existing checkpoint is continued with resume=True (if it has the same configuration; a
    finished run returns at once) and refused otherwise, so nothing is overwritten silently.
    Shuffling and augmentation depend only on (seed, epoch), so a resumed run is bit-identical
    on CPU. `lr_scale` multiplies the learning rate (the paper's 0.2 for
    m ⊙ w is lr_scale=2 on lr 0.1). `device`: default `default_device()`. Under torchrun
    (see `init_distributed`), `cfg.batch_size` is the global batch, split across the ranks.
    `callbacks` (`mirrorprune.callbacks`) add fixed masks, rewinding, ... to any method.
    """
    run = setup(model, method, len(train_data), train_data.name, cfg, out_dir, resume,
                lr_scale, device, callbacks)
    if run.device.type != "cpu":  # uint8 images on the accelerator: batches are made there
        train_data = train_data.to(run.device)
        test_data = test_data.to(run.device) if test_data is not None else None
    for epoch in range(run.start, cfg.epochs):
        t0 = time.time()
        row = train_epoch(run, train_data, epoch, progress)
        finish_epoch(run, test_data, epoch, row, t0, progress)
    if run.start < cfg.epochs:  # not when a finished run is only read back
        _warn_if_unlearned(run, train_data)
    return run.history


def _warn_if_unlearned(run: Run, data: ImageData) -> None:
    """Say so when the last epoch's training accuracy is no better than always answering the
    most frequent class: the table would only show chance-level numbers."""
    if not run.history or run.rank != 0 or not len(data):
        return
    acc = run.history[-1]["train_acc"]
    majority = float(torch.bincount(data.y.cpu()).max()) / len(data)
    if acc <= majority + 0.02:
        method = run.method
        hp = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in method.hp.items() if v != method.defaults[k])
        warn_user(
            f"{method.name}: training accuracy {acc:.1%} after {len(run.history)} epochs is "
            f"no better than always answering the most frequent class ({majority:.1%}): the "
            "model learned nothing. A penalty, strength or sparsity target too strong for this "
            f"budget does this (here: {hp or 'the defaults'}), as does a learning rate too "
            f"large; `mirrorprune tune --method {method.name} --grid KEY=...` chooses them on "
            "a validation split"
            + (" (PILoT's strength acts over flow time: a short run needs a smaller one)."
               if "strength" in method.hp else "."))


def setup(model: nn.Module, method: Method, train_size: int, dataset: str, cfg: TrainConfig,
          out_dir: str | Path | None, resume: bool, lr_scale: float,
          device: str | torch.device | None, callbacks: Sequence[Callback]) -> Run:
    """Check the configuration, attach the method, build the optimizer, continue a checkpoint
    (or refuse one), write config.json, and wrap the model for DDP."""
    cfg.validate()
    rank, world = rank_world()
    if world > cfg.batch_size:
        raise UsageError(f"batch_size {cfg.batch_size} is smaller than the number of processes "
                         f"{world}: each needs at least one example per step")
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":  # fixed input shapes: let cuDNN pick its fastest convolutions
        torch.backends.cudnn.benchmark = True
    model.to(dev)
    method.check_lr(cfg.lr * lr_scale)
    out = Path(out_dir) if out_dir is not None else None
    run = Run(model, method, cfg, run_config(cfg, method, lr_scale, dataset, train_size), dev,
              math.ceil(train_size / cfg.batch_size), lr_scale, callbacks, out, rank, world)
    ck = check_resume(out, run.config, method, resume) if out else None
    method.attach(model, run.steps_per_epoch, cfg.epochs,
                  lambda k: cfg.lr_at(k, run.total_steps, run.steps_per_epoch) * lr_scale)
    for cb in callbacks:
        cb.on_train_start(run)
    if cfg.channels_last:  # after attach (its m and w are 4-d too), before the optimizer
        model.to(memory_format=torch.channels_last)
    groups = method.param_groups(cfg.weight_decay)
    run.optimizer = (method.make_optimizer(groups, cfg.lr, cfg.momentum)
                     or OPTIMIZERS[cfg.optimizer](groups, cfg))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        if ck is not None:
            restore(run, ck)
        # recorded, not compared: resuming elsewhere or on more processes is fine; a finished
        # run read again keeps the record of the invocation that trained it
        if rank == 0 and (ck is None or run.start < cfg.epochs):
            write_json(out / "config.json", {**run.config, "world_size": world,
                                             **run_provenance(out, None if ck is None
                                                             else run.start)})
    run.net = model
    if world > 1:
        # after any resume: constructing DDP broadcasts rank 0's parameters and synchronizes
        # the ranks, so none starts before every rank has read the checkpoint
        run.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.compile:
        run.net = torch.compile(run.net)
    run.step = run.start * run.steps_per_epoch
    model.train()
    return run


def train_epoch(run: Run, data: ImageData, epoch: int, progress: bool) -> dict:
    """One epoch of steps; returns the start of its log row (epoch, lr, train loss/accuracy)."""
    cfg = run.cfg
    run.method.start_epoch(epoch)
    # summed on the device: no step waits for the host
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    seen = 0
    batches = data.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + epoch)
    bar = tqdm(batches, total=run.steps_per_epoch, disable=not (progress and run.rank == 0),
               desc=f"{run.method.name} epoch {epoch + 1}/{cfg.epochs}", leave=False,
               mininterval=1)
    for i, (x, y) in enumerate(bar):
        lr = (cfg.lr_at(run.step, run.total_steps, run.steps_per_epoch) * run.lr_scale
              * run.method.lr_factor)
        loss, right, n = train_step(run, x, y, lr, epoch)
        loss_sum += loss * n
        correct += right
        seen += n
        if run.finite_every > 1 and (i + 1) % run.finite_every == 0:
            _check_finite(loss_sum, run, epoch)
    _check_finite(loss_sum, run, epoch)
    loss_sum, correct, seen = sum_over_ranks([loss_sum.item(), int(correct), seen], run.world)
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        # e.g. a parameter the loss does not see: never checkpoint it
        raise FloatingPointError(_nonfinite_message(torch.tensor(loss_sum), run, epoch))
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen,
            "train_acc": correct / seen}


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor, lr: float, epoch: int
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One optimizer step on this rank's share of the global batch (x, y); returns (the mean
    data loss, correct predictions) of that share as tensors on the device (reading them
    waits for the step), and its number of examples."""
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    n_global = len(y)
    x = to_input(x.chunk(run.world)[run.rank], run.device, run.memory_format)
    y = y.chunk(run.world)[run.rank].to(run.device, non_blocking=True)
    dtype = PRECISIONS[run.cfg.precision]
    with torch.autocast(run.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = run.net(x)
        loss = nn.functional.cross_entropy(logits, y)
    # DDP averages gradients over ranks: weight each rank's mean by its share of the
    # global batch, so the result is the global batch's mean gradient
    data_loss = loss * (len(y) * run.world / n_global) if run.world > 1 else loss
    pen = run.method.penalty()
    full = data_loss + pen if pen is not None else data_loss
    if run.finite_every == 1:
        _check_finite(full, run, epoch)
    full.backward()
    run.method.before_step(lr)
    run.optimizer.step()
    run.method.after_step()
    for cb in run.callbacks:
        cb.on_step_end(run)
    run.step += 1
    return loss.detach(), (logits.argmax(1) == y).sum(), len(y)


def _check_finite(loss: torch.Tensor, run: Run, epoch: int) -> None:
    if not all_finite(loss, run.world):
        raise FloatingPointError(_nonfinite_message(loss, run, epoch))


def finish_epoch(run: Run, test_data: ImageData | None, epoch: int, row: dict, t0: float,
                 progress: bool) -> None:
    """Evaluate, complete the log row with the method's diagnostics, let the method and the
    callbacks see it, and (rank 0, with an output folder) checkpoint, then write the logs."""
    row = {**row, "test_acc": (evaluate(run.model, test_data, run.cfg.eval_batch_size)
                               if test_data else None),
           "seconds": time.time() - t0, **run.method.stats()}
    run.method.end_epoch(epoch, row)
    for cb in run.callbacks:
        cb.on_epoch_end(run, epoch, row)
    run.history.append(row)
    if progress and run.rank == 0:
        tqdm.write(f"{run.method.name} epoch {row['epoch']}: loss {row['train_loss']:.4f} "
                   f"test_acc {row['test_acc']} ({row['seconds']:.0f}s)")
    if run.out and run.rank == 0:
        # checkpoint first: the logs never show an epoch that a resume would train again
        save_torch({"epoch": epoch + 1, "config": run.config, "model": run.model.state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "method": run.method.state_dict(), "history": run.history,
                    "callbacks": [cb.state_dict() for cb in run.callbacks]}, run.checkpoint)
        _write_logs(run.out, run.history)


def restore(run: Run, ck: dict[str, Any]) -> None:
    """Continue from a checkpoint that `check_resume` accepted."""
    run.model.load_state_dict(ck["model"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.method.load_state_dict(ck["method"])
    for cb, state in zip(run.callbacks, ck.get("callbacks", ())):
        cb.load_state_dict(state)
    run.start, run.history = ck["epoch"], ck["history"]


def _nonfinite_message(loss: torch.Tensor, run: Run, epoch: int) -> str:
    """Names the step, the non-finite parameters and the last good checkpoint."""
    bad = [n for n, p in run.model.named_parameters() if not torch.isfinite(p).all()]
    where = (f"non-finite values in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"
             if bad else "all parameters are still finite")
    ckpt = run.checkpoint
    last = (f"last good checkpoint: {ckpt}" if ckpt and ckpt.exists()
            else "no checkpoint written yet")
    what = f"non-finite loss ({loss.item()})" if not torch.isfinite(loss) else "non-finite weights"
    return (f"{what} at epoch {epoch + 1}, step {run.step} of "
            f"{run.method.name} ({where}); {last}. Lower the learning rate or the regularization "
            "strength and start again (or resume from the checkpoint)")


def run_config(cfg: TrainConfig, method: Method, lr_scale: float, dataset: str,
               train_size: int | None) -> dict:
    """What a training run's checkpoint records and a resume must match (the weights the
    method prunes, when not its default selection, by name: a type or predicate object's
    address would differ from one process to the next)."""
    selection = {k: names for k, v in (("include", method.include),
                                       ("exclude", method.exclude)) if (names := _names(v))}
    return {**asdict(cfg), "method": method.name, "hparams": method.hp, "lr_scale": lr_scale,
            "train_size": train_size, "dataset": dataset,
            **({"selection": selection} if selection else {})}


def _names(selector: Any) -> list[str]:
    """A module selector (globs, types, or a predicate) as names."""
    if selector is None:
        return []
    items = (selector,) if isinstance(selector, str) or callable(selector) else selector
    return [s if isinstance(s, str) else getattr(s, "__qualname__", repr(s)) for s in items]


def _config_diff(saved: dict, config: dict, method: Method) -> str:
    """The differences between a recorded run configuration and `config`, listed ("" if
    none); keys whose value is None in `config` are not compared (unknown yet)."""
    saved = with_defaults(json.loads(json.dumps(saved, default=str)), TrainConfig)
    now = json.loads(json.dumps(config, default=str))
    # a hyperparameter added to the method later (at its default), or inert, changes nothing
    saved["hparams"] = method.comparable(saved.get("hparams", {}))
    if isinstance(now.get("hparams"), dict):
        now["hparams"] = method.comparable(now["hparams"])
    keys = [k for k in sorted(set(saved) | set(now)) if now.get(k, 0) is not None]

    def shown(d: dict, k: str) -> str:  # an absent key is "not set" (e.g. the default selection)
        return repr(d[k]) if k in d else "not set"

    return "; ".join(f"{k}: {shown(saved, k)} in the checkpoint, {shown(now, k)} now"
                     for k in keys if saved.get(k) != now.get(k))


def run_provenance(out: Path, resumed_at: int | None) -> dict:
    """What config.json records of the code and invocation behind a run: for a new run this
    invocation's `provenance()`; for a resumed one, the invocation that started it (kept from
    the config.json there) and, under "resumed", each one that continued it with the last epoch
    trained before it — a run that spans sessions names every commit that trained it."""
    now = provenance()
    try:
        before = json.loads((out / "config.json").read_text()) if resumed_at is not None else {}
    except (OSError, ValueError):  # unreadable: the record starts here
        before = {}
    if "provenance" not in before:
        return {"provenance": now}
    return {"provenance": before["provenance"],
            "resumed": [*before.get("resumed", []), {**now, "after_epoch": resumed_at}]}


def recorded_config_matches(out: str | Path, config: dict, method: Method) -> bool:
    """Whether the run in `out` recorded (config.json) the configuration `config` — how a
    finished run whose checkpoint was removed (its results kept) is recognized."""
    path = Path(out) / "config.json"
    if not path.exists():
        return False
    recorded = json.loads(path.read_text())
    for k in ("world_size", "provenance", "resumed"):  # recorded, not compared
        recorded.pop(k, None)
    return not _config_diff(recorded, config, method)


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
    shown = _config_diff(ck["config"], config, method)
    if shown:
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
