"""PILoT as an optimizer: the same mirror flow taken directly on x (SPEC §2.5c), with no
reparametrization and no memory beyond the base optimizer's.

Under PILoT's flow x_t = c_t·sinh(z_t) with c_t = β/2·e^{−4A_t} and dz/dt = −2∇f(x_t); since
sinh is invertible, z is recomputed from x at every step:

    z_k = arcsinh(x_k / c_k),   z_{k+1} = z_k − 2 η_k d_k,   x_{k+1} = c_{k+1}·sinh(z_{k+1}),

with c_{k+1} = c_k·e^{−4ΔA_k} and d_k the gradient or the base optimizer's direction (SGD's
momentum buffer; AdamW's normalized moment). This is mirror descent with the time-dependent
potential R_{c_t}. With b = 2η_k d_k and h = sqrt(x² + c²) the step is, exactly,

    x_{k+1} = (c_{k+1}/c_k) · (x·cosh b − h·sinh b)
            = (c_{k+1}/c_k) · ½ [(x − h)·e^{b} + (x + h)·e^{−b}],

the first form for |b| ≤ 1, the second beyond with x − h = −c·c/(h + x) for x ≥ 0 and
x + h = c·c/(h − x) for x < 0 (no cancellation). It never forms x/c or sinh(z): c may underflow
to 0 (A in the thousands), and then the step is the exact multiplicative one x·e^{∓b}; near 0
it is additive with rate 2η·c. Parameters are updated in their own dtype, computed in float32 at
least; where torch.compile works the step is one fused loop (MIRRORPRUNE_COMPILE=0: eager).

Use `param_groups(model, ...)` to flag the prunable weights (`mirror=True`, the same selection as
`mp.PILoT`); every other parameter gets the base optimizer's plain update with `weight_decay`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .errors import UsageError, check_number
from .prune import unique_weights
from .reparam import Selector
from .schedules import Schedule, Strength, as_schedule


def param_groups(model: nn.Module, include: Selector = None, exclude: Selector = (),
                 weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Two parameter groups: the prunable weights that `mp.PILoT` would reparametrize
    (`mirror=True`, no ordinary weight decay) and every other parameter (`weight_decay`)."""
    mirror = list(unique_weights(model, include, exclude).values())
    ids = {id(p) for p in mirror}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": mirror, "mirror": True, "weight_decay": 0.0, "name": "pilot_mirror"}]
    if rest:
        groups.append({"params": rest, "mirror": False, "weight_decay": weight_decay,
                       "name": "other"})
    return groups


@torch.no_grad()
def mirror_step(x: torch.Tensor, b: torch.Tensor, log_c: float | torch.Tensor,
                log_c_next: float | torch.Tensor) -> torch.Tensor:
    """c' · sinh(arcsinh(x/c) − b) for c = e^{log_c}, c' = e^{log_c_next}, exact to rounding
    without forming x/c or sinh(arcsinh(x/c)) (see the module docstring); a new tensor.

    With h = sqrt(x² + c²): c'·sinh(z − b) = (c'/c)·(x·cosh b − h·sinh b), evaluated as written
    for |b| ≤ 1 (at most e² ulps of cancellation) and as ½[(x − h)e^b + (x + h)e^{−b}] with the
    cancelling difference x ∓ h rewritten as c·c/(h ± x) beyond. log_c may be a tensor that
    broadcasts against x (one c per row, e.g.)."""
    if isinstance(log_c, torch.Tensor):
        c, ratio = torch.exp(log_c), torch.exp(log_c_next - log_c)
    else:  # c may underflow to 0: then the step is purely multiplicative
        c, ratio = math.exp(log_c), math.exp(log_c_next - log_c)
    h = torch.hypot(x, torch.as_tensor(c, dtype=x.dtype).expand_as(x))
    out = x * torch.cosh(b) - h * torch.sinh(b)
    big = b.abs() > 1
    if bool(big.any()):
        pos = x >= 0
        tiny = torch.finfo(x.dtype).tiny
        # c·(c/(h ± x)), not c²/(h ± x): c² underflows long before c does
        x_minus_h = torch.where(pos, (c / (h + x).clamp_min(tiny)) * -c, x - h)
        x_plus_h = torch.where(pos, x + h, (c / (h - x).clamp_min(tiny)) * c)
        eb = torch.exp(b.clamp(-80.0, 80.0))  # a wild direction must not make inf of a weight
        out = torch.where(big, 0.5 * (x_minus_h * eb + x_plus_h / eb), out)
    return out.mul_(ratio)


