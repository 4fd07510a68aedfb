import json
import re
from pathlib import Path

import pytest

from mirrorprune.cli import main
from mirrorprune.experiments import demo

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_as_written():
    """The "Use it on your model" block, extracted from README.md and run unchanged: the model
    finalized at 90% sparsity keeps its unpruned accuracy within 2 points, and at least 90%."""
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    example = [b for b in blocks if "mp.PILoT(" in b and "pilot.attach(" in b]
    assert example, "README lost its example"
    ns: dict = {}
    exec(compile(example[0], "README.md", "exec"), ns)
    pruned, unpruned = ns["pruned"], ns["unpruned"]
    assert ns["mp"].sparsity_report(pruned).sparsity == pytest.approx(0.9, abs=1e-4)
    acc = ns["accuracy"](pruned)
    assert acc >= 0.90 and acc >= unpruned - 0.02, (acc, unpruned)
    assert ns["pilot"].stats()["A"] == pytest.approx(ns["mp"].schedules.DEFAULT_STRENGTH)


def test_readme_optimizer_example_runs_as_written():
    """The "PILoT as an optimizer" block, run unchanged: the realized strength is the
    default, and the pruned copy keeps the unpruned accuracy within 2 points, at least 90%."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = [b for b in blocks if "PILoTSGD(" in b]
    assert example, "README lost its optimizer example"
    ns: dict = {}
    exec(compile(example[0], "README.md", "exec"), ns)
    assert ns["optimizer"].stats()["A"] == pytest.approx(ns["mp"].schedules.DEFAULT_STRENGTH)
    assert ns["mp"].sparsity_report(ns["pruned"]).sparsity == pytest.approx(0.9, abs=1e-4)
    unpruned, pruned = ns["acc"]
    assert pruned >= 0.90 and pruned >= unpruned - 0.02, (pruned, unpruned)


def test_demo_pilot_beats_dense_at_95_percent():
    cfg = demo.DemoConfig(seeds=2, sparsities=(0.95,))
    out = demo.run(cfg, progress=False)
    acc = {r["method"]: r["accuracy_mean"] for r in out["summary"]}
    assert acc["pilot"] >= acc["dense"] + 0.2, acc
    assert out["report"].sparsity == pytest.approx(0.95, abs=1e-4)


def test_cli_demo_writes_what_it_prints(capsys, tmp_path):
    # two epochs are a short flow time: a small strength (the default needs longer runs)
    assert main(["demo", "--seeds", "1", "--epochs", "2", "--strength", "0.05", "--quiet",
                 "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    d = json.loads((tmp_path / "d.json").read_text())
    assert {(r["method"], r["sparsity"]) for r in d["summary"]} == {
        (m, s) for m in ("dense", "pilot") for s in (0.0, 0.9, 0.95, 0.98)}
    unpruned = {r["method"]: r["accuracy_mean"] for r in d["summary"] if r["sparsity"] == 0}
    assert min(unpruned.values()) > 0.8  # two epochs already learn the digits
    total = d["report"][-1]
    assert total["zeros"] == round(0.98 * total["params"]) and f"{total['zeros']:,}" in out
    assert d["config"]["epochs"] == 2 and "2 epochs" in out


def test_doctor_reports_datasets(capsys, tmp_path):
    assert main(["doctor", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "threads" in out
    assert "CPU: " in out and "bf16 units: " in out  # what bf16 autocast's speed depends on
    assert "cifar10        NOT AVAILABLE" in out and "digits         found" in out


@pytest.mark.parametrize("args, valid", [
    (["oneshot", "--model", "resnet50"], "resnet20"),
    (["oneshot", "--dataset", "imagenet"], "cifar10"),
    (["targets", "--dataset", "svhn"], "fashion-mnist"),
    (["iterative", "--mode", "imp", "--model", "vit"], "lenet_300_100"),
])
def test_cli_unknown_names_list_the_valid_ones(capsys, tmp_path, args, valid):
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "invalid choice" in err and valid in err


def test_readme_method_table_is_the_generated_one(capsys):
    from mirrorprune.methods import methods_table

    assert methods_table(markdown=True) in README.read_text()
    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == methods_table(markdown=True)
