"""The embedded-default demo: an MLP on scikit-learn's digits, dense vs PILoT, pruned to 90/95%.

Both methods share the training loop, budget, seeds and data split; the dense model gets ordinary
weight decay, then one-shot global magnitude pruning (no fine-tuning for either method).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from tqdm import tqdm

from .. import schedules as S
from ..ci import mean_ci
from ..config import option
from ..data import load
from ..errors import UsageError
from ..methods import Method, PilotMethod
from ..models import mlp
from ..provenance import provenance
from ..prune import prune, sparsity_report
from ..train import TrainConfig, evaluate, train


@dataclass
class DemoConfig:
    sizes: tuple[int, ...] = option((64, 256, 256, 10), "MLP widths", cli=False)
    seeds: int = option(5, "number of seeds")
    sparsities: tuple[float, ...] = option((0.0, 0.9, 0.95, 0.98), "pruning levels", cli=False)
    epochs: int = option(60, "training epochs")
    strength: float = option(S.DEFAULT_STRENGTH, "PILoT's strength A (the default "
                             "schedule: A spread over flow time)")
    # the paper's α schedule instead: geometric α0·p^epoch (coupled)
    alpha0: float | None = option(None, "PILoT's α at epoch 0, decaying as 0.95^epoch (the "
                                  "paper's schedule) instead of --strength")
    p: float = option(0.95, "PILoT's geometric factor per epoch", cli=False)
    beta: float = option(1.0, "PILoT's β", cli=False)
    train: TrainConfig = option(TrainConfig(batch_size=64), "the rest of the training setup",
                                cli=False)


def run(cfg: DemoConfig | None = None, progress: bool = True) -> dict:
    """Train dense and PILoT models for each seed, prune each to every sparsity, evaluate."""
    cfg = cfg or DemoConfig()
    if cfg.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {cfg.seeds}")
    replace(cfg.train, epochs=cfg.epochs).validate()
    t0 = time.time()
    tr, te = load("digits", "train"), load("digits", "test")
    test_size = len(te)
    rows, report = [], None
    jobs = [(seed, name) for seed in range(cfg.seeds) for name in ("dense", "pilot")]
    for seed, name in tqdm(jobs, desc="demo", disable=not progress):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), *mlp(cfg.sizes))
        pilot_hp = ({"strength": cfg.strength} if cfg.alpha0 is None else
                    {"schedule": "geometric", "alpha": cfg.alpha0, "p": cfg.p})
        method = (PilotMethod(beta=cfg.beta, **pilot_hp) if name == "pilot"
                  else Method())
        train(model, method, tr, None,
              TrainConfig(**{**asdict(cfg.train), "seed": seed, "epochs": cfg.epochs}),
              progress=False)
        plain = method.export()
        for s in cfg.sparsities:
            pruned = prune(plain, s)
            rows.append({"method": name, "seed": seed, "sparsity": s,
                         "accuracy": evaluate(pruned, te)})
            if name == "pilot" and seed == 0 and s == max(cfg.sparsities):
                report = sparsity_report(pruned)
    summary = []
    for name in ("dense", "pilot"):
        for s in cfg.sparsities:
            accs = [r["accuracy"] for r in rows if r["method"] == name and r["sparsity"] == s]
            mean, half = mean_ci(accs)
            summary.append({"method": name, "sparsity": s, "accuracy_mean": mean,
                            "accuracy_ci95": half, "seeds": len(accs)})
    return {"provenance": provenance(), "config": asdict(cfg), "rows": rows,
            "summary": summary, "report": report, "test_size": test_size,
            "seconds": time.time() - t0}


def format_table(summary: list[dict]) -> str:
    lines = [f"{'method':<8}  {'sparsity':>8}  {'test accuracy (mean ± 95% CI)':>30}  seeds"]
    lines.append("-" * len(lines[0]))
    for r in summary:
        acc = f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_ci95']:.2f} %"
        lines.append(f"{r['method']:<8}  {r['sparsity']:>8.0%}  {acc:>30}  {r['seeds']:>5}")
    return "\n".join(lines)


CONFIG = DemoConfig  # the command line's options (cli.py)
