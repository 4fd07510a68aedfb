import csv
import json

import pytest

from mirrorprune.cli import main
from mirrorprune.experiments import targets
from mirrorprune.methods import REFERENCE_EPOCH_LR, STR, PilotMethod, Spred


def test_targets_exports_exactly_each_target(tmp_path, capsys):
    assert main(["targets", "--dataset", "digits", "--sparsities", "0.9", "--methods",
                 "pilot,gmp", "--seeds", "2", "--epochs", "2", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert "| pilot |" in capsys.readouterr().out
    rows = list(csv.DictReader(open(tmp_path / "targets.csv")))
    assert len(rows) == 4
    assert all(abs(float(r["actual_sparsity"]) - 0.9) < 1e-4 for r in rows)
    md = (tmp_path / "targets.md").read_text()
    assert md.count(" ± ") == 5  # 2 headers, 2 cells, gmp − pilot
    assert "| gmp | " in md.split("| method − pilot | 90% |")[1]
    assert "Training time per run" in md and "pilot " in md and "2 runs" in md
    assert "(at " not in md and (tmp_path / "targets.png").stat().st_size > 0
    # the controller's input and output each epoch are in the log: the mass pruning to the
    # target would remove (the same weights as the mass90 diagnostic) and the new rate
    log = tmp_path / "target0.9" / "runs" / "pilot" / "seed0" / "log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["mass_at_target"] for r in rows] == pytest.approx([r["mass90"] for r in rows])
    assert all(r["rate"] >= 0 for r in rows) and len(rows) == 2


def test_cells_of_models_sparser_than_their_target_give_their_sparsity(tmp_path):
    # STR's threshold can leave a model sparser than the target: pruning cannot undo that,
    # so its cells are not at the target and the table and plot say where they are
    rows = [{"method": m, "seed": s, "target": t, "accuracy": a,
             "actual_sparsity": t if m == "gmp" else 0.958 + s / 1000}
            for m, a in (("gmp", 0.85), ("str", 0.80)) for s in (1, 2) for t in (0.9, 0.95)]
    md = targets.markdown(rows, ("gmp", "str"))
    assert "| gmp | 85.00 ± 0.00 | 85.00 ± 0.00 |" in md
    assert md.count("(at 96.0%)") == 2  # mean of 95.9% and 96.0%
    assert targets.cells(rows, ("str",))["str"][0.9]["actual"] == pytest.approx(0.9595)
    targets.plot(rows, ("gmp", "str"), "t", tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0


def test_targets_sharing_hyperparameters_share_one_run(tmp_path):
    # spred's ladder gives 80% and 90% the same alpha: one run, pruned to both targets
    assert targets.aim("spred", 0.8) == targets.aim("spred", 0.9)
    assert main(["targets", "--dataset", "digits", "--sparsities", "0.8,0.9", "--methods",
                 "spred", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert (tmp_path / "target0.8" / "runs" / "spred" / "seed0").is_dir()
    assert not (tmp_path / "target0.9").exists()
    rows = list(csv.DictReader(open(tmp_path / "targets.csv")))
    assert sorted(float(r["target"]) for r in rows) == [0.8, 0.9]
    assert all(abs(float(r["actual_sparsity"]) - float(r["target"])) < 1e-3 for r in rows)


def test_aim_and_validation(tmp_path, capsys):
    assert targets.aim("gmp", 0.95) == {"target": 0.95}
    assert targets.aim("pilot", 0.9)["schedule"] == "target"
    assert targets.aim("str", 0.97)["s_init"] == STR.AIM_S_INIT[0.98] == -1.5
    assert targets.aim("dense", 0.9) == {} and targets.aim("l1", 0.9) == {}  # no knob: pruned
    # α is per step: half the steps × lr per epoch doubles it, s_init is not scaled
    half = REFERENCE_EPOCH_LR / 2
    assert targets.aim("spred", 0.9, half)["alpha"] == pytest.approx(2 * Spred.AIM_ALPHA[0.9])
    # the strength is budget-invariant: PILoT's controller starts from the same rate
    assert targets.aim("pilot", 0.9, half) == targets.aim("pilot", 0.9) == {
        "schedule": "target", "target": 0.9, "strength": PilotMethod.AIM_RATE}
    assert targets.aim("str", 0.9, half) == targets.aim("str", 0.9)
    assert main(["targets", "--sparsities", "0.9,1.0", "--out", str(tmp_path)]) == 2
    assert "sparsities must lie in (0, 1)" in capsys.readouterr().err
    assert main(["targets", "--sparsities", "high", "--out", str(tmp_path)]) == 2
    assert "expects comma-separated numbers" in capsys.readouterr().err


def test_targets_of_other_methods_are_kept(tmp_path):
    base = ["targets", "--dataset", "digits", "--seeds", "1", "--epochs", "1", "--quiet",
            "--out", str(tmp_path)]
    assert main([*base, "--methods", "gmp", "--sparsities", "0.9"]) == 0
    before = (tmp_path / "targets.csv").read_text()
    assert main([*base, "--methods", "str", "--sparsities", "0.8,0.9"]) == 0
    after = (tmp_path / "targets.csv").read_text()
    assert after.startswith(before)
    rows = list(csv.DictReader(open(tmp_path / "targets.csv")))
    assert sorted((r["method"], r["target"]) for r in rows) == [
        ("gmp", "0.9"), ("str", "0.8"), ("str", "0.9")]
    md = (tmp_path / "targets.md").read_text()
    assert "| method | 80% | 90% |" in md and "| gmp | – | " in md  # gmp was not run at 80%


def test_targets_in_parallel_with_speed_options_equal_sequential_runs(tmp_path):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the 2 workers gets on a 2-core machine: same sums
    try:
        args = ["targets", "--dataset", "digits", "--sparsities", "0.8,0.9", "--methods",
                "pilot,gmp", "--seeds", "1", "--epochs", "1", "--precision", "bf16", "--quiet"]
        assert main([*args, "--out", str(tmp_path / "seq")]) == 0
        assert main([*args, "--parallel", "2", "--out", str(tmp_path / "par")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert ((tmp_path / "seq" / "targets.csv").read_text()
            == (tmp_path / "par" / "targets.csv").read_text())
    run = json.loads((tmp_path / "par" / "target0.9" / "runs" / "gmp" / "seed0" /
                      "config.json").read_text())
    assert run["precision"] == "bf16"  # the speed options reach every target's runs


def test_tune_chooses_per_level_and_targets_aims_by_it(tmp_path, capsys):
    """tune records, per level, the value best on validation there (among those whose own
    model reaches the level exactly); targets --aim-from trains each target with it."""

    from mirrorprune.experiments.tune import per_level

    rows = [{"s": s, "sparsity": lv, "actual_sparsity": act, "val_accuracy": acc}
            for s, lv, act, acc in [(-3, 0.9, 0.9, 0.80), (-2, 0.9, 0.96, 0.85),  # overshoots
                                    (-3, 0.98, 0.98, 0.30), (-2, 0.98, 0.98, 0.70),
                                    (-3, 0.99, 0.995, 0.2), (-2, 0.99, 0.996, 0.1)]]
    at, best = per_level(rows, "s", [-3, -2], (0.9, 0.98, 0.99))
    assert best == {"0.9": -3, "0.98": -2, "0.99": -3}  # 0.99: nobody exact, best of all
    assert at["0.9"] == {"-3": 0.80, "-2": 0.85}

    tuned = tmp_path / "tune"
    assert main(["tune", "--dataset", "digits", "--method", "spred", "--grid",
                 "alpha=1e-4,3e-3", "--levels", "0.8,0.9", "--epochs", "1", "--quiet",
                 "--out", str(tuned)]) == 0
    blob = json.loads((tuned / "tune.json").read_text())
    assert set(blob["best_at_level"]) == {"0.8", "0.9"}
    out = tmp_path / "targets"
    base = ["targets", "--dataset", "digits", "--methods", "spred,gmp", "--epochs", "1",
            "--quiet", "--aim-from", str(tuned / "tune.json"), "--out", str(out)]
    assert main([*base, "--sparsities", "0.8,0.95"]) == 2
    assert "spred was tuned at the levels 0.8, 0.9, not at [0.95]" in capsys.readouterr().err
    assert main([*base, "--sparsities", "0.8,0.9"]) == 0
    used = json.loads((out / "config.json").read_text())["hparams_used"]
    for t in ("0.8", "0.9"):
        assert used[f"spred@{t}"] == {"alpha": blob["best_at_level"][t]}
        assert used[f"gmp@{t}"] == {"target": float(t)}  # not tuned: its own aim
    assert main([*base[:-2], "--hp", "spred.alpha=5e-4", "--sparsities", "0.8", "--out",
                 str(tmp_path / "hp")]) == 0  # --hp wins
    used = json.loads((tmp_path / "hp" / "config.json").read_text())["hparams_used"]
    assert used["spred@0.8"] == {"alpha": 5e-4}
    assert main([*base, "--sparsities", "0.8", "--dataset", "mnist"]) == 2  # argparse: last wins
    assert "--aim-from " in (err := capsys.readouterr().err) and "was tuned on digits" in err
    (tmp_path / "junk.json").write_text("{}")
    assert main([*base[:-2], "--hp-from", str(tmp_path / "junk.json"), "--out",
                 str(tmp_path / "junk")]) == 2
    assert "--hp-from " in (err := capsys.readouterr().err) and "not a tune.json" in err
    blob.pop("best_at_level")  # a tune.json from before the per-level choice
    (tuned / "tune.json").write_text(json.dumps(blob))
    assert main([*base, "--sparsities", "0.8", "--out", str(tmp_path / "old")]) == 2
    assert "holds no per-level choice" in capsys.readouterr().err


def test_tune_aimed_trains_each_value_at_each_level_and_targets_aims_by_it(tmp_path):
    """tune --aim trains each grid value once per level, aimed at it as targets aims the
    method (pilot: its target controller at that level), and validates it there only; the
    per-level choice is what targets --aim-from trains each target with."""

    tuned = tmp_path / "tune"
    assert main(["tune", "--dataset", "digits", "--method", "pilot", "--aim", "--grid",
                 "mass_tol=0.05,0.9", "--levels", "0.5,0.8", "--epochs", "6", "--quiet",
                 "--out", str(tuned)]) == 0  # 6 epochs: the controller acts, the model learns
    for tol in (0.05, 0.9):
        for lv in (0.5, 0.8):
            run = tuned / f"mass_tol={tol}" / f"target{lv:g}" / "runs" / "pilot" / "seed0"
            hp = json.loads((run / "config.json").read_text())["hparams"]
            assert (hp["schedule"], hp["target"], hp["mass_tol"]) == ("target", lv, tol)
            sweep = json.loads((run / "sweep.json").read_text())["rows"]
            assert [r["sparsity"] for r in sweep] == [lv]  # validated at its own level only
    blob = json.loads((tuned / "tune.json").read_text())
    rows = list(csv.DictReader(open(tuned / "tune.csv")))
    assert len(rows) == 4 and blob["tune"]["aim"] is True
    for lv in ("0.5", "0.8"):  # the per-level choice is the better of the two runs there
        here = {float(r["mass_tol"]): float(r["val_accuracy"]) for r in rows
                if f"{float(r['sparsity']):g}" == lv}
        assert here[blob["best_at_level"][lv]] == max(here.values())
    out = tmp_path / "targets"
    assert main(["targets", "--dataset", "digits", "--methods", "pilot", "--epochs", "2",
                 "--quiet", "--sparsities", "0.5,0.8", "--aim-from", str(tuned / "tune.json"),
                 "--out", str(out)]) == 0
    used = json.loads((out / "config.json").read_text())["hparams_used"]
    for lv in ("0.5", "0.8"):
        assert used[f"pilot@{lv}"] == {"schedule": "target", "target": float(lv),
                                       "strength": 1.0,
                                       "mass_tol": blob["best_at_level"][lv]}


def test_train_size_known_before_loading_matches_the_loaded_split():
    """Aimed runs scale by steps per epoch, so tune and targets plan them with the training
    size before loading: it must be what load_data then gives (validation split or holdout
    cut first, then the subset), else a tuned value is checked under another budget."""
    from mirrorprune.experiments.common import load_data, preset, train_size

    base = preset("cpu", "digits", "mlp")
    for extra in ({}, {"holdout": 0.1}, {"train_subset": 700}, {"train_subset": 5000},
                  {"holdout": 0.2, "train_subset": 1000}):
        p = {**base, **extra}
        for validation in (None, 0.1, 0.25):
            tr, _ = load_data("digits", p, validation=validation)
            assert train_size("digits", p, validation) == len(tr), (extra, validation)


def test_tune_says_when_the_knob_did_not_act(tmp_path, capsys):
    """A knob that cannot act is refused before training (another schedule's); one that did
    not act on the budget (PILoT's controller decides after each epoch: with one epoch its
    mass_tol changes nothing) is reported, recorded, and not passed on as a choice."""

    from mirrorprune.experiments.tune import no_effect

    assert no_effect({"0.9": {"1": 0.5, "2": 0.5}, "0.95": {"1": 0.5, "2": 0.4},
                      "0.98": {"1": 0.3}}) == ["0.9"]
    base = ["tune", "--dataset", "digits", "--method", "pilot", "--grid", "mass_tol=0.1,0.6",
            "--levels", "0.8", "--epochs", "1", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "inert")]) == 2  # schedule=strength
    assert "mass_tol does not act on pilot" in capsys.readouterr().err
    assert not (tmp_path / "inert").exists()
    tuned = tmp_path / "tune"
    assert main([*base, "--aim", "--out", str(tuned)]) == 0
    assert "did not act on this budget" in capsys.readouterr().out
    blob = json.loads((tuned / "tune.json").read_text())
    assert blob["no_effect_at_level"] == ["0.8"]
    for flag in ("--aim-from", "--hp-from"):
        assert main(["targets", "--dataset", "digits", "--methods", "pilot", "--epochs", "1",
                     "--quiet", "--sparsities", "0.8", flag, str(tuned / "tune.json"),
                     "--out", str(tmp_path / "t")]) == 2
        assert "made no difference" in capsys.readouterr().err


def test_targets_reuse_a_finished_run_of_the_same_configuration(tmp_path, capsys):
    """--reuse: a run whose configuration a finished oneshot run kept with its model has (GMP
    aimed at 50% is oneshot's gmp.target=0.5) is copied and evaluated, not trained, and gives
    the rows that training it gives; another configuration (60%, another weight decay) trains."""
    shot = tmp_path / "oneshot"
    assert main(["oneshot", "--dataset", "digits", "--methods", "gmp", "--hp", "gmp.target=0.5",
                 "--seeds", "2", "--epochs", "1", "--out", str(shot), "--quiet"]) == 0
    args = ["targets", "--dataset", "digits", "--methods", "gmp", "--sparsities", "0.5,0.6",
            "--seeds", "1", "--first-seed", "1", "--epochs", "1", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "trained")]) == 0
    assert main([*args, "--reuse", str(shot), "--out", str(tmp_path / "reused")]) == 0
    run = tmp_path / "reused/target0.5/runs/gmp/seed1"
    assert (run / "reused_from.txt").read_text() == f"{shot / 'runs/gmp/seed1'}\n"
    assert not (run / "checkpoint.pt").exists()  # evaluated, not trained
    assert (tmp_path / "reused/target0.6/runs/gmp/seed1/checkpoint.pt").exists()
    assert ((tmp_path / "reused/targets.csv").read_text()
            == (tmp_path / "trained/targets.csv").read_text())
    assert main([*args[:-1], "--weight-decay", "0.01", "--reuse", str(shot), "--quiet",
                 "--out", str(tmp_path / "other")]) == 0
    assert not list((tmp_path / "other").rglob("reused_from.txt"))
    capsys.readouterr()
    assert main([*args, "--reuse", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "--reuse: no such folder" in capsys.readouterr().err
