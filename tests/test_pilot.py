import copy

import pytest
import torch
from torch import nn

import mirrorprune as mp
from mirrorprune import schedules as S


def _lstsq(n=30, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(d, n, generator=g, dtype=torch.float64)
    x_star = torch.zeros(n, dtype=torch.float64)
    x_star[:3] = torch.tensor([2.0, -1.5, 1.0], dtype=torch.float64)
    return Z, Z @ x_star


def test_one_sgd_step_is_the_pilot_update_exactly():
    torch.manual_seed(1)
    lin = nn.Linear(6, 4, bias=False).double()
    pilot = mp.PILoT(lin, schedule=S.Constant(0.05))
    m0, w0 = lin.weight_m.detach().clone(), lin.weight_w.detach().clone()
    x, lr = torch.randn(8, 6, dtype=torch.float64), 0.3
    # ∂f/∂x on a plain copy of the weight
    x_plain = (m0 * w0).requires_grad_()
    (x @ x_plain.T).square().mean().backward()
    g = x_plain.grad
    opt = torch.optim.SGD(pilot.param_groups(), lr=lr)
    lin(x).square().mean().backward()
    assert pilot.step() == 0.05
    opt.step()
    # m − η(g ⊙ w + 2α m), w − η(g ⊙ m + 2α w): to float tolerance written plainly, and bit for
    # bit when written with torch's `a + c·b` (torch.add(alpha=c)), which SGD itself uses
    torch.testing.assert_close(lin.weight_m.detach(), m0 - lr * (g * w0 + 2 * 0.05 * m0),
                               rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(lin.weight_w.detach(), w0 - lr * (g * m0 + 2 * 0.05 * w0),
                               rtol=1e-14, atol=1e-15)
    step_m = torch.add(m0, torch.add(g * w0, m0, alpha=2 * 0.05), alpha=-lr)
    step_w = torch.add(w0, torch.add(g * m0, w0, alpha=2 * 0.05), alpha=-lr)
    assert torch.equal(lin.weight_m.detach(), step_m)
    assert torch.equal(lin.weight_w.detach(), step_w)


def test_param_groups_split_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    pilot = mp.PILoT(model, 1e-3)
    mw, rest = pilot.param_groups(weight_decay=5e-4)
    assert mw["weight_decay"] == 0.0 and rest["weight_decay"] == 5e-4
    assert len(mw["params"]) == 4 and len(rest["params"]) == 4  # 2 biases + BN weight/bias
    ids = {id(p) for g in (mw, rest) for p in g["params"]}
    assert ids == {id(p) for p in model.parameters()}


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    b = copy.deepcopy(a)
    pa, pb = mp.PILoT(a, 0.01), mp.PILoT(b, 0.01)
    oa = torch.optim.SGD(pa.param_groups(1e-4), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(pb.param_groups(1e-4), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    for _ in range(3):
        oa.zero_grad()
        nn.functional.mse_loss(a(x), y).backward()
        pa.step()
        oa.step()
        ob.zero_grad()
        for xs, ys in ((x[:8], y[:8]), (x[8:], y[8:])):
            (nn.functional.mse_loss(b(xs), ys) / 2).backward()
        pb.step()  # once per optimizer step
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def _descend(lr, steps, alpha=3.0):
    Z, Y = _lstsq()
    torch.manual_seed(0)
    lin = nn.Linear(30, 1, bias=False).double()
    nn.init.normal_(lin.weight, std=0.3)
    x0 = lin.weight.detach().clone()
    pilot = mp.PILoT(lin, S.Constant(alpha), track_mirror=True)
    opt = torch.optim.SGD(pilot.param_groups(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (Z @ lin.weight[0] - Y).square().sum() / len(Y)).backward()
        pilot.step(lr=lr)
        opt.step()
    return pilot.stats(), float((lin.weight.detach() - x0).abs().max())


def test_closed_form_flow_holds_along_small_sgd_steps():
    """∇R_{c_t}(x_t) = −L_t (SPEC §2.4) along plain gradient descent, to first order in η."""
    fine, moved = _descend(lr=1e-5, steps=4000)
    assert fine["A_nominal"] == pytest.approx(0.12) and moved > 0.3  # c_t fell 38%, x moved
    assert fine["mirror_residual_max"] < 1e-5
    # m² − w² tracks the theory's 2 c_t
    assert fine["c_measured"] == pytest.approx(fine["c"], rel=1e-4)
    # the residual is the discretization error of the flow: twice the step, twice the residual
    coarse, _ = _descend(lr=2e-5, steps=2000)
    assert coarse["A_nominal"] == pytest.approx(0.12)
    assert coarse["mirror_residual_max"] / fine["mirror_residual_max"] == pytest.approx(2, rel=0.1)


def test_stats_contents():
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    pilot = mp.PILoT(model, S.Geometric(1e-2, 0.5), beta=2.0)
    st = pilot.stats()
    assert st["step"] == 0 and st["alpha"] == 1e-2 and st["A"] == 0.0
    assert st["c"] == pytest.approx(1.0) and st["c_measured"] == pytest.approx(1.0, rel=1e-5)
    assert st["params"] == 120 and st["zeros"] == 0
    x = torch.cat([mw.x().flatten() for mw in pilot.weights])
    assert st["l1"] == pytest.approx(float(x.abs().sum()), rel=1e-6)
    near = int((x.abs() <= 1e-3).sum())
    assert st["near_zero"] == near / 120 and st["l2sq_mw"] == pytest.approx(
        sum(float(mw.m.square().sum() + mw.w.square().sum()) for mw in pilot.weights))
    # a constructed case: three weights set exactly (x = m·w with m² − w² = β kept)
    mw = pilot.weights[0]
    with torch.no_grad():
        for i, x0 in enumerate((0.0, 5e-4, 2.0)):
            m0, w0 = mp.mirror_init(torch.tensor(x0, dtype=torch.float64), 2.0)
            mw.m.view(-1)[i], mw.w.view(-1)[i] = m0, w0
    st2 = pilot.stats()
    assert st2["zeros"] == 1 and st2["near_zero"] == (near + 2 - sum(
        int(abs(float(v)) <= 1e-3) for v in x[:3])) / 120
    assert st2["c_measured"] == pytest.approx(1.0, rel=1e-5)  # m² − w² = β for every entry
    assert st2["penalty"] == pytest.approx(1e-2 * st2["l2sq_mw"])
    # the default Strength has no horizon before attach: stats still work, without an α
    fresh = mp.PILoT(nn.Linear(4, 4)).stats()
    assert fresh["alpha"] is None and fresh["penalty"] is None and fresh["A"] == 0.0
    opt = torch.optim.SGD(pilot.param_groups(), lr=0.1)
    model(torch.randn(2, 10)).sum().backward()
    pilot.step()  # no lr: A is unknown from then on, the measured c still reported
    opt.step()
    st = pilot.stats()
    assert st["A_nominal"] is None and st["c"] is None
    assert st["A"] == st["A_measured"] > 0  # an α schedule's realized A is the measured one
    assert st["alpha"] == 5e-3 and st["alpha_sum"] == 1e-2
    with pytest.raises(ValueError, match="lr"):
        mp.PILoT(nn.Linear(2, 2), 1e-3, track_mirror=True).step()
    with pytest.raises(ValueError, match="beta > 0"):
        mp.PILoT(nn.Linear(2, 2), 1e-3, beta=0.0, track_mirror=True)


def test_unused_weights_still_decay():
    model = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    pilot = mp.PILoT(model, 0.1)
    opt = torch.optim.SGD(pilot.param_groups(), lr=0.5)
    model["a"](torch.randn(3, 2)).sum().backward()
    m0 = model["b"].weight_m.detach().clone()
    pilot.step()
    opt.step()
    torch.testing.assert_close(model["b"].weight_m.detach(), m0 * (1 - 0.5 * 2 * 0.1))


def _train(model, pilot, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        pilot.step(lr=opt.param_groups[0]["lr"])
        opt.step()


def _fresh(track=False):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    pilot = mp.PILoT(model, S.OffAfter(S.Every(S.Geometric(1e-2, 0.9), 3), 15),
                     track_mirror=track)
    return model, pilot, torch.optim.SGD(pilot.param_groups(1e-4), lr=0.05, momentum=0.9)


@pytest.mark.parametrize("track", [False, True])
def test_resume_is_bit_identical(track, tmp_path):
    model, pilot, opt = _fresh(track)
    _train(model, pilot, opt, 20, seed=1)
    _train(model, pilot, opt, 20, seed=2)
    ref = model.state_dict()

    model, pilot, opt = _fresh(track)
    _train(model, pilot, opt, 20, seed=1)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pilot": pilot.state_dict()},
               tmp_path / "ckpt.pt")
    del model, pilot, opt
    model, pilot, opt = _fresh(track)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    pilot.load_state_dict(ckpt["pilot"])
    assert pilot.steps == 20
    _train(model, pilot, opt, 20, seed=2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_load_state_dict_refuses_other_configuration():
    _, pilot, _ = _fresh()
    other = mp.PILoT(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)), 1e-3, beta=0.5)
    with pytest.raises(ValueError, match="another configuration"):
        other.load_state_dict(pilot.state_dict())
    same_shape = mp.PILoT(nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3)), 1e-3)
    with pytest.raises(ValueError, match="does not match"):
        same_shape.load_state_dict(pilot.state_dict())


def test_schedule_returning_bad_alpha_stops_with_message():
    class Bad(S.Schedule):
        def alpha(self, k):
            return float("nan")

    pilot = mp.PILoT(nn.Linear(2, 2), Bad())
    with pytest.raises(ValueError, match=r"schedule\(0\) must be a finite number"):
        pilot.step()


def test_extreme_alpha_is_refused_and_tiny_beta_works():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    pilot = mp.PILoT(model, 10.0)
    with pytest.raises(ValueError, match="alpha 10 is too large for lr 0.1.*1 − 2·alpha·lr"):
        pilot.step(lr=0.1)
    for beta in (1e-30, 1e-12):
        torch.manual_seed(0)
        model = nn.Linear(5, 3)
        x0 = model.weight.detach().clone()
        pilot = mp.PILoT(model, 1e-3, beta=beta)
        mw = pilot.weights[0]
        torch.testing.assert_close(model.weight, x0)
        opt = torch.optim.SGD(pilot.param_groups(), lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            model(torch.randn(8, 5)).pow(2).mean().backward()
            pilot.step(lr=0.1)
            opt.step()
        assert torch.isfinite(mw.m).all() and torch.isfinite(mw.w).all()
        assert pilot.stats()["c_measured"] >= 0
