"""One-shot pruning (paper Fig. 2): train each method, then prune globally by magnitude to
1 − 0.8^k (k = 1..25) and to 80/90/95/98/99%, and evaluate test accuracy.

Every (method, seed) run lives in OUT/runs/METHOD/seedN with its own checkpoint, logs and
sweep.json, so an interrupted experiment resumes where it stopped and finished runs are reused.
BatchNorm statistics are not recalibrated after pruning unless asked (`bn_recalibrate`), as in
the paper.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..ci import mean_ci
from ..data import ImageData, load
from ..errors import UsageError
from ..files import save_figure, write_json, write_rows, write_text
from ..methods import create_method
from ..models import create_model
from ..provenance import provenance
from ..prune import prune, sparsity_report
from ..train import TrainConfig, check_resume, evaluate, is_main, recalibrate_bn, run_config, train
from .common import (
    check_methods,
    check_options,
    check_out,
    make_methods,
    merge_rows,
    ordered,
    previous_config,
)

SWEEP = tuple(1 - 0.8**k for k in range(1, 26))
TABLE = (0.8, 0.9, 0.95, 0.98, 0.99)


def preset(name: str, dataset: str, model: str) -> dict[str, Any]:
    """Training budget: `paper` (SPEC §4.2, for a GPU) or `cpu` (minutes per run here)."""
    if name == "paper":
        return {"train": TrainConfig(epochs=150, batch_size=256, lr=0.1, weight_decay=1e-4,
                                     lr_schedule="cosine"),
                "lr_scale_mw": 2.0, "train_subset": None, "test_subset": None}
    if name != "cpu":
        raise UsageError(f"unknown preset {name!r}; choose cpu or paper")
    # The paper doubles the learning rate of m ⊙ w models on BatchNorm ResNets; the BN-free MLPs
    # diverge with it, so they keep one learning rate for every method.
    if dataset in ("mnist", "fashion-mnist"):
        return {"train": TrainConfig(epochs=15, batch_size=128, lr=0.1),
                "lr_scale_mw": 1.0, "train_subset": None, "test_subset": None}
    if dataset == "digits":
        return {"train": TrainConfig(epochs=60, batch_size=64, lr=0.1),
                "lr_scale_mw": 1.0, "train_subset": None, "test_subset": None}
    # CIFAR-sized: ~0.2 s per ResNet-20 step at batch 128 on 2 cores, so 15 epochs on a fixed
    # class-balanced 10k subset take ~4 minutes; 2k test images keep the 30-level sweep short.
    return {"train": TrainConfig(epochs=15, batch_size=128, lr=0.1),
            "lr_scale_mw": 2.0, "train_subset": 10_000, "test_subset": 2_000}


@dataclass
class OneshotConfig:
    dataset: str = "mnist"
    model: str = "lenet_300_100"
    methods: tuple[str, ...] = ("dense", "pilot")
    seeds: int = 3
    preset: str = "cpu"
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> overrides
    epochs: int | None = None  # overrides the preset
    exclude: tuple[str, ...] = ()
    bn_recalibrate: bool = False
    data_dir: str | None = None

    def validate(self) -> None:
        check_options(self.methods, self.hparams, self.seeds, self.epochs)
        preset(self.preset, self.dataset, self.model)

    def shared(self) -> dict[str, Any]:
        """The settings every method of one output folder must share."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("methods", "seeds", "hparams", "data_dir")}


def train_config(cfg: OneshotConfig, seed: int) -> TrainConfig:
    tcfg = preset(cfg.preset, cfg.dataset, cfg.model)["train"]
    return TrainConfig(**{**asdict(tcfg), "seed": seed,
                          "epochs": tcfg.epochs if cfg.epochs is None else cfg.epochs})


