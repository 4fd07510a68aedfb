import csv

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
    import json

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
