"""mirrorprune's sparse export against DeepSparse 1.8, the CPU sparse-inference runtime (end of
life 2025; community licence: evaluation only, so it is never a dependency of mirrorprune),
on the same pruned models, same machine, same thread count.

Each model is pruned globally by magnitude (random weights, seed 0: latency does not depend
on their values) and exported to ONNX (opset 13, torch's TorchScript-based exporter). Every
measurement runs in a fresh process — mirrorprune's `export_sparse(model, example_input=x)`
and its best dense model (BatchNorm folded, channels_last) in this Python, DeepSparse in its
own venv — alternating between the two, and the median over --processes processes of each
process's median latency is reported. DeepSparse threads are pinned
(NM_BIND_THREADS_TO_CORES=1); the torch processes raise glibc's allocation thresholds
(`mirrorprune.allocator`).

Set-up (once; this project's venv also needs `pip install onnx` for the export), then run:

    python3.11 -m venv .peer-venv
    .peer-venv/bin/pip install --only-binary=:all: deepsparse==1.8.0
    python benchmarks/peer.py --peer-python .peer-venv/bin/python \
        --out benchmarks/results/peer
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"resnet20": (3, 32, 32), "lenet_300_100": (1, 28, 28), "vgg16_bn": (3, 32, 32),
          "resnet18": (3, 32, 32)}


def _time(fn, rounds: int, min_seconds: float = 0.02) -> float:
    """Median ms per call over `rounds` rounds of enough calls for ~min_seconds. Not
    `mirrorprune.sparse.median_seconds`: this also runs in DeepSparse's venv, which has neither
    torch nor mirrorprune, and both sides must be timed by the same rule."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    fn()
    reps = max(1, min(200, int(min_seconds / max(time.perf_counter() - t, 1e-6))))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return 1e3 * statistics.median(times)


def worker_torch(state: str, model: str, batch: int, threads: int, rounds: int) -> dict:
    import torch

    import mirrorprune as mp
    from mirrorprune.allocator import keep_large_blocks
    from mirrorprune.models import create_model

    keep_large_blocks()
    torch.set_num_threads(threads)
    net = create_model(model, 10, SHAPES[model]).eval()
    net.load_state_dict(torch.load(state, weights_only=True))
    x = torch.randn(batch, *SHAPES[model])
    sparse = mp.export_sparse(net, example_input=x)
    best = mp.export_dense_fast(net)
    with torch.inference_mode():
        return {"mirrorprune_ms": _time(lambda: sparse(x), rounds),
                "best_dense_ms": _time(lambda: best(x), rounds)}


def worker_deepsparse(onnx: str, model: str, batch: int, threads: int, rounds: int) -> dict:
    import numpy as np
    from deepsparse import compile_model

    engine = compile_model(onnx, batch_size=batch, num_cores=threads)
    x = [np.random.rand(batch, *SHAPES[model]).astype(np.float32)]
    return {"deepsparse_ms": _time(lambda: engine.run(x), rounds)}


def prepare(model: str, sparsity: float, folder: Path) -> tuple[Path, Path]:
    """The pruned model's state dict and its ONNX export (batch axis dynamic)."""
    import torch

    import mirrorprune as mp
    from mirrorprune.models import create_model

    torch.manual_seed(0)
    net = mp.prune(create_model(model, 10, SHAPES[model]).eval(), sparsity)
    state, onnx = folder / f"{model}.pt", folder / f"{model}.onnx"
    torch.save(net.state_dict(), state)
    torch.onnx.export(net, torch.randn(1, *SHAPES[model]), onnx, opset_version=13,
                      dynamo=False, input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return state, onnx


def run_worker(python: str, kind: str, path: Path, model: str, batch: int, threads: int,
               rounds: int) -> dict:
    env = {**os.environ, "NM_BIND_THREADS_TO_CORES": "1"}
    out = subprocess.run([python, __file__, "--worker", kind, str(path), model, str(batch),
                          str(threads), str(rounds)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, path, model, batch, threads, rounds = sys.argv[2:8]
        fn = worker_torch if kind == "torch" else worker_deepsparse
        print(json.dumps(fn(path, model, int(batch), int(threads), int(rounds))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer-python", default=".peer-venv/bin/python",
                    help="python of a venv with deepsparse==1.8.0")
    ap.add_argument("--models", default="resnet20,lenet_300_100")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--batches", default="64,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="benchmarks/results/peer")
    a = ap.parse_args()
    if not Path(a.peer_python).exists():
        sys.exit(f"peer.py: {a.peer_python} not found: create the DeepSparse venv first "
                 "(see the instructions at the top of benchmarks/peer.py)")
    from mirrorprune.files import write_json, write_text
    from mirrorprune.provenance import provenance

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in a.models.split(","):
            state, onnx = prepare(model, a.sparsity, Path(tmp))
            for batch in (int(b) for b in a.batches.split(",")):
                runs: dict[str, list[float]] = {}
                for _ in range(a.processes):
                    for r in (run_worker(sys.executable, "torch", state, model, batch,
                                         a.threads, a.rounds),
                              run_worker(a.peer_python, "deepsparse", onnx, model, batch,
                                         a.threads, a.rounds)):
                        for k, v in r.items():
                            runs.setdefault(k, []).append(v)
                row = {"model": model, "sparsity": a.sparsity, "batch": batch,
                       "threads": a.threads, **{k: statistics.median(v) for k, v in
                                                runs.items()}, "per_process": runs}
                row["deepsparse_over_mirrorprune"] = (row["deepsparse_ms"]
                                                      / row["mirrorprune_ms"])
                rows.append(row)
                print(f"{model} {a.sparsity:.0%} batch {batch:3d}, {a.threads} threads: "
                      f"mirrorprune {row['mirrorprune_ms']:.3f} ms, DeepSparse "
                      f"{row['deepsparse_ms']:.3f} ms, best dense {row['best_dense_ms']:.3f}"
                      f" ms", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "peer.json", {"meta": {"args": vars(a), "provenance": provenance()},
                                   "rows": rows})
    lines = ["| model | sparsity | batch | threads | mirrorprune ms | DeepSparse 1.8 ms | "
             "best dense ms | mirrorprune speed / DeepSparse |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['sparsity']:.0%} | {r['batch']} | {r['threads']} | "
              f"{r['mirrorprune_ms']:.3f} | {r['deepsparse_ms']:.3f} | {r['best_dense_ms']:.3f} "
              f"| {r['deepsparse_over_mirrorprune']:.2f}x |" for r in rows]
    write_text(out / "peer.md", f"`python benchmarks/peer.py --models {a.models} --sparsity "
               f"{a.sparsity} --batches {a.batches} --threads {a.threads} --processes "
               f"{a.processes}` (median over processes of per-process medians)\n\n"
               + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
