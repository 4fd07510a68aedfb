import json

import pytest

from mirrorprune.cli import main
from mirrorprune.experiments import diag

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")


def test_small_diag_experiment_recovers_ground_truth_and_matches_theory(tmp_path, capsys):
    rc = main(["diag", "--out", str(tmp_path), "--n", "30", "--d", "15", "--k", "2",
               "--inits", "2", "--seed", "2", "--steps", "20000", "--lr", "0.1", "--quiet"])
    assert rc == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"methods", "basis_pursuit_error", "kkt_gap", "kkt_gap_pilot_opt",
                         "seconds"}
    res = json.loads((tmp_path / "results.json").read_text())
    norm = res["x_star_norm"]
    pilot = last["methods"]["pilot"]
    assert pilot["best_schedule"] in ("harmonic", "quadratic", "geometric")
    assert pilot["final_error"] <= 0.01 * norm
    beta0 = res["table"]["pilot_beta0"]
    # spred's β = 0 cannot flip signs: far worse than β = 1 for every strength
    assert min(v["final_error"] for v in beta0.values()) > 10 * pilot["final_error"]
    assert last["kkt_gap"] <= 1e-3 and last["basis_pursuit_error"] < 1e-8
    # PILoT as an optimizer on x: the same best schedule, within 2× of the m ⊙ w form's error,
    # and its own limit argmin R_{c∞} reached as well
    opt = last["methods"]["pilot_opt"]
    assert opt["best_schedule"] == pilot["best_schedule"]
    assert opt["final_error"] <= 2 * pilot["final_error"] and last["kkt_gap_pilot_opt"] <= 1e-3
    for f in ("fig1a.png", "fig1b.png", "fig1c.png", "fig4.png", "trajectories.csv"):
        assert (tmp_path / f).stat().st_size > 0
    header = (tmp_path / "trajectories.csv").read_text().splitlines()[0]
    assert header == "method,schedule,init,seed,step,t,error"


def test_sgd_mode_and_validation(tmp_path, capsys):
    cfg = diag.DiagConfig(n=20, d=10, k=2, inits=1, steps=300, lr=0.05, sgd_batch=3,
                          sgd_seeds=2, records=20)
    sim = diag.simulate(cfg, diag.make_problem(cfg), progress=False)
    assert len(sim["runs"]) == 5 * 7 * 1 * 2 and sim["traj"].shape[0] == len(sim["runs"])
    with pytest.raises(ValueError, match="sgd-batch"):
        diag.DiagConfig(d=10, sgd_batch=11).validate()
    assert main(["diag", "--out", str(tmp_path), "--k", "500"]) == 2
    assert "k <= n" in capsys.readouterr().err
