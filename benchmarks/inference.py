"""CPU inference latency of dense vs `mp.export_sparse` models, and the crossover that sets
`mirrorprune.sparse.MIN_SPARSITY`.

Models: LeNet-300-100, a wide MLP (4096-4096-4096-10) and ResNet-20, pruned globally by
magnitude to 90/95/98% (random weights: latency does not depend on their values), at batch 1
and 64, with each thread count in --threads (default: torch's). Dense and sparse calls are
interleaved and the median of each is reported, with the speedup = dense / sparse. The
crossover part times one 4096x4096 and one 300x784 layer at sparsities 50..99% (first thread
count).

    python benchmarks/inference.py --threads 2,1 --out benchmarks/results/inference
"""

from __future__ import annotations

import argparse
import functools
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import mirrorprune as mp
from mirrorprune.allocator import keep_large_blocks
from mirrorprune.files import write_json, write_text
from mirrorprune.models import lenet_300_100, mlp, resnet18, resnet20, vgg16_bn
from mirrorprune.provenance import provenance
from mirrorprune.sparse import SparseLinear, gather_product, median_seconds
from mirrorprune.sparse_conv import SparseConv2d

MODELS = {
    "lenet_300_100": (lambda: lenet_300_100(10, 784), (1, 28, 28)),
    "mlp_4096": (lambda: mlp((4096, 4096, 4096, 10)), (4096,)),
    "resnet20": (lambda: resnet20(10), (3, 32, 32)),
    "resnet18": (lambda: resnet18(10), (3, 32, 32)),
    "vgg16_bn": (lambda: vgg16_bn(10), (3, 32, 32)),
}


@torch.inference_mode()
def latency(*fns: Callable, x: object, rounds: int, reps: int | None = None
            ) -> tuple[float, ...]:
    """Median seconds per call f(x) of each function, interleaved (`median_seconds`; reps None:
    enough calls for ~20 ms a round)."""
    calls = [functools.partial(f, x) for f in fns]
    with torch.inference_mode():
        return median_seconds(*calls, rounds=rounds, reps=reps, round_seconds=0.02, warmup=3)


@torch.inference_mode()
def kernel_table(batches: tuple[int, ...], rounds: int) -> list[dict]:
    """torch's CSR product vs `gather_product` on one layer's W @ xᵀ: the rule behind
    `mirrorprune.sparse.GATHER_MIN_BATCH`."""
    out = []
    for n_out, n_in in ((300, 784), (1024, 1024), (4096, 4096)):
        for s in (0.8, 0.95, 0.98):
            torch.manual_seed(0)
            w = torch.randn(n_out, n_in)
            csr = SparseLinear(w * (torch.rand_like(w) >= s)).weight
            by_csr = functools.partial(torch.sparse.mm, csr)
            by_gather = functools.partial(gather_product, csr)
            for bs in batches:
                xt = torch.randn(n_in, bs)
                t_csr, t_gather = latency(by_csr, by_gather, x=xt, rounds=rounds)
                out.append({"layer": f"{n_out}x{n_in}", "sparsity": s, "batch": bs,
                            "csr_over_gather": t_csr / t_gather})
                print(f"kernel {n_out}x{n_in} {s:.0%} batch {bs:3d}: CSR / gather "
                      f"{t_csr / t_gather:5.2f}", flush=True)
    return out


def file_sizes(name: str, sparsity: float, dense: nn.Module) -> dict:
    """Bytes of torch.save(state_dict) and of save_sparse for one pruned model."""
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(dense.state_dict(), Path(tmp) / "dense.pt")
        return {"model": name, "sparsity": sparsity,
                "dense_bytes": (Path(tmp) / "dense.pt").stat().st_size,
                "sparse_bytes": mp.save_sparse(dense, Path(tmp) / "m.safetensors")}


def size_table(sizes: list[dict]) -> list[str]:
    return ["| model | sparsity | torch.save | save_sparse | ratio |", "|---|---|---|---|---|",
            *(f"| {z['model']} | {z['sparsity']:.0%} | {z['dense_bytes'] / 1e6:.2f} MB | "
              f"{z['sparse_bytes'] / 1e6:.3f} MB | {z['dense_bytes'] / z['sparse_bytes']:.1f}x |"
              for z in sizes)]