# Taylor coefficients of sinh(b)/b and cosh(b) in t = b², to below float64 rounding for |b| <= 1
# (float32 needs the first 7)
_SINH = tuple(1 / math.factorial(2 * k + 1) for k in range(10))
_COSH = tuple(1 / math.factorial(2 * k) for k in range(10))
# c range in which h = sqrt(x² + c²) is computed directly (no overflow or harmful underflow in
# float32: |x| < 2^60 squares below 2^120, c² >= 2^-120 stays normal, and beyond 2^60 h = |x|
# to rounding); outside it, hypot (about 40% slower here)
_SQRT_C_RANGE = (2.0 ** -60, 2.0 ** 30)


def _horner(t: torch.Tensor, coef: tuple[float, ...]) -> torch.Tensor:
    out = torch.full_like(t, coef[-1])
    for a in reversed(coef[:-1]):
        out = out * t + a
    return out


def _h(x: torch.Tensor, c: torch.Tensor, sqrt_h: bool) -> torch.Tensor:
    """sqrt(x² + c²): directly when c is in _SQRT_C_RANGE (`sqrt_h`), else hypot."""
    if sqrt_h:
        return torch.where(x.abs() < 2.0 ** 60, torch.sqrt(x * x + c * c), x.abs())
    return torch.hypot(x, c)


def _small_form(x: torch.Tensor, b: torch.Tensor, h: torch.Tensor, n: int) -> torch.Tensor:
    """x·cosh b − h·sinh b with n terms of each series (|b| <= 1)."""
    t = b * b
    return x * _horner(t, _COSH[:n]) - h * (b * _horner(t, _SINH[:n]))


def _fused_step(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, ratio: torch.Tensor,
                sqrt_h: bool = False) -> torch.Tensor:
    """`mirror_step` without branches (both forms, chosen per element), for torch.compile to
    fuse into one loop over the weights. cosh b and sinh b of the |b| <= 1 form are
    polynomials (exact to rounding, faster than the transcendental functions; the compiled
    expm1 is not accurate near 0); `sqrt_h` (c in _SQRT_C_RANGE) avoids hypot."""
    h = _h(x, c, sqrt_h)
    small = _small_form(x, b.clamp(-1.0, 1.0), h, 7 if x.dtype == torch.float32 else len(_SINH))
    q = c * (c / (h + x.abs()).clamp_min(torch.finfo(x.dtype).tiny))  # h − |x|
    pos = x >= 0
    e = torch.exp(b.clamp(-80.0, 80.0))
    big = 0.5 * (torch.where(pos, -q, x - h) * e + torch.where(pos, x + h, q) / e)
    return torch.where(b.abs() <= 1, small, big) * ratio


def _fused_update(xs: list[torch.Tensor], ds: list[torch.Tensor], scale: torch.Tensor,
                  c: torch.Tensor, ratio: torch.Tensor, sqrt_h: bool,
                  only_large: bool = False) -> None:
    """x ← c'·sinh(arcsinh(x/c) − scale·d) in place for every (x, d): compiled, one graph and
    one guard check per step for all the weights of a group. only_large: only where
    |scale·d| > SMALL_B (the rest was done by `_fused_sgd_step`)."""
    for x, d in zip(xs, ds):
        b = d * scale
        y = _fused_step(x, b, c, ratio, sqrt_h)
        x.copy_(torch.where(b.abs() > SMALL_B, y, x) if only_large else y)


