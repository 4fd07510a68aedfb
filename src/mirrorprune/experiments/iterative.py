"""Iterative pruning (paper Fig. 3): IMP and LRR, each with x = x or with m ⊙ w + PILoT.

Cycle 0 trains the full model; after every cycle the weights are pruned globally by magnitude
to 1 − keep^(cycle+1) and the next cycle retrains with the learning-rate (and α) schedule
restarted:
- IMP rewinds the surviving weights to their values at initialization (rewind_epoch = 0) or at
  the end of epoch `rewind_epoch` of cycle 0;
- LRR keeps the trained surviving weights.
With PILoT, how m and w are carried across a prune: a pruned weight becomes m = w = 0, the saddle
where both the loss gradient (∂/∂m = g·w, ∂/∂w = g·m) and the decay 2α·(m, w) vanish, so it stays
pruned (the masks are re-applied after every step anyway). IMP rewinds the surviving (m, w) to
their stored values; LRR re-balances each survivor to m² − w² = β with m ⊙ w unchanged, i.e. it
starts a fresh PILoT run from the trained weights (SPEC §2.2 allows pretrained x0).

Layout: OUT/VARIANT/seedN/cycleNN/ holds each cycle's training run (checkpoint, logs) and
OUT/VARIANT/seedN/state.pt the driver's state, both written atomically, so an interrupted run
resumes at the cycle and epoch where it stopped. Every invocation rewrites OUT/iterative.csv and
OUT/iterative.png from all variants present in OUT.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import schedules as S
from ..callbacks import Callback, FixedMasks, Rewind, StartFrom
from ..ci import mean_ci
from ..config import option
from ..data import ImageData
from ..distributed import is_main
from ..errors import UsageError
from ..files import load_torch, save_torch, write_json, write_rows
from ..methods import Method, PilotMethod
from ..models import create_model
from ..provenance import provenance
from ..prune import prune, sparsity_report, unique_weights
from ..train import train
from .common import DataConfig, check_methods, check_out, load_data, plot_curves, preset


@dataclass
class IterativeConfig(DataConfig):
    mode: str = option("imp", "imp (rewind the weights) or lrr (rewind only the learning rate)",
                       choices=("imp", "lrr"), required=True)
    pilot: bool = option(False, "train m ⊙ w with PILoT every cycle")
    cycles: int = option(18, "pruning cycles (18: 0.8^18 = 1.8% of the weights left)")
    keep: float = option(0.8, "fraction of the weights kept per cycle")
    rewind_epoch: int = option(0, "IMP: rewind to the end of this epoch of cycle 0 (0: "
                               "initialization)")
    epochs: int = option(8, "epochs per cycle")
    seeds: int = option(1, "seeds (0, 1, ...)")
    strength: float = option(S.DEFAULT_STRENGTH, "PILoT's strength A in each cycle")
    alpha: float | None = option(None, "PILoT's α (the paper's 1e-4) with a geometric decay to "
                                 "1% in each cycle, instead of --strength")
    beta: float = option(1.0, "PILoT's β (m0² − w0²)")

    @property
    def variant(self) -> str:
        return self.mode + ("+pilot" if self.pilot else "")

    def validate(self) -> None:
        if self.mode not in ("imp", "lrr"):
            raise UsageError(f"mode must be imp or lrr, got {self.mode!r}")
        if not 0 < self.keep < 1 or self.cycles < 1 or self.epochs < 1 or self.seeds < 1:
            raise UsageError(f"need 0 < --keep < 1 and --cycles, --epochs, --seeds >= 1; got "
                             f"keep {self.keep}, cycles {self.cycles}, epochs {self.epochs}, "
                             f"seeds {self.seeds}")
        if not 0 <= self.rewind_epoch <= self.epochs:
            raise UsageError(f"rewind_epoch must be in [0, epochs={self.epochs}]")
        if self.mode == "lrr" and self.rewind_epoch:
            raise UsageError("rewind_epoch applies to IMP only (LRR keeps the trained weights)")
        preset(self.preset, self.dataset, self.model)


def _method(cfg: IterativeConfig) -> Method:
    if not cfg.pilot:
        return Method()
    if cfg.alpha is None:
        return PilotMethod(strength=cfg.strength, beta=cfg.beta)
    return PilotMethod(schedule="geometric", alpha=cfg.alpha, beta=cfg.beta)


def _seed_config(config: dict) -> dict:
    """A seed's run does not depend on the seed count: more seeds can join a finished run."""
    return {k: v for k, v in config.items() if k != "seeds"}


def _read_state(path: Path, cfg: IterativeConfig) -> dict | None:
    """The driver state of one seed (None if there is none yet); UsageError, listing the
    differences, if it belongs to another configuration."""
    if not path.exists():
        return None
    state = load_torch(path, "mirrorprune iterative-pruning state")
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise UsageError(f"{path} is not an iterative-pruning state of mirrorprune; move it away")
    saved, now = _seed_config(state["config"]), _seed_config(asdict(cfg))
    diff = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k)}
    if diff:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
        raise UsageError(f"{path} belongs to another configuration ({shown}); use the same "
                         "options, or another --out")
    return state