def write_sizes(a: argparse.Namespace) -> None:
    sizes = []
    for name in a.models.split(","):
        factory, _ = MODELS[name]
        torch.manual_seed(0)
        base = factory().eval()
        sizes += [file_sizes(name, s, mp.prune(base, s))
                  for s in (float(v) for v in a.sparsities.split(","))]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "file_sizes.json", {"meta": {"args": vars(a), "provenance": provenance()},
                                         "file_sizes": sizes})
    table = "\n".join(size_table(sizes))
    write_text(out / "file_sizes.md", "File sizes of pruned models (seed 0): "
               "`python benchmarks/inference.py --sizes-only`; save_sparse writes "
               f"safetensors (format version {mp.sparse.VERSION}).\n\n{table}\n")
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sparsities", default="0.9,0.95,0.98")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--threads", default=str(torch.get_num_threads()))
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--out", default="benchmarks/results/inference")
    ap.add_argument("--models-only", action="store_true",
                    help="only the model table (no layer crossover or kernel tables)")
    ap.add_argument("--sizes-only", action="store_true",
                    help="only the file-size table (file_sizes.md / .json), no timing")
    a = ap.parse_args()
    # large activations reused, not page-faulted in on every call: for dense and sparse alike
    keep_large_blocks()
    if a.sizes_only:
        return write_sizes(a)
    rows, cross, sizes = [], [], []
    thread_counts = [int(v) for v in a.threads.split(",")]
    batches = [int(v) for v in a.batches.split(",")]
    for name in a.models.split(","):
        factory, shape = MODELS[name]
        torch.manual_seed(0)
        base = factory().eval()
        for s in (float(v) for v in a.sparsities.split(",")):
            dense = mp.prune(base, s)
            fast = mp.export_dense_fast(dense)  # BatchNorm folded + channels_last
            sizes.append(file_sizes(name, s, dense))
            for threads, bs in itertools.product(thread_counts, batches):
                torch.set_num_threads(threads)
                x = torch.randn(bs, *shape)
                # each layer timed dense and sparse on this input (convolutions only with it)
                sparse = mp.export_sparse(dense, min_sparsity=0.0, example_input=x)
                n_sparse = sum(isinstance(m, (mp.SparseLinear, SparseConv2d))
                               for m in sparse.modules())
                err = (sparse(x) - dense(x)).abs().max().item()
                td, ts, tf = latency(dense, sparse, fast, x=x, rounds=a.rounds)
                row = {"model": name, "sparsity": s, "threads": threads, "batch": bs,
                       "dense_ms": 1e3 * td, "sparse_ms": 1e3 * ts, "speedup": td / ts,
                       "best_dense_ms": 1e3 * tf, "best_dense_speedup": td / tf,
                       "sparse_over_best_dense": tf / ts,
                       "sparse_layers": n_sparse, "max_abs_diff": err}
                rows.append(row)
                print(f"{name:14s} {s:.0%} {threads} thr batch {bs:3d}: dense {1e3 * td:8.3f} "
                      f"ms  sparse {1e3 * ts:8.3f} ms  speedup {td / ts:5.2f}x  best dense "
                      f"{1e3 * tf:8.3f} ms ({td / tf:4.2f}x; sparse {tf / ts:4.2f}x of it)  "
                      f"(max |diff| {err:.1e})",
                      flush=True)
    torch.set_num_threads(thread_counts[0])
    for n_out, n_in in ((4096, 4096), (300, 784)) if not a.models_only else ():
        for s in (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99):
            torch.manual_seed(0)
            layer_model = mp.prune(nn.Sequential(nn.Linear(n_in, n_out)), s)
            sparse = mp.export_sparse(layer_model, min_sparsity=0.0)
            for bs in batches:
                x = torch.randn(bs, n_in)
                td, ts = latency(layer_model, sparse, x=x, rounds=a.rounds)
                cross.append({"layer": f"{n_out}x{n_in}", "sparsity": s, "batch": bs,
                              "speedup": td / ts})
                print(f"layer {n_out}x{n_in} {s:.0%} batch {bs:3d}: speedup {td / ts:5.2f}x",
                      flush=True)
    kernels = [] if a.models_only else kernel_table(batches=(1, 4, 8, 16, 32, 64, 256),
                                                    rounds=a.rounds)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(a), "torch": torch.__version__, "provenance": provenance()}
    write_json(out / "inference.json", {"meta": meta, "rows": rows, "crossover": cross,
                                        "kernels": kernels, "file_sizes": sizes})
    lines = ["| model | sparsity | threads | batch | dense ms | sparse ms | speedup | best dense "
             "ms (BN folded, channels_last) | best dense speedup | sparse / best dense |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['sparsity']:.0%} | {r['threads']} | {r['batch']} | "
              f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{r['best_dense_ms']:.3f} | {r['best_dense_speedup']:.2f}x | "
              f"{r['sparse_over_best_dense']:.2f}x |" for r in rows]
    if not a.models_only:
        lines += ["", "| layer | batch | " + " | ".join(
            f"{s:.0%}" for s in sorted({c['sparsity'] for c in cross})) + " |",
            "|---|---|" + "---|" * len({c["sparsity"] for c in cross})]
        for layer in dict.fromkeys(c["layer"] for c in cross):
            for bs in dict.fromkeys(c["batch"] for c in cross):
                cells = [f"{c['speedup']:.2f}x" for c in cross
                         if c["layer"] == layer and c["batch"] == bs]
                lines.append(f"| {layer} | {bs} | " + " | ".join(cells) + " |")
        kb = list(dict.fromkeys(k["batch"] for k in kernels))
        lines += ["", "CSR product time / gather time (> 1: the gather kernel is faster):", "",
                  "| layer | sparsity | " + " | ".join(f"batch {b}" for b in kb) + " |",
                  "|---|---|" + "---|" * len(kb)]
        for key in dict.fromkeys((k["layer"], k["sparsity"]) for k in kernels):
            cells = [f"{k['csr_over_gather']:.2f}" for k in kernels
                     if (k["layer"], k["sparsity"]) == key]
            lines.append(f"| {key[0]} | {key[1]:.0%} | " + " | ".join(cells) + " |")
    lines += ["", *size_table(sizes)]
    write_text(
        out / "inference.md",
        f"CPU latency, torch {torch.__version__}; `python benchmarks/inference.py "
        f"--models {a.models} --sparsities {a.sparsities} --threads {a.threads} --rounds "
        f"{a.rounds}{' --models-only' if a.models_only else ''}` (median of interleaved "
        f"rounds; glibc keeps large blocks, `mirrorprune.allocator`; crossover "
        f"table with {thread_counts[0]} threads).\n\n"
        + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
