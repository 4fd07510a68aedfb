"""Training-loop callbacks: how experiments extend `mirrorprune.train.train` by composition,
for any method. Iterative pruning is built from three of them: `StartFrom` (the weights a cycle
starts from), `FixedMasks` (pruned weights held at zero) and `Rewind` (the weights kept at the
end of an early epoch, IMP's rewind point)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from .errors import UsageError

if TYPE_CHECKING:  # the training loop imports this module, not the other way round
    from .train import Run


class Callback:
    """Hooks of the training loop; each does nothing unless overridden. A callback's state
    (`state_dict`) is saved in every checkpoint and restored on resume."""

    def on_train_start(self, run: Run) -> None:
        """After the method is attached, before the optimizer is built and before a resume."""

    def on_step_end(self, run: Run) -> None:
        """After `optimizer.step()` and the method's `after_step()`."""

    def on_epoch_end(self, run: Run, epoch: int, row: dict[str, Any]) -> None:
        """After evaluation and the method's `end_epoch`, before the checkpoint."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class StartFrom(Callback):
    """Loads `state` (a state dict of the model as the method has attached it, e.g. its m and w)
    into the model before training starts."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state

    def on_train_start(self, run: Run) -> None:
        run.model.load_state_dict(self.state)


class FixedMasks(Callback):
    """Holds pruned weights at exactly zero: multiplies the tensors behind each prunable weight
    (`method.masked_tensors()`: the weight, or m and w) by its keep-mask at the start and after
    every optimizer step. `masks`: weight name -> bool tensor of the weight's shape."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    @torch.no_grad()
    def apply(self, run: Run) -> None:
        tensors = run.method.masked_tensors()
        missing = sorted(set(tensors) - set(self.masks))
        if missing:
            raise UsageError(f"FixedMasks has no mask for {missing[:3]}; give one per prunable "
                             f"weight ({', '.join(tensors)})")
        for name, ts in tensors.items():
            for t in ts:
                t.mul_(self.masks[name])

    def on_train_start(self, run: Run) -> None:
        self.apply(run)

    def on_step_end(self, run: Run) -> None:
        self.apply(run)


class Rewind(Callback):
    """Keeps a copy of the model's state dict at the end of epoch `epoch` (1-based): the rewind
    point of IMP with late rewinding. `snapshot` is None until then; it is checkpointed, so a
    resumed run keeps it."""

    def __init__(self, epoch: int):
        if epoch < 1:
            raise UsageError(f"Rewind needs an epoch >= 1 (0 is the initialization), got {epoch}")
        self.epoch = epoch
        self.snapshot: dict[str, torch.Tensor] | None = None

    def on_epoch_end(self, run: Run, epoch: int, row: dict[str, Any]) -> None:
        if epoch + 1 == self.epoch:
            self.snapshot = copy.deepcopy(run.model.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot = state["snapshot"]
