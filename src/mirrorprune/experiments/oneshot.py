"""One-shot pruning (paper Fig. 2): train each method, then prune globally by magnitude to
1 − 0.8^k (k = 1..25) and to 80/90/95/98/99%, and evaluate test accuracy.

Every (method, seed) run lives in OUT/runs/METHOD/seedN with its own checkpoint, logs,
final.pt (the trained model, exported plain: about the size of the model's weights) and
sweep.json, so an interrupted experiment resumes where it stopped and finished runs are reused;
a finished run kept without its (larger) checkpoint is evaluated again from final.pt.
BatchNorm statistics are not recalibrated after pruning unless asked (`bn_recalibrate`), as in
the paper.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..allocator import keep_large_blocks
from ..ci import mean_ci, show
from ..config import option
from ..data import ImageData
from ..distributed import is_main
from ..errors import UsageError, cli_warnings
from ..files import (
    load_torch,
    save_torch,
    write_json,
    write_results_json,
    write_rows,
    write_text,
)
from ..methods import Method, create_method
from ..models import create_model
from ..provenance import provenance
from ..prune import prune, sparsity_report
from ..train import (
    check_resume,
    evaluate,
    recalibrate_bn,
    recorded_config_matches,
    run_config,
    train,
)
from .common import (
    MethodsConfig,
    check_methods,
    check_out,
    load_data,
    make_methods,
    merge_rows,
    ordered,
    paired_differences,
    plot_curves,
    preset,
    previous_config,
    recorded_seeds,
    results_title,
    wall_times,
)

SWEEP = tuple(1 - 0.8**k for k in range(1, 26))
TABLE = (0.8, 0.9, 0.95, 0.98, 0.99)


@dataclass
class OneshotConfig(MethodsConfig):
    exclude: tuple[str, ...] = option((), "module names (globs) kept dense, e.g. conv1",
                                      repeat=True)


def run_one(cfg: OneshotConfig, method_name: str, seed: int, tr: ImageData, te: ImageData,
            out: Path, progress: bool, resume: bool = False,
            sparsities: tuple[float, ...] | None = None) -> list[dict]:
    """Train one (method, seed) (or reuse its finished run) and evaluate it at `sparsities`
    (default: the sweep 1 − 0.8^k and the table's 80/90/95/98/99%)."""
    levels = sorted(set(sparsities) if sparsities else set(SWEEP) | set(TABLE))
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    tcfg = cfg.train_config(seed)
    rundir = out / "runs" / method_name / f"seed{seed}"
    torch.manual_seed(seed)
    model = create_model(cfg.model, 10, tr.shape)
    method = create_method(method_name, exclude=cfg.exclude, **cfg.hparams.get(method_name, {}))
    scale = p["lr_scale_mw"] if method.uses_mw else 1.0
    sweep_file = rundir / "sweep.json"
    # the recalibration recipe is part of the key: results of an older recipe are recomputed
    key = {"bn_recalibrate": "train-augmentation" if cfg.bn_recalibrate else False,
           "test_size": len(te), "epochs": tcfg.epochs, "levels": levels,
           "hparams": json.loads(json.dumps(method.hp, default=str))}
    final = rundir / "final.pt"
    if not (rundir / "checkpoint.pt").exists() and (final.exists() or sweep_file.exists()):
        config = _run_config(cfg, method, seed)
        if not final.exists():
            return _kept_results(rundir, key, config, method, resume)
        plain, unpruned = _final_model(cfg, tr, rundir, config, method, resume)
    else:
        history = train(model, method, tr, te, tcfg, rundir, resume=resume,
                        progress=progress, lr_scale=scale)
        plain, unpruned = method.export(), history[-1]["test_acc"]
        # the trained model, small: what is kept (committed) to evaluate again; a finished
        # run reused keeps the file it wrote (its bytes would differ: a committed file churns)
        if is_main() and not final.exists():
            save_torch(plain.state_dict(), final)
    cached = _cached_rows(sweep_file, key, method)
    if cached is not None:
        return cached
    rows = []
    for s in levels:
        pruned = prune(plain, s, exclude=cfg.exclude)
        if cfg.bn_recalibrate:
            recalibrate_bn(pruned, tr)
        rows.append({"method": method_name, "seed": seed, "sparsity": s,
                     "actual_sparsity": sparsity_report(pruned, exclude=cfg.exclude).sparsity,
                     "accuracy": evaluate(pruned, te),
                     "unpruned_accuracy": unpruned})
    if is_main():
        write_json(sweep_file, {"key": key, "rows": rows})
    return rows


def _cached_rows(sweep_file: Path, key: dict, method: Method) -> list[dict] | None:
    """The rows in `sweep_file` if it exists and was evaluated as `key` says, else None (a
    hyperparameter added to the method since, at its default, changes nothing, nor does one
    that does not act: `Method.comparable`)."""
    if not sweep_file.exists():
        return None
    cached = json.loads(sweep_file.read_text())
    saved = cached.get("key", {})
    saved = {**saved, "hparams": method.comparable(saved.get("hparams", {}))}
    now = {**key, "hparams": method.comparable(key["hparams"])}
    return cached["rows"] if saved == now else None


def _final_model(cfg: OneshotConfig, tr: ImageData, rundir: Path, config: dict,
                 method: Method, resume: bool) -> tuple[torch.nn.Module, float]:
    """The trained model of a finished run kept as final.pt (without its checkpoint), and
    its unpruned test accuracy (the last row of its log)."""
    if not resume:
        raise UsageError(f"{rundir} holds a finished run: resume (--resume) to reuse it, or "
                         "choose another output folder")
    if not recorded_config_matches(rundir, config, method):
        raise UsageError(f"{rundir}/final.pt was trained with another configuration; use "
                         "another output folder")
    plain = create_model(cfg.model, 10, tr.shape)
    plain.load_state_dict(load_torch(rundir / "final.pt", "trained model (final.pt)"))
    if config["channels_last"]:  # as trained: the same convolution kernels evaluate it
        plain.to(memory_format=torch.channels_last)
    log = (rundir / "log.jsonl").read_text().splitlines()
    return plain, json.loads(log[-1])["test_acc"]


def _kept_results(rundir: Path, key: dict, config: dict, method: Method, resume: bool
                  ) -> list[dict]:
    """The rows of a finished run kept as its results (sweep.json, config.json and logs: what
    is committed) without its checkpoint. Nothing can be recomputed without the checkpoint, so
    anything but a resume of the same run and evaluation is refused, not trained over."""
    if not resume:
        raise UsageError(f"{rundir} holds a finished run's results: resume (--resume) to reuse "
                         "them, or choose another output folder")
    cached = _cached_rows(rundir / "sweep.json", key, method)
    if not recorded_config_matches(rundir, config, method):
        why = "it was trained with another configuration"
    elif cached is None:
        why = "it was evaluated otherwise (sparsities, test set or BatchNorm recalibration)"
    else:
        return cached
    raise UsageError(f"{rundir} holds a finished run's results without its checkpoint, and "
                     f"{why}: evaluating it again needs the checkpoint (or use another output "
                     "folder)")


Job = tuple[OneshotConfig, str, int, Path, "tuple[float, ...] | None"]


def run_many(jobs: list[Job], parallel: int, resume: bool, validation: float | None = None
             ) -> bool:
    """With parallel > 1, `run_one` for each (config, method, seed, out, sparsities),
    `parallel` at a time, each in a spawned process of its own with its share of the CPU's
    threads (a partial last round, a larger share; a GPU is shared); each writes only its own
    run folder. Returns the `resume` flag with which the caller then runs (or, after this,
    reads) the same runs in order. A worker's error (UsageError, non-finite loss, ...) is
    raised here. Runs found in a `reuse` folder are copied first (`adopt_runs`)."""
    resume = adopt_runs(jobs) or resume  # a copied run is read, as on resume
    if parallel <= 1:
        return resume
    total = torch.get_num_threads()
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, cfg, m, seed, out, resume, validation, sparsities,
                               threads) for (cfg, m, seed, out, sparsities), threads
                   in zip(jobs, job_threads(len(jobs), parallel, total))]
        for f in futures:
            f.result()
    return True  # the finished runs are read


