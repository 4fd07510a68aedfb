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
    (lambda: S.Geometric(1e-3, p=1.0), r"p must be in \(0, 1\)"),
    (lambda: S.Every(S.Constant(1), 0), "n must be an int >= 1"),
    (lambda: S.OffAfter(S.Constant(1), -1), "step must be an int >= 0"),
    (lambda: S.OffAfter(lambda k: 1.0, 3), "Schedule"),
    (lambda: S.Constant(1)(-1), "k must be an int >= 0"),
])
def test_invalid(make, match):
    with pytest.raises(ValueError, match=match):
        make()
