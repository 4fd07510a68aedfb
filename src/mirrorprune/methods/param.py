"""Baselines that compute the weight from other tensors, via torch.nn.utils.parametrize:
Continuous Sparsification, Powerpropagation and STR (SPEC §3)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..errors import UsageError
from ..reparam import safe_deepcopy
from .base import Method, hparam, register_method


class _Parametrized(Method):
    """Registers `make_param(weight)` on every selected weight; export collapses it with
    `final(param, original)`, the method's own end-of-training weight."""

    decay_own = False  # whether the parametrization's own parameters get weight decay

    def make_param(self, weight: torch.Tensor) -> nn.Module:
        raise NotImplementedError

    def final(self, param: nn.Module, original: torch.Tensor) -> torch.Tensor:
        return param(original)

    def attach(self, model, steps_per_epoch, epochs, lr=None):
        super().attach(model, steps_per_epoch, epochs, lr)
        for _, mod, a in self.selected:
            if not parametrize.is_parametrized(mod, a):  # tied weights: once
                x = getattr(mod, a).detach()
                parametrize.register_parametrization(mod, a, self.make_param(x).to(x.device))

    def masked_tensors(self):
        raise UsageError(f"method {self.name!r} computes its weight from other tensors, which a "
                         "fixed mask cannot hold at zero; use dense, l1, gmp or an m ⊙ w method")

    def params(self) -> list[nn.Module]:
        return [mod.parametrizations[a][0] for _, mod, a in self.selected]

    def param_groups(self, weight_decay):
        # the parametrization's own parameters (mask logits, thresholds) are grouped apart
        own = {id(p) for q in self.params() for p in q.parameters()}
        rest = [p for p in self.model.parameters() if id(p) not in own]
        return [{"params": rest, "weight_decay": weight_decay},
                {"params": [p for q in self.params() for p in q.parameters()],
                 "weight_decay": weight_decay if self.decay_own else 0.0}]

    @torch.no_grad()
    def export(self) -> nn.Module:
        model = safe_deepcopy(self.model)
        for n, _, a in self.selected:
            copy_mod = model.get_submodule(n)
            if not parametrize.is_parametrized(copy_mod, a):
                continue
            p = copy_mod.parametrizations[a]
            value = self.final(p[0], p.original).detach().clone()
            # deepcopy shares the generated Parametrized* class with the original module, and
            # removing a parametrization deletes the property from that class: give the copy
            # a class of its own first, or the trained model would lose its `weight`
            cls = type(copy_mod)
            copy_mod.__class__ = type(cls.__name__, cls.__bases__, {
                k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
            parametrize.remove_parametrizations(copy_mod, a, leave_parametrized=False)
            getattr(copy_mod, a).copy_(value)
        return model


class _SigmoidMask(nn.Module):
    def __init__(self, shape: torch.Size, s_init: float):
        super().__init__()
        self.s = nn.Parameter(torch.full(shape, float(s_init)))
        self.register_buffer("temperature", torch.tensor(1.0))

    def forward(self, w):
        return w * torch.sigmoid(self.temperature * self.s)


@register_method("cs")
class ContinuousSparsification(_Parametrized):
    """Continuous Sparsification (Savarese et al. 2020): x = w ⊙ σ(T·s), penalty λ Σ σ(T·s),
    temperature T raised geometrically from 1 to t_final over training (per epoch), final hard
    mask 1[s > 0]. s starts at s_init (negative for high sparsity); no weight decay on s."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        lam: float = hparam(1e-8, "λ of the penalty λ Σ σ(T·s)", low=0)
        s_init: float = hparam(-0.05, "initial mask logit s (negative: sparser)")
        t_final: float = hparam(200.0, "temperature T at the last epoch (from 1)", low=1)

    def make_param(self, weight):
        return _SigmoidMask(weight.shape, self.hp["s_init"])

    def start_epoch(self, epoch):
        t = self.hp["t_final"] ** (epoch / max(1, self.epochs - 1))
        for q in self.params():
            q.temperature.fill_(t)

    def penalty(self):
        return self.hp["lam"] * sum(torch.sigmoid(q.temperature * q.s).sum() for q in self.params())

    def final(self, param, original):
        return original * (param.s > 0)

    def stats(self):
        return {**super().stats(), "temperature": float(self.params()[0].temperature)}


class _Power(nn.Module):
    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, v):
        return v * v.abs().pow(self.a - 1)

    def right_inverse(self, x):
        return x.sign() * x.abs().pow(1 / self.a)


@register_method("powerprop")
class Powerprop(_Parametrized):
    """Powerpropagation (Schwarz et al. 2021): x = v·|v|^(a−1), v initialized so x0 is unchanged;
    ordinary weight decay on v."""

    @dataclasses.dataclass(frozen=True)
    class Config:
        a: float = hparam(2.0, "exponent of x = v·|v|^(a−1)", low=1)

    def make_param(self, weight):
        return _Power(self.hp["a"])


class _SoftThreshold(nn.Module):
    def __init__(self, s_init: float):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s_init)))

    def forward(self, w):
        return w.sign() * F.relu(w.abs() - torch.sigmoid(self.s))


@register_method("str")
class STR(_Parametrized):
    """Soft Threshold Reparameterization (Kusupati et al. 2020): x = sign(w)·relu(|w| − σ(s_l)),
    one learnable s per layer from s_init, weight decay on w and s. Sparsity is set by s_init and
    the weight decay: a larger s_init or decay gives sparser models.

    No knob aims it at a sparsity: `aim` uses the s_init of the grid point that was best at the
    nearest target on a validation split (the last 10k MNIST training images, LeNet-300-100,
    `cpu` budget; benchmarks/calibrate_targets.py). s_init ≥ −1.25 collapsed to 100% there."""

    AIM_S_INIT = {0.8: -1.75, 0.9: -1.75, 0.95: -1.75, 0.98: -1.5}

    @dataclasses.dataclass(frozen=True)
    class Config:
        s_init: float = hparam(-3.0, "initial threshold logit s of every layer (larger: sparser)")

    decay_own = True

    @classmethod
    def aim(cls, target, epoch_lr):
        return {"s_init": cls.AIM_S_INIT[min(cls.AIM_S_INIT, key=lambda s: abs(s - target))]}

    def make_param(self, weight):
        return _SoftThreshold(self.hp["s_init"])

    def stats(self):
        th = [float(torch.sigmoid(q.s.detach())) for q in self.params()]
        return {**super().stats(), "threshold_mean": sum(th) / len(th)}
