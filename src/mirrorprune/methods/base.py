"""The one small interface every method implements, its registry, dense training (x = x) as
its base, and explicit L1.

A method is one class with one typed configuration: `Config`, a dataclass declared with
`mirrorprune.config.option` (names, types, defaults, ranges, one-line help), registered by
name with `@register_method("name")`; `create_method(name, **hparams)` is the one factory."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..config import default_of, kind_text, option, parse
from ..errors import UsageError
from ..prune import pruned_mass
from ..reparam import Selector, safe_deepcopy, select_weights

#: Every method by name, in registration order (filled by `register_method`).
METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: registers a Method subclass under `name` (its `--methods` name)."""
    def register(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method name {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls
    return register


def create_method(name: str, include: Selector = None, exclude: Selector = (),
                  **hparams: Any) -> Method:
    """A method by name (see METHODS) with its hyperparameters (checked: UsageError)."""
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name](include=include, exclude=exclude, **hparams)


def methods_table(markdown: bool = False) -> str:
    """Every registered method with its hyperparameters (type, range, default, help), from the
    methods' own declarations: as text, or as the README's Markdown table."""
    def summary(cls: type) -> str:
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

    if not markdown:
        out = []
        for name, cls in METHODS.items():
            out.append(f"{name}: {summary(cls)}")
            out += [f"    {f.name} ({kind_text(cls.Config, f)}, default {default_of(f)!r}): "
                    f"{f.metadata['help']}" for f in dataclasses.fields(cls.Config)]
        return "\n".join(out)
    lines = ["| `--methods` name | what | hyperparameters (`--hp NAME.KEY=VALUE`): type, "
             "default, meaning |", "|---|---|---|"]
    for name, cls in METHODS.items():
        hps = "<br>".join(f"`{f.name}` = `{default_of(f)!r}` ({kind_text(cls.Config, f)}): "
                          f"{f.metadata['help']}" for f in dataclasses.fields(cls.Config))
        cells = [f"`{name}`", summary(cls), hps or "—"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class NoHParams:
    """Dense training has no hyperparameters of its own."""


hparam = option  # the methods' name for a hyperparameter field


@register_method("dense")
class Method:
    """Dense training (x = x) with ordinary weight decay; pruned by global magnitude afterwards.

    The training loop calls, in order: `attach(model, steps_per_epoch, epochs)` once, then per
    epoch `start_epoch(epoch)`, per step `loss + penalty()`, `backward()`, `before_step(lr)`,
    `optimizer.step()`, `after_step()`, and after evaluation `end_epoch(epoch, row)`.
    `export()` returns a plain copy of the model after the method's own finalization (a hard
    mask, a collapsed m ⊙ w, ...), ready for exact magnitude pruning of the same weights.
    Fixed masks, rewinding and snapshots are training-loop callbacks
    (`mirrorprune.train.FixedMasks`, ...), not method state.
    """

    name = "dense"
    uses_mw = False  # trains a product m ⊙ w (the paper gives those a doubled learning rate)
    lr_factor = 1.0  # multiplies the training loop's learning rate (an optimizer of its own)
    Config: type = NoHParams  # the method's hyperparameters, a dataclass of `hparam` fields
    defaults: dict[str, Any] = {}  # Config's defaults as a dict (set for each subclass)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = dataclasses.asdict(cls.Config())

    def __init__(self, include: Selector = None, exclude: Selector = (), **hparams: Any):
        self.config = parse(self.Config, hparams, self.name)
        self.hp = dataclasses.asdict(self.config)
        self.include, self.exclude = include, exclude
        self.model: nn.Module | None = None
        self.step_count = 0

    @classmethod
    def aim(cls, target: float, epoch_lr: float) -> dict[str, Any]:
        """The hyperparameters that aim this method at sparsity `target` on a budget of
        `epoch_lr` (steps per epoch × learning rate of its prunable weights); {} if it has no
        knob for that (it is then pruned to the target at the end, like every method)."""
        return {}

    # ---------------------------------------------------------------- training hooks

    def attach(self, model: nn.Module, steps_per_epoch: int, epochs: int,
               lr: Callable[[int], float] | None = None) -> None:
        """Take over `model` for a run of `epochs` × `steps_per_epoch` optimizer steps whose
        learning rate at step k is `lr(k)` (None: constant)."""
        self.model, self.steps_per_epoch, self.epochs = model, steps_per_epoch, epochs
        self.lr_at = lr
        self.selected = select_weights(model, self.include, self.exclude)

    def masked_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The trainable tensors behind each prunable weight (by the weight's name), which a
        fixed mask zeroes (`mirrorprune.train.FixedMasks`)."""
        return {ref.name: [ref.tensor()] for ref in self.selected}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": list(self.model.parameters()), "weight_decay": weight_decay}]

    def make_optimizer(self, groups: list[dict[str, Any]], lr: float, momentum: float
                       ) -> torch.optim.Optimizer | None:
        """The method's own optimizer for these groups, or None for the training loop's
        (`TrainConfig.optimizer`)."""
        return None

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

    def after_step(self) -> None:
        self.step_count += 1

    # ---------------------------------------------------------------- results

    def weights(self) -> dict[str, torch.Tensor]:
        """The effective prunable weights (detached), tied ones once."""
        out, seen = {}, set()
        for ref in self.selected:
            p = ref.module._parameters.get(ref.attr)  # None where a parametrization computes it
            key = id(p) if p is not None else (id(ref.module), ref.attr)
            if key not in seen:
                seen.add(key)
                out[ref.name] = ref.tensor().detach()
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

    @classmethod
    def inert(cls, hp: dict[str, Any]) -> set[str]:
        """Hyperparameters that do not act under `hp` (another schedule's knobs): not compared
        when a run is resumed or its results reused, so changing their defaults keeps runs."""
        return set()

    @classmethod
    def comparable(cls, hp: dict[str, Any]) -> dict[str, Any]:
        """Recorded hyperparameters `hp` as runs are compared: one added to the method since
        takes its default, and inert ones are left out."""
        full = {**json.loads(json.dumps(cls.defaults, default=str)), **hp}
        return {k: v for k, v in full.items() if k not in cls.inert(full)}

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = state["step_count"]


@register_method("l1")
class L1(Method):
    """Dense with an explicit L1 penalty λ‖x‖₁ on the prunable weights (SPEC §3)."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        lam: float = hparam(1e-4, "λ of the penalty λ‖x‖₁, summed over all prunable weights",
                            low=0)

    def penalty(self) -> torch.Tensor:
        return self.hp["lam"] * sum(ref.tensor().abs().sum() for ref in self.selected)
