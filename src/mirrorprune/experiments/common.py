"""What the experiments share: their common options (`DataConfig`, `MethodsConfig`), budget
presets and data, the checks made before training (everything asked for, without loading data or
writing a file: a mistake costs nothing and overwrites nothing), merging results with those of
earlier invocations in the same output folder, and the accuracy-vs-sparsity figure."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from ..ci import mean_ci, show
from ..config import option, with_defaults
from ..data import DATASETS, SHAPES, TRAIN_SIZES, ImageData, load, locate
from ..distributed import rank_world
from ..errors import UsageError
from ..files import read_rows, save_figure
from ..methods import METHODS, Method, create_method
from ..models import MODELS, create_model
from ..reparam import select_weights
from ..train import PRECISIONS, TrainConfig

PRESETS = ("cpu", "cpu-full", "paper")
VALIDATION = 0.1  # the last fraction of a training set: the validation split every tuning uses


def preset(name: str, dataset: str, model: str) -> dict[str, Any]:
    """Training budget: `paper` (SPEC §4.2, for a GPU), `cpu` (minutes per run here) or
    `cpu-full` (CIFAR-10: the whole training set minus the validation split, the whole test
    set, bf16 + channels_last, 45 epochs; about 47 minutes per ResNet-20 run here).

    "holdout": the final runs train without the validation split too, so that tuning and the
    table train on the same examples."""
    fast = {"precision": "bf16", "channels_last": True}
    if name == "paper":
        return {"train": TrainConfig(epochs=150, batch_size=256, lr=0.1, weight_decay=1e-4,
                                     lr_schedule="cosine", **fast),
                "lr_scale_mw": 2.0, "train_subset": None, "test_subset": None, "holdout": None}
    if name == "cpu-full":
        if dataset != "cifar10":
            raise UsageError(f"preset cpu-full is for cifar10 (the cpu preset already trains "
                             f"{dataset} on its whole training set)")
        # 45 epochs, 1 warm-up, weight decay 5e-4: chosen for dense on the validation split
        # (results/cifar10-full-recipe/): 86.7% at 30 epochs (1e-4: 85.4%), 87.6% at 45, 87.7%
        # at 60 — saturated short of issue 16's 88% on this JPEG copy of CIFAR-10, so 45
        return {"train": TrainConfig(epochs=45, batch_size=128, lr=0.1, weight_decay=5e-4,
                                     warmup_epochs=1, **fast),
                "lr_scale_mw": 2.0, "train_subset": None, "test_subset": None,
                "holdout": VALIDATION}
    if name != "cpu":
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    # The paper doubles the learning rate of m ⊙ w models on BatchNorm ResNets; the BN-free MLPs
    # diverge with it, so they keep one learning rate for every method.
    if dataset in ("mnist", "fashion-mnist"):
        return {"train": TrainConfig(epochs=15, batch_size=128, lr=0.1),
                "lr_scale_mw": 1.0, "train_subset": None, "test_subset": None, "holdout": None}
    if dataset == "digits":
        return {"train": TrainConfig(epochs=60, batch_size=64, lr=0.1),
                "lr_scale_mw": 1.0, "train_subset": None, "test_subset": None, "holdout": None}
    # CIFAR-sized: ~0.2 s per ResNet-20 step at batch 128 on 2 cores, so 15 epochs on a fixed
    # class-balanced 10k subset take ~4 minutes; 2k test images keep the 30-level sweep short.
    return {"train": TrainConfig(epochs=15, batch_size=128, lr=0.1),
            "lr_scale_mw": 2.0, "train_subset": 10_000, "test_subset": 2_000, "holdout": None}


def load_data(dataset: str, p: dict, data_dir: str | None = None,
              validation: float | None = None) -> tuple[ImageData, ImageData]:
    """The (train, test) data of `dataset`, cut to the preset `p`'s subsets. With
    `validation` = f, the test set is never touched: (training set minus its last fraction f,
    that last fraction f) — the fixed validation split every hyperparameter is chosen on."""
    tr = load(dataset, "train", data_dir)
    if validation:
        tr, te = split_validation(tr, validation)
    else:
        if p.get("holdout"):
            tr = split_validation(tr, p["holdout"])[0]
        te = load(dataset, "test", data_dir)
    if p["train_subset"]:
        tr = tr.subset(p["train_subset"])
    if p["test_subset"]:
        te = te.subset(p["test_subset"])
    return tr, te


def train_size(dataset: str, p: dict, validation: float | None = None) -> int:
    """How many training images `load_data` gives from the standard copy of `dataset`, known
    without loading it: plans are checked before any data is loaded (and again with the real
    size where a copy differs)."""
    n = TRAIN_SIZES[dataset]
    cut = validation or p.get("holdout")
    if cut:
        n -= round(cut * n)
    return min(n, p["train_subset"] or n)


def split_validation(data: ImageData, fraction: float) -> tuple[ImageData, ImageData]:
    """(the first 1 − fraction of `data`, its last `fraction`, not augmented)."""
    n = len(data) - round(fraction * len(data))
    if not 0 < n < len(data):
        raise UsageError(f"a validation fraction of {fraction} leaves no training or no "
                         f"validation examples of {len(data)}")
    missing = sorted(set(data.y[:n].tolist()) - set(data.y[n:].tolist()))
    if missing:  # a class-sorted dataset: its last part would validate on a few classes only
        raise UsageError(f"the last {fraction:.0%} of the {data.name} training set holds no "
                         f"example of class(es) {missing}: the data is ordered by class; "
                         "store it shuffled (or interleaved by class) before validating on it")
    return (ImageData(data.name, data.x[:n], data.y[:n], data.mean, data.std, data.augment),
            ImageData(data.name, data.x[n:], data.y[n:], data.mean, data.std, False))


@dataclasses.dataclass
class DataConfig:
    """Options of every training experiment: what is trained, on which data, with which
    budget."""

    dataset: str = option("mnist", "dataset", choices=DATASETS)
    model: str = option("lenet_300_100", "model", choices=tuple(MODELS))
    preset: str = option("cpu", "training budget: cpu (minutes per run here) or paper "
                         "(SPEC §4.2, for a GPU)", choices=PRESETS)
    data_dir: str | None = option(None, "where the dataset files are (default: the search "
                                  "path of `mirrorprune doctor`)")
    precision: str | None = option(None, "fp32, or bf16 autocast (weights and optimizer state "
                                   "stay fp32); default: the preset's (bf16 for cpu-full and "
                                   "paper)", choices=tuple(PRECISIONS))
    channels_last: bool | None = option(None, "conv weights and inputs in NHWC memory format "
                                        "(faster CNNs on CPU and GPU); the cpu-full and paper "
                                        "presets set it")
    compile: bool | None = option(None, "torch.compile the model for training")
    weight_decay: float | None = option(None, "override the preset's weight decay (the same "
                                        "for every method; `tune --grid weight_decay=...` "
                                        "chooses it on the validation split)")

    def data_options(self) -> dict[str, Any]:
        """This config's `DataConfig` fields, to build another experiment's config that trains
        the same way (tune and targets run oneshot's runs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)}

    def budget(self, seed: int, epochs: int | None = None) -> TrainConfig:
        """The preset's training configuration for one seed, with `epochs` and the speed
        options given applied."""
        tcfg = dataclasses.asdict(preset(self.preset, self.dataset, self.model)["train"])
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        speed = {k: getattr(self, k) for k in ("precision", "channels_last", "compile",
                                               "weight_decay") if getattr(self, k) is not None}
        return TrainConfig(**{**tcfg, **speed, "seed": seed,
                              "epochs": tcfg["epochs"] if epochs is None else epochs})


@dataclasses.dataclass
class MethodsConfig(DataConfig):
    """Options of the experiments that compare methods (oneshot, targets)."""

    per_method: ClassVar[tuple[str, ...]] = ()  # options, besides these, that may differ

    parallel: int = option(1, "runs (method × seed) trained at once, each in a process of its "
                           "own: the CPU's threads are divided between them, a GPU is shared")
    methods: tuple[str, ...] = option(("dense", "pilot"),
                                      f"comma-separated, from: {','.join(METHODS)}")
    seeds: int = option(3, "seeds per method (0, 1, ...)")
    first_seed: int = option(0, "the first seed: seeds FIRST_SEED, ..., FIRST_SEED+SEEDS-1 (e.g. "
                             "to re-evaluate only the seeds whose trained models were kept)")
    hparams: dict[str, dict[str, Any]] = option({}, "method -> hyperparameter overrides "
                                                "(--hp METHOD.NAME=VALUE)", cli=False)
    epochs: int | None = option(None, "override the preset's epochs")
    bn_recalibrate: bool = option(False, "re-estimate BatchNorm statistics after pruning (off, "
                                  "as in the paper)")
    reuse: tuple[str, ...] = option((), "an earlier experiment's output folder: a run to be "
                                    "trained here whose configuration a finished run kept there "
                                    "with its model (final.pt) has is copied, not trained again",
                                    repeat=True)

    def validate(self) -> None:
        check_options(self.methods, self.hparams, self.seeds, self.epochs)
        if self.first_seed < 0:
            raise UsageError(f"--first-seed must be >= 0, got {self.first_seed}")
        check_parallel(self.parallel)
        preset(self.preset, self.dataset, self.model)
        missing = [d for d in self.reuse if not Path(d).is_dir()]
        if missing:
            raise UsageError(f"--reuse: no such folder: {', '.join(missing)}")

    def shared(self) -> dict[str, Any]:
        """The settings every method of one output folder must share."""
        per_method = ("methods", "seeds", "first_seed", "hparams", "data_dir", "parallel",
                      "reuse", *self.per_method)
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in per_method}

    def seed_list(self) -> range:
        return range(self.first_seed, self.first_seed + self.seeds)

    def recorded(self, m: str) -> dict[str, Any]:
        """What config.json keeps of method `m`'s runs (with per-method options added)."""
        return {"seeds": self.seeds, **({"first_seed": self.first_seed} if self.first_seed else {}),
                "hparams": self.hparams.get(m, {})}

    def train_config(self, seed: int) -> TrainConfig:
        """The preset's training configuration for one seed, with `epochs` applied."""
        return self.budget(seed, self.epochs)


