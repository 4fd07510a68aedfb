"""Does one PILoT strength A transfer across budgets? (issue: the strength knob)

Three steps, each resumable (every training run keeps its folder under --out):

1. choose  — `mirrorprune tune` of pilot.strength (√2 grid) for each shape, on the validation
   splits (last 10% of the training set, never the test set) of MNIST / LeNet-300-100 (the
   `cpu` preset: 15 epochs, batch 128) and digits / LeNet-300-100 (60 epochs, batch 64); the
   default is the (shape, strength) with the best validation accuracy averaged over 90/95/98%
   sparsity and over the two pairs.
2. alpha   — the same tuning of the paper's per-step α (geometric per epoch, coupled) at the
   reference budgets (MNIST 15 epochs, digits 60 epochs).
3. transfer — the chosen strength and the chosen α, untouched, on other budgets: MNIST at 5, 15
   and 45 epochs, batch 64 / 128 / 256, cosine or warm-up + cosine; digits at 20 and 60 epochs.
   Reports the realized A, the fraction of ‖x‖₁ outside the largest 5% of the weights, and
   test accuracy unpruned and at 90/95/98% (global magnitude pruning, no fine-tuning).

    python benchmarks/strength_transfer.py [--workers 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import mirrorprune as mp
from mirrorprune.experiments.common import load_data, preset
from mirrorprune.files import write_json, write_rows, write_text
from mirrorprune.methods import create_method
from mirrorprune.models import create_model
from mirrorprune.provenance import provenance
from mirrorprune.train import TrainConfig, evaluate, train

PAIRS = {"mnist": "lenet_300_100", "digits": "lenet_300_100"}
STRENGTHS = [round(0.25 * 2 ** (k / 2), 4) for k in range(11)]  # 0.25 .. 8, √2 apart
ALPHAS = [1.25e-4 * 2**k for k in range(8)]  # 1.25e-4 .. 1.6e-2, ×2 apart
SHAPES = ("geometric", "linear", "cosine")
LEVELS = (0.9, 0.95, 0.98)
# (dataset, epochs, batch, warm-up epochs); the reference budgets are the presets'
BUDGETS = [("mnist", 5, 128, 0), ("mnist", 15, 128, 0), ("mnist", 45, 128, 0),
           ("mnist", 15, 64, 0), ("mnist", 15, 256, 0), ("mnist", 15, 128, 2),
           ("digits", 20, 64, 0), ("digits", 60, 64, 0), ("digits", 60, 64, 5)]


def tune(jobs: list[tuple[str, list[str]]], workers: int) -> None:
    """Run `mirrorprune tune` commands (folder, extra args), `workers` at a time, each on
    one thread of its own."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def one(job: tuple[str, list[str]]) -> None:
        out, extra = job
        if (Path(out) / "tune.json").exists():
            return
        cmd = [sys.executable, "-m", "mirrorprune", "tune", "--quiet", "--resume", "--out", out,
               *extra]
        subprocess.run(cmd, check=True, env=env)
        print("done", out, flush=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, jobs))


def choose(out: Path, workers: int) -> dict:
    jobs = [(str(out / "tune" / ds / f"strength-{shape}"),
             ["--dataset", ds, "--model", model, "--method", "pilot", "--grid",
              "strength=" + ",".join(map(str, STRENGTHS)), "--hp", f"pilot.shape={shape}"])
            for ds, model in PAIRS.items() for shape in SHAPES]
    tune(jobs, workers)
    scores = {}  # (shape, strength) -> mean over pairs
    for shape in SHAPES:
        per = [json.loads((out / "tune" / ds / f"strength-{shape}" / "tune.json").read_text())
               for ds in PAIRS]
        for a in STRENGTHS:
            scores[(shape, a)] = sum(t["mean_val_accuracy"][repr(a)] for t in per) / len(per)
    shape, strength = max(scores, key=scores.get)
    lines = ["| shape | " + " | ".join(f"A = {a:g}" for a in STRENGTHS) + " |",
             "|---|" + "---|" * len(STRENGTHS)]
    lines += [f"| {s} | " + " | ".join(f"{100 * scores[(s, a)]:.2f}" for a in STRENGTHS) + " |"
              for s in SHAPES]
    return {"shape": shape, "strength": strength, "table": "\n".join(lines),
            "scores": {f"{s}@{a}": v for (s, a), v in scores.items()}}


