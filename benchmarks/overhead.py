"""Training overhead of PILoT against dense training of the same model, in one process.

For each model, dense steps (SGD with momentum), PILoT steps in the m ⊙ w form (forward,
backward, PILoT's decay, SGD-momentum update) and in the optimizer form (`mp.optim.PILoTSGD`,
same momentum) are timed in interleaved rounds, so machine noise hits all alike; the reported
ratio is the median over rounds of (variant round time / dense round time). Memory: the exact
bytes of parameters + gradients + optimizer state of each variant; the peak of all bytes torch holds
during one training step (the state at its start plus the running sum of the profiler's
allocations and frees, per op; CPU); and the peak resident memory a fresh process adds while
training (ru_maxrss, CPU; coarse, allocator-dependent) or torch.cuda.max_memory_allocated (GPU).

    python benchmarks/overhead.py --out benchmarks/results/overhead
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp_
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import mirrorprune as mp
from mirrorprune.files import write_json
from mirrorprune.models import lenet_300_100, resnet20
from mirrorprune.provenance import provenance


class Block(nn.Module):
    """One Transformer encoder block (d 256, 8 heads, ff 1024) with a linear read-out."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x).mean(1))


# name: (model factory, input shape); every case is 10-class classification
CASES = {
    "resnet20": (lambda: resnet20(10), (128, 3, 32, 32)),
    "lenet_300_100": (lambda: lenet_300_100(10, 784), (256, 1, 28, 28)),
    "transformer_block": (Block, (32, 128, 256)),
}


def setup(case: str, variant: str, device: str):
    """A model, optimizer, PILoT (or None) and a fixed batch for one (case, variant)."""
    factory, shape = CASES[case]
    torch.manual_seed(0)
    model = factory().to(device)
    pilot = None
    if variant == "pilot_opt":
        opt = mp.optim.PILoTSGD(mp.optim.param_groups(model, weight_decay=5e-4), lr=0.01,
                                momentum=0.9, strength=mp.schedules.Strength(0.5, horizon=10**6))
    else:
        if variant == "pilot":
            pilot = mp.PILoT(model, mp.schedules.Constant(1e-4))
            groups = pilot.param_groups(weight_decay=5e-4)
        else:
            groups = [{"params": list(model.parameters()), "weight_decay": 5e-4}]
        opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    x = torch.randn(shape, device=device)
    y = torch.randint(0, 10, (shape[0],), device=device)
    return model, opt, pilot, x, y


