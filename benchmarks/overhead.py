"""Training overhead of PILoT against dense training of the same model, in one process.

For each model, dense and PILoT steps (forward, backward, PILoT's decay, SGD-momentum update)
are timed in interleaved rounds, so machine noise hits both alike; the reported ratio is the
median over rounds of (PILoT round time / dense round time). Memory: the exact bytes of
parameters + gradients + optimizer state of each variant; the peak of all bytes torch holds
during one training step (the state at its start plus the running sum of the profiler's
allocations and frees, per op; CPU); and the peak resident memory a fresh process adds while
training (ru_maxrss, CPU; coarse, allocator-dependent) or torch.cuda.max_memory_allocated (GPU).

    python benchmarks/overhead.py --out benchmarks/results/overhead
"""

from __future__ import annotations

import argparse
import multiprocessing as mp_
import platform
import resource
import statistics
import time
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


def time_case(case: str, device: str, rounds: int, steps: int) -> dict:
    runs = {v: setup(case, v, device) for v in ("dense", "pilot")}
    for r in runs.values():  # warm-up (allocator, kernels, optimizer state)
        for _ in range(3):
            step(*r)
    _sync(device)
    times: dict[str, list[float]] = {"dense": [], "pilot": []}
    for i in range(rounds):
        order = ("dense", "pilot") if i % 2 == 0 else ("pilot", "dense")
        for v in order:
            t = time.perf_counter()
            for _ in range(steps):
                step(*runs[v])
            _sync(device)
            times[v].append((time.perf_counter() - t) / steps)
    ratios = [p / d for p, d in zip(times["pilot"], times["dense"])]
    copy = sum(mw.m.numel() * mw.m.element_size() for mw in runs["pilot"][2].weights)
    dense, pilot = (state_bytes(runs[v][0], runs[v][1]) for v in ("dense", "pilot"))
    if device == "cpu":
        dense["step_peak"], pilot["step_peak"] = (step_peak_bytes(*runs[v])
                                                  for v in ("dense", "pilot"))
    return {"case": case, "dense_ms": 1e3 * statistics.median(times["dense"]),
            "pilot_ms": 1e3 * statistics.median(times["pilot"]),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "reparametrized_bytes": copy,
            **{f"dense_{k}_bytes": v for k, v in dense.items()},
            **{f"pilot_{k}_bytes": v for k, v in pilot.items()},
            # extra memory of PILoT in copies of the reparametrized weights
            **{f"extra_{k}_copies": (pilot[k] - dense[k]) / copy for k in dense}}


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
    ap.add_argument("--steps", type=int, default=5, help="steps per timed round")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/overhead")
    a = ap.parse_args()
    rows = []
    for case in a.cases.split(","):
        row = time_case(case, a.device, a.rounds, a.steps)
        for v in ("dense", "pilot"):
            row[f"{v}_peak_bytes"] = peak_memory(case, v, a.device)
        rows.append(row)
        mib = {k: v / 2**20 for k, v in row.items() if k.endswith("bytes")}
        print(f"{case:18s} dense {row['dense_ms']:8.2f} ms  pilot {row['pilot_ms']:8.2f} ms  "
              f"ratio {row['ratio_median']:.3f} [{row['ratio_min']:.3f}, {row['ratio_max']:.3f}]"
              f"  extra copies of the wrapped weights ({mib['reparametrized_bytes']:.1f} MiB): "
              + ", ".join(f"{k} {row[f'extra_{k}_copies']:+.2f}"
                          for k in ("params", "grads", "optimizer", "step_peak")
                          if f"extra_{k}_copies" in row)
              + f"  peak +{mib['dense_peak_bytes']:.0f} / +{mib['pilot_peak_bytes']:.0f} MiB",
              flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(a), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "provenance": provenance()}
    write_json(out / "overhead.json", {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
