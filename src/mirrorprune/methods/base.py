"""The one small interface every method implements, dense training (x = x) as its base, and
typed hyperparameters: each method declares them as a dataclass (`HParams` subclass) whose
fields carry type, default, range and a one-line help; `parse_hparams` turns user values (from
the API or `--hp NAME.KEY=VALUE`) into it, naming the valid keys, types and ranges on error."""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import typing
from typing import Any

import torch
from torch import nn

from ..errors import UsageError, check_number
from ..prune import pruned_mass
from ..reparam import Selector, safe_deepcopy, select_modules


def hparam(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False,
           choices: tuple[str, ...] | None = None) -> Any:
    """A hyperparameter field: its default, one line of help, and the allowed values."""
    return dataclasses.field(default=default, metadata={
        "help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
        "choices": choices})


@dataclasses.dataclass(frozen=True)
class HParams:
    """Base of every method's hyperparameters (none: dense training)."""

    def check(self) -> None:
        """Checks across fields (after each field was checked on its own)."""


def _kind(cls: type, f: dataclasses.Field) -> tuple[type, bool]:
    """(float, int or str, whether None is allowed) of a field."""
    hint = typing.get_type_hints(cls)[f.name]
    args = typing.get_args(hint)
    if args:  # X | None
        return next(a for a in args if a is not type(None)), type(None) in args
    return hint, False


def describe(cls: type[HParams], f: dataclasses.Field) -> str:
    """"alpha (float >= 0, default 0.001): what it does" for one field."""
    kind, optional = _kind(cls, f)
    md = f.metadata
    if md["choices"]:
        what = " | ".join(md["choices"])
    else:
        lo, hi = md["low"], md["high"]
        what = kind.__name__
        if lo is not None and hi is not None:
            what += (f" in {'(' if md['low_open'] else '['}{lo:g}, "
                     f"{hi:g}{')' if md['high_open'] else ']'}")
        elif lo is not None:
            what += f" {'>' if md['low_open'] else '>='} {lo:g}"
        elif hi is not None:
            what += f" {'<' if md['high_open'] else '<='} {hi:g}"
    if optional:
        what += " or None"
    return f"{f.name} ({what}, default {f.default!r}): {md['help']}"


def _coerce(cls: type[HParams], f: dataclasses.Field, value: Any, what: str) -> Any:
    kind, optional = _kind(cls, f)
    md = f.metadata
    if value is None and optional:
        return None
    if kind is float:
        return check_number(value, what, md["low"], md["high"], md["low_open"], md["high_open"])
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise UsageError(f"{what} must be an integer, got {value!r}")
        return int(check_number(value, what, md["low"], md["high"]))
    if not isinstance(value, str) or (md["choices"] and value not in md["choices"]):
        raise UsageError(f"{what} must be one of {', '.join(md['choices'] or ('a string',))}, "
                         f"got {value!r}")
    return value


