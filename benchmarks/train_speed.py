"""Speed of the training loop's precision and memory-format options, in one process.

One `mirrorprune.train.train_step` (the loop every experiment uses: inputs moved and laid out,
autocast forward and loss, backward, SGD with momentum) of the same model on the same batch in
fp32, bf16 autocast and bf16 + channels_last (and with --compile, compiled), timed in
interleaved rounds; the reported ratio is the median over rounds of (variant / fp32). The data
path: the time `ImageData.batches` takes to shuffle, crop, flip and normalize a CIFAR-sized
uint8 batch, as a fraction of (that + the fastest variant's step) — the share of an epoch spent
outside forward/backward/update.

    python benchmarks/train_speed.py --out benchmarks/results/train_speed
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from overhead import interleave  # noqa: E402

from mirrorprune.data import ImageData  # noqa: E402
from mirrorprune.files import write_json  # noqa: E402
from mirrorprune.methods import create_method  # noqa: E402
from mirrorprune.models import create_model  # noqa: E402
from mirrorprune.provenance import cpu_features, provenance  # noqa: E402
from mirrorprune.train import TrainConfig, setup, train_step  # noqa: E402

VARIANTS = {"fp32": {}, "bf16": {"precision": "bf16"},
            "bf16+channels_last": {"precision": "bf16", "channels_last": True}}
SHAPE = (3, 32, 32)


def make_run(model: str, method: str, batch: int, device: str, **speed):
    torch.manual_seed(0)
    net = create_model(model, 10, SHAPE)
    cfg = TrainConfig(epochs=1, batch_size=batch, lr=0.1, **speed)
    return setup(net, create_method(method), 50_000, "cifar10", cfg, None, False, 1.0, device,
                 ())


def data_seconds(batch: int, n_batches: int, device: str) -> float:
    """Seconds per augmented, normalized batch from uint8 CIFAR-sized images on `device`."""
    g = torch.Generator().manual_seed(0)
    data = ImageData("cifar10", torch.randint(0, 256, (50_000, *SHAPE), generator=g,
                                              dtype=torch.uint8),
                     torch.randint(0, 10, (50_000,), generator=g),
                     (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), augment=True).to(device)
    times = []
    for rep in range(3):
        it = data.batches(batch, shuffle=True, seed=rep)
        t = time.perf_counter()
        for _ in range(n_batches):
            x, y = next(it)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / n_batches)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--methods", default="dense,pilot")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--compile", action="store_true", help="add a compiled bf16 + cl variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/train_speed")
    a = ap.parse_args()
    variants = dict(VARIANTS)
    if a.compile:
        variants["bf16+channels_last+compile"] = {**VARIANTS["bf16+channels_last"],
                                                  "compile": True}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.batch, *SHAPE, generator=g)
    y = torch.randint(0, 10, (a.batch,), generator=g)
    rows = []
    for method in a.methods.split(","):
        runs = {v: make_run(a.model, method, a.batch, a.device, **kw) for v, kw in variants.items()}
        times = interleave({v: (lambda r=r: train_step(r, x, y, 0.05, 0)) for v, r in runs.items()},
                           a.rounds, a.steps, a.device)
        row = {"model": a.model, "method": method, "batch": a.batch}
        for v in variants:
            ratios = [t / f for t, f in zip(times[v], times["fp32"])]
            row[v] = {"ms": 1e3 * statistics.median(times[v]),
                      "ratio_to_fp32": statistics.median(ratios),
                      "ratio_min": min(ratios), "ratio_max": max(ratios)}
            print(f"{a.model} {method:6s} {v:28s} {row[v]['ms']:7.1f} ms/step, "
                  f"×{1 / row[v]['ratio_to_fp32']:.2f} faster than fp32 "
                  f"[{row[v]['ratio_min']:.2f}, {row[v]['ratio_max']:.2f}]", flush=True)
        rows.append(row)
    fastest = min(r[v]["ms"] for r in rows for v in variants if r["method"] == "dense")
    data_ms = 1e3 * data_seconds(a.batch, 50, a.device)
    share = data_ms / (data_ms + fastest)
    print(f"data path: {data_ms:.2f} ms per batch of {a.batch} = {share:.1%} of a step "
          "(fastest dense variant + data)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(a), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "cpu": cpu_features(),
            "provenance": provenance()}
    write_json(out / "train_speed.json", {"meta": meta, "rows": rows,
                                          "data_ms_per_batch": data_ms, "data_share": share})


if __name__ == "__main__":
    main()
