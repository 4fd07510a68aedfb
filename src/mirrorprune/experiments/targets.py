"""Fixed-target sparsity (the ICLR table): each method is trained aimed at each target sparsity,
exported at exactly that sparsity (global magnitude pruning), and evaluated.

Each method says how it is aimed at a target (`Method.aim`): pilot by the target controller,
gmp by the end of its ramp, spred and str by values chosen per target on a validation split
(their classes say which: MNIST's); the others are trained as they are and pruned to the target.
`--aim-from tune.json` aims a method instead by the value `mirrorprune tune` found best on
validation at each target, on the data and model at hand; --hp overrides both.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..ci import mean_ci, show
from ..config import option
from ..distributed import is_main
from ..errors import UsageError
from ..files import write_results_json, write_rows, write_text
from ..methods import METHODS, REFERENCE_EPOCH_LR
from ..provenance import provenance
from .common import (
    MethodsConfig,
    load_data,
    merge_rows,
    ordered,
    paired_differences,
    plot_curves,
    preset,
    previous_config,
    recorded_seeds,
    results_title,
    train_size,
    wall_times,
)
from .oneshot import OneshotConfig, check_runs, run_many, run_one


def aim(method: str, target: float, epoch_lr: float = REFERENCE_EPOCH_LR) -> dict[str, Any]:
    """The hyperparameters that aim `method` at sparsity `target` on a budget of `epoch_lr`
    (steps per epoch × learning rate of its prunable weights): the method's own `aim`."""
    return METHODS[method].aim(target, epoch_lr)


def epoch_lr(p: dict, n_train: int) -> float:
    """Steps per epoch × learning rate of the m ⊙ w weights of preset `p` on `n_train` images:
    the budget by which `aim` scales per-step values (the α ladders)."""
    tcfg = p["train"]
    return math.ceil(n_train / tcfg.batch_size) * tcfg.lr * p["lr_scale_mw"]


@dataclass
class TargetsConfig(MethodsConfig):
    per_method: ClassVar[tuple[str, ...]] = ("sparsities", "aims")

    methods: tuple[str, ...] = option(("pilot", "spred", "str", "gmp"),
                                      f"comma-separated, from: {','.join(METHODS)}")
    sparsities: tuple[float, ...] = option((0.8, 0.9, 0.95, 0.98),
                                           "target sparsities, comma-separated")
    aims: dict[str, dict[str, dict[str, Any]]] = option(
        {}, "{method: {target: hyperparameters}} that aim a method at each target instead of "
        "its own `aim` (--aim-from: the values `tune` found best on validation there)",
        cli=False)

    def validate(self) -> None:
        super().validate()
        if not self.sparsities or not all(0 < s < 1 for s in self.sparsities):
            raise UsageError(f"sparsities must lie in (0, 1), got {self.sparsities}")
        if len(set(self.sparsities)) < len(self.sparsities):
            raise UsageError(f"--sparsities names a target more than once: {self.sparsities}")
        for m, per_target in self.aims.items():
            if m not in self.methods:
                raise UsageError(f"--aim-from aims {m}, which --methods does not name")
            missing = [t for t in self.sparsities if f"{t:g}" not in per_target]
            if missing:
                raise UsageError(f"--aim-from: {m} was tuned at the levels "
                                 f"{', '.join(per_target)}, not at {missing}; tune it with "
                                 "--levels that include every target")


def plan(cfg: TargetsConfig, epoch_lr: float) -> dict[tuple[str, str], list[float]]:
    """(method, hyperparameters as JSON) -> the targets trained by that one run: targets whose
    hyperparameters coincide (spred and STR ladders have plateaus) share one training run, kept
    in the folder of the first of them and pruned to each of them."""
    groups: dict[tuple[str, str], list[float]] = {}
    for target in cfg.sparsities:
        for m in cfg.methods:
            hp = {**aim(m, target, epoch_lr), **cfg.aims.get(m, {}).get(f"{target:g}", {}),
                  **cfg.hparams.get(m, {})}
            groups.setdefault((m, json.dumps(hp, sort_keys=True)), []).append(target)
    return groups


def _oneshot(cfg: TargetsConfig, m: str, hp_json: str) -> OneshotConfig:
    return OneshotConfig(**cfg.data_options(), methods=(m,), hparams={m: json.loads(hp_json)},
                         epochs=cfg.epochs, bn_recalibrate=cfg.bn_recalibrate, seeds=cfg.seeds,
                         first_seed=cfg.first_seed, reuse=cfg.reuse)


