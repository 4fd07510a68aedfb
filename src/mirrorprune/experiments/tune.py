"""Choose a method's hyperparameter on a validation split, never on the test set.

`mirrorprune tune --method NAME --grid KEY=v1,v2,...` trains the method once per value (and
seed) on the training set minus a fixed validation split (its last `val_fraction`), prunes each
trained model to every level in `levels` (global magnitude, no fine-tuning) and picks the value
with the best mean validation accuracy over the levels and seeds. It writes `tune.csv` (one row
per value, seed and level) and `tune.json` (the grid, the mean per value, the choice, and
"hparams": {method: {key: value, ...}} that `oneshot`/`targets --hp-from tune.json` read; and
per level the value best there, which `targets --aim-from tune.json` aims each target with).
Runs live in OUT/KEY=VALUE/runs/METHOD/seedN and resume like oneshot's. With `--aim` each
value is trained once per level, aimed at it as `targets` aims the method (PILoT: its target
controller), and validated at that level only (OUT/KEY=VALUE/targetL/...): how a knob of the
aimed training (the controller's mass_tol) is chosen per target. KEY may also be a
training option shared by every method (`weight_decay`, with `--method dense --levels 0` the
dense recipe): its choice is in tune.json's "training" and goes to oneshot/targets as
`--weight-decay`.
"""

from __future__ import annotations

import ast
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..ci import mean_ci
from ..config import option
from ..distributed import is_main
from ..errors import UsageError
from ..files import write_results_json, write_rows
from ..methods import METHODS
from ..provenance import provenance
from .common import VALIDATION, DataConfig, check_parallel, load_data, preset, train_size
from .oneshot import OneshotConfig, check_runs, run_many, run_one
from .targets import aim, epoch_lr

# grid keys that are training options shared by every method (chosen once, passed to
# oneshot/targets as --weight-decay), not hyperparameters of the method tuned
TRAINING_KEYS = ("weight_decay",)


