"""The strength knob (SPEC §2.5b): A spread over flow time and applied as a decoupled decay is
realized exactly under every learning-rate schedule and momentum; `pilot.attach(optimizer)` is
the explicit `pilot.step()` done by the optimizer."""

import math

import pytest
import torch
from torch import nn

import mirrorprune as mp
from mirrorprune import schedules as S
from mirrorprune.data import load_digits
from mirrorprune.errors import UsageError

XTR, YTR, _, _ = load_digits()
XTR = XTR / XTR.std()  # standardized inputs
BATCH = 128
STEPS_PER_EPOCH = math.ceil(len(YTR) / BATCH)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _scheduler(name, opt, steps):
    return {
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0),
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
        "step": lambda: torch.optim.lr_scheduler.StepLR(opt, steps // 3, 0.1),
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=steps),
    }[name]()


def _train(model, opt, steps, before_step=None, after_step=None):
    g = torch.Generator().manual_seed(0)
    correct = seen = 0
    for k in range(steps):
        idx = torch.randint(0, len(YTR), (BATCH,), generator=g)
        opt.zero_grad()
        out = model(XTR[idx])
        nn.functional.cross_entropy(out, YTR[idx]).backward()
        if before_step:
            before_step()
        opt.step()
        if after_step:
            after_step()
        if k >= steps - STEPS_PER_EPOCH:  # the last epoch's training accuracy
            correct += int((out.argmax(1) == YTR[idx]).sum())
            seen += BATCH
    return correct / seen


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine", "step", "onecycle"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_realized_strength_is_the_requested_one(lr_schedule, momentum):
    steps = 30 * STEPS_PER_EPOCH
    model = _mlp()
    pilot = mp.PILoT(model, S.Strength(total=0.5))
    opt = torch.optim.SGD(pilot.param_groups(1e-4), lr=0.2, momentum=momentum)
    sched = _scheduler(lr_schedule, opt, steps)
    pilot.attach(opt, horizon=steps, lr=sched)
    acc = _train(model, opt, steps, after_step=sched.step)
    st = pilot.stats()
    assert st["A"] == pytest.approx(0.5, rel=1e-9)  # Σ ΔA_k telescopes to the total
    # what m² − w² says happened: the decay's exact e^{−4A}, and the discrete gradient steps'
    # own O(η²) drift (within 1.2% here)
    assert st["A_measured"] == pytest.approx(0.5, rel=0.02)
    assert math.isfinite(st["l1"]) and acc > 0.8  # no NaN, no collapse
    assert pilot.alpha == 0.0 and pilot.schedule.delta(steps) == 0.0  # off after the horizon


def test_flow_time_spreads_the_strength_with_the_learning_rate():
    lrs = [0.0, 0.1, 0.2, 0.2, 0.1, 0.0]
    lin = S.Strength(total=3.0, horizon=6, shape="linear", lr=lambda k: lrs[k])
    deltas = [lin.delta(k) for k in range(7)]
    assert deltas == pytest.approx([3.0 * e / 0.6 for e in lrs] + [0.0])  # ΔA_k ∝ η_k
    for shape in S.SHAPES:
        s = S.Strength(total=2.0, horizon=50, shape=shape, lr=0.1, end=0.5)
        a = [s.A_at(s.tau(k)) for k in range(51)]
        assert a[0] == 0 and a[25] == pytest.approx(2.0) and a[50] == pytest.approx(2.0)
        assert all(x <= y + 1e-15 for x, y in zip(a, a[1:]))  # monotone: off, never negative
    geo = S.Strength(total=1.0, horizon=100, lr=0.1, shape="geometric")
    assert geo.alpha(99) == pytest.approx(geo.alpha(0) * 0.01, rel=0.05)  # α decays to 1%