def step(model, opt, pilot, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    if pilot is not None:
        pilot.step()
    opt.step()


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state."""
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    return {"params": sum(size(p) for p in model.parameters()),
            "grads": sum(size(p.grad) for p in model.parameters() if p.grad is not None),
            "optimizer": sum(size(t) for st in opt.state.values() for t in st.values()
                             if isinstance(t, torch.Tensor))}


def step_peak_bytes(model, opt, pilot, x, y) -> int:
    """Peak of the bytes torch holds during one step (CPU), at op granularity: what is alive at
    its start (parameters and optimizer state; last step's gradients are freed first, as the
    step's zero_grad would, because the profiler cannot see frees of blocks allocated before it
    started) plus the highest running sum, in start-time order, of each profiler event's own
    allocations minus frees."""
    opt.zero_grad(set_to_none=True)
    start = sum(state_bytes(model, opt).values())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        step(model, opt, pilot, x, y)
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return start + peak


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


VARIANTS = ("dense", "pilot", "pilot_opt")


def interleave(fns: dict[str, Callable[[], object]], rounds: int, steps: int, device: str,
               warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each function, per round: after `warmup` calls each (allocator,
    kernels, optimizer state, compilation), `rounds` rounds of `steps` calls of every function,
    the order rotated each round so that machine noise hits all alike."""
    names = list(fns)
    for f in fns.values():
        for _ in range(warmup):
            f()
    _sync(device)
    times: dict[str, list[float]] = {v: [] for v in names}
    for i in range(rounds):
        for v in names[i % len(names):] + names[:i % len(names)]:
            t = time.perf_counter()
            for _ in range(steps):
                fns[v]()
            _sync(device)
            times[v].append((time.perf_counter() - t) / steps)
    return times


def time_case(case: str, device: str, rounds: int, steps: int,
              min_round: float = 0.1) -> dict:
    """Step times and memory of every variant of `case`. Rounds last at least `min_round`
    seconds (more steps per round for small models: a LeNet step of ~3 ms made 5-step rounds
    so noisy that the median ratio moved by ±0.03 between runs)."""
    runs = {v: setup(case, v, device) for v in VARIANTS}
    dense = runs["dense"]
    for _ in range(3):
        step(*dense)
    _sync(device)
    t = time.perf_counter()
    step(*dense)
    _sync(device)
    steps = max(steps, math.ceil(min_round / (time.perf_counter() - t)))
    times = interleave({v: (lambda r=r: step(*r)) for v, r in runs.items()}, rounds, steps,
                       device)
    weights = mp.optim.param_groups(runs["dense"][0])[0]["params"]  # the prunable weights
    copy = sum(p.numel() * p.element_size() for p in weights)
    state = {v: state_bytes(runs[v][0], runs[v][1]) for v in VARIANTS}
    if device == "cpu":
        for v in VARIANTS:
            state[v]["step_peak"] = step_peak_bytes(*runs[v])
    row = {"case": case, "reparametrized_bytes": copy, "steps_per_round": steps}
    for v in VARIANTS:
        ratios = [a / d for a, d in zip(times[v], times["dense"])]
        row[f"{v}_ms"] = 1e3 * statistics.median(times[v])
        if v != "dense":  # extra memory in copies of the prunable weights
            row.update({f"{v}_ratio_median": statistics.median(ratios),
                        f"{v}_ratio_min": min(ratios), f"{v}_ratio_max": max(ratios),
                        **{f"{v}_extra_{k}_copies": (state[v][k] - state["dense"][k]) / copy
                           for k in state["dense"]}})
        row.update({f"{v}_{k}_bytes": b for k, b in state[v].items()})
    return row


def _rss_peak() -> int:
    """This process's peak resident memory in bytes: VmHWM on Linux (ru_maxrss survives exec,
    so a spawned child would report its parent's peak), ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            line = next(ln for ln in f if ln.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak(case: str, variant: str, device: str, steps: int, q) -> None:
    r = setup(case, variant, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_peak()
    for _ in range(steps):
        step(*r)
    q.put(torch.cuda.max_memory_allocated() - base if device == "cuda" else _rss_peak() - base)


def peak_memory(case: str, variant: str, device: str, steps: int = 3) -> int:
    """Peak memory that training adds, measured in a fresh process (peaks never go down)."""
    ctx = mp_.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_peak, args=(case, variant, device, steps, q))
    p.start()
    out = q.get()
    p.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=5,
                    help="steps per timed round, at least (rounds last >= 0.1 s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/overhead")
    a = ap.parse_args()
    rows = []
    for case in a.cases.split(","):
        row = time_case(case, a.device, a.rounds, a.steps)
        for v in VARIANTS:
            row[f"{v}_peak_bytes"] = peak_memory(case, v, a.device)
        rows.append(row)
        for v in VARIANTS[1:]:
            extra = ", ".join(f"{k} {row[f'{v}_extra_{k}_copies']:+.2f}"
                              for k in ("params", "grads", "optimizer", "step_peak")
                              if f"{v}_extra_{k}_copies" in row)
            print(f"{case:18s} {v:9s} {row[f'{v}_ms']:8.2f} ms vs dense {row['dense_ms']:8.2f} "
                  f"ms: ratio {row[f'{v}_ratio_median']:.3f} [{row[f'{v}_ratio_min']:.3f}, "
                  f"{row[f'{v}_ratio_max']:.3f}]; extra copies of the prunable weights "
                  f"({row['reparametrized_bytes'] / 2**20:.1f} MiB): {extra}; peak +"
                  f"{row['dense_peak_bytes'] / 2**20:.0f} / +{row[f'{v}_peak_bytes'] / 2**20:.0f}"
                  " MiB", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(a), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "provenance": provenance()}
    write_json(out / "overhead.json", {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
