"""Command line: `mirrorprune SUBCOMMAND`; each subcommand maps to one experiment or tool."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from dataclasses import replace

from .errors import UsageError
from .files import write_json


def _demo(args: argparse.Namespace) -> int:
    from .experiments import demo

    cfg = demo.DemoConfig()
    cfg = replace(cfg, seeds=args.seeds, alpha0=args.alpha0,
                  train=replace(cfg.train, epochs=args.epochs))
    out = demo.run(cfg, progress=not args.quiet)
    print("\nMLP 64-256-256-10 on scikit-learn digits (360 test images), one-shot global "
          f"magnitude pruning, {cfg.train.epochs} epochs, seeds 0..{cfg.seeds - 1}, "
          f"PILoT alpha0={cfg.alpha0:g}")
    print(demo.format_table(out["summary"]))
    print(f"\nPILoT model at {max(cfg.sparsities):.0%} (seed 0):")
    print(out["report"])
    print(f"\n{out['seconds']:.1f} s")
    if args.json:
        write_json(args.json, {**out, "report": out["report"].as_dicts()})
    return 0


def _diag(args: argparse.Namespace) -> int:
    from .experiments import diag

    cfg = diag.DiagConfig(n=args.n, d=args.d, k=args.k, inits=args.inits, seed=args.seed,
                          steps=args.steps, lr=args.lr, sgd_batch=args.sgd_batch,
                          l1_step=args.l1_step, records=args.records)
    cfg.validate()
    result = diag.run(cfg, args.out, progress=not args.quiet)
    for meth, best in result["methods"].items():
        print(f"{meth:<12} best {best['best_schedule']:<12} final ‖x − x*‖ = "
              f"{best['final_error']:.3e} ({100 * best['relative_error']:.3f}% of ‖x*‖)")
    print(f"wrote {args.out}/results.json, trajectories.csv, {', '.join(result['figures'])}")
    print(json.dumps(diag.headline(result)))
    return 0


def _parse_hparams(items: list[str]) -> dict[str, dict]:
    """["pilot.alpha=1e-3", ...] -> {"pilot": {"alpha": 0.001}}; values are Python literals or
    plain strings."""
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot:
            raise UsageError(f"--hp expects METHOD.NAME=VALUE (e.g. pilot.alpha=1e-3), "
                             f"got {item!r}")
        if name in out.get(method, {}):
            raise UsageError(f"--hp sets {key} twice; give each hyperparameter once")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(method, {})[name] = parsed
    return out


def _oneshot(args: argparse.Namespace) -> int:
    from .experiments import oneshot

    cfg = oneshot.OneshotConfig(
        dataset=args.dataset, model=args.model, methods=tuple(args.methods.split(",")),
        seeds=args.seeds, preset=args.preset, hparams=_parse_hparams(args.hp),
        epochs=args.epochs, exclude=tuple(args.exclude), bn_recalibrate=args.bn_recalibrate,
        data_dir=args.data_dir)
    res = oneshot.run(cfg, args.out, progress=not args.quiet, resume=args.resume)
    print(res["table"])
    print(f"wrote {args.out}/: {', '.join(res['files'])} and runs/ ({res['seconds']:.0f} s)")
    return 0


def _iterative(args: argparse.Namespace) -> int:
    from .experiments import iterative

    cfg = iterative.IterativeConfig(
        mode=args.mode, pilot=args.pilot, dataset=args.dataset, model=args.model,
        cycles=args.cycles, keep=args.keep, rewind_epoch=args.rewind_epoch, epochs=args.epochs,
        seeds=args.seeds, preset=args.preset, alpha=args.alpha, data_dir=args.data_dir)
    res = iterative.run(cfg, args.out, progress=not args.quiet)
    last = max(r["cycle"] for r in res["rows"])
    accs = [r["accuracy"] for r in res["rows"] if r["cycle"] == last]
    sp = [r["sparsity"] for r in res["rows"] if r["cycle"] == last]
    print(f"{cfg.variant}: cycle {last}, sparsity {sum(sp) / len(sp):.2%}, test accuracy "
          f"{100 * sum(accs) / len(accs):.2f}% (mean of {len(accs)} seed(s)); wrote "
          f"{args.out}/iterative.csv, iterative.png ({res['seconds']:.0f} s)")
    return 0


def _targets(args: argparse.Namespace) -> int:
    from .experiments import targets

    try:
        sparsities = tuple(float(s) for s in args.sparsities.split(","))
    except ValueError:
        raise UsageError(f"--sparsities expects numbers like 0.8,0.9, got {args.sparsities!r}"
                         ) from None
    cfg = targets.TargetsConfig(
        dataset=args.dataset, model=args.model, methods=tuple(args.methods.split(",")),
        sparsities=sparsities, seeds=args.seeds, preset=args.preset,
        hparams=_parse_hparams(args.hp), epochs=args.epochs, bn_recalibrate=args.bn_recalibrate,
        data_dir=args.data_dir)
    res = targets.run(cfg, args.out, progress=not args.quiet, resume=args.resume)
    print(res["table"])
    print(f"wrote {args.out}/targets.csv, targets.md, config.json ({res['seconds']:.0f} s)")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """Lists what is installed and where datasets would be read from; it opens no data file
    (so a crafted file in a folder it looks at cannot do anything)."""
    import platform

    import torch

    from . import __version__, data
    from .provenance import git_commit

    print(f"mirrorprune {__version__} (commit {git_commit() or 'unknown'}), Python "
          f"{platform.python_version()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CUDA: {torch.cuda.is_available() and torch.cuda.get_device_name(0) or 'no GPU'}")
    try:
        print(f"data search path: {', '.join(str(d) for d in data.search_dirs(args.data_dir))}")
    except UsageError as e:
        print(f"data search path: {e}")
    for name in data.DATASETS:
        try:
            path = data.locate(name, args.data_dir)
        except UsageError as e:
            print(f"  {name:<14} NOT AVAILABLE: {e}")
            continue
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        size = sum(f.stat().st_size for f in files if f.is_file())
        print(f"  {name:<14} found: {path} ({len(files)} file(s), {size / 1e6:.1f} MB; not "
              "opened)")
    cache = os.environ.get("MIRRORPRUNE_CACHE", "~/.cache/mirrorprune")
    print(f"decoded-data cache: {cache}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="mirrorprune", description=__doc__)
    p.add_argument("--version", action="version", version=f"mirrorprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="dense vs PILoT MLP on bundled digits, pruned to 90-98%%")
    d.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    d.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    d.add_argument("--alpha0", type=float, default=3e-3,
                   help="PILoT's alpha at epoch 0, decaying as 0.95^epoch (default 3e-3)")
    d.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)

    g = sub.add_parser("diag", help="diagonal linear network experiment (paper Fig. 1, 4, 5)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--n", type=int, default=100, help="dimensions (default 100)")
    g.add_argument("--d", type=int, default=40, help="samples, d < n (default 40)")
    g.add_argument("--k", type=int, default=5, help="nonzeros of the ground truth (default 5)")
    g.add_argument("--inits", type=int, default=5, help="initializations (default 5)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, default=50_000, help="gradient steps (default 50000)")
    g.add_argument("--lr", type=float, default=0.02, help="step size η (default 0.02)")
    g.add_argument("--sgd-batch", type=int, default=None, metavar="B",
                   help="SGD with B samples per step and 5 seeds per init (writes fig5.png)")
    g.add_argument("--l1-step", choices=("prox", "subgradient"), default="prox",
                   help="discretization of the L1 baselines (default prox: soft-thresholding)")
    g.add_argument("--records", type=int, default=200,
                   help="log-spaced points kept per trajectory in trajectories.csv (default 200)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=_diag)

    from .data import DATASETS
    from .methods import METHODS
    from .models import MODELS

    o = sub.add_parser("oneshot", help="one-shot pruning sweep of several methods (paper Fig. 2)")
    o.add_argument("--dataset", choices=DATASETS, default="mnist")
    o.add_argument("--model", choices=list(MODELS), default="lenet_300_100")
    o.add_argument("--methods", default="dense,pilot",
                   help=f"comma-separated, from: {','.join(METHODS)}")
    o.add_argument("--seeds", type=int, default=3)
    o.add_argument("--preset", choices=("cpu", "paper"), default="cpu",
                   help="training budget: cpu (minutes per run) or paper (SPEC §4.2, GPU)")
    o.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    o.add_argument("--hp", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="method hyperparameter, e.g. pilot.alpha=1e-3 (repeatable)")
    o.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="module names kept dense (repeatable), e.g. conv1")
    o.add_argument("--bn-recalibrate", action="store_true",
                   help="re-estimate BatchNorm statistics after pruning (off, as in the paper)")
    o.add_argument("--data-dir", default=None, help="where the dataset files are")
    o.add_argument("--out", required=True, help="output folder")
    o.add_argument("--resume", action="store_true",
                   help="continue interrupted runs in --out and reuse finished ones")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    o.set_defaults(func=_oneshot)

    it = sub.add_parser("iterative", help="IMP / LRR with or without PILoT (paper Fig. 3)")
    it.add_argument("--mode", choices=("imp", "lrr"), required=True)
    it.add_argument("--pilot", action="store_true", help="train m ⊙ w with PILoT every cycle")
    it.add_argument("--dataset", choices=DATASETS, default="mnist")
    it.add_argument("--model", choices=list(MODELS), default="lenet_300_100")
    it.add_argument("--cycles", type=int, default=18, help="pruning cycles (default 18: 98.2%%)")
    it.add_argument("--keep", type=float, default=0.8, help="fraction kept per cycle")
    it.add_argument("--rewind-epoch", type=int, default=0,
                    help="IMP: rewind to the end of this epoch of cycle 0 (0: initialization)")
    it.add_argument("--epochs", type=int, default=8, help="epochs per cycle (default 8)")
    it.add_argument("--seeds", type=int, default=1)
    it.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    it.add_argument("--alpha", type=float, default=1e-4, help="PILoT alpha (default 1e-4)")
    it.add_argument("--data-dir", default=None)
    it.add_argument("--out", required=True, help="output folder; interrupted runs resume")
    it.add_argument("--quiet", action="store_true")
    it.set_defaults(func=_iterative)

    t = sub.add_parser("targets", help="train each method aimed at fixed target sparsities")
    t.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    t.add_argument("--methods", default="pilot,spred,str,gmp")
    t.add_argument("--dataset", choices=DATASETS, default="mnist")
    t.add_argument("--model", choices=list(MODELS), default="lenet_300_100")
    t.add_argument("--seeds", type=int, default=3)
    t.add_argument("--preset", choices=("cpu", "paper"), default="cpu")
    t.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    t.add_argument("--hp", action="append", default=[], metavar="METHOD.NAME=VALUE",
                   help="override a method's hyperparameter for every target")
    t.add_argument("--bn-recalibrate", action="store_true",
                   help="re-estimate BatchNorm statistics after pruning (default: off, as in the "
                        "paper)")
    t.add_argument("--data-dir", default=None)
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_targets)

    dr = sub.add_parser("doctor", help="report the torch build, threads, GPU and which datasets "
                        "are found")
    dr.add_argument("--data-dir", default=None)
    dr.set_defaults(func=_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns its exit status. A user error (a bad option, a missing or
    unreadable file) prints one paragraph, the problem and the fix, on stderr and returns 2; a
    run stopped by non-finite numbers returns 1; Ctrl-C returns 130. No tracebacks for those."""
    args = build_parser().parse_args(argv)
    if args.func in (_oneshot, _targets, _iterative):
        from .train import init_distributed

        if init_distributed()[0] != 0:  # a no-op unless launched by torchrun
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - only rank 0 reports
    try:
        return args.func(args)
    except UsageError as e:
        print(f"mirrorprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"mirrorprune {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mirrorprune {args.command}: interrupted; finished epochs are checkpointed: "
              "rerun the same command (with --resume for oneshot and targets) to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
