"""Command line: `mirrorprune SUBCOMMAND`; each subcommand maps to one experiment or tool."""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys

from .allocator import keep_large_blocks
from .config import add_arguments, from_args
from .errors import UsageError, cli_warnings
from .files import write_json


def _demo(args: argparse.Namespace) -> int:
    from .experiments import demo

    cfg = from_args(demo.DemoConfig, args)
    out = demo.run(cfg, progress=not args.quiet)
    print(f"\nMLP 64-256-256-10 on scikit-learn digits ({out['test_size']} test images), "
          f"one-shot global magnitude pruning, {cfg.epochs} epochs, seeds 0..{cfg.seeds - 1}, "
          "PILoT "
          + (f"strength A = {cfg.strength:g}" if cfg.alpha0 is None else
             f"alpha0={cfg.alpha0:g}"))
    print(demo.format_table(out["summary"]))
    print(f"\nPILoT model at {max(cfg.sparsities):.0%} (seed 0):")
    print(out["report"])
    print(f"\n{out['seconds']:.1f} s")
    if args.json:
        write_json(args.json, {**out, "report": out["report"].as_dicts()})
    return 0


def _diag(args: argparse.Namespace) -> int:
    from .experiments import diag

    cfg = from_args(diag.DiagConfig, args)
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
    plain strings (the method's Config checks them)."""
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


def _compare(args: argparse.Namespace) -> int:
    """oneshot, targets and tune: training runs in one output folder, with --hp."""
    from .experiments import oneshot, targets, tune

    module, cls = {"oneshot": (oneshot, oneshot.OneshotConfig),
                   "targets": (targets, targets.TargetsConfig),
                   "tune": (tune, tune.TuneConfig)}[args.command]
    hp = _parse_hparams(args.hp)
    extra: dict = {}
    if getattr(args, "hp_from", None) or getattr(args, "aim_from", None):
        on = (args.dataset or cls().dataset, args.model or cls().model,
              tuple((args.methods or ",".join(cls().methods)).split(",")))
        tuned = tune.hparams_from(args.hp_from, *on)  # explicit --hp wins over them
        hp = {m: {**tuned.get(m, {}), **hp.get(m, {})} for m in {*tuned, *hp}}
        if getattr(args, "aim_from", None):
            extra["aims"] = tune.aims_from(args.aim_from, *on)
    cfg = from_args(cls, args, hparams=hp, **extra)
    res = module.run(cfg, args.out, progress=not args.quiet, resume=args.resume)
    print(res["table"])
    print(f"wrote {args.out}/: {', '.join(res['files'])} ({res['seconds']:.0f} s)")
    return 0


def _iterative(args: argparse.Namespace) -> int:
    from .experiments import iterative

    cfg = from_args(iterative.IterativeConfig, args)
    res = iterative.run(cfg, args.out, progress=not args.quiet)
    last = max(r["cycle"] for r in res["rows"])
    accs = [r["accuracy"] for r in res["rows"] if r["cycle"] == last]
    sp = [r["sparsity"] for r in res["rows"] if r["cycle"] == last]
    print(f"{cfg.variant}: cycle {last}, sparsity {sum(sp) / len(sp):.2%}, test accuracy "
          f"{100 * sum(accs) / len(accs):.2f}% (mean of {len(accs)} seed(s)); wrote "
          f"{args.out}/iterative.csv, iterative.png ({res['seconds']:.0f} s)")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from .methods import methods_table

    print(methods_table(markdown=args.markdown))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """Lists what is installed and where datasets would be read from; it opens no data file
    (so a crafted file in a folder it looks at cannot do anything)."""
    import platform

    import torch

    from . import __version__, data
    from .provenance import cpu_features, git_commit

    print(f"mirrorprune {__version__} (commit {git_commit() or 'unknown'}), Python "
          f"{platform.python_version()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CUDA: {torch.cuda.is_available() and torch.cuda.get_device_name(0) or 'no GPU'}")
    print(f"CPU: {cpu_features()}")
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
    """The subcommands; each experiment's options are generated from its config dataclass
    (defaults and help written once, in `mirrorprune.experiments`)."""
    from . import __version__
    from .experiments import demo, diag, iterative, oneshot, targets, tune

    p = argparse.ArgumentParser(prog="mirrorprune", description=__doc__)
    p.add_argument("--version", action="version", version=f"mirrorprune {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands = [("demo", _demo, demo), ("diag", _diag, diag), ("oneshot", _compare, oneshot),
                ("iterative", _iterative, iterative), ("targets", _compare, targets),
                ("tune", _compare, tune)]
    for name, func, module in commands:
        cls = module.CONFIG
        # the help line is the first paragraph of the experiment's docstring
        text = " ".join(module.__doc__.split("\n\n")[0].split())
        c = sub.add_parser(name, help=text.replace("%", "%%"))
        add_arguments(c, cls)
        if name == "demo":
            c.add_argument("--json", metavar="FILE", help="also write all results as JSON")
        else:
            c.add_argument("--out", required=True, help="output folder")
        if name in ("oneshot", "targets", "tune"):
            c.add_argument("--hp", action="append", default=[], metavar="METHOD.NAME=VALUE",
                           help="method hyperparameter, e.g. pilot.strength=2 (repeatable; "
                           "`mirrorprune methods` lists them)")
            c.add_argument("--resume", action="store_true",
                           help="continue interrupted runs in --out and reuse finished ones")
        if name in ("oneshot", "targets"):
            c.add_argument("--hp-from", action="append", default=[], metavar="TUNE.JSON",
                           help="the values chosen by `mirrorprune tune` (repeatable; --hp "
                           "wins over them)")
        if name == "targets":
            c.add_argument("--aim-from", action="append", default=[], metavar="TUNE.JSON",
                           help="aim the method of a `mirrorprune tune` at each target by the "
                           "value best on validation at that sparsity (its --levels must "
                           "include the targets; repeatable; --hp wins over it)")
        c.add_argument("--quiet", action="store_true", help="no progress bars")
        c.set_defaults(func=func)

    m = sub.add_parser("methods", help="list every method with its hyperparameters")
    m.add_argument("--markdown", action="store_true", help="as the README's Markdown table")
    m.set_defaults(func=_methods)
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
    keep_large_blocks()
    cli_warnings(f"mirrorprune {args.command}")
    if args.func in (_compare, _iterative):
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
