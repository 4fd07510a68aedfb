"""Micro-measurements behind README "Sparse export" (issue 17), one process, single thread
unless stated, medians; 2-core AMD EPYC (Zen 4) here.

    python benchmarks/sparse_conv_micro.py > benchmarks/results/sparse_conv_micro.txt

1. The blocked kernel's cost per (four-pixel strip, output channel) against nonzeros per row
   (a 16->16 3x3 layer at 32x32, batch 16, input in cache), fitted as a + b * nnz.
2. Per layer of a 95%-pruned ResNet-20 at batch 64: planes vs blocked kernel.
3. The whole network at batch 64 (2 threads): output buffers shared vs one per layer.
4. Batch 1: a stage-3 layer's module call (cached arguments / forced miss) vs its kernel alone,
   and the exported model vs the best dense one (2 threads, 100 calls x 15 rounds, 3 times).
5. Layers padded beyond the layouts' 1-pixel border (they copy their input into a wider one),
   a depthwise and a dilated layer vs their dense form (channels_last), 95% sparse, one
   thread; a 3x3 layer for reference.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch
from inference import latency  # benchmarks/inference.py: interleaved medians

import mirrorprune as mp
from mirrorprune import sparse_conv as sc
from mirrorprune.models import resnet20


def per_call(f, n: int) -> float:
    """Median seconds per call of f() over 5 rounds of n calls."""
    return latency(lambda _: f(), x=None, rounds=5, reps=n)[0]


def cost_model() -> None:
    rows = []
    for sp in (0.0, 0.5, 0.8, 0.9, 0.95):
        conv = torch.nn.Conv2d(16, 16, 3, 1, 1).eval()
        with torch.no_grad():
            conv.weight[torch.rand_like(conv.weight) < sp] = 0
        nnz = int((conv.weight != 0).sum()) / 16
        u = sc.SparseConv2d(conv, relu=True, reuse_output=True)
        x = sc.pad_planes(torch.randn(16, 16, 32, 32), True)
        dt = per_call(lambda u=u, x=x: u(x), 50)
        ns = dt / (32 * 8 * 16) * 1e9
        rows.append((nnz, ns))
        print(f"1. nnz/row {nnz:6.1f}: {dt * 1e6:7.1f} us, {16 * 1024 * 16 * nnz / dt / 1e9:5.1f}"
              f" G multiply-adds/s, {ns:6.1f} ns per (strip, output channel)")
    b, a = np.polyfit([r[0] for r in rows], [r[1] for r in rows], 1)
    print(f"1. fit: {a:.1f} ns + {b:.2f} ns per nonzero")


def layers(model) -> None:
    for name, conv, c, hw in (("stage 1", model.layers[1].conv2, 16, 32),
                              ("stage 2", model.layers[4].conv2, 32, 16),
                              ("stage 3", model.layers[7].conv2, 64, 8)):
        u = sc.SparseConv2d(conv, relu=True, reuse_output=True)
        t = {}
        for blocked in (False, True):
            x = sc.pad_planes(torch.randn(64, c, hw, hw), blocked)
            r = sc.pad_planes(torch.randn(64, c, hw, hw), blocked)
            t[blocked] = per_call(lambda u=u, x=x, r=r: u(x, r, sc.PAD), 10)
        print(f"2. {name}: planes {t[False] * 1e3:.3f} ms, blocked {t[True] * 1e3:.3f} ms, "
              f"{t[False] / t[True]:.2f}x")


def sharing(model) -> None:
    x = torch.randn(64, 3, 32, 32)
    sp = mp.export_sparse(model, example_input=x)
    units = [m for m in sp.modules() if isinstance(m, sc.SparseConv2d)]
    shared = [u.slot for u in units]
    t = {}
    for _ in range(3):
        for mode in ("shared", "per layer"):
            for i, u in enumerate(units):
                u.slot = shared[i] if mode == "shared" else 100 + i
            t.setdefault(mode, []).append(per_call(lambda: sp(x), 5))
    a, b = statistics.median(t["per layer"]), statistics.median(t["shared"])
    print(f"3. batch 64, 2 threads: {len(set(shared))} shared buffers {b * 1e3:.2f} ms, "
          f"one per layer ({len(units)}) {a * 1e3:.2f} ms, {a / b:.2f}x")


def batch1(model) -> None:
    torch.set_num_threads(1)
    sp = mp.export_sparse(model, example_input=torch.randn(1, 3, 32, 32))
    u = sp.get_submodule("sparse_layers_7_conv2")
    xs = [sc._zeros((1, 64, 10, 10)) for _ in range(2)]
    r = sc._zeros((1, 64, 10, 10))
    cached = per_call(lambda: u(xs[0], r, sc.PAD), 2000)
    flip = iter(range(10**9))
    missed = per_call(lambda: u(xs[next(flip) % 2], r, sc.PAD), 2000)
    call = sc._POOLS.calls[u][3]
    kernel = per_call(lambda: call[0](*call[2]), 2000)
    print(f"4. batch-1 stage-3 layer: module call {cached * 1e6:.1f} us cached, "
          f"{missed * 1e6:.1f} us uncached; its kernel alone {kernel * 1e6:.1f} us")
    torch.set_num_threads(2)
    best = mp.export_dense_fast(model)
    for k in range(3):
        a, b = latency(sp, best, x=torch.randn(1, 3, 32, 32), rounds=15, reps=100)
        print(f"4. batch 1, 2 threads, run {k + 1}: sparse {a * 1e3:.3f} ms, best dense "
              f"{b * 1e3:.3f} ms, {b / a:.2f}x")


def other_layers() -> None:
    for k, pad, c, hw, groups, dil in ((3, 1, 32, 16, 1, 1), (5, 2, 32, 16, 1, 1),
                                       (7, 3, 3, 32, 1, 1), (3, 1, 32, 16, 32, 1),
                                       (3, 2, 32, 16, 1, 2)):
        conv = torch.nn.Conv2d(c, 32, k, 1, pad, dilation=dil, groups=groups).eval()
        with torch.no_grad():
            conv.weight[torch.rand_like(conv.weight) < 0.95] = 0
        unit, dense = sc.SparseConv2d(conv, reuse_output=True), sc._dense_chain(conv, False)
        for batch in (1, 64):
            x = torch.randn(batch, c, hw, hw)
            a, b = latency(lambda v, u=unit: u(v[1]), lambda v, d=dense: d(v[0], None),
                           x=(x, sc.pad_planes(x)), rounds=7, reps=20)
            print(f"5. {k}x{k} padding {pad}, dilation {dil}, {c}->32 at {hw}x{hw}, groups "
                  f"{groups}, batch {batch}: sparse "
                  f"{a * 1e3:.3f} ms, dense {b * 1e3:.3f} ms, {b / a:.2f}x")


def main() -> None:
    torch.manual_seed(0)
    model = mp.prune(resnet20().eval(), 0.95)
    with torch.inference_mode():
        torch.set_num_threads(1)
        cost_model()
        layers(model)
        torch.set_num_threads(2)
        sharing(model)
        batch1(model)
        torch.set_num_threads(1)
        other_layers()


if __name__ == "__main__":
    main()