def job_threads(n_jobs: int, parallel: int, total: int) -> list[int]:
    """Threads for each of `n_jobs` jobs run `parallel` at a time on `total` threads: an
    equal share, except in a partial last round (5 jobs, 2 at a time: the 5th runs alone)."""
    return [max(1, total // min(parallel, n_jobs - i // parallel * parallel))
            for i in range(n_jobs)]


def _worker(cfg: OneshotConfig, method: str, seed: int, out: Path, resume: bool,
            validation: float | None, sparsities: tuple[float, ...] | None,
            threads: int) -> None:
    keep_large_blocks()  # a fresh (spawned) process: glibc's defaults again
    cli_warnings("mirrorprune")  # a worker has no line of the user's to point at
    torch.set_num_threads(threads)
    tr, te = load_data(cfg.dataset, preset(cfg.preset, cfg.dataset, cfg.model), cfg.data_dir,
                       validation=validation)
    run_one(cfg, method, seed, tr, te, out, False, resume, sparsities)


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
        return show(r["accuracy"], r["ci95"])

    head = "| method | unpruned | " + " | ".join(f"{s:.0%}" for s in TABLE) + " |"
    lines = [head, "|" + "---|" * (len(TABLE) + 2)]
    for m in methods:
        un = [r["unpruned_accuracy"] for r in rows
              if r["method"] == m and r["sparsity"] == TABLE[0]]
        lines.append(f"| {m} | {show(*mean_ci(un))} | "
                     + " | ".join(cell(m, s) for s in TABLE) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], methods: tuple[str, ...], title: str, path: Path) -> None:
    curves = {m: [(r["sparsity"], r["accuracy"], r["ci95"]) for r in summary
                  if r["method"] == m and r["sparsity"] in SWEEP] for m in methods}
    plot_curves(curves, path, title, "sparsity (global magnitude pruning, no fine-tuning)",
                (0.2, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995))


