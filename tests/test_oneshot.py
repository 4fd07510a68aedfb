import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mirrorprune.cli import main
from mirrorprune.experiments import oneshot

pytest.importorskip("matplotlib")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_oneshot_digits_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    args = ["oneshot", "--dataset", "digits", "--model", "lenet_300_100", "--methods",
            "dense,pilot,gmp", "--seeds", "2", "--epochs", "2", "--hp", "gmp.target=0.5",
            "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| pilot |" in out and "| 95% |" in out
    rows = list(csv.DictReader(open(tmp_path / "oneshot.csv")))
    assert len(rows) == 3 * 2 * len(set(oneshot.SWEEP) | set(oneshot.TABLE))
    for r in rows:  # exact sparsity, except below GMP's own 50%
        if r["method"] != "gmp" or float(r["sparsity"]) >= 0.5:
            assert abs(float(r["actual_sparsity"]) - float(r["sparsity"])) < 1e-4
    for f in ("oneshot.png", "oneshot.md", "config.json", "runs/pilot/seed1/log.jsonl",
              "runs/pilot/seed1/sweep.json", "runs/gmp/seed0/checkpoint.pt"):
        assert (tmp_path / f).exists(), f
    md = (tmp_path / "oneshot.md").read_text()
    times = md.split("Training time per run")[1]
    assert all(f"{m} " in times and "2 runs" in times for m in ("dense", "pilot", "gmp"))
    diffs = md.split("| method − pilot |")[1].split("Training time")[0]
    assert "| dense |" in diffs and "| gmp |" in diffs and "| pilot |" not in diffs
    assert main(args) == 2
    assert "exists: resume it" in capsys.readouterr().err
    before = (tmp_path / "oneshot.csv").read_text()
    config = (tmp_path / "config.json").read_text()
    # another invocation (its provenance differs) reuses the finished runs: the results are
    # the same, and so is the record of the invocation that computed them
    monkeypatch.setattr(oneshot, "provenance", lambda: {"date": "later"})
    assert main(args + ["--resume"]) == 0
    assert (tmp_path / "oneshot.csv").read_text() == before
    assert (tmp_path / "config.json").read_text() == config


def test_finished_runs_kept_as_results_without_checkpoints(tmp_path, capsys):
    """What is committed of a finished run (sweep.json, config.json, logs, final.pt; not the
    checkpoint) is enough to resume: the table is rebuilt without training, and final.pt
    evaluates the run again (the same rows; or after BatchNorm recalibration). Without
    final.pt, anything that would need the model again is refused, not trained over."""
    import shutil

    base = ["oneshot", "--dataset", "digits", "--methods", "dense,pilot", "--seeds", "1",
            "--epochs", "2", "--quiet"]
    first = tmp_path / "first"
    assert main([*base, "--out", str(first)]) == 0
    assert (first / "runs/pilot/seed0/final.pt").exists()
    kept = tmp_path / "kept"
    shutil.copytree(first, kept, ignore=shutil.ignore_patterns("checkpoint.pt"))
    assert not list(kept.rglob("checkpoint.pt"))
    # results from before a hyperparameter was added (it is at its default) are still these
    sweep = kept / "runs/pilot/seed0/sweep.json"
    older = json.loads(sweep.read_text())
    del older["key"]["hparams"]["mass_tol"]
    # nor does a knob of another schedule (the controller's, under schedule=strength) at
    # another value, e.g. recorded before its default changed: Method.inert
    older["key"]["hparams"]["delta"] = 99.0
    sweep.write_text(json.dumps(older))
    config = json.loads((sweep.parent / "config.json").read_text())
    config["hparams"]["delta"] = 99.0
    (sweep.parent / "config.json").write_text(json.dumps(config))
    (kept / "runs/pilot/seed0/final.pt").rename(kept / "final.pt")  # no model: reused, or error
    assert main([*base, "--out", str(kept), "--resume"]) == 0
    (kept / "final.pt").rename(kept / "runs/pilot/seed0/final.pt")
    assert not list(kept.rglob("checkpoint.pt"))  # nothing was trained
    assert (kept / "oneshot.csv").read_text() == (first / "oneshot.csv").read_text()
    for sweep in kept.rglob("sweep.json"):  # evaluated again from final.pt: the same rows
        sweep.unlink()
    assert main([*base, "--out", str(kept), "--resume"]) == 0
    assert (kept / "oneshot.csv").read_text() == (first / "oneshot.csv").read_text()
    recal = tmp_path / "recal"  # its own folder (other settings), the runs copied without sweeps
    shutil.copytree(kept / "runs", recal / "runs", ignore=shutil.ignore_patterns("sweep.json"))
    assert main([*base, "--out", str(recal), "--resume", "--bn-recalibrate"]) == 0
    key = json.loads((recal / "runs/pilot/seed0/sweep.json").read_text())["key"]
    assert key["bn_recalibrate"] and not list(recal.rglob("checkpoint.pt"))
    capsys.readouterr()
    other = tmp_path / "other"  # run folders only: the run's own record is what is compared
    shutil.copytree(kept / "runs", other / "runs", ignore=shutil.ignore_patterns("sweep.json"))
    assert main([*base, "--out", str(other), "--resume", "--weight-decay", "0.01"]) == 2
    assert "final.pt was trained with another configuration" in capsys.readouterr().err
    runs = tmp_path / "runs-only"  # results alone (no final.pt): nothing can be evaluated again
    shutil.copytree(first / "runs", runs / "runs",
                    ignore=shutil.ignore_patterns("checkpoint.pt", "final.pt"))
    for extra, msg in ([], "resume (--resume) to reuse them"),\
            (["--resume", "--bn-recalibrate"], "evaluated otherwise"),\
            (["--resume", "--weight-decay", "0.01"], "trained with another configuration"):
        assert main([*base, "--out", str(runs), *extra]) == 2
        assert msg in capsys.readouterr().err
    assert not list(runs.rglob("checkpoint.pt"))


def test_first_seed_evaluates_only_the_later_seeds(tmp_path, capsys):
    """--first-seed K runs seeds K, ..., K+SEEDS-1: a recalibrated table over the seeds whose
    models were kept trains nothing (seed 0, kept without a model, is left out, not trained
    again); a reused run keeps the final.pt it wrote (a committed file does not churn)."""
    import shutil

    base = ["oneshot", "--dataset", "digits", "--methods", "dense", "--epochs", "1", "--quiet"]
    first = tmp_path / "first"
    assert main([*base, "--seeds", "2", "--out", str(first)]) == 0
    model = first / "runs/dense/seed1/final.pt"
    written = model.stat().st_mtime_ns
    assert main([*base, "--seeds", "2", "--out", str(first), "--resume"]) == 0
    assert model.stat().st_mtime_ns == written  # not written again
    recal = tmp_path / "recal"
    shutil.copytree(first / "runs", recal / "runs",
                    ignore=shutil.ignore_patterns("sweep.json", "checkpoint.pt"))
    (recal / "runs/dense/seed0/final.pt").unlink()  # seed 0's model was lost, its logs kept
    assert main([*base, "--seeds", "1", "--first-seed", "1", "--bn-recalibrate", "--resume",
                 "--out", str(recal)]) == 0
    assert not list(recal.rglob("checkpoint.pt"))  # nothing trained
    assert not (recal / "runs/dense/seed0/sweep.json").exists()
    rows = list(csv.DictReader(open(recal / "oneshot.csv")))
    assert rows and {r["seed"] for r in rows} == {"1"}
    assert json.loads((recal / "config.json").read_text())["methods"]["dense"] == {
        "seeds": 1, "first_seed": 1, "hparams": {}}
    md = (recal / "oneshot.md").read_text()
    assert "1 seed(s) from seed 1" in md and ", 1 run)" in md  # seed 0's log not counted
    assert main([*base, "--first-seed", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--first-seed must be >= 0" in capsys.readouterr().err


def test_resume_compares_the_weights_selected(tmp_path, capsys):
    """A run that kept a layer dense (--exclude) is another configuration: its run folder is
    not resumed, nor reused, as one that prunes every layer."""
    import shutil

    base = ["oneshot", "--dataset", "digits", "--methods", "pilot", "--seeds", "1", "--epochs",
            "1", "--quiet", "--resume", "--out"]
    assert main([*base, str(tmp_path / "first"), "--exclude", "4"]) == 0
    config = json.loads((tmp_path / "first/runs/pilot/seed0/config.json").read_text())
    assert config["selection"] == {"exclude": ["4"]}
    assert main([*base, str(tmp_path / "first"), "--exclude", "4"]) == 0
    shutil.copytree(tmp_path / "first/runs", tmp_path / "runs-only/runs")
    assert main([*base, str(tmp_path / "runs-only")]) == 2
    assert "selection: {'exclude': ['4']} in the checkpoint, not set now" in capsys.readouterr().err


def test_oneshot_validation(tmp_path, capsys):
    for args, msg in ((["--methods", "dense,magic"], "unknown method"),
                      (["--methods", "dense", "--hp", "pilot.alpha=1"], "not run"),
                      (["--hp", "alpha=1"], "METHOD.NAME=VALUE")):
        assert main(["oneshot", *args, "--out", str(tmp_path)]) == 2
        assert msg in capsys.readouterr().err


def test_other_methods_add_rows_and_rerun_methods_replace_theirs(tmp_path, capsys):
    base = ["oneshot", "--dataset", "digits", "--seeds", "1", "--epochs", "1", "--quiet",
            "--out", str(tmp_path)]
    assert main([*base, "--methods", "dense,gmp", "--hp", "gmp.target=0.5"]) == 0
    first = (tmp_path / "oneshot.csv").read_text().splitlines()
    assert main([*base, "--methods", "pilot"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "oneshot.csv")))
    assert [m for m in dict.fromkeys(r["method"] for r in rows)] == ["dense", "gmp", "pilot"]
    # the earlier methods' rows are kept byte for byte, the new method's appended
    assert (tmp_path / "oneshot.csv").read_text().splitlines()[: len(first)] == first
    md = (tmp_path / "oneshot.md").read_text()
    assert "| dense |" in md and "| gmp |" in md and "| pilot |" in md
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert list(cfg["methods"]) == ["dense", "gmp", "pilot"]
    assert cfg["methods"]["gmp"]["hparams"] == {"gmp": {"target": 0.5}}["gmp"]
    # re-running a method (a second seed) replaces its rows only
    assert main([*base[:3], "--seeds", "2", *base[5:], "--methods", "dense", "--resume"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "oneshot.csv")))
    seeds = {m: sorted({r["seed"] for r in rows if r["method"] == m}) for m in
             ("dense", "gmp", "pilot")}
    assert seeds == {"dense": ["0", "1"], "gmp": ["0"], "pilot": ["0"]}
    assert json.loads((tmp_path / "config.json").read_text())["methods"]["dense"]["seeds"] == 2
    capsys.readouterr()


def test_folders_of_the_first_release_can_be_extended(tmp_path):
    from mirrorprune.experiments.common import previous_config

    # the config.json release 0.1 wrote for results/oneshot-mnist (from git history)
    old = Path(__file__).resolve().parent / "data" / "oneshot-config-release-0.1.json"
    (tmp_path / "config.json").write_text(old.read_text())
    cfg = oneshot.OneshotConfig(dataset="mnist", model="lenet_300_100", epochs=None)
    prev = previous_config(tmp_path, "oneshot.csv", cfg, "oneshot")
    assert prev["methods"]["pilot"] == {"seeds": 3, "hparams": {}}
    assert list(prev["methods"]) == json.loads(old.read_text())["oneshot"]["methods"]
    # settings added since (recorded by none of its versions) had their defaults then
    saved = json.loads(old.read_text())
    for k in ("bn_recalibrate", "precision", "channels_last", "compile", "weight_decay"):
        saved["oneshot"].pop(k, None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert previous_config(tmp_path, "oneshot.csv", cfg, "oneshot") is not None
    recal = oneshot.OneshotConfig(dataset="mnist", model="lenet_300_100", bn_recalibrate=True)
    with pytest.raises(ValueError, match="bn_recalibrate: False there, True now"):
        previous_config(tmp_path, "oneshot.csv", recal, "oneshot")


def test_cpu_full_preset_trains_without_the_validation_split(monkeypatch):
    from mirrorprune.experiments import common
    from test_methods import _tiny_data

    full = {"train": _tiny_data(100), "test": _tiny_data(40, seed=1)}
    monkeypatch.setattr(common, "load", lambda name, split, data_dir=None: full[split])
    p = common.preset("cpu-full", "cifar10", "resnet20")
    assert (p["train"].precision, p["train"].channels_last) == ("bf16", True)
    tr, te = common.load_data("cifar10", p)
    tr_v, val = common.load_data("cifar10", p, validation=common.VALIDATION)
    # the table's runs train on exactly the examples tuning trained on; the test set is whole
    assert torch.equal(tr.x, tr_v.x) and len(tr) == 90 and len(val) == 10 and len(te) == 40
    with pytest.raises(ValueError, match="cpu-full is for cifar10"):
        common.preset("cpu-full", "mnist", "lenet_300_100")
    cfg = common.DataConfig(dataset="cifar10", model="resnet20", preset="cpu-full",
                            precision="fp32")
    assert (cfg.budget(0).precision, cfg.budget(0).channels_last, cfg.budget(0, 3).epochs) == (
        "fp32", True, 3)


def test_a_partial_last_round_of_parallel_jobs_gets_the_idle_threads():
    assert oneshot.job_threads(5, 2, 2) == [1, 1, 1, 1, 2]
    assert oneshot.job_threads(4, 2, 2) == [1, 1, 1, 1]
    assert oneshot.job_threads(3, 2, 8) == [4, 4, 8]
    assert oneshot.job_threads(7, 3, 16) == [5, 5, 5, 5, 5, 5, 16]
    assert oneshot.job_threads(2, 4, 1) == [1, 1]


def test_parallel_runs_equal_sequential_ones(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the 2 workers gets on a 2-core machine: same sums
    try:
        args = ["oneshot", "--dataset", "digits", "--model", "lenet_300_100", "--methods",
                "dense,pilot", "--seeds", "2", "--epochs", "2", "--quiet"]
        assert main([*args, "--out", str(tmp_path / "seq")]) == 0
        assert main([*args, "--parallel", "3", "--out", str(tmp_path / "par")]) == 0
        tune = ["tune", "--dataset", "digits", "--model", "lenet_300_100", "--method", "l1",
                "--grid", "lam=1e-4,1e-3", "--epochs", "2", "--quiet"]
        assert main([*tune, "--out", str(tmp_path / "tseq")]) == 0
        assert main([*tune, "--parallel", "2", "--out", str(tmp_path / "tpar")]) == 0
    finally:
        torch.set_num_threads(threads)
    for a, b in (("seq", "par"), ("tseq", "tpar")):
        name = "oneshot.csv" if a == "seq" else "tune.csv"
        assert (tmp_path / a / name).read_text() == (tmp_path / b / name).read_text()
    assert (tmp_path / "par" / "runs" / "pilot" / "seed1" / "sweep.json").exists()
    assert main(["oneshot", "--parallel", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err


def test_tune_can_validate_after_batchnorm_recalibration(tmp_path, capsys):
    """--bn-recalibrate re-estimates BatchNorm statistics on the training split after pruning,
    before validating (a short-budget BatchNorm net pruned to 90%+ is near chance for every
    value otherwise); the same trained runs re-evaluated without it give other numbers."""

    args = ["tune", "--dataset", "digits", "--model", "resnet20", "--method", "l1", "--grid",
            "lam=1e-5,1e-4", "--levels", "0.9", "--epochs", "1", "--quiet", "--out",
            str(tmp_path)]
    assert main([*args, "--bn-recalibrate"]) == 0
    sweep = tmp_path / "lam=1e-05" / "runs" / "l1" / "seed0" / "sweep.json"
    recal = json.loads(sweep.read_text())
    assert recal["key"]["bn_recalibrate"] == "train-augmentation"
    assert "BatchNorm statistics re-estimated" in json.loads(
        (tmp_path / "tune.json").read_text())["protocol"]
    assert main([*args, "--resume"]) == 0  # the checkpoints re-evaluated, not retrained
    plain = json.loads(sweep.read_text())
    assert plain["key"]["bn_recalibrate"] is False
    assert plain["rows"][0]["accuracy"] != recal["rows"][0]["accuracy"]
    capsys.readouterr()


def test_tune_says_when_the_choice_sits_at_the_grid_edge():
    from mirrorprune.experiments.tune import grid_edge

    lams = [2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4]
    msg = grid_edge("lam", lams, 4e-4)
    assert "largest" in msg and "lam=0.0008" in msg
    assert "smallest" in grid_edge("lam", lams, 2.5e-5) and "lam=1.25e-05" in grid_edge(
        "lam", lams, 2.5e-5)
    assert "s_init=-5" in grid_edge("s_init", [-4, -3, -2, -1.5], -4)  # not all positive
    assert "target=0.992" in grid_edge("target", [0.9, 0.95, 0.98], 0.98)  # stays below 1
    assert "target=0.8)" in grid_edge("target", [0.9, 0.95, 0.98], 0.9)
    assert grid_edge("lam", lams, 1e-4) is None  # inside
    assert grid_edge("lam", [1e-5, 1e-4], 1e-4) is None  # two values have no inside
    assert grid_edge("shape", ["cosine", "linear", "step"], "step") is None  # not numeric


def test_tune_chooses_a_training_option_and_oneshot_takes_it(tmp_path, capsys):
    """weight_decay is a training option: tune grids it (here for dense, unpruned), writes the
    choice under "training", and --weight-decay carries it into the run configuration."""

    out = tmp_path / "wd"
    assert main(["tune", "--dataset", "digits", "--model", "lenet_300_100", "--method", "dense",
                 "--grid", "weight_decay=0,0.01", "--levels", "0", "--epochs", "1", "--quiet",
                 "--out", str(out)]) == 0
    blob = json.loads((out / "tune.json").read_text())
    assert blob["training"] == {"weight_decay": blob["best"]} and blob["hparams"] == {"dense": {}}
    assert blob["at_edge"] is None  # two values: no inside to miss
    assert "--weight-decay" in capsys.readouterr().out
    for v in (0, 0.01):
        saved = json.loads((out / f"weight_decay={v}" / "runs" / "dense" / "seed0" /
                            "config.json").read_text())
        assert saved["weight_decay"] == v
    assert main(["oneshot", "--dataset", "digits", "--weight-decay", "-1", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--weight-decay must be >= 0" in capsys.readouterr().err


def test_paired_differences_pair_seeds_and_mark_sure_ones():
    from mirrorprune.experiments.common import paired_differences

    acc = {("pilot", 0): 0.80, ("pilot", 1): 0.70, ("pilot", 2): 0.75,
           ("l1", 0): 0.70, ("l1", 1): 0.60, ("l1", 2): 0.651,  # 10 points behind, each seed
           ("gmp", 0): 0.90, ("gmp", 1): 0.60}  # +10 and −10: no sign; seed 2 not run
    rows = [{"method": m, "seed": k, "sparsity": 0.9, "accuracy": a} for (m, k), a in acc.items()]
    md = paired_differences(rows, ("l1", "pilot", "gmp"), "sparsity", (0.9, 0.95))
    assert "| method − pilot | 90% | 95% |" in md
    l1 = next(line for line in md.splitlines() if line.startswith("| l1 |"))
    assert "**-9.97 ± 0.14**" in l1 and l1.endswith("| – |")  # unpaired cells stay empty
    gmp = next(line for line in md.splitlines() if line.startswith("| gmp |"))
    assert "+0.00 ± 127.06" in gmp and "**" not in gmp
    assert paired_differences(rows, ("pilot",), "sparsity", (0.9,)) == ""
    # without pilot the first method is the reference
    assert "| method − l1 |" in paired_differences(rows, ("l1", "gmp"), "sparsity", (0.9,))


def test_training_time_leaves_out_a_paused_epoch(tmp_path):
    from mirrorprune.experiments.common import wall_times

    run = tmp_path / "runs" / "pilot" / "seed0"
    run.mkdir(parents=True)
    run.joinpath("log.jsonl").write_text("".join(f'{{"seconds": {s}}}\n' for s in (60, 60, 900)))
    assert "pilot 3.0 min (3.0–3.0, 1 run)" in wall_times([run])


def test_plot_bands_stay_within_possible_accuracies(tmp_path, monkeypatch):
    """Two seeds give a t-interval wider than the 0–100% an accuracy can take: the band is
    clipped there, the line (the mean) is not touched."""
    from mirrorprune.experiments import common

    figs = []
    monkeypatch.setattr(common, "save_figure", lambda fig, path: figs.append(fig))
    common.plot_curves({"a": [(0.5, 0.95, 0.3), (0.9, 0.05, 0.3), (0.99, 0.5, float("nan"))]},
                       tmp_path / "p.png", "t", "x", (0.5, 0.9))
    ax = figs[0].axes[0]
    ys = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert ys.min() == 0.0 and ys.max() == 100.0
    assert list(ax.lines[0].get_ydata()) == [95.0, 5.0, 50.0]


def test_a_long_plot_title_is_wrapped_not_cut(tmp_path, monkeypatch):
    from mirrorprune.experiments import common

    figs = []
    monkeypatch.setattr(common, "save_figure", lambda fig, path: figs.append(fig))
    long = "cifar10 resnet20, preset cpu-full, 2 seed(s) from seed 1, 45000 training images, " \
           "BatchNorm recalibrated after pruning"
    common.plot_curves({"a": [(0.5, 0.9, 0.0)]}, tmp_path / "p.png", long, "x", (0.5,))
    title = figs[0].axes[0].get_title()  # wrapped onto lines the figure's width holds
    assert title.replace("\n", " ") == long and max(map(len, title.splitlines())) <= 80


def test_recal_copy_lets_the_recalibrated_pass_evaluate_without_training(tmp_path, capsys):
    """benchmarks/recal_copy.sh (used by cifar10_full.sh and gpu_paper.sh) copies each trained
    run into OUT-bnrecal, where --resume --bn-recalibrate evaluates its model again: no epoch
    is trained, the sweep says it was recalibrated, and a second copy leaves it alone."""
    script = BENCHMARKS / "recal_copy.sh"
    out = tmp_path / "exp"
    args = ["oneshot", "--dataset", "digits", "--methods", "dense,pilot", "--seeds", "1",
            "--epochs", "1", "--quiet"]
    assert main([*args, "--out", str(out)]) == 0
    recal = tmp_path / "exp-bnrecal"
    subprocess.run(["bash", str(script), str(out), "1"], check=True)  # from seed 1: none
    assert not recal.exists()
    subprocess.run(["bash", str(script), str(out)], check=True)
    log = (out / "runs/pilot/seed0/log.jsonl").read_text()
    assert (recal / "runs/pilot/seed0/final.pt").exists()
    assert main([*args, "--resume", "--bn-recalibrate", "--out", str(recal)]) == 0
    assert (recal / "runs/pilot/seed0/log.jsonl").read_text() == log  # not trained again
    sweep = json.loads((recal / "runs/pilot/seed0/sweep.json").read_text())
    assert sweep["key"]["bn_recalibrate"] == "train-augmentation"
    # the table says how it was evaluated, not only the folder's name
    assert "BatchNorm recalibrated" in (recal / "oneshot.md").read_text().splitlines()[0]
    assert "BatchNorm" not in (out / "oneshot.md").read_text().splitlines()[0]
    (recal / "runs/pilot/seed0/final.pt").unlink()
    subprocess.run(["bash", str(script), str(out)], check=True)  # evaluated: not copied again
    assert not (recal / "runs/pilot/seed0/final.pt").exists()
    capsys.readouterr()


def test_gpu_paper_script_refuses_a_machine_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run(["bash", str(BENCHMARKS / "gpu_paper.sh"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode != 0 and "no GPU here" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written
