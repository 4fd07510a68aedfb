import pytest

from mirrorprune import schedules as S


def test_values_and_step_convention():
    assert [S.Constant(0.5)(k) for k in (0, 9)] == [0.5, 0.5]
    assert [S.Harmonic(1.0)(k) for k in (0, 1, 3)] == [1.0, 0.5, 0.25]
    assert [S.Quadratic(1.0)(k) for k in (0, 1, 3)] == [1.0, 0.25, 1 / 16]
    assert S.Geometric(2.0, 0.5)(3) == 0.25
    off = S.OffAfter(S.Constant(1.0), step=3)
    assert [off(k) for k in range(5)] == [1.0, 1.0, 1.0, 0.0, 0.0]
    per_epoch = S.Every(S.Geometric(1.0, 0.5), n=10)
    assert [per_epoch(k) for k in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]


def test_state_dict_round_trip_and_mismatch():
    s = S.OffAfter(S.Every(S.Geometric(1e-3, 0.9), 5), 100)
    t = S.OffAfter(S.Every(S.Geometric(1e-3, 0.9), 5), 100)
    t.load_state_dict(s.state_dict())
    assert s.state_dict()["schedule"]["schedule"] == {"type": "Geometric", "alpha0": 1e-3, "p": 0.9}
    with pytest.raises(ValueError, match="does not match"):
        S.Constant(1.0).load_state_dict(S.Constant(2.0).state_dict())
    assert repr(S.Geometric(1e-3)) == "Geometric(alpha0=0.001, p=0.95)"


@pytest.mark.parametrize("make, match", [
    (lambda: S.Constant(-1), ">= 0"),
    (lambda: S.Harmonic(float("inf")), "finite"),
    (lambda: S.Geometric(1e-3, p=1.0), r"p \(paper: 0.95\) must be a finite number in \(0, 1\)"),
    (lambda: S.Every(S.Constant(1), 0), "n must be an int >= 1"),
    (lambda: S.OffAfter(S.Constant(1), -1), "step must be an int >= 0"),
    (lambda: S.OffAfter(lambda k: 1.0, 3), "Schedule"),
    (lambda: S.Constant(1)(-1), "k must be an int >= 0"),
])
def test_invalid(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_target_controller_on_a_scripted_trace():
    c = S.TargetController(1.0, target_sparsity=0.9, epochs=10, delta=2.0, acc_tol=0.01,
                           mass_tol=0.01, rate_max=5.0, horizon=100, lr=0.1,
                           in_reach="lower")  # the paper's rule
    trace = [  # (train_acc, mass_at_target) -> expected rate of A after the epoch
        (0.50, 0.30, 2.0),   # accuracy holds, not yet sparse: raise
        (0.60, 0.20, 4.0),   # raise
        (0.55, 0.20, 4.0),   # accuracy dropped by more than acc_tol, target not reached: hold
        (0.60, 0.20, 5.0),   # recovered: raise, capped at rate_max
        (0.61, 0.001, 2.5),  # already effectively 90% sparse: lower
        (0.70, 0.50, 1.25),  # second half (epoch 6 of 10): always lower
        (0.70, 0.50, 0.625),
    ]
    for epoch, (acc, mass, expected) in enumerate(trace):
        assert c.observe(epoch, acc, mass) == pytest.approx(expected)
        # ΔA of a step: the rate times its share of flow time (constant lr: 1/horizon)
        assert c.delta(50) == pytest.approx(expected / 100)
    capped = S.TargetController(1.0, 0.9, 100, delta=10.0, rate_max=5.0)
    assert capped.observe(0, 0.5, 0.5) == 5.0
    d = S.TargetController(1.0, 0.9, 10, delta=2.0, mass_tol=0.4, horizon=100,
                           in_reach="lower")
    d.load_state_dict(c.state_dict() | {"delta": 2.0, "acc_tol": 0.01, "mass_tol": 0.4,
                                        "rate_max": 50.0})
    assert d.current == c.current and len(d.history) == len(trace)
    with pytest.raises(ValueError, match="does not match"):
        S.TargetController(1.0, 0.8, 10, horizon=100).load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="target_sparsity"):
        S.TargetController(1.0, 1.0, 10)
    with pytest.raises(ValueError, match="in_reach must be one of lower, hold"):
        S.TargetController(1.0, 0.9, 10, in_reach="stop")


def test_target_controller_holding_A_once_in_reach():
    c = S.TargetController(1.0, target_sparsity=0.9, epochs=12, delta=2.0, mass_tol=0.1,
                           horizon=100, lr=0.1, in_reach="hold")
    trace = [  # (train_acc, mass_at_target) -> expected rate of A after the epoch
        (0.50, 0.30, 2.0),   # not yet sparse: raise
        (0.60, 0.05, 0.0),   # in reach: A held (no step adds to it)
        (0.62, 0.08, 0.0),   # still in reach: held
        (0.63, 0.20, 2.0),   # out of reach in the first half: resume at the held rate
        (0.64, 0.20, 4.0),   # then raise again
        (0.65, 0.50, 2.0),   # second half (epoch 6 of 12), not in reach: lower
        (0.66, 0.01, 0.0),   # in reach: held
    ]
    for epoch, (acc, mass, expected) in enumerate(trace):
        assert c.observe(epoch, acc, mass) == pytest.approx(expected)
        assert c.delta(50) == pytest.approx(expected / 100)
        assert c.history[-1]["rate"] == pytest.approx(expected)
    # a resumed run continues held, with the rate it would resume at
    d = S.TargetController(1.0, 0.9, 12, delta=2.0, mass_tol=0.1, horizon=100, lr=0.1,
                           in_reach="hold")
    d.load_state_dict(c.state_dict())
    assert d.held and d.delta(50) == 0.0 and d.observe(7, 0.66, 0.5) == pytest.approx(1.0)
