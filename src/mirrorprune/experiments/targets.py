"""Fixed-target sparsity (the ICLR table): each method is trained aimed at each target sparsity,
exported at exactly that sparsity (global magnitude pruning), and evaluated.

How each method aims at a target s:
- pilot: `schedules.TargetController` (its defaults) from α_init = PILOT_ALPHA_INIT;
- gmp: its cubic ramp ends at s;
- spred and str have no target knob: their sparsity follows their strength, so each target gets
  the spred α (SPRED_ALPHA) and STR s_init (STR_S_INIT) of the grid point that was best at that
  target on a validation split (the last 10k MNIST training images, LeNet-300-100, `cpu` budget;
  benchmarks/calibrate_targets.py and benchmarks/results/calibrate_targets/). The controller's
  delta and mass_tol were chosen the same way; PILOT_ALPHA_INIT was not tuned.

Any method's values can be overridden with --hp.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..ci import mean_ci
from ..data import TRAIN_SIZES
from ..errors import UsageError
from ..files import write_json, write_rows, write_text
from ..provenance import provenance
from ..train import is_main
from .common import check_options, merge_rows, ordered, previous_config
from .oneshot import OneshotConfig, check_runs, load_data, preset, run_one

PILOT_ALPHA_INIT = 3e-4
SPRED_ALPHA = {0.8: 3e-4, 0.9: 3e-4, 0.95: 3e-4, 0.98: 5e-4}
STR_S_INIT = {0.8: -1.75, 0.9: -1.75, 0.95: -1.75, 0.98: -1.5}


# Steps per epoch × learning rate of the budget the values were chosen on (50k MNIST images,
# batch 128: 391 steps of lr 0.1). α is a per-step rate, so on another budget the α values are
# scaled by REFERENCE_EPOCH_LR / (its steps per epoch × lr) to add the same A = Σ ηα per epoch.
REFERENCE_EPOCH_LR = 391 * 0.1


def aim(method: str, target: float, epoch_lr: float = REFERENCE_EPOCH_LR) -> dict[str, Any]:
    """The hyperparameters that aim `method` at sparsity `target` on a budget of `epoch_lr`
    (steps per epoch × learning rate of the m ⊙ w parameters)."""
    nearest = min(SPRED_ALPHA, key=lambda s: abs(s - target))
    f = REFERENCE_EPOCH_LR / epoch_lr
    return {"pilot": {"schedule": "target", "target": target, "alpha": PILOT_ALPHA_INIT * f},
            "gmp": {"target": target},
            "spred": {"alpha": SPRED_ALPHA[nearest] * f},
            "str": {"s_init": STR_S_INIT[nearest]}}.get(method, {})


@dataclass
class TargetsConfig:
    dataset: str = "mnist"
    model: str = "lenet_300_100"
    methods: tuple[str, ...] = ("pilot", "spred", "str", "gmp")
    sparsities: tuple[float, ...] = (0.8, 0.9, 0.95, 0.98)
    seeds: int = 3
    preset: str = "cpu"
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)
    epochs: int | None = None
    bn_recalibrate: bool = False
    data_dir: str | None = None

    def validate(self) -> None:
        check_options(self.methods, self.hparams, self.seeds, self.epochs)
        if not self.sparsities or not all(0 < s < 1 for s in self.sparsities):
            raise UsageError(f"sparsities must lie in (0, 1), got {self.sparsities}")
        if len(set(self.sparsities)) < len(self.sparsities):
            raise UsageError(f"--sparsities names a target more than once: {self.sparsities}")
        preset(self.preset, self.dataset, self.model)

    def shared(self) -> dict[str, Any]:
        """The settings every method of one output folder must share."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("methods", "sparsities", "seeds", "hparams", "data_dir")}


def plan(cfg: TargetsConfig, epoch_lr: float) -> dict[tuple[str, str], list[float]]:
    """(method, hyperparameters as JSON) -> the targets trained by that one run: targets whose
    hyperparameters coincide (spred and STR ladders have plateaus) share one training run, kept
    in the folder of the first of them and pruned to each of them."""
    groups: dict[tuple[str, str], list[float]] = {}
    for target in cfg.sparsities:
        for m in cfg.methods:
            hp = {**aim(m, target, epoch_lr), **cfg.hparams.get(m, {})}
            groups.setdefault((m, json.dumps(hp, sort_keys=True)), []).append(target)
    return groups