def run_seed(cfg: IterativeConfig, seed: int, out: Path, progress: bool, tr: ImageData,
             te: ImageData) -> list[dict]:
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    tcfg = cfg.budget(seed, cfg.epochs)
    scale = p["lr_scale_mw"] if cfg.pilot else 1.0
    sdir = out / cfg.variant / f"seed{seed}"
    sdir.mkdir(parents=True, exist_ok=True)
    state_path = sdir / "state.pt"
    torch.manual_seed(seed)
    init = create_model(cfg.model, 10, tr.shape).state_dict()
    mine = _seed_config(asdict(cfg))
    state = _read_state(state_path, cfg) or {
        "config": mine, "done": 0, "rows": [], "masks": None, "start": copy.deepcopy(init),
        "start_wrapped": None, "rewind": None}
    for cycle in range(state["done"], cfg.cycles + 1):
        torch.manual_seed(seed)
        model = create_model(cfg.model, 10, tr.shape)
        model.load_state_dict(state["start"])
        method = _method(cfg)
        callbacks: list[Callback] = []
        if state["start_wrapped"] is not None:  # (m, w) to start from, not x
            callbacks.append(StartFrom(state["start_wrapped"]))
        if state["masks"] is not None:
            callbacks.append(FixedMasks(state["masks"]))
        rewind = (Rewind(cfg.rewind_epoch) if cycle == 0 and cfg.mode == "imp"
                  and cfg.rewind_epoch else None)
        history = train(model, method, tr, te, tcfg, sdir / f"cycle{cycle:02d}", resume=True,
                        progress=progress, lr_scale=scale,
                        callbacks=[*callbacks, *([rewind] if rewind else [])])
        plain = method.export()
        state["rows"].append({"variant": cfg.variant, "seed": seed, "cycle": cycle,
                              "sparsity": sparsity_report(plain).sparsity,
                              "accuracy": history[-1]["test_acc"]})
        if cycle < cfg.cycles:
            pruned = prune(plain, 1 - cfg.keep ** (cycle + 1))
            state["masks"] = {n: p.detach() != 0 for n, p in unique_weights(pruned).items()}
            if cfg.mode == "lrr":  # PILoT re-wraps x, i.e. re-balances m² − w² = β
                state["start"], state["start_wrapped"] = pruned.state_dict(), None
            else:
                if cycle == 0:  # the rewind point: None (init) or the end of rewind_epoch
                    state["rewind"] = rewind.snapshot if rewind else None
                if cfg.pilot:  # wrapping init gives (m0, w0) again; a snapshot holds (m, w)
                    state["start"], state["start_wrapped"] = init, state["rewind"]
                else:
                    state["start"], state["start_wrapped"] = state["rewind"] or init, None
        state["done"] = cycle + 1
        if is_main():
            save_torch(state, state_path)
    return state["rows"]


def collect(out: Path) -> list[dict]:
    """All rows of every variant and seed found in OUT."""
    rows = []
    for state_path in sorted(out.glob("*/seed*/state.pt")):
        rows += load_torch(state_path, "mirrorprune iterative-pruning state")["rows"]
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    curves = {}
    for variant in sorted({r["variant"] for r in rows}):
        pts = []
        for c in sorted({r["cycle"] for r in rows if r["variant"] == variant}):
            sel = [r for r in rows if r["variant"] == variant and r["cycle"] == c]
            pts.append((sum(r["sparsity"] for r in sel) / len(sel),
                        *mean_ci([r["accuracy"] for r in sel])))
        curves[variant] = pts
    plot_curves(curves, path, title, "sparsity after each cycle",
                (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99))


def run(cfg: IterativeConfig, out: str | Path, progress: bool = True) -> dict:
    """Run (or continue) every seed of `cfg`'s variant in `out`; iterative.csv/.png then show
    every variant and seed found in `out`."""
    cfg.validate()
    t0 = time.time()
    out = Path(out)
    # everything that can be checked before loading data or writing a file
    p = preset(cfg.preset, cfg.dataset, cfg.model)
    check_methods({cfg.variant: _method(cfg)}, cfg.dataset, cfg.model, p["train"].lr,
                  p["lr_scale_mw"], cfg.data_dir)
    check_out(out)
    for seed in range(cfg.seeds):
        _read_state(out / cfg.variant / f"seed{seed}" / "state.pt", cfg)
    for other in sorted(out.glob("*/seed*/state.pt")):  # the table reads them all
        load_torch(other, "mirrorprune iterative-pruning state")
    tr, te = load_data(cfg.dataset, p, cfg.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main():
        write_json(out / f"config-{cfg.variant}.json",
                   {"iterative": asdict(cfg), "provenance": provenance()})
    mine = []
    for seed in range(cfg.seeds):
        mine += run_seed(cfg, seed, out, progress, tr, te)
    if not is_main():  # under torchrun only rank 0 writes the results
        return {"rows": mine, "seconds": time.time() - t0}
    rows = collect(out)
    write_rows(out / "iterative.csv", rows)
    plot(rows, out / "iterative.png", f"{cfg.dataset} {cfg.model}: iterative pruning, keep "
         f"{cfg.keep:g} per cycle, {cfg.epochs} epochs per cycle")
    mine = [r for r in rows if r["variant"] == cfg.variant]
    return {"rows": mine, "seconds": time.time() - t0}


CONFIG = IterativeConfig  # the command line's options (cli.py)
