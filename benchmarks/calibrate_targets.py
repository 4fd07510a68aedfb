"""Choose the fixed-target hyperparameters (experiments/targets.py) on a validation split.

LeNet-300-100 on MNIST with the `cpu` preset budget (15 epochs, batch 128, lr 0.1 cosine),
trained on the first 50k training images and scored on the last 10k, so the test set plays no
part in the choice. Every grid point is exported at each target by exact global magnitude
pruning. For methods whose training does not depend on the target (spred, STR) one run serves
every target; PILoT's target controller is trained once per target. Rows accumulate in
OUT/METHOD.csv over invocations (a grid point run again replaces its rows), and OUT/METHOD.json
records each invocation.

    python benchmarks/calibrate_targets.py --method pilot \
        --grid "schedule=target strength=1 delta=1.25,1.5 in_reach=hold mass_tol=0.25,0.4"
    python benchmarks/calibrate_targets.py --method spred --grid "alpha=1e-4,3e-4,1e-3,3e-3"
    python benchmarks/calibrate_targets.py --method str --grid "s_init=-3,-2,-1,0,1"
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from mirrorprune.data import load
from mirrorprune.experiments.common import split_validation
from mirrorprune.files import read_rows, write_json, write_rows
from mirrorprune.methods import create_method
from mirrorprune.models import create_model
from mirrorprune.provenance import provenance
from mirrorprune.prune import prune, pruned_mass, sparsity_report
from mirrorprune.train import TrainConfig, evaluate, train


def parse_grid(text: str) -> list[dict]:
    """"a=1,2 b=x" -> [{a: 1, b: "x"}, {a: 2, b: "x"}] (numbers parsed as float)."""
    def value(v: str):
        try:
            return float(v)
        except ValueError:
            return v
    axes = {k: [value(v) for v in vs.split(",")]
            for k, vs in (item.split("=", 1) for item in text.split())}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--grid", required=True, help='e.g. "alpha=1e-4,1e-3 beta=1"')
    ap.add_argument("--targets", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--out", default="benchmarks/results/calibrate_targets")
    a = ap.parse_args()
    targets = [float(t) for t in a.targets.split(",")]
    tr, val = split_validation(load("mnist", "train"), 1 / 6)  # the last 10k images
    cfg = TrainConfig(epochs=15, batch_size=128, lr=0.1, seed=a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{a.method}.csv"
    grid = parse_grid(a.grid)
    # earlier invocations' rows are kept (a grid point run again replaces its own rows)
    keys = [{k: v for k, v in hp.items()} for hp in grid]
    rows = [r for r in (read_rows(path) if path.exists() else [])
            if {k: r.get(k) for k in keys[0]} not in keys]
    log = out / f"{a.method}.json"
    runs = json.loads(log.read_text()).get("runs", []) if log.exists() else []
    for hp in grid:
        per_target = hp.get("schedule") == "target"
        for group in ([[t] for t in targets] if per_target else [targets]):
            torch.manual_seed(a.seed)
            model = create_model("lenet_300_100", 10, tr.shape)
            method = create_method(a.method, **hp, **({"target": group[0]} if per_target else {}))
            log = train(model, method, tr, val, cfg, progress=False)
            plain = method.export()
            own = sparsity_report(plain).sparsity  # exact zeros the method made itself
            for t in group:
                row = {"method": a.method, **hp, "target": t,
                       "val_acc_pruned": evaluate(prune(plain, t), val),
                       "val_acc_unpruned": log[-1]["test_acc"], "own_sparsity": own,
                       "mass_at_target": pruned_mass(method.weights(), t),
                       "A": log[-1].get("A", float("nan"))}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_rows(path, rows)
    write_json(log, {"runs": [*runs, {"args": vars(a), "provenance": provenance()}]})


if __name__ == "__main__":
    main()