def recorded_seeds(rec: dict[str, Any]) -> range:
    """The seeds of a method's runs as config.json records them (`recorded`)."""
    return range(rec.get("first_seed", 0), rec.get("first_seed", 0) + rec["seeds"])


def seeds_label(runs: Iterable[dict]) -> str:
    """'2 seed(s)', '2/3 seed(s)' (methods ran different counts), '2 seed(s) from seed 1'."""
    runs = list(runs)
    label = "/".join(map(str, sorted({r["seeds"] for r in runs}))) + " seed(s)"
    firsts = sorted({r.get("first_seed", 0) for r in runs})
    return label + (f" from seed {'/'.join(map(str, firsts))}" if firsts != [0] else "")


def results_title(cfg: Any, runs: Iterable[dict], train_size: int) -> str:
    """The first line of a results table and its plot's title: what was trained, on what, with
    how many seeds, and whether the models were evaluated after BatchNorm recalibration."""
    return (f"{cfg.dataset} {cfg.model}, preset {cfg.preset}, {seeds_label(runs)}, "
            f"{train_size} training images"
            + (", BatchNorm recalibrated after pruning" if cfg.bn_recalibrate else ""))


def check_out(out: Path) -> None:
    """UsageError unless `out` is, or can be created as, a folder we can write to (checked by
    creating and removing an unnamed file in the nearest existing folder: nothing is left)."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UsageError(f"--out {out} cannot be created: {p} is a file, not a folder; choose "
                         "another output folder")
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise UsageError(f"--out {out} cannot be written ({p}: {e.strerror or e}); choose a "
                         "folder you can write to") from None


def check_parallel(parallel: int) -> None:
    if parallel < 1:
        raise UsageError(f"--parallel must be >= 1, got {parallel}")
    if parallel > 1 and rank_world()[1] > 1:
        raise UsageError("--parallel runs processes of its own; under torchrun leave it at 1")


def check_options(methods: tuple[str, ...], hparams: dict[str, dict[str, Any]], seeds: int,
                  epochs: int | None) -> None:
    """The options every training experiment shares: known methods named once, hyperparameters
    only for those, at least one seed and epoch."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise UsageError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    dup = sorted({m for m in methods if methods.count(m) > 1})
    if dup:
        raise UsageError(f"--methods names {', '.join(dup)} more than once; give each method "
                         "once (use --seeds for repeated runs)")
    bad_hp = [m for m in hparams if m not in methods]
    if bad_hp:
        raise UsageError(f"hyperparameters given for method(s) {bad_hp} that are not run")
    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {seeds}")
    if epochs is not None and epochs < 1:
        raise UsageError(f"--epochs must be >= 1 (or left out for the preset's), got {epochs}")