def _oneshot(cfg: TargetsConfig, m: str, hp_json: str) -> OneshotConfig:
    return OneshotConfig(dataset=cfg.dataset, model=cfg.model, methods=(m,), preset=cfg.preset,
                         hparams={m: json.loads(hp_json)}, epochs=cfg.epochs,
                         bn_recalibrate=cfg.bn_recalibrate, data_dir=cfg.data_dir,
                         seeds=cfg.seeds)


def run(cfg: TargetsConfig, out: str | Path, progress: bool = True, resume: bool = False
        ) -> dict:
    """Train each method aimed at each target and evaluate it there. Methods already in `out`
    from an earlier invocation (same shared settings) keep their rows unless re-run."""
    cfg.validate()
    t0 = time.time()
    out = Path(out)
    previous = previous_config(out, "targets.csv", cfg.shared(), "targets")
    p = preset(cfg.preset, cfg.dataset, cfg.model)

    def checked_plan(n_train: int) -> dict[tuple[str, str], list[float]]:
        # the α ladders are per step: scaled by this budget's steps per epoch × lr
        tcfg = p["train"]
        groups = plan(cfg, math.ceil(n_train / tcfg.batch_size) * tcfg.lr * p["lr_scale_mw"])
        for (m, hp_json), tgts in groups.items():
            one = _oneshot(cfg, m, hp_json)
            one.validate()
            check_runs(one, out / f"target{tgts[0]:g}", resume)
        return groups

    # everything is checked before loading data, with the standard training-set size, and
    # again (still before any file is written) if this copy of the data has another size
    expected = min(p["train_subset"] or math.inf, TRAIN_SIZES[cfg.dataset])
    groups = checked_plan(expected)
    tr, te = load_data(cfg.dataset, p, cfg.data_dir)
    if len(tr) != expected:
        groups = checked_plan(len(tr))
    used = {f"{m}@{t:g}": json.loads(hp_json) for (m, hp_json), tgts in groups.items()
            for t in tgts}
    rows = []
    for (m, hp_json), tgts in groups.items():
        one = _oneshot(cfg, m, hp_json)
        for seed in range(cfg.seeds):
            sweep = run_one(one, m, seed, tr, te, out / f"target{tgts[0]:g}", progress, resume,
                            sparsities=tuple(tgts))
            rows += [{**r, "target": r["sparsity"]} for r in sweep]
    if not is_main():  # under torchrun only rank 0 writes the results
        return {"table": markdown(rows, cfg.methods), "rows": rows,
                "seconds": time.time() - t0}
    rows = merge_rows(out, "targets.csv", rows, "method", cfg.methods)
    methods = ordered(rows, "method")
    prev_methods = (previous or {}).get("methods", {})
    runs = {**prev_methods, **{m: {"seeds": cfg.seeds, "sparsities": list(cfg.sparsities),
                                   "hparams": cfg.hparams.get(m, {})} for m in cfg.methods}}
    used = {**{k: v for k, v in (previous or {}).get("hparams_used", {}).items()
               if k.split("@")[0] not in cfg.methods}, **used}
    table = markdown(rows, methods)
    write_json(out / "config.json",
               {"targets": cfg.shared(), "methods": {m: runs[m] for m in methods},
                "hparams_used": used, "data_dir": cfg.data_dir, "provenance": provenance(),
                "train_size": len(tr), "test_size": len(te)})
    write_rows(out / "targets.csv", rows)
    seeds = sorted({runs[m]["seeds"] for m in methods})
    write_text(out / "targets.md", f"{cfg.dataset} {cfg.model}, preset {cfg.preset}, "
                                    f"{'/'.join(map(str, seeds))} seed(s), {len(tr)} training "
                                    "images\n\nTest accuracy (%) at exactly the target sparsity"
                                    + (", BatchNorm statistics re-estimated after pruning"
                                       if cfg.bn_recalibrate else "")
                                    + f", mean ± 95% CI over seeds.\n\n{table}\n")
    return {"table": table, "rows": rows, "seconds": time.time() - t0}


def markdown(rows: list[dict], methods: tuple[str, ...]) -> str:
    """Mean ± 95% CI per method and target (the targets of `rows`, ascending; – where a method
    was not run at a target)."""
    targets = sorted({r["target"] for r in rows})
    lines = ["| method | " + " | ".join(f"{s:.0%}" for s in targets) + " |",
             "|" + "---|" * (len(targets) + 1)]
    for m in methods:
        cells = []
        for s in targets:
            accs = [r["accuracy"] for r in rows if r["method"] == m and r["target"] == s]
            if not accs:
                cells.append("–")
                continue
            mean, half = mean_ci(accs)
            cells.append(f"{100 * mean:.2f}" + ("" if math.isnan(half) else
                                                f" ± {100 * half:.2f}"))
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