@dataclass
class TuneConfig(DataConfig):
    method: str = option("pilot", "the method to tune", choices=tuple(METHODS))
    grid: str = option("", "KEY=v1,v2,...: the hyperparameter and the values to try",
                       required=True)
    seeds: int = option(1, "seeds per value (0, 1, ...)")
    epochs: int | None = option(None, "override the preset's epochs")
    levels: tuple[float, ...] = option((0.9, 0.95, 0.98), "sparsities whose mean validation "
                                       "accuracy is maximized, comma-separated")
    val_fraction: float = option(VALIDATION, "the last fraction of the training set held out for "
                                 "validation")
    exclude: tuple[str, ...] = option((), "module names (globs) kept dense", repeat=True)
    bn_recalibrate: bool = option(False, "re-estimate BatchNorm statistics (on the training "
                                  "split) after pruning, before validating: without it, a "
                                  "short-budget BatchNorm network pruned to 90%+ is near chance "
                                  "for every value and the choice is noise")
    parallel: int = option(1, "runs (grid value × seed) trained at once, each in a process of "
                           "its own: the CPU's threads are divided between them, a GPU is shared")
    aim: bool = option(False, "train each value once per level, aimed at it as `targets` aims "
                       "the method (pilot: its target controller), and validate it there: for "
                       "knobs of the aimed training, chosen per target for targets --aim-from")
    hparams: dict[str, dict[str, Any]] = option({}, "fixed hyperparameters (--hp)", cli=False)

    def parsed_grid(self) -> tuple[str, list[Any]]:
        """(KEY, [values]) with each value read as a Python literal (else a string)."""
        key, sep, values = self.grid.partition("=")
        if not sep or not key or not values:
            raise UsageError(f"--grid expects KEY=v1,v2,... (e.g. strength=0.5,1,2), got "
                             f"{self.grid!r}")

        def literal(v: str) -> Any:
            try:
                return ast.literal_eval(v)
            except (ValueError, SyntaxError):
                return v
        return key, [literal(v.strip()) for v in values.split(",") if v.strip()]

    def one(self, value: Any, level: float | None = None, n_train: int | None = None
            ) -> OneshotConfig:
        """The oneshot configuration that trains one grid value (aimed at `level` on a
        training split of `n_train` images, by default that of the standard copy)."""
        key, _ = self.parsed_grid()
        data, hp = self.data_options(), dict(self.hparams.get(self.method, {}))
        (data if key in TRAINING_KEYS else hp)[key] = value
        if level is not None:  # aimed as `targets` aims it; --hp and the grid value win
            p = preset(self.preset, self.dataset, self.model)
            n = n_train or train_size(self.dataset, p, self.val_fraction)
            hp = {**aim(self.method, level, epoch_lr(p, n)), **hp}
        return OneshotConfig(**data, methods=(self.method,), seeds=self.seeds,
                             hparams={self.method: hp}, epochs=self.epochs,
                             exclude=self.exclude, bn_recalibrate=self.bn_recalibrate)

    def validate(self) -> None:
        key, values = self.parsed_grid()
        if not values or len(set(map(repr, values))) < len(values):
            raise UsageError(f"--grid needs distinct values, got {values}")
        check_parallel(self.parallel)
        if not 0 < self.val_fraction < 1:
            raise UsageError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if not self.levels or not all(0 <= s < 1 for s in self.levels):
            raise UsageError(f"--levels must lie in [0, 1), got {self.levels}")
        bad = [m for m in self.hparams if m != self.method]
        if bad:
            raise UsageError(f"--hp given for {bad}, but the method tuned is {self.method}")
        for v, level, _ in self.runs():
            one = self.one(v, level)
            one.validate()
            # comparable() leaves out the knobs that do not act under these hyperparameters
            if key not in TRAINING_KEYS and \
                    key not in METHODS[self.method].comparable(one.hparams[self.method]):
                raise UsageError(f"{key} does not act on {self.method} as tuned here (it "
                                 "belongs to another schedule: every value would train the "
                                 "same model); tune the schedule's own knob, or set the "
                                 "schedule with --hp (PILoT's controller: --aim)")

    def runs(self) -> list[tuple[Any, float | None, str]]:
        """(grid value, level it is aimed at or None, its folder in OUT) of every run."""
        key, values = self.parsed_grid()
        if not self.aim:
            return [(v, None, f"{key}={v}") for v in values]
        return [(v, lv, f"{key}={v}/target{lv:g}") for v in values for lv in self.levels]