def parse_hparams(cls: type[HParams], values: dict[str, Any], method: str) -> HParams:
    """`values` (name -> value) checked and converted into `cls`; unset fields keep their
    defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = "; ".join(describe(cls, f) for f in fields.values()) or "none"
        raise UsageError(f"unknown hyperparameter(s) {unknown} for method {method!r}; "
                         f"valid: {valid}")
    out = cls(**{k: _coerce(cls, fields[k], v, f"{method}.{k}") for k, v in values.items()})
    out.check()
    return out


class Method:
    """Dense training (x = x) with ordinary weight decay; pruned by global magnitude afterwards.

    The training loop calls, in order: `attach(model, steps_per_epoch, epochs)` once, then per
    epoch `start_epoch(epoch)`, per step `loss + penalty()`, `backward()`, `before_step(lr)`,
    `optimizer.step()`, `after_step()`, and after evaluation `end_epoch(epoch, row)`.
    `export()` returns a plain copy of the model after the method's own finalization (a hard
    mask, a collapsed m ⊙ w, ...), ready for exact magnitude pruning of the same weights.
    """

    name = "dense"
    uses_mw = False  # trains a product m ⊙ w (the paper gives those a doubled learning rate)
    Config: type[HParams] = HParams  # the method's hyperparameters
    defaults: dict[str, Any] = {}  # Config's defaults as a dict (set for each subclass)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = dataclasses.asdict(cls.Config())

    def __init__(self, include: Selector = None, exclude: Selector = (), **hparams: Any):
        self.config = parse_hparams(self.Config, hparams, self.name)
        self.hp = dataclasses.asdict(self.config)
        self.include, self.exclude = include, exclude
        self.model: nn.Module | None = None
        self.step_count = 0
        # For iterative pruning: fixed keep-masks by weight name (re-applied after every step),
        # a state_dict loaded right after attach, and an epoch whose weights are kept (rewind).
        self.masks: dict[str, torch.Tensor] | None = None
        self.initial_state: dict[str, torch.Tensor] | None = None
        self.snapshot_epoch: int | None = None
        self.snapshot: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- training hooks

    def attach(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None:
        self.model, self.steps_per_epoch, self.epochs = model, steps_per_epoch, epochs
        self.modules = select_modules(model, self.include, self.exclude)

    def setup(self) -> None:
        """Called by the training loop after `attach` and before the optimizer is built."""
        if self.initial_state is not None:
            self.model.load_state_dict(self.initial_state)
        self.apply_masks()

    def masked_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The trainable tensors behind each prunable weight, which a mask zeroes."""
        return {f"{n}.weight" if n else "weight": [mod.weight] for n, mod in self.modules}

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self.masks is None:
            return
        for name, tensors in self.masked_tensors().items():
            for t in tensors:
                t.mul_(self.masks[name])

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters()), "weight_decay": weight_decay}]

    def check_lr(self, lr: float) -> None:
        """Refuse, before training, hyperparameters that cannot work with this largest
        learning rate (UsageError)."""

    def penalty(self) -> torch.Tensor | None:
        return None

    def start_epoch(self, epoch: int) -> None:
        pass

    def before_step(self, lr: float) -> None:
        pass

    def end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """After evaluation, with the epoch's log row (train_acc, test_acc, ...)."""
        if self.snapshot_epoch is not None and epoch + 1 == self.snapshot_epoch:
            self.snapshot = copy.deepcopy(self.model.state_dict())

    def after_step(self) -> None:
        self.step_count += 1
        self.apply_masks()

    # ---------------------------------------------------------------- results

    def weights(self) -> dict[str, torch.Tensor]:
        """The effective prunable weights (detached), tied ones once."""
        out, seen = {}, set()
        for n, mod in self.modules:
            w = mod.weight
            key = id(mod._parameters.get("weight", mod))
            if key not in seen:
                seen.add(key)
                out[f"{n}.weight" if n else "weight"] = w.detach()
        return out

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """‖x‖₁, the fraction of exact zeros, and for pruning to 90/95/99%: the magnitude
        threshold (q90, ...) and the fraction of ‖x‖₁ that pruning removes (mass90, ...). Small
        values mean the model is already nearly that sparse."""
        weights = self.weights()
        flat = torch.cat([w.flatten().abs().float() for w in weights.values()])
        out = {"l1": float(flat.sum()), "zeros": float((flat == 0).float().mean())}
        srt = flat.sort().values
        for q in (90, 95, 99):
            out[f"q{q}"] = float(srt[max(1, min(len(srt), math.ceil(q / 100 * len(srt)))) - 1])
            out[f"mass{q}"] = pruned_mass(weights, q / 100)
        return out

    def export(self) -> nn.Module:
        return safe_deepcopy(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "snapshot": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count, self.snapshot = state["step_count"], state.get("snapshot")


class L1(Method):
    """Dense with an explicit L1 penalty λ‖x‖₁ on the prunable weights (SPEC §3)."""

    name = "l1"

    @dataclasses.dataclass(frozen=True)
    class Config(HParams):
        lam: float = hparam(1e-4, "λ of the penalty λ‖x‖₁, summed over all prunable weights",
                            low=0)

    def penalty(self) -> torch.Tensor:
        return self.hp["lam"] * sum(mod.weight.abs().sum() for _, mod in self.modules)
