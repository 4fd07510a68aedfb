"""Gradual magnitude pruning (Zhu & Gupta 2017) with a cubic sparsity ramp."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import UsageError
from ..prune import magnitude_masks
from .base import Method, hparam, register_method


@register_method("gmp")
class GMP(Method):
    """Gradual magnitude pruning (Zhu & Gupta 2017): prune to `target` along
    s_t = target·(1 − (1 − progress)³) between the fractions `start` and `end` of training,
    recomputing global magnitude masks every `every` steps; pruned weights are held at zero after
    every optimizer step."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        target: float = hparam(0.9, "sparsity reached at the end of the ramp", low=0, high=1,
                               high_open=True)
        start: float = hparam(0.1, "fraction of training where the ramp starts", low=0, high=1)
        end: float = hparam(0.75, "fraction of training where the ramp ends", low=0, high=1)
        every: int = hparam(50, "steps between mask updates", low=1)
        scope: str = hparam("global", "magnitude ranking across layers or per layer",
                            choices=("global", "layer"))

        def check(self) -> None:
            if not self.start < self.end:
                raise UsageError(f"gmp needs start < end (fractions of training), got start "
                                 f"{self.start} and end {self.end}")

    def attach(self, model, steps_per_epoch, epochs, lr=None):
        super().attach(model, steps_per_epoch, epochs, lr)
        self.total = steps_per_epoch * epochs
        self.ramp_masks: dict[str, torch.Tensor] | None = None  # the ramp's current masks

    def sparsity_at(self, step: int) -> float:
        t0, t1 = self.hp["start"] * self.total, self.hp["end"] * self.total
        progress = min(1.0, max(0.0, (step - t0) / max(1.0, t1 - t0)))
        return self.hp["target"] * (1 - (1 - progress) ** 3)

    @torch.no_grad()
    def after_step(self):
        self.step_count += 1
        k = self.step_count
        end = self.hp["end"] * self.total + self.hp["every"]  # one update past the ramp's end
        in_ramp = self.hp["start"] * self.total <= k <= end
        if in_ramp and (k % self.hp["every"] == 0 or self.ramp_masks is None):
            s = self.sparsity_at(k)
            if s > 0:
                self.ramp_masks = magnitude_masks(self.weights(), s, self.hp["scope"])
        if self.ramp_masks is not None:
            for name, tensors in self.masked_tensors().items():
                for t in tensors:
                    t.mul_(self.ramp_masks[name])

    def stats(self):
        return {**super().stats(), "gmp_sparsity": self.sparsity_at(self.step_count)}

    @classmethod
    def aim(cls, target, epoch_lr):
        return {"target": target}

    def state_dict(self):
        return {**super().state_dict(), "masks": self.ramp_masks}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.ramp_masks = state["masks"]