def check_methods(methods: dict[str, Method], dataset: str, model: str, lr: float,
                  lr_scale_mw: float, data_dir: str | None) -> None:
    """Every method's selection (include/exclude) on the model, and its hyperparameters against
    the largest learning rate it will get; the dataset's files are located, not read."""
    locate(dataset, data_dir)  # raises DataNotFoundError, saying where it looked
    for method in methods.values():
        select_weights(create_model(model, 10, SHAPES[dataset]), method.include,
                       method.exclude)
        method.check_lr(lr * (lr_scale_mw if method.uses_mw else 1.0))


def make_methods(names: Iterable[str], hparams: dict[str, dict[str, Any]],
                 exclude: tuple[str, ...] = ()) -> dict[str, Method]:
    """Each named method with its hyperparameters (checked now: UsageError)."""
    return {m: create_method(m, exclude=exclude, **hparams.get(m, {})) for m in names}


def previous_config(out: Path, results: str, cfg: MethodsConfig, what: str
                    ) -> dict[str, Any] | None:
    """The config.json of an earlier invocation into `out` (None if there was none), with
    "methods": {name: {"seeds", "hparams", ...}}. Its shared settings (under `what`) must equal
    `cfg.shared()`: results of other settings are never mixed into one table (UsageError listing
    the differences). A setting the earlier version did not record yet had its default."""
    path = out / "config.json"
    if not path.exists():
        if (out / results).exists():
            raise UsageError(f"{out / results} exists without its config.json, so it cannot be "
                             "extended safely; use another output folder")
        return None
    try:
        prev = json.loads(path.read_text())
        saved = prev[what]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is unreadable; use another output folder") from None
    now = json.loads(json.dumps(cfg.shared(), default=str))
    saved = with_defaults(saved, type(cfg))
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise UsageError(f"{out} holds results made with other settings ({shown}); add methods "
                         "with the same settings, or use another output folder")
    if "methods" not in prev:  # written by release 0.1.0: one invocation's methods
        prev["methods"] = {m: {"seeds": saved.get("seeds"),
                               "hparams": saved.get("hparams", {}).get(m, {}),
                               **({"sparsities": saved["sparsities"]}
                                  if "sparsities" in saved else {})}
                           for m in saved.get("methods", ())}
    return prev