# The |b| <= 1 form alone, with 4 terms of each series: exact to float32 rounding while
# |b| <= SMALL_B (the first term left out, b^8/8!, is then below 2^-24), and 3-4x cheaper
# than the full update, which also evaluates the other form and picks per element. Training
# steps are nearly always that small (b = 2·lr·d); LeNet-300-100's step cost 1.14x SGD's
# with the full update (issue 15).
_SMALL_TERMS = 4
SMALL_B = 0.45


def _fused_small_update(xs: list[torch.Tensor], ds: list[torch.Tensor], scale: torch.Tensor,
                        c: torch.Tensor, ratio: torch.Tensor, sqrt_h: bool) -> None:
    """`_fused_update` for float32 weights when every |scale·d| <= SMALL_B."""
    for x, d in zip(xs, ds):
        x.copy_(_small_form(x, d * scale, _h(x, c, sqrt_h), _SMALL_TERMS) * ratio)


def _fused_sgd_step(xs: list[torch.Tensor], gs: list[torch.Tensor], bufs: list[torch.Tensor],
                    ps: list[torch.Tensor], pgs: list[torch.Tensor], pbufs: list[torch.Tensor],
                    k: torch.Tensor, sqrt_h: bool, nesterov: bool) -> torch.Tensor:
    """A whole PILoTSGD step with momentum in one compiled pass over the parameters (float32,
    CPU, momentum buffers made): for the mirror weights xs, buf ← μ·buf + (1 − dampening)·g,
    d = buf (Nesterov: g + μ·buf), and x takes the small-step form wherever |scale·d| <=
    SMALL_B — elsewhere x stays as it was and `_fused_update(..., only_large=True)` finishes
    it; the other parameters ps take torch's SGD step with weight decay.
    k = (scale, c, c'/c, μ, 1 − dampening, lr and weight decay of ps). Returns max |d| of xs.
    Issue 15: on LeNet-300-100 the separate momentum, max, update and SGD calls cost 1.09x
    SGD's step; most of it was per-call overhead."""
    scale, c, ratio, mu, keep, lr, wd = (k[i] for i in range(7))

    def direction(g: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        new = buf * mu + g * keep  # torch's SGD momentum, the buffer updated in place
        buf.copy_(new)
        return g + new * mu if nesterov else new

    tops = []
    for x, g, buf in zip(xs, gs, bufs):
        b = direction(g, buf) * scale
        y = _small_form(x, b, _h(x, c, sqrt_h), _SMALL_TERMS) * ratio
        x.copy_(torch.where(b.abs() <= SMALL_B, y, x))
        tops.append(b.abs().amax())  # same loop as the update: one pass
    for p, g, buf in zip(ps, pgs, pbufs):
        p.copy_(p - direction(g + p * wd, buf) * lr)
    return torch.stack(tops).amax() / scale


# [full update, small-step update, SGD momentum + small-step update], compiled once made;
# None where they cannot be
_COMPILED: list[Any] = []


def _compiled() -> Any:
    if not _COMPILED:
        use = os.environ.get("MIRRORPRUNE_COMPILE", "1") != "0"
        # static shapes: kernels 2× faster than dynamic ones here; one graph per model (per
        # set of weight shapes), up to dynamo's recompile limit, beyond which it runs eagerly
        fns = (_fused_update, _fused_small_update, _fused_sgd_step)
        _COMPILED.extend([torch.compile(f, dynamic=False) if use else None for f in fns])
    return _COMPILED[0]


def _max_abs(ts: list[torch.Tensor]) -> float:
    """max |t| over all the tensors (aminmax: a tenth of the time of an infinity norm here)."""
    out = 0.0
    for t in ts:
        lo, hi = torch.aminmax(t)
        out = max(out, -float(lo), float(hi))
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous t's elements as a 1-d tensor sharing its memory that is not a view: one
    compiled graph then serves every shape and rank (torch.compile guards on a view's base)."""
    return t.new_empty(0).set_(t.untyped_storage(), t.storage_offset(), (t.numel(),), (1,))


def mirror_update_(params: list[torch.Tensor], directions: list[torch.Tensor], scale: float,
                   log_c: float, log_c_next: float) -> None:
    """Every p ← c'·sinh(arcsinh(p/c) − scale·d) in place (c = e^{log_c}, c' = e^{log_c_next}).
    float32/float64 contiguous weights go through one compiled update per (device, dtype) where
    torch.compile works (about ten passes over the weights fused into one;
    MIRRORPRUNE_COMPILE=0: off); others (bf16, channels_last, no compiler) through
    `mirror_step`, computed in float32 at least."""
    fused = _compiled()
    batches: dict[tuple, tuple[list, list]] = {}
    rest = []
    for p, d in zip(params, directions):
        if (fused is not None and p.dtype in (torch.float32, torch.float64)
                and d.dtype == p.dtype and p.is_contiguous() and d.is_contiguous()):
            xs, ds = batches.setdefault((p.device, p.dtype), ([], []))
            xs.append(p)
            ds.append(d)
        else:
            rest.append((p, d))
    for (dev, dtype), (xs, ds) in batches.items():
        update = fused
        # on CPU the largest |b| costs one cheap pass and no device sync: with it the
        # small-step form alone is enough on most steps
        if dev.type == "cpu" and dtype == torch.float32 and scale * _max_abs(ds) <= SMALL_B:
            update = _COMPILED[1]
        try:
            c = math.exp(log_c)
            update([_flat(x) for x in xs], [_flat(d) for d in ds],
                   *(torch.tensor(v, dtype=dtype, device=dev) for v in
                     (scale, c, math.exp(log_c_next - log_c))),
                   _SQRT_C_RANGE[0] <= c <= _SQRT_C_RANGE[1])
        except Exception:  # noqa: BLE001 - no compiler, unsupported backend: stay eager
            _COMPILED[:] = [None] * len(_COMPILED)
            rest += list(zip(xs, ds))
    for p, d in rest:
        work = torch.promote_types(p.dtype, torch.float32)
        p.copy_(mirror_step(p.to(work), d.to(work) * scale, log_c, log_c_next))


class _PILoTOptimizer(torch.optim.Optimizer):
    """The mirror-group bookkeeping shared by PILoTSGD and PILoTAdamW: one strength schedule
    for all mirror groups, its step k and log c_k stored in each mirror group (so they are in
    `state_dict()`)."""

    def __init__(self, params: Iterable, defaults: dict[str, Any], beta: float,
                 strength: Schedule | float | None):
        beta = check_number(beta, "beta (m0² − w0² of the flow; paper: 1.0)", low=0,
                            low_open=True)
        super().__init__(params, {**defaults, "mirror": False})
        self.strength = Strength() if strength is None else as_schedule(strength)
        if not any(g["mirror"] for g in self.param_groups):
            raise UsageError("no parameter group has mirror=True: build the groups with "
                             "mirrorprune.optim.param_groups(model)")
        for g in self.param_groups:
            if g["mirror"]:
                g.setdefault("log_c", math.log(beta / 2))
                g.setdefault("pilot_step", 0)
                g.setdefault("A", 0.0)

    def _strength_step(self, group: dict[str, Any]) -> tuple[float, float]:
        """(log c_k, log c_{k+1}) of this step, and advance the group's schedule position."""
        k = group["pilot_step"]
        if self.strength.decoupled:
            dA = self.strength.delta(k)
        else:  # an α schedule: c shrinks by e^{−4ηα} per step (no momentum amplification here)
            alpha = self.strength(k)
            if 2 * alpha * group["lr"] >= 1:
                raise UsageError(f"alpha {alpha:g} is too large for lr {group['lr']:g}")
            dA = alpha * group["lr"]
        log_c = group["log_c"]
        group["log_c"], group["pilot_step"], group["A"] = log_c - 4 * dA, k + 1, group["A"] + dA
        return log_c, group["log_c"]

    def _mirror_update(self, group: dict[str, Any], params: list[torch.Tensor],
                       directions: list[torch.Tensor]) -> None:
        log_c, log_c_next = self._strength_step(group)
        mirror_update_(params, directions, 2 * group["lr"], log_c, log_c_next)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                if group["mirror"]:
                    self._strength_step(group)  # the strength advances with every step
                continue
            dirs = self._directions(group, params)
            if group["mirror"]:
                self._mirror_update(group, params, dirs)
            else:
                self._plain_update(group, params, dirs)
        return loss

    def _directions(self, group: dict[str, Any], params: list[torch.Tensor]
                    ) -> list[torch.Tensor]:
        """The base optimizer's direction d for each parameter (its step is −lr·d)."""
        raise NotImplementedError

    def _plain_update(self, group: dict[str, Any], params: list[torch.Tensor],
                      dirs: list[torch.Tensor]) -> None:
        torch._foreach_add_(params, dirs, alpha=-group["lr"])

    def stats(self) -> dict[str, float]:
        """The realized strength A, log c and the step of the (first) mirror group."""
        g = next(g for g in self.param_groups if g["mirror"])
        return {"A": g["A"], "log_c": g["log_c"], "step": g["pilot_step"],
                "c": math.exp(g["log_c"])}


class PILoTSGD(_PILoTOptimizer):
    """SGD whose `mirror=True` groups take PILoT's step on x (mirror descent with the potential
    R_{c_t}); other groups are plain SGD with `weight_decay`. Momentum (optionally dampened or
    Nesterov) forms the direction d in the dual space, from the gradient.

    strength: a `mirrorprune.schedules` strength schedule (default `Strength()`: give its
    horizon, and its lr as the LR scheduler you will step with `optimizer.strength.bind(lr=...)`)
    or an α schedule (the paper's per-step α, here with c_{k+1} = c_k·e^{−4η_kα_k}).
    beta: m0² − w0² of the equivalent m ⊙ w form (c_0 = β/2; > 0).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0,
                 dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
                 beta: float = 1.0, strength: Schedule | float | None = None):
        check_number(lr, "lr", low=0)
        check_number(momentum, "momentum", low=0, high=1, high_open=True)
        check_number(weight_decay, "weight_decay", low=0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise UsageError("nesterov needs momentum > 0 and dampening 0 (as torch's SGD)")
        super().__init__(params, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                  "nesterov": nesterov, "weight_decay": weight_decay},
                         beta, strength)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if closure is None and self._fused_step():
            return None
        return super().step(closure)

    def _fused_step(self) -> bool:
        """The step as one compiled call (`_fused_sgd_step`) where it applies: the groups of
        `param_groups` (one mirror group, at most one other) with momentum, the same momentum
        settings, every parameter float32 on the CPU with its gradient and momentum buffer.
        False (nothing changed) elsewhere: the caller takes the step group by group."""
        _compiled()
        fused = _COMPILED[2]
        mirror = [g for g in self.param_groups if g["mirror"]]
        plain = [g for g in self.param_groups if not g["mirror"]]
        if fused is None or len(mirror) != 1 or len(plain) > 1 or not mirror[0]["momentum"]:
            return False
        group = mirror[0]
        if any(g[key] != group[key] for g in plain for key in ("momentum", "dampening",
                                                                "nesterov")):
            return False
        lists = []
        for g in (group, *plain):
            params = g["params"]
            grads = [p.grad for p in params]
            bufs = [self.state[p].get("momentum_buffer") for p in params]
            # float32 on the CPU (the small-step form's accuracy, no device sync); layouts
            # need no check: the compiled graph's guards see them
            if any(t is None for t in grads) or any(b is None for b in bufs) or not all(
                    p.dtype is torch.float32 and p.is_cpu for p in params):
                return False
            lists += [params, grads, bufs]
        saved = {key: group[key] for key in ("log_c", "pilot_step", "A")}
        log_c, log_c_next = self._strength_step(group)
        c = math.exp(log_c)
        other = (plain[0]["lr"], plain[0]["weight_decay"]) if plain else (0.0, 0.0)
        # the step's numbers written into one reused tensor (torch.tensor costs more here)
        k = self.__dict__.get("_fused_k")
        if k is None:
            k = self._fused_k = torch.zeros(7)
        k.numpy()[:] = (2 * group["lr"], c, math.exp(log_c_next - log_c), group["momentum"],
                        1 - group["dampening"], *other)
        sqrt_h = _SQRT_C_RANGE[0] <= c <= _SQRT_C_RANGE[1]
        try:  # the tensors as they are (flat views cost more in guards than they save here)
            top = float(fused(*lists, *([[], [], []] if not plain else []), k, sqrt_h,
                              group["nesterov"]))
        except Exception:  # noqa: BLE001 - no compiler: eager from now on (nothing changed)
            _COMPILED[:] = [None] * len(_COMPILED)
            group.update(saved)
            return False
        if 2 * group["lr"] * top > SMALL_B:  # rare: the large steps, where x was left as it was
            params, grads, bufs = lists[:3]
            dirs = (torch._foreach_add(grads, bufs, alpha=group["momentum"])
                    if group["nesterov"] else bufs)
            _COMPILED[0](params, dirs, k[0], k[1], k[2], sqrt_h, True)
        return True

    def _directions(self, group, params):
        grads = [p.grad for p in params]
        if group["weight_decay"] and not group["mirror"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        return self._momentum(group, params, grads)

    def _momentum(self, group: dict[str, Any], params: list[torch.Tensor],
                  grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """SGD's direction: the gradient, or the (dampened, Nesterov) momentum buffer."""
        mu = group["momentum"]
        if mu == 0:
            return list(grads)
        bufs, old, old_grads = [], [], []
        for p, g in zip(params, grads):
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.clone(g).detach()
            else:
                old.append(st["momentum_buffer"])
                old_grads.append(g)
            bufs.append(st["momentum_buffer"])
        if old:  # as torch's foreach SGD: buf ← μ·buf + (1 − dampening)·g
            torch._foreach_mul_(old, mu)
            torch._foreach_add_(old, old_grads, alpha=1 - group["dampening"])
        if group["nesterov"]:
            return torch._foreach_add(grads, bufs, alpha=mu)
        return bufs


class PILoTAdamW(_PILoTOptimizer):
    """Experimental: AdamW whose `mirror=True` groups take PILoT's dual step with Adam's
    normalized direction d = m̂ / (sqrt(v̂) + eps); other groups are AdamW with decoupled
    `weight_decay`. Arguments as torch's AdamW, plus beta and strength as PILoTSGD's."""

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, beta: float = 1.0,
                 strength: Schedule | float | None = None):
        check_number(lr, "lr", low=0)
        for v in betas:
            check_number(v, "betas", low=0, high=1, high_open=True)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps,
                                  "weight_decay": weight_decay}, beta, strength)

    def _plain_update(self, group, params, dirs):
        if group["weight_decay"]:  # decoupled, as AdamW's
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        super()._plain_update(group, params, dirs)

    def _directions(self, group, params):
        b1, b2 = group["betas"]
        out = []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["step"] += 1
            t = float(st["step"])
            st["exp_avg"].lerp_(p.grad, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
            out.append(st["exp_avg"] / (1 - b1**t) / denom)
        return out