def check_runs(cfg: OneshotConfig, out: Path, resume: bool) -> None:
    """Everything about a run that can be checked before data is loaded or a file written:
    hyperparameters, selection, data location, output folder, existing checkpoints."""
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    methods = make_methods(cfg.methods, cfg.hparams, cfg.exclude)
    check_methods(methods, cfg.dataset, cfg.model, p["train"].lr, p["lr_scale_mw"],
                  cfg.data_dir)
    check_out(out)
    for seed in cfg.seed_list():
        for name, method in methods.items():
            check_resume(out / "runs" / name / f"seed{seed}", _run_config(cfg, method, seed),
                         method, resume)


def _run_config(cfg: OneshotConfig, method: Method, seed: int) -> dict:
    """The configuration that `method`'s run of `seed` records (`train.run_config`)."""
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    scale = p["lr_scale_mw"] if method.uses_mw else 1.0
    return run_config(cfg.train_config(seed), method, scale, cfg.dataset, None)


def adopt_runs(jobs: list[Job]) -> bool:
    """Copy into each job's run folder that does not exist yet a finished run of the same
    configuration kept with its model under a folder its config names in `reuse` (say, a
    oneshot run that a targets table needs too): its final.pt, config.json and logs, and
    reused_from.txt naming it. The copy is evaluated, not trained. Whether any was copied."""
    copied = False
    for cfg, m, seed, out, _ in jobs:
        rundir = out / "runs" / m / f"seed{seed}"
        if not cfg.reuse or rundir.exists():
            continue
        method = create_method(m, exclude=cfg.exclude, **cfg.hparams.get(m, {}))
        config = _run_config(cfg, method, seed)
        found = next((d for src in cfg.reuse
                      for d in sorted(Path(src).glob(f"**/runs/{m}/seed{seed}"))
                      if (d / "final.pt").exists()
                      and recorded_config_matches(d, config, method)), None)
        if found is None:
            continue
        copied = True
        if is_main():  # one copy; the other ranks wait for it (below)
            rundir.mkdir(parents=True)
            for f in ("final.pt", "config.json", "log.csv", "log.jsonl"):
                if (found / f).exists():
                    shutil.copy2(found / f, rundir / f)
            write_text(rundir / "reused_from.txt", f"{found}\n")
    if copied and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return copied


def run(cfg: OneshotConfig, out: str | Path, progress: bool = True, resume: bool = False
        ) -> dict:
    """Train and sweep every (method, seed); with resume, existing runs are continued or reused
    (their configuration must match), otherwise an existing run is an error. Methods already
    in `out` from an earlier invocation (same shared settings) keep their rows unless re-run."""
    cfg.validate()
    t0 = time.time()
    out = Path(out)
    previous = previous_config(out, "oneshot.csv", cfg, "oneshot")
    check_runs(cfg, out, resume)
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    tr, te = load_data(cfg.dataset, p, cfg.data_dir)  # first: the workers find it decoded
    resume = run_many([(cfg, m, seed, out, None) for seed in cfg.seed_list()
                       for m in cfg.methods], cfg.parallel, resume)
    rows = []
    for seed in cfg.seed_list():
        for m in cfg.methods:
            rows += run_one(cfg, m, seed, tr, te, out, progress, resume)
    if not is_main():  # under torchrun only rank 0 writes the results
        return {"table": "", "summary": summarize(rows, cfg.methods),
                "seconds": time.time() - t0, "files": []}
    rows = merge_rows(out, "oneshot.csv", rows, "method", cfg.methods)
    methods = ordered(rows, "method")
    runs = {**(previous or {}).get("methods", {}),
            **{m: cfg.recorded(m) for m in cfg.methods}}
    write_results_json(out / "config.json", {
        "oneshot": cfg.shared(), "methods": {m: runs[m] for m in methods},
        "preset": {**p, "train": asdict(p["train"])}, "data_dir": cfg.data_dir,
        "train_size": len(tr), "test_size": len(te), "provenance": provenance()})
    summary = summarize(rows, methods)
    write_rows(out / "oneshot.csv", rows)
    title = results_title(cfg, (runs[m] for m in methods), len(tr))
    plot(summary, methods, title, out / "oneshot.png")
    table = markdown_table(rows, summary, methods)
    times = wall_times(out / "runs" / m / f"seed{s}" for m in methods
                       for s in recorded_seeds(runs[m]))
    diffs = paired_differences(rows, methods, "sparsity", TABLE)
    write_text(out / "oneshot.md", f"{title}\n\nTest accuracy (%), mean ± 95% CI over seeds.\n\n"
                                    f"{table}\n\n{diffs}\n\n{times}\n")
    return {"table": table, "summary": summary, "seconds": time.time() - t0,
            "files": ["oneshot.csv", "oneshot.png", "oneshot.md", "config.json", "runs/"]}


CONFIG = OneshotConfig  # the command line's options (cli.py)