def load_data(dataset: str, p: dict, data_dir: str | None = None
              ) -> tuple[ImageData, ImageData]:
    """The (train, test) data of `dataset`, cut to the preset `p`'s subsets."""
    tr = load(dataset, "train", data_dir)
    te = load(dataset, "test", data_dir)
    if p["train_subset"]:
        tr = tr.subset(p["train_subset"])
    if p["test_subset"]:
        te = te.subset(p["test_subset"])
    return tr, te


def run_one(cfg: OneshotConfig, method_name: str, seed: int, tr: ImageData, te: ImageData,
            out: Path, progress: bool, resume: bool = False,
            sparsities: tuple[float, ...] | None = None) -> list[dict]:
    """Train one (method, seed) (or reuse its finished run) and evaluate it at `sparsities`
    (default: the sweep 1 − 0.8^k and the table's 80/90/95/98/99%)."""
    levels = sorted(set(sparsities) if sparsities else set(SWEEP) | set(TABLE))
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    tcfg = train_config(cfg, seed)
    rundir = out / "runs" / method_name / f"seed{seed}"
    torch.manual_seed(seed)
    model = create_model(cfg.model, 10, tr.shape)
    method = create_method(method_name, exclude=cfg.exclude, **cfg.hparams.get(method_name, {}))
    scale = p["lr_scale_mw"] if method.uses_mw else 1.0
    history = train(model, method, tr, te, tcfg, rundir, resume=resume, progress=progress,
                    lr_scale=scale)
    sweep_file = rundir / "sweep.json"
    # the recalibration recipe is part of the key: results of an older recipe are recomputed
    key = {"bn_recalibrate": "train-augmentation" if cfg.bn_recalibrate else False,
           "test_size": len(te), "epochs": tcfg.epochs, "levels": levels}
    if sweep_file.exists():
        cached = json.loads(sweep_file.read_text())
        if cached.get("key") == key:
            return cached["rows"]
    plain = method.export()
    rows = []
    for s in levels:
        pruned = prune(plain, s, exclude=cfg.exclude)
        if cfg.bn_recalibrate:
            recalibrate_bn(pruned, tr)
        rows.append({"method": method_name, "seed": seed, "sparsity": s,
                     "actual_sparsity": sparsity_report(pruned, exclude=cfg.exclude).sparsity,
                     "accuracy": evaluate(pruned, te),
                     "unpruned_accuracy": history[-1]["test_acc"]})
    if is_main():
        write_json(sweep_file, {"key": key, "rows": rows})
    return rows


def summarize(rows: list[dict], methods: tuple[str, ...]) -> list[dict]:
    out = []
    for m in methods:
        for s in sorted({r["sparsity"] for r in rows}):
            accs = [r["accuracy"] for r in rows if r["method"] == m and r["sparsity"] == s]
            if accs:
                mean, half = mean_ci(accs)
                out.append({"method": m, "sparsity": s, "accuracy": mean, "ci95": half,
                            "seeds": len(accs)})
    return out


