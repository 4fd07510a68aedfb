"""Command line: `mirrorprune SUBCOMMAND`; each subcommand maps to one experiment or tool."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace


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
        with open(args.json, "w") as f:
            json.dump({**out, "report": out["report"].as_dicts()}, f, indent=1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mirrorprune", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="dense vs PILoT MLP on bundled digits, pruned to 90-98%%")
    d.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    d.add_argument("--epochs", type=int, default=60, help="training epochs (default 60)")
    d.add_argument("--alpha0", type=float, default=3e-3,
                   help="PILoT's alpha at epoch 0, decaying as 0.95^epoch (default 3e-3)")
    d.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