def merge_rows(out: Path, results: str, rows: list[dict], key: str, rerun: Iterable[str]
               ) -> list[dict]:
    """The rows of an earlier invocation's `results` CSV whose `key` is not among `rerun`,
    followed by `rows`: re-running some methods replaces their rows and keeps the others'."""
    path = out / results
    rerun = set(rerun)
    old = read_rows(path) if path.exists() else []
    return [r for r in old if r.get(key) not in rerun] + rows


def wall_times(run_dirs: Iterable[Path]) -> str:
    """One line per method: the training time of its runs, each the number of its epochs times
    their median time (each epoch with its test evaluation: a machine paused or shared for a
    while does not count), median and range in minutes. `run_dirs`: folders
    runs/METHOD/seedN. Empty if no run has a log."""
    minutes: dict[str, list[float]] = {}
    for d in sorted(run_dirs):
        log = d / "log.jsonl"
        if log.exists():
            secs = [json.loads(line)["seconds"] for line in log.read_text().splitlines()
                    if line.strip()]
            if secs:
                minutes.setdefault(d.parent.name, []).append(
                    len(secs) * statistics.median(secs) / 60)
    if not minutes:
        return ""
    def fmt(v: float) -> str:
        return f"{v:.1f}" if v < 10 else f"{v:.0f}"

    parts = [f"{m} {fmt(statistics.median(v))} min ({fmt(min(v))}–{fmt(max(v))}, "
             f"{len(v)} run{'s' * (len(v) != 1)})" for m, v in minutes.items()]
    return ("Training time per run (epochs × median epoch time, each epoch with its test "
            "evaluation; median and range over runs): " + "; ".join(parts) + ".")