def markdown_table(rows: list[dict], summary: list[dict], methods: tuple[str, ...]) -> str:
    def cell(m: str, s: float) -> str:
        r = next((x for x in summary if x["method"] == m and abs(x["sparsity"] - s) < 1e-12),
                 None)
        if r is None:
            return "–"
        ci = "" if math.isnan(r["ci95"]) else f" ± {100 * r['ci95']:.2f}"
        return f"{100 * r['accuracy']:.2f}{ci}"

    head = "| method | unpruned | " + " | ".join(f"{s:.0%}" for s in TABLE) + " |"
    lines = [head, "|" + "---|" * (len(TABLE) + 2)]
    for m in methods:
        un = [r["unpruned_accuracy"] for r in rows
              if r["method"] == m and r["sparsity"] == TABLE[0]]
        mean, half = mean_ci(un)
        ci = "" if math.isnan(half) else f" ± {100 * half:.2f}"
        lines.append(f"| {m} | {100 * mean:.2f}{ci} | "
                     + " | ".join(cell(m, s) for s in TABLE) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], methods: tuple[str, ...], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for m in methods:
        pts = [r for r in summary if r["method"] == m and r["sparsity"] in SWEEP]
        x = [-math.log10(1 - r["sparsity"]) for r in pts]
        y = [100 * r["accuracy"] for r in pts]
        h = [0 if math.isnan(r["ci95"]) else 100 * r["ci95"] for r in pts]
        line, = ax.plot(x, y, marker=".", label=m)
        ax.fill_between(x, [a - b for a, b in zip(y, h)], [a + b for a, b in zip(y, h)],
                        color=line.get_color(), alpha=0.2)
    ticks = [0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995]
    ax.set_xticks([-math.log10(1 - t) for t in ticks], [f"{t:.1%}" for t in ticks])
    ax.set(xlabel="sparsity (global magnitude pruning, no fine-tuning)",
           ylabel="test accuracy (%), mean ± 95% CI", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def check_runs(cfg: OneshotConfig, out: Path, resume: bool) -> None:
    """Everything about a run that can be checked before data is loaded or a file written:
    hyperparameters, selection, data location, output folder, existing checkpoints."""
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    methods = make_methods(cfg.methods, cfg.hparams, cfg.exclude)
    check_methods(methods, cfg.dataset, cfg.model, p["train"].lr, p["lr_scale_mw"],
                  cfg.data_dir)
    check_out(out)
    for seed in range(cfg.seeds):
        for name, method in methods.items():
            scale = p["lr_scale_mw"] if method.uses_mw else 1.0
            config = run_config(train_config(cfg, seed), method, scale, cfg.dataset, None)
            check_resume(out / "runs" / name / f"seed{seed}", config, method, resume)


def run(cfg: OneshotConfig, out: str | Path, progress: bool = True, resume: bool = False
        ) -> dict:
    """Train and sweep every (method, seed); with resume, existing runs are continued or reused
    (their configuration must match), otherwise an existing run is an error. Methods already
    in `out` from an earlier invocation (same shared settings) keep their rows unless re-run."""
    cfg.validate()
    t0 = time.time()
    out = Path(out)
    previous = previous_config(out, "oneshot.csv", cfg.shared(), "oneshot")
    check_runs(cfg, out, resume)
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    tr, te = load_data(cfg.dataset, p, cfg.data_dir)
    rows = []
    for seed in range(cfg.seeds):
        for m in cfg.methods:
            rows += run_one(cfg, m, seed, tr, te, out, progress, resume)
    if not is_main():  # under torchrun only rank 0 writes the results
        return {"table": "", "summary": summarize(rows, cfg.methods),
                "seconds": time.time() - t0, "files": []}
    rows = merge_rows(out, "oneshot.csv", rows, "method", cfg.methods)
    methods = ordered(rows, "method")
    runs = {**(previous or {}).get("methods", {}),
            **{m: {"seeds": cfg.seeds, "hparams": cfg.hparams.get(m, {})} for m in cfg.methods}}
    write_json(out / "config.json", {
        "oneshot": cfg.shared(), "methods": {m: runs[m] for m in methods},
        "preset": {**p, "train": asdict(p["train"])}, "data_dir": cfg.data_dir,
        "train_size": len(tr), "test_size": len(te), "provenance": provenance()})
    summary = summarize(rows, methods)
    write_rows(out / "oneshot.csv", rows)
    seeds = sorted({runs[m]["seeds"] for m in methods})
    title = (f"{cfg.dataset} {cfg.model}, preset {cfg.preset}, "
             f"{'/'.join(map(str, seeds))} seed(s), {len(tr)} train images")
    plot(summary, methods, title, out / "oneshot.png")
    table = markdown_table(rows, summary, methods)
    write_text(out / "oneshot.md", f"{title}\n\nTest accuracy (%), mean ± 95% CI over seeds.\n\n"
                                    f"{table}\n")
    return {"table": table, "summary": summary, "seconds": time.time() - t0,
            "files": ["oneshot.csv", "oneshot.png", "oneshot.md", "config.json"]}