def run(cfg: TargetsConfig, out: str | Path, progress: bool = True, resume: bool = False
        ) -> dict:
    """Train each method aimed at each target and evaluate it there. Methods already in `out`
    from an earlier invocation (same shared settings) keep their rows unless re-run."""
    cfg.validate()
    t0 = time.time()
    out = Path(out)
    previous = previous_config(out, "targets.csv", cfg, "targets")
    p = preset(cfg.preset, cfg.dataset, cfg.model)

    def checked_plan(n_train: int) -> dict[tuple[str, str], list[float]]:
        # the α ladders are per step: scaled by this budget's steps per epoch × lr
        groups = plan(cfg, epoch_lr(p, n_train))
        for (m, hp_json), tgts in groups.items():
            one = _oneshot(cfg, m, hp_json)
            one.validate()
            check_runs(one, out / f"target{tgts[0]:g}", resume)
        return groups

    # everything is checked before loading data, with the standard training-set size, and
    # again (still before any file is written) if this copy of the data has another size
    expected = train_size(cfg.dataset, p)
    groups = checked_plan(expected)
    tr, te = load_data(cfg.dataset, p, cfg.data_dir)
    if len(tr) != expected:
        groups = checked_plan(len(tr))
    used = {f"{m}@{t:g}": json.loads(hp_json) for (m, hp_json), tgts in groups.items()
            for t in tgts}
    resume = run_many([(_oneshot(cfg, m, hp_json), m, seed, out / f"target{tgts[0]:g}",
                        tuple(tgts)) for (m, hp_json), tgts in groups.items()
                       for seed in cfg.seed_list()], cfg.parallel, resume)
    rows = []
    for (m, hp_json), tgts in groups.items():
        one = _oneshot(cfg, m, hp_json)
        for seed in cfg.seed_list():
            sweep = run_one(one, m, seed, tr, te, out / f"target{tgts[0]:g}", progress, resume,
                            sparsities=tuple(tgts))
            rows += [{**r, "target": r["sparsity"]} for r in sweep]
    if not is_main():  # under torchrun only rank 0 writes the results
        return {"table": markdown(rows, cfg.methods), "rows": rows,
                "seconds": time.time() - t0}
    rows = merge_rows(out, "targets.csv", rows, "method", cfg.methods)
    methods = ordered(rows, "method")
    prev_methods = (previous or {}).get("methods", {})
    runs = {**prev_methods, **{m: {**cfg.recorded(m), "sparsities": list(cfg.sparsities)}
                               for m in cfg.methods}}
    used = {**{k: v for k, v in (previous or {}).get("hparams_used", {}).items()
               if k.split("@")[0] not in cfg.methods}, **used}
    table = markdown(rows, methods)
    write_results_json(out / "config.json",
                       {"targets": cfg.shared(), "methods": {m: runs[m] for m in methods},
                        "hparams_used": used, "data_dir": cfg.data_dir,
                        "provenance": provenance(), "train_size": len(tr),
                        "test_size": len(te)})
    write_rows(out / "targets.csv", rows)
    title = results_title(cfg, (runs[m] for m in methods), len(tr))
    plot(rows, methods, title, out / "targets.png")
    write_text(out / "targets.md", f"{title}\n\nTest accuracy (%) at the target sparsity"
                                    " (pruned to exactly it; in brackets the sparsity a model"
                                    " kept where training left it sparser), mean ± 95% CI"
                                    f" over seeds.\n\n{table}\n\n"
                                    + paired_differences(rows, methods, "target",
                                                         sorted({r["target"] for r in rows}))
                                    + "\n\n"
                                    + wall_times(d for m in methods
                                                 for s in recorded_seeds(runs[m])
                                                 for d in out.glob(f"target*/runs/{m}/seed{s}"))
                                    + "\n")
    return {"table": table, "rows": rows, "seconds": time.time() - t0,
            "files": ["targets.csv", "targets.md", "targets.png", "config.json", "target*/runs/"]}


# a model sparser than its target by more than this (a fraction) is flagged: pruning cannot
# bring it back to the target, so its cell is not at the target's sparsity
OVERSHOOT = 5e-4


def cells(rows: list[dict], methods: tuple[str, ...]) -> dict[str, dict[float, dict]]:
    """Per method and target: accuracy mean and 95% CI half-width, and the mean sparsity the
    models actually have there (above the target where training left them sparser)."""
    out: dict[str, dict[float, dict]] = {}
    targets = sorted({r["target"] for r in rows})
    for m in methods:
        for s in targets:
            sel = [r for r in rows if r["method"] == m and r["target"] == s]
            if sel:
                out.setdefault(m, {})[s] = {
                    "ci": mean_ci([r["accuracy"] for r in sel]),
                    "actual": sum(r["actual_sparsity"] for r in sel) / len(sel)}
    return out


def markdown(rows: list[dict], methods: tuple[str, ...]) -> str:
    """Mean ± 95% CI per method and target (the targets of `rows`, ascending; – where a method
    was not run at a target; the actual sparsity in brackets where the models were sparser than
    the target)."""
    targets = sorted({r["target"] for r in rows})
    table = cells(rows, methods)
    lines = ["| method | " + " | ".join(f"{s:.0%}" for s in targets) + " |",
             "|" + "---|" * (len(targets) + 1)]
    for m in methods:
        row = []
        for s in targets:
            c = table.get(m, {}).get(s)
            if c is None:
                row.append("–")
                continue
            over = c["actual"] - s > OVERSHOOT
            row.append(show(*c["ci"]) + (f" (at {c['actual']:.1%})" if over else ""))
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], methods: tuple[str, ...], title: str, path: Path) -> None:
    """Accuracy against the sparsity each method actually has at each target."""
    curves = {m: [(c["actual"], *c["ci"]) for _, c in sorted(by.items())]
              for m, by in cells(rows, methods).items()}
    plot_curves(curves, path, title, "sparsity after pruning to each target (above it where "
                "training left the model sparser)", tuple(sorted({r["target"] for r in rows})))


CONFIG = TargetsConfig  # the command line's options (cli.py)