def paired_differences(rows: list[dict], methods: tuple[str, ...], level: str,
                       levels: Iterable[float]) -> str:
    """Markdown table: each method's test accuracy minus the reference's (pilot where it ran,
    else the first method) at each of `levels` of the column `level`, paired by seed (a seed
    fixes the data order for every method), in points, mean ± 95% CI over the seeds both ran;
    ** marks a CI that excludes 0. Empty with fewer than two methods."""
    if len(methods) < 2:
        return ""
    ref = "pilot" if "pilot" in methods else methods[0]
    levels = list(levels)

    def acc(m: str, s: float) -> dict[int, float]:
        return {int(r["seed"]): float(r["accuracy"]) for r in rows
                if r["method"] == m and abs(float(r[level]) - s) < 1e-9}

    lines = [f"| method − {ref} | " + " | ".join(f"{s:.0%}" for s in levels) + " |",
             "|" + "---|" * (len(levels) + 1)]
    for m in methods:
        if m == ref:
            continue
        cells = []
        for s in levels:
            a, b = acc(m, s), acc(ref, s)
            diffs = [a[k] - b[k] for k in sorted(a.keys() & b.keys())]
            if not diffs:
                cells.append("–")
                continue
            mean, half = mean_ci(diffs)
            bold = "**" if not math.isnan(half) and abs(mean) > half else ""
            cells.append(f"{bold}{show(mean, half, sign=True)}{bold}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return ("Difference to " + ref + " (points), paired by seed, mean ± 95% CI; bold where "
            "the CI excludes 0.\n\n" + "\n".join(lines))


def ordered(rows: list[dict], key: str) -> tuple[str, ...]:
    """The values of `key` in order of first appearance."""
    return tuple(dict.fromkeys(r[key] for r in rows))


def plot_curves(curves: dict[str, list[tuple[float, float, float]]], path: Path, title: str,
                xlabel: str, ticks: tuple[float, ...]) -> None:
    """Accuracy against sparsity: one line per name through its (sparsity, mean, 95% CI
    half-width) points (accuracies in [0, 1]), with a band for the CI (clipped to 0–100%: with
    two seeds the t-interval is wide enough to leave the possible range), on a −log10(1 − s)
    axis that spreads out the high sparsities."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def pos(s: float) -> float:
        return -math.log10(1 - s + 1e-12)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, pts in curves.items():
        x = [pos(s) for s, _, _ in pts]
        y = [100 * m for _, m, _ in pts]
        h = [0.0 if math.isnan(c) else 100 * c for _, _, c in pts]
        line, = ax.plot(x, y, marker=".", label=name)
        ax.fill_between(x, [max(a - b, 0.0) for a, b in zip(y, h)],
                        [min(a + b, 100.0) for a, b in zip(y, h)], color=line.get_color(),
                        alpha=0.2)
    ax.set_xticks([pos(t) for t in ticks], [f"{t:.1%}" for t in ticks])
    ax.set(xlabel=xlabel, ylabel="test accuracy (%), mean ± 95% CI")
    ax.set_title(textwrap.fill(title, 80), fontsize=10)  # a long title is wrapped, not cut
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
