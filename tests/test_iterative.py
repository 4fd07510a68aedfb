import csv

import pytest
import torch

from mirrorprune.experiments import iterative
from mirrorprune.methods import Method

pytest.importorskip("matplotlib")


def _cfg(**kw):
    # two epochs per cycle are a short flow time: a small strength
    return iterative.IterativeConfig(**{"dataset": "digits", "cycles": 2, "epochs": 2,
                                        "strength": 0.05, **kw})


@pytest.mark.parametrize("mode, pilot, rewind", [("imp", False, 1), ("lrr", True, 0),
                                                 ("imp", True, 1)])
def test_cycles_reach_exact_sparsity_and_keep_pruned_weights_at_zero(tmp_path, mode, pilot,
                                                                     rewind):
    cfg = _cfg(mode=mode, pilot=pilot, rewind_epoch=rewind)
    rows = iterative.run(cfg, tmp_path, progress=False)["rows"]
    assert [r["cycle"] for r in rows] == [0, 1, 2]
    assert [r["sparsity"] for r in rows] == pytest.approx([0.0, 0.2, 0.36], abs=1e-4)
    assert all(0.5 < r["accuracy"] <= 1 for r in rows)
    state = torch.load(tmp_path / cfg.variant / "seed0" / "state.pt", weights_only=True)
    assert state["done"] == 3 and set(state["masks"]) == {"1.weight", "3.weight", "5.weight"}
    if mode == "imp" and rewind:
        assert state["rewind"] is not None
    if pilot:  # the last cycle's checkpoint: pruned entries are the saddle m = w = 0
        ck = torch.load(tmp_path / cfg.variant / "seed0" / "cycle02" / "checkpoint.pt",
                        weights_only=True)["model"]
        mask = state["masks"]["3.weight"]  # masks for cycle 2 were computed after cycle 1
        assert (ck["3.weight_m"][~mask] == 0).all() and (ck["3.weight_w"][~mask] == 0).all()
    header = (tmp_path / "iterative.csv").read_text().splitlines()[0]
    assert header == "variant,seed,cycle,sparsity,accuracy"
    assert (tmp_path / "iterative.png").exists()


def test_resume_mid_cycle_gives_the_same_results(tmp_path, monkeypatch):
    cfg = _cfg(mode="lrr", pilot=True)
    ref = iterative.run(cfg, tmp_path / "ref", progress=False)["rows"]
    calls = {"n": 0}
    original = Method.start_epoch

    def flaky(self, epoch):
        calls["n"] += 1
        if calls["n"] == 4:  # cycle 1, second epoch
            raise KeyboardInterrupt
        original(self, epoch)

    monkeypatch.setattr(Method, "start_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        iterative.run(cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(Method, "start_epoch", original)
    rows = iterative.run(cfg, tmp_path / "b", progress=False)["rows"]
    assert rows == ref
    got = list(csv.DictReader(open(tmp_path / "b" / "iterative.csv")))
    assert len(got) == 3
    with pytest.raises(ValueError, match="another configuration"):
        iterative.run(_cfg(mode="lrr", pilot=True, keep=0.5), tmp_path / "b", progress=False)


def test_validation():
    with pytest.raises(ValueError, match="IMP only"):
        _cfg(mode="lrr", rewind_epoch=1).validate()
    with pytest.raises(ValueError, match="mode"):
        _cfg(mode="snip").validate()
    with pytest.raises(ValueError, match="rewind_epoch must be in"):
        _cfg(rewind_epoch=3).validate()