def run(cfg: TuneConfig, out: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Train every grid value (and seed) on the training split, evaluate on the validation
    split, choose the best mean; returns {"table", "rows", "best", "files", "seconds"}."""
    cfg.validate()
    t0 = time.time()
    out = Path(out)
    key, values = cfg.parsed_grid()

    def checked_runs(n_train: int | None = None) -> list:
        runs = [(v, cfg.one(v, lv, n_train), out / folder, cfg.levels if lv is None else (lv,))
                for v, lv, folder in cfg.runs()]
        for _, one, folder, _ in runs:
            check_runs(one, folder, resume)
        return runs

    # everything is checked before loading data or writing, and again (before writing) if
    # this copy's training split differs from the standard one: aimed runs depend on its size
    runs = checked_runs()
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    tr, val = load_data(cfg.dataset, p, cfg.data_dir, validation=cfg.val_fraction)
    if cfg.aim and len(tr) != train_size(cfg.dataset, p, cfg.val_fraction):
        runs = checked_runs(len(tr))
    # after loading: parallel workers find the data decoded
    resume = run_many([(one, cfg.method, seed, folder, levels) for _, one, folder, levels in runs
                       for seed in range(cfg.seeds)], cfg.parallel, resume,
                      validation=cfg.val_fraction)
    rows = []
    for v, one, folder, levels in runs:
        for seed in range(cfg.seeds):
            sweep = run_one(one, cfg.method, seed, tr, val, folder, progress, resume,
                            sparsities=levels)
            rows += [{"method": cfg.method, key: v, "seed": seed, "sparsity": r["sparsity"],
                      "actual_sparsity": r["actual_sparsity"], "val_accuracy": r["accuracy"],
                      "val_unpruned": r["unpruned_accuracy"]} for r in sweep]
    scores = {repr(v): mean_ci([r["val_accuracy"] for r in rows if r[key] == v])[0]
              for v in values}
    best = max(values, key=lambda v: scores[repr(v)])  # ties: the first in the grid
    at_level, best_at = per_level(rows, key, values, cfg.levels)
    table = "\n".join(f"{key}={v}: mean validation accuracy {100 * scores[repr(v)]:.2f}%"
                      + (" <- best" if v == best else "") for v in values)
    edge = grid_edge(key, values, best)
    if edge:
        table += f"\nwarning: {edge}"
    same = no_effect(at_level)
    if same:
        table += (f"\nwarning: every {key} value gave the same validation accuracy at "
                  f"{', '.join(same)}: {key} did not act on this budget (e.g. PILoT's "
                  "controller never brought the target in reach) or every value collapsed to "
                  "the same guess, so nothing was chosen there; tune on a longer budget or "
                  "leave it at its default")
    if key in TRAINING_KEYS:
        table += f"\n(a training option: pass --{key.replace('_', '-')} {best} to oneshot/targets)"
    if is_main():
        write_rows(out / "tune.csv", rows)
        write_results_json(out / "tune.json", {
            "tune": asdict(cfg), "method": cfg.method, "key": key, "grid": values,
            "levels": list(cfg.levels), "mean_val_accuracy": scores, "best": best,
            "at_edge": edge, "val_accuracy_at_level": at_level, "best_at_level": best_at,
            "no_effect_at_level": same,
            "hparams": {cfg.method: {**cfg.hparams.get(cfg.method, {}),
                                     **({} if key in TRAINING_KEYS else {key: best})}},
            "training": {key: best} if key in TRAINING_KEYS else {},
            "protocol": f"trained on the first {1 - cfg.val_fraction:.0%} of the training set, "
                        f"validated on its last {cfg.val_fraction:.0%}; best mean validation "
                        f"accuracy over sparsities {list(cfg.levels)}"
                        + (" (BatchNorm statistics re-estimated on the training split after "
                           "pruning)" if cfg.bn_recalibrate else "")
                        + f" and {cfg.seeds} seed(s); "
                        "the test set is not used",
            "train_size": len(tr), "val_size": len(val), "provenance": provenance()})
    return {"table": table, "rows": rows, "best": best, "seconds": time.time() - t0,
            "files": ["tune.csv", "tune.json", f"{key}=*/" + ("target*/" if cfg.aim else "")
                      + "runs/"]}


def per_level(rows: list[dict], key: str, values: list, levels: tuple[float, ...]
              ) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """({level: {repr(value): mean validation accuracy there}}, {level: the value best there})
    — the choice that aims a method at one fixed target (`targets --aim-from`). A value whose
    own model is sparser than a level (STR, GMP) was validated at its own sparsity, not at
    the level: it is chosen there only if no value reaches the level exactly."""
    at_level: dict[str, dict[str, float]] = {}
    best_at: dict[str, Any] = {}
    for level in levels:
        def here(v: Any, level: float = level) -> list[dict]:
            return [r for r in rows if r[key] == v and abs(r["sparsity"] - level) < 1e-9]

        at_level[f"{level:g}"] = {repr(v): mean_ci([r["val_accuracy"] for r in here(v)])[0]
                                  for v in values}
        exact = [v for v in values
                 if all(abs(r["actual_sparsity"] - level) < 1e-3 for r in here(v))]
        best_at[f"{level:g}"] = max(exact or values,
                                    key=lambda v: at_level[f"{level:g}"][repr(v)])
    return at_level, best_at


def no_effect(at_level: dict[str, dict[str, float]]) -> list[str]:
    """The levels at which every grid value (two or more) scored exactly the same: the knob
    did not act there (results differ in the last digits whenever training differs), or
    every model collapsed to one guess — either way nothing was chosen."""
    return [lv for lv, accs in at_level.items() if len(accs) > 1 and len(set(accs.values())) == 1]


def aims_from(paths: list[str], dataset: str, model: str, methods: tuple[str, ...]
              ) -> dict[str, dict[str, dict[str, Any]]]:
    """{method: {level: {key: value}}} from `tune.json` files (made on the same dataset and
    model): the value best on validation at each of the tune's levels, for `targets
    --aim-from`; later files win."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path, blob in _tune_files(paths, dataset, model, "--aim-from"):
        if blob["method"] not in methods:
            continue
        if "best_at_level" not in blob or blob["key"] in TRAINING_KEYS:
            raise UsageError(f"--aim-from {path} holds no per-level choice of a method "
                             "hyperparameter (written before it was recorded, or it tuned a "
                             "training option): rerun that tune with --resume")
        if blob.get("no_effect_at_level"):
            raise UsageError(f"--aim-from {path}: {blob['key']} made no difference at "
                             f"{', '.join(blob['no_effect_at_level'])} on its tuning budget, so "
                             "it chose nothing there; leave this --aim-from out (the method's "
                             "own aim) or tune on a longer budget")
        fixed = blob["tune"].get("hparams", {}).get(blob["method"], {})
        out[blob["method"]] = {lv: {**fixed, blob["key"]: v}
                               for lv, v in blob["best_at_level"].items()}
    return out


def grid_edge(key: str, values: list, best: Any) -> str | None:
    """Why the choice may not be the optimum when `best` is the smallest or largest of three
    or more numeric grid values (the score may keep rising beyond it), with the next value to
    try: geometric continuation when the grid is positive — of 1 − v when every value lies in
    (0.5, 1), as sparsity targets do (0.95, 0.98 → 0.992) — else arithmetic; else None."""
    nums = sorted(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool))
    if len(nums) < 3 or len(nums) != len(values) or best not in (nums[0], nums[-1]):
        return None
    edge, inner = (nums[0], nums[1]) if best == nums[0] else (nums[-1], nums[-2])
    if nums[0] <= 0:
        beyond = 2 * edge - inner
    elif 0.5 < nums[0] and nums[-1] < 1:
        beyond = 1 - (1 - edge) ** 2 / (1 - inner)
    else:
        beyond = edge * edge / inner
    side = "smallest" if best == nums[0] else "largest"
    return (f"the best {key}={best} is the grid's {side} value: the optimum may lie beyond it; "
            f"extend the grid (e.g. add {key}={beyond:.4g}) and tune again with --resume")


def _tune_files(paths: list[str], dataset: str, model: str, flag: str
                ) -> list[tuple[str, dict]]:
    """(path, content) of each tune.json, checked to be one made on `dataset` / `model`."""
    out = []
    for path in paths:
        try:
            blob = json.loads(Path(path).read_text())
            made = blob["tune"]
            _ = blob["hparams"], blob["method"], blob["key"]  # a KeyError: not a tune.json
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"{flag} {path}: not a tune.json written by mirrorprune tune"
                             ) from None
        if (made.get("dataset"), made.get("model")) != (dataset, model):
            raise UsageError(f"{flag} {path} was tuned on {made.get('dataset')} / "
                             f"{made.get('model')}, not on {dataset} / {model}; tune on the "
                             "data and model you run")
        out.append((path, blob))
    return out


def hparams_from(paths: list[str], dataset: str, model: str, methods: tuple[str, ...]
                 ) -> dict[str, dict[str, Any]]:
    """The chosen hyperparameters of `tune.json` files (made on the same dataset and model),
    for the methods in `methods`; later files win."""
    out: dict[str, dict[str, Any]] = {}
    for path, blob in _tune_files(paths, dataset, model, "--hp-from"):
        if blob["method"] in methods and blob.get("no_effect_at_level") and \
                len(blob["no_effect_at_level"]) == len(blob["levels"]):
            raise UsageError(f"--hp-from {path}: {blob['key']} made no difference on its "
                             "tuning budget, so it chose nothing; leave this --hp-from out or "
                             "tune on a longer budget")
        for m, hp in blob["hparams"].items():
            if m in methods:
                out[m] = {**out.get(m, {}), **hp}
    return out


CONFIG = TuneConfig  # the command line's options (cli.py)