def alphas(out: Path, workers: int) -> dict[str, float]:
    jobs = [(str(out / "tune" / ds / "alpha-geometric"),
             ["--dataset", ds, "--model", model, "--method", "pilot", "--grid",
              "alpha=" + ",".join(f"{a:g}" for a in ALPHAS), "--hp", "pilot.schedule=geometric"])
            for ds, model in PAIRS.items()]
    tune(jobs, workers)
    return {ds: json.loads((out / "tune" / ds / "alpha-geometric" / "tune.json").read_text()
                           )["best"] for ds in PAIRS}


def run_budget(out: Path, ds: str, epochs: int, batch: int, warmup: int, hp: dict,
               data: dict) -> dict:
    """Train pilot with `hp` on one budget (full training set), evaluate on the test set."""
    tr, te = data[ds]
    base = preset("cpu", ds, PAIRS[ds])["train"]
    cfg = TrainConfig(epochs=epochs, batch_size=batch, lr=base.lr, warmup_epochs=warmup)
    torch.manual_seed(0)
    model = create_model(PAIRS[ds], 10, tr.shape)
    method = create_method("pilot", **hp)
    knob = ("A = " + f"{hp['strength']:g}" if "strength" in hp else f"α = {hp['alpha']:g}")
    folder = out / "runs" / ds / f"e{epochs}-b{batch}-w{warmup}-{knob.replace(' ', '')}"
    log = train(model, method, tr, te, cfg, folder, resume=True, progress=False)
    plain = method.export()
    accs = {f"acc{round(100 * s)}": evaluate(mp.prune(plain, s), te) for s in LEVELS}
    return {"dataset": ds, "epochs": epochs, "batch": batch, "warmup_epochs": warmup,
            "knob": knob, "realized_A": log[-1]["A"], "mass_outside_top5": log[-1]["mass95"],
            "acc_unpruned": log[-1]["test_acc"], **accs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/strength_transfer")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tune-only", action="store_true",
                    help="stop after choosing (steps 1 and 2; e.g. on a machine with a GPU)")
    a = ap.parse_args()
    out = Path(a.out)
    chosen = choose(out, a.workers)
    print(chosen["table"], "\nchosen:", chosen["shape"], chosen["strength"], flush=True)
    best_alpha = alphas(out, a.workers)
    print("alpha:", best_alpha, flush=True)
    write_json(out / "choice.json", {"chosen": chosen, "alpha": best_alpha,
                                     "provenance": provenance()})
    if a.tune_only:
        return
    data = {ds: load_data(ds, preset("cpu", ds, m)) for ds, m in PAIRS.items()}
    strength_hp = {"strength": chosen["strength"], "shape": chosen["shape"]}
    rows = [run_budget(out, *b, hp, data) for b in BUDGETS
            for hp in (strength_hp, {"schedule": "geometric", "alpha": best_alpha[b[0]]})]
    write_rows(out / "transfer.csv", rows)
    lines = ["| data | epochs | batch | warm-up | knob | realized A | ‖x‖₁ outside top 5% | "
             "unpruned | 90% | 95% | 98% |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dataset']} | {r['epochs']} | {r['batch']} | {r['warmup_epochs']} | "
              f"{r['knob']} | {r['realized_A']:.3f} | {r['mass_outside_top5']:.3f} | "
              f"{100 * r['acc_unpruned']:.2f} | {100 * r['acc90']:.2f} | "
              f"{100 * r['acc95']:.2f} | {100 * r['acc98']:.2f} |" for r in rows]
    write_text(out / "README.md",
               "# Strength transfer\n\n`python benchmarks/strength_transfer.py` "
               f"(seed 0; {os.cpu_count()} cores; tuning runs on one thread each, "
               f"{a.workers} at a time).\n\n"
               "## 1. The default, chosen on validation splits\n\nMean validation accuracy (%) "
               "at 90/95/98% sparsity, averaged over MNIST / LeNet-300-100 (15 epochs) and "
               "digits / LeNet-300-100 (60 epochs):\n\n" + chosen["table"] +
               f"\n\nChosen: shape {chosen['shape']}, A = {chosen['strength']:g}. Per-step α "
               f"(geometric per epoch, coupled) chosen the same way: {best_alpha}.\n\n"
               "## 2. The same values on other budgets (test set)\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