def test_the_users_scheduler_is_read_from_a_copy():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=40)
    before = (sched.state_dict(), opt.param_groups[0]["lr"], sched.get_last_lr())
    profile = S.lr_profile(sched, 45)  # past total_steps: the last lr is held
    assert (sched.state_dict(), opt.param_groups[0]["lr"], sched.get_last_lr()) == before
    assert profile[0] == pytest.approx(0.2 / 25) and max(profile) == pytest.approx(0.2)
    assert len(profile) == 45 and min(profile[:40]) == profile[39] < 1e-5


def test_attach_is_the_explicit_step_bit_for_bit():
    for schedule in (lambda: S.Strength(total=0.5, horizon=30, lr=0.1),
                     lambda: S.Every(S.Geometric(1e-3, 0.9), 5)):
        models, pilots = [], []
        for attached in (False, True):
            model = _mlp()
            pilot = mp.PILoT(model, schedule())
            opt = torch.optim.SGD(pilot.param_groups(1e-4), lr=0.1, momentum=0.9)
            if attached:
                pilot.attach(opt)
                _train(model, opt, 30)
            else:
                _train(model, opt, 30, before_step=lambda p=pilot: p.step(lr=0.1))
            models.append(model)
            pilots.append(pilot)
        for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
            assert torch.equal(a, b)
        assert pilots[0].stats()["A"] == pilots[1].stats()["A"]


def test_attach_refuses_double_use_and_needs_a_horizon():
    model = _mlp()
    pilot = mp.PILoT(model)  # Strength() without a horizon
    opt = torch.optim.SGD(pilot.param_groups(), lr=0.1)
    model(XTR[:4]).sum().backward()
    with pytest.raises(UsageError, match=r"needs its horizon.*pilot.attach\(optimizer, horizon"):
        pilot.step()
    assert not pilot.schedule.ready and pilot.stats()["alpha"] is None
    pilot.attach(opt, horizon=10)
    assert pilot.schedule.ready and pilot.stats()["alpha"] > 0
    assert S.Geometric(1e-3, 0.5).ready  # α schedules need nothing more
    with pytest.raises(UsageError, match="already applies PILoT at every optimizer step"):
        pilot.step()
    with pytest.raises(UsageError, match="attached already"):
        pilot.attach(opt)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    pilot.detach()
    with pytest.raises(UsageError, match="does not train this PILoT's m and w"):
        pilot.attach(other, horizon=10)
    opt.step()
    assert pilot.steps == 0  # detached: the optimizer steps alone


def test_attached_pilot_runs_once_per_optimizer_step_and_not_on_skipped_amp_steps():
    model = _mlp()
    pilot = mp.PILoT(model, S.Strength(total=0.3, horizon=20, lr=0.1))
    opt = torch.optim.SGD(pilot.param_groups(), lr=0.1)
    pilot.attach(opt)
    for _ in range(3):  # gradient accumulation: 4 micro-batches, one optimizer step
        opt.zero_grad()
        for i in range(4):
            nn.functional.cross_entropy(model(XTR[i::4][:32]), YTR[i::4][:32]).backward()
        opt.step()
    assert pilot.steps == 3
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.zero_grad()
    scaler.scale(model(XTR[:8]).sum() * float("inf")).backward()  # inf gradients
    scaler.step(opt)  # skipped: unscale_ finds infs, optimizer.step() is not called
    scaler.update()
    assert pilot.steps == 3
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(XTR[:8]), YTR[:8])).backward()
    scaler.step(opt)
    assert pilot.steps == 4


def test_alpha_schedules_report_the_realized_strength():
    # coupled α with momentum 0.9: the realized A is about 10× Σ ηα (momentum amplifies it)
    model = _mlp()
    pilot = mp.PILoT(model, S.Constant(1e-3))
    opt = torch.optim.SGD(pilot.param_groups(), lr=0.1, momentum=0.9)
    pilot.attach(opt)
    _train(model, opt, 200)
    st = pilot.stats()
    assert st["A_nominal"] == pytest.approx(200 * 0.1 * 1e-3)
    assert st["A"] == st["A_measured"] and 7 < st["A"] / st["A_nominal"] < 11
