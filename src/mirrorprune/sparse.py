"""Sparse export that pays off: Linear layers computing with a CSR weight, and compressed
checkpoints (bitmask + non-zero values) that round-trip exactly.

Which layers become sparse is a measured rule: on CPU the sparse product beats the dense one
only once the weight is sparse enough — for a 4096x4096 layer from 80% at batch 1 (from 60% at
batch 64), below that dense wins (benchmarks/results/inference) — and, for small layers at
small batches, hardly ever; `export_sparse(..., example_input=x)` therefore times each candidate
layer on its real input and keeps the faster form. Convolutions have their own kernel, in
`sparse_conv` (numba), used the same way.

The kernel: a sparse layer computes yᵀ = W xᵀ. From `GATHER_MIN_BATCH` rows on it sums, for
each output, the rows of xᵀ that it needs, weighted — vectorized over the batch: with numba
(float32, CPU inference) a kernel that fuses the bias and runs four nonzeros per pass, else
`gather_product` (`embedding_bag` over the CSR arrays), 1.6-5x faster than torch's CSR product
at batch 32-256; below that it calls the CSR product (`torch.sparse.mm`), faster there on most
layers. All need xᵀ contiguous: that transpose is the one overhead, so inside an nn.Sequential
a sparse layer feeding another Linear layer (through elementwise modules only) hands over its
output untransposed (a dense Linear multiplies it without a copy).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError, warn_user
from .files import atomic_write, load_torch
from .reparam import default_types, find_mirror_weights, safe_deepcopy, weight_names

# Measured on 2 CPU cores (benchmarks/results/inference): sparse pays from about this sparsity on.
MIN_SPARSITY = 0.8
# Convolutions: candidates from this sparsity on, each timed on the example input (the sparse
# kernel wins on ResNet-20's 79%-sparse first stage already; benchmarks/results/inference).
CONV_MIN_SPARSITY = 0.25
# Batch from which `gather_product` beats torch's CSR product (benchmarks/results/inference,
# kernel table: 300x784, 1024x1024 and 4096x4096 layers at 80-98% sparsity).
GATHER_MIN_BATCH = 16
# Multiply-adds below which the numba Linear kernel runs on one thread: waking numba's pool
# costs more than it saves on small layers (LeNet-300-100 at 95%, batch 64, 2 threads: 120 µs
# end to end on one thread, 142 µs with its 755k-multiply-add first layer on two).
LINEAR_SERIAL_WORK = 2_000_000
# Dtypes of torch's CPU CSR product; other dtypes (bfloat16, float16) use the gather kernel
# (embedding_bag) at every batch size.
CSR_DTYPES = (torch.float32, torch.float64)
# Modules whose fused inference path (eval mode, no grad) reads their Linear children's weights
# as dense tensors: those children stay dense.
_FUSED_OWNERS = (nn.TransformerEncoderLayer, nn.MultiheadAttention)
# Modules that apply elementwise and keep their input's memory layout: a transposed activation
# passes through them unchanged (torch preserves strides of dense tensors in unary ops).
_LAYOUT_KEEPING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                   nn.ELU, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Dropout, nn.Identity)


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W held as a CSR tensor (the same outputs as the nn.Linear it replaces,
    up to float summation order).

    `transposed_output=True` returns y as a transposed (non-contiguous) view — what the next
    SparseLinear wants as input; `export_sparse` sets it only where it knows the consumer.
    """

    transposed_output: bool = False
    # from batch GATHER_MIN_BATCH: "gather" (`gather_product`) or "numba" (the numba kernel,
    # float32 CPU inference; falls back to gather elsewhere). export_sparse times both on the
    # example input: numba won on LeNet-300-100 (2x), gather on 4096-wide layers (2.6x, the
    # inputs no longer fit the cache and embedding_bag prefetches)
    kernel: str = "gather"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseLinear needs a 2-d weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        with warnings.catch_warnings():  # "CSR support is in beta": it is what we rely on
            warnings.simplefilter("ignore", UserWarning)
            csr = weight.detach().to_sparse_csr()
        self.register_buffer("weight", csr)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> SparseLinear:
        return cls(layer.weight, layer.bias)

    def __getstate__(self) -> dict:
        # the numba kernel's cached arrays are rebuilt on first use (and hold a module)
        return {k: v for k, v in super().__getstate__().items() if k != "_kernel_args"}

    def __deepcopy__(self, memo: dict) -> SparseLinear:
        # torch cannot deep-copy CSR tensors ("Cannot access storage of SparseCsrTensorImpl")
        new = SparseLinear(self.weight.to_dense(), self.bias)
        new.transposed_output, new.kernel = self.transposed_output, self.kernel
        memo[id(self)] = new
        return new.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        kernel = None
        if (self.kernel == "numba" and x2.shape[0] >= GATHER_MIN_BATCH
                and x2.dtype is torch.float32 and x2.is_cpu
                and not (x2.requires_grad and torch.is_grad_enabled())):
            kernel = self._kernel()
        if kernel is not None:
            y = self._numba_product(x2, kernel)
        else:
            # xᵀ contiguous (free when x is a transposed output of the previous SparseLinear)
            xt = x2.t().contiguous()
            if xt.shape[1] >= GATHER_MIN_BATCH or self.weight.dtype not in CSR_DTYPES:
                y = gather_product(self.weight, xt)
            else:
                y = torch.sparse.mm(self.weight, xt)
            if self.bias is not None:
                y = y.add_(self.bias.unsqueeze(1))  # y is fresh: in place is safe
            y = y.t() if self.transposed_output else y.t().contiguous()
        return y.reshape(*x.shape[:-1], self.out_features)

    def _kernel(self) -> tuple | None:
        """(the numba kernel module, W's CSR arrays and the bias as numpy arrays) for a float32
        CPU weight with numba installed, else None; made once per weight (`.to()` etc. make
        a new one)."""
        cached = self.__dict__.get("_kernel_args")
        if cached is None or cached[0] is not self.weight:
            from . import sparse_conv

            w = self.weight
            args = None
            if sparse_conv.available() and w.dtype == torch.float32 and w.device.type == "cpu":
                b = torch.zeros(self.out_features) if self.bias is None else self.bias
                args = (sparse_conv, w.crow_indices().numpy(), w.col_indices().numpy(),
                        w.values().numpy(), b.detach().float().numpy())
            cached = self._kernel_args = (w, args)
        return cached[1]

    def _numba_product(self, x: torch.Tensor, kernel: tuple) -> torch.Tensor:
        """x Wᵀ + b with the numba kernel (float32 CPU inference, batch >= GATHER_MIN_BATCH):
        on xᵀ, each nonzero one multiply-add over a row of the batch, the bias fused. The
        transposes in and out are numpy's (half of torch's time here) and skipped where the
        output feeds another Linear layer (`transposed_output`). On LeNet-300-100's 784→300
        layer at 96.9% sparsity and batch 64: 2x faster than `gather_product` (issue 17);
        2.6x slower on 4096x4096 layers."""
        sc, indptr, col, val, bias = kernel
        n = x.shape[0]
        xt = np.ascontiguousarray(x.detach().numpy().T)  # no copy if x is transposed already
        out = np.empty((self.out_features, n), np.float32)
        sc.run_kernel(sc._k.sparse_linear, sc._k.sparse_linear_parallel,
                      (indptr, col, val, bias, xt.reshape(-1), out.reshape(-1), n, 0,
                       self.out_features),
                      len(val) * n, lambda threads: -(-self.out_features // (4 * threads)),
                      LINEAR_SERIAL_WORK)
        return torch.from_numpy(out.T if self.transposed_output else np.ascontiguousarray(out.T))

    def extra_repr(self) -> str:
        nnz = self.weight.values().numel()
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, "
                f"sparsity={1 - nnz / (self.in_features * self.out_features):.3f}"
                + (", transposed_output=True" if self.transposed_output else ""))


def gather_product(csr: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """W @ xᵀ for a CSR W and a contiguous xᵀ: output row i = Σ_k values[k] · xᵀ[col[k]] over
    row i's CSR segment, each term a whole row of xᵀ (vectorized over the batch)."""
    return F.embedding_bag(csr.col_indices(), xt, csr.crow_indices(), mode="sum",
                           per_sample_weights=csr.values(), include_last_offset=True)


@dataclass
class ExportDecision:
    """What `export_sparse` did with one prunable weight, and why."""

    name: str
    shape: tuple[int, ...]
    sparsity: float
    sparse: bool
    reason: str


class ExportReport(list):
    """The `ExportDecision`s of one export; `str()` gives a table."""

    def __str__(self) -> str:
        w = max([5, *(len(d.name) for d in self)])
        lines = [f"{'layer':<{w}}  {'shape':<12}  {'sparsity':>8}  form    why"]
        lines += [f"{d.name:<{w}}  {'x'.join(map(str, d.shape)):<12}  {d.sparsity:>8.2%}  "
                  f"{'sparse' if d.sparse else 'dense ':<6}  {d.reason}" for d in self]
        return "\n".join(lines)


def export_sparse(model: nn.Module, min_sparsity: float | None = None,
                  example_input: torch.Tensor | None = None, inplace: bool = False,
                  report: bool = False) -> nn.Module | tuple[nn.Module, ExportReport]:
    """A copy of a plain (finalized) model for inference whose sparse layers compute with
    their nonzeros only: nn.Linear layers with at least `min_sparsity` exact zeros (default
    `MIN_SPARSITY`) become `SparseLinear` (CSR weight), and — with `example_input` and numba
    installed (`pip install 'mirrorprune[fast]'`) — nn.Conv2d layers with at least
    `min_sparsity` zeros (default `CONV_MIN_SPARSITY`) become `SparseConv2d`.

    With `example_input` (a batch like the ones you will serve), each candidate layer is also
    timed dense and sparse on the input it receives, and only those where sparse is faster are
    replaced: small layers at batch 1 often are not (benchmarks/results/inference).
    Convolutions: the model is traced with torch.fx, BatchNorm folded into the convolutions,
    and each conv (→ residual add) (→ ReLU) chain found in the graph becomes one fused sparse
    layer; activations between sparse layers stay in the kernels' padded layout. A model
    torch.fx cannot trace keeps its convolutions dense, and convolutions the kernel does not
    cover (groups, dilation, stride > 2, padding > 1, non-float32) stay dense; the report says
    which and why. The result is then a new `torch.fx.GraphModule`, also with `inplace`.

    Linear layers inside `nn.TransformerEncoderLayer` / `nn.MultiheadAttention` stay dense:
    their fused inference path reads the weights as dense tensors. bfloat16 / float16 Linear
    layers compute with the gather kernel at every batch size (torch's CSR product has no such
    CPU kernel). For inference: the sparse layers hold buffers, not trainable parameters; the
    exported model may be called from several threads at once. `report=True` also returns an
    `ExportReport` saying for each prunable weight (`default_types()`) which form it got and
    why.
    """
    if min_sparsity is not None and not 0 <= min_sparsity <= 1:
        raise UsageError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if find_mirror_weights(model):
        raise UsageError("export_sparse needs a plain model; call finalize() (or "
                         "pilot.finalize(sparsity)) first to get one")
    out = model if inplace else safe_deepcopy(model)
    out, conv_decisions = _convert_convs(
        out, example_input, CONV_MIN_SPARSITY if min_sparsity is None else min_sparsity,
        copy=inplace)
    min_sparsity = MIN_SPARSITY if min_sparsity is None else min_sparsity
    decisions: dict[int, ExportDecision] = {}
    chosen, prunable = [], default_types()
    for owner_name, mod in out.named_modules():
        if isinstance(mod, prunable) and not isinstance(mod, (nn.Linear, nn.Conv2d)):
            # prunable, but with no sparse kernel here: say so, as for the layers that have one
            for a in weight_names(mod):
                x = getattr(mod, a)
                decisions[id(x)] = ExportDecision(  # named as layers are, by module
                    owner_name if a == "weight" else f"{owner_name}.{a}".lstrip("."),
                    tuple(x.shape),
                    (x == 0).float().mean().item(), False,
                    f"{type(mod).__name__}: no sparse kernel (nn.Linear and nn.Conv2d have one)")
        for name, child in mod.named_children():
            if not isinstance(child, nn.Linear):
                continue
            sp = (child.weight == 0).float().mean().item()
            d = decisions[id(child)] = ExportDecision(
                f"{owner_name}.{name}" if owner_name else name, tuple(child.weight.shape), sp,
                False, "")
            if isinstance(mod, _FUSED_OWNERS):
                d.reason = (f"inside {type(mod).__name__}, whose fused inference path reads "
                            "this weight as a dense tensor")
            elif type(child) is not nn.Linear:  # e.g. MultiheadAttention's out_proj
                d.reason = f"{type(child).__name__} is read through .weight by its owner"
            elif sp < min_sparsity:
                d.reason = f"sparsity below min_sparsity {min_sparsity:g}"
            else:
                chosen.append((mod, name, child))
    if example_input is not None:
        chosen = _timed_choice(out, chosen, decisions, example_input)
    for mod, name, child in chosen:
        sparse = child if isinstance(child, SparseLinear) else SparseLinear.from_linear(child)
        d = decisions[id(getattr(mod, name))]
        d.sparse = True
        d.reason = ("CSR; gather kernel at every batch size (no CSR product for "
                    f"{_dtype_name(child.weight.dtype)})" if child.weight.dtype not in CSR_DTYPES
                    else f"CSR; {sparse.kernel} kernel from batch {GATHER_MIN_BATCH}")
        sparse.transposed_output = False  # set where known, below
        setattr(mod, name, sparse)
    _chain_transposed(out, example_input)
    return (out, ExportReport([*conv_decisions, *decisions.values()])) if report else out


def _timed_choice(model: nn.Module, chosen: list[tuple], decisions: dict[int, ExportDecision],
                  example_input: torch.Tensor) -> list[tuple]:
    """The (owner, name, SparseLinear) of the candidates (owner, name, nn.Linear) that compute
    faster sparse on the inputs `example_input` gives them, each with its faster kernel; the
    others' decisions get their reason."""
    inputs = _layer_inputs(model, [c for _, _, c in chosen], example_input)
    feeds = _linear_feeds(model)
    fed_by = {id(b): a for a in model.modules() for b in [feeds.get(id(a))] if b is not None}
    kept, sparse_ids = [], set()
    for mod, name, c in chosen:
        x = inputs.get(id(c))
        if x is None:
            decisions[id(c)].reason = "not reached by the example input"
            continue
        if id(fed_by.get(id(c))) in sparse_ids:  # it will arrive transposed
            x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
        sparse = _faster_sparse(c, x, transposed_output=id(c) in feeds)
        if sparse is not None:
            kept.append((mod, name, sparse))
            sparse_ids.add(id(c))
        else:
            decisions[id(c)].reason = "dense is faster on the example input"
    return kept


def _convert_convs(model: nn.Module, example_input: torch.Tensor | None, min_sparsity: float,
                   copy: bool) -> tuple[nn.Module, list[ExportDecision]]:
    """(model traced with torch.fx, BatchNorm folded, its sparse convolutions computing with
    `SparseConv2d` where that is faster on `example_input`; a decision per nn.Conv2d), or
    (`model`, decisions) where no conversion is tried. Folding changes the modules of the model
    it traces: `copy` traces a copy (the caller's own model, export_sparse(inplace=True))."""
    from . import sparse_conv
    from .fast import fold_batchnorm

    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        return model, []

    def all_dense(reason: str) -> tuple[nn.Module, list[ExportDecision]]:
        return model, [ExportDecision(n, tuple(m.weight.shape),
                                      (m.weight == 0).float().mean().item(), False, reason)
                       for n, m in convs]
    if example_input is None:
        return all_dense("convolutions are converted only with example_input (to time them)")
    if not sparse_conv.available():
        warn_user(f"convolutions stay dense: {sparse_conv.INSTALL_HINT}")
        return all_dense(f"numba is not installed: {sparse_conv.INSTALL_HINT}")
    gm, why = fold_batchnorm(safe_deepcopy(model) if copy else model)
    if gm is None:  # (fuse traces before it changes anything)
        return all_dense(f"model not traceable with torch.fx ({why})")
    return gm, sparse_conv.convert_convs(gm, example_input, min_sparsity)


def _linear_feeds(model: nn.Module) -> dict[int, nn.Module]:
    """id(layer) -> the layer it feeds, for Linear layers (dense or sparse) that feed another
    through layout-keeping modules only, inside plain nn.Sequential containers (whose data
    flow is known; subclasses may route data differently)."""
    feeds = {}
    for seq in model.modules():
        if type(seq) is not nn.Sequential:
            continue
        mods = list(seq)
        for i, m in enumerate(mods):
            if isinstance(m, (nn.Linear, SparseLinear)):
                j = i + 1
                while j < len(mods) and type(mods[j]) in _LAYOUT_KEEPING:
                    j += 1
                if j < len(mods) and isinstance(mods[j], (nn.Linear, SparseLinear)):
                    feeds[id(m)] = mods[j]
    return feeds


def _chain_transposed(model: nn.Module, example_input: torch.Tensor | None = None) -> None:
    """A SparseLinear whose output reaches another Linear layer skips transposing back: a
    SparseLinear wants it transposed, and a dense one multiplies a transposed input without a
    copy (BLAS transposes) — faster on LeNet's 300→100 layer at batch 64 (28 vs 54 µs), but
    slower on its 100→10 one (38 vs 11 µs). So with `example_input`, a dense consumer is
    timed on both layouts (the contiguous one paying for its copy) and gets the faster."""
    feeds = _linear_feeds(model)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    for m in sparse:
        m.transposed_output = id(m) in feeds
    dense_next = {id(m): feeds[id(m)] for m in sparse
                  if id(m) in feeds and not isinstance(feeds[id(m)], SparseLinear)}
    if example_input is None or not dense_next:
        return
    inputs = _layer_inputs(model, list(dense_next.values()), example_input)
    for m in sparse:
        layer = dense_next.get(id(m))
        x = inputs.get(id(layer))
        if x is not None and not x.is_contiguous():  # what the transposed output gives it
            m.transposed_output = _transposed_is_faster(layer, x)


def _transposed_is_faster(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` is faster on the non-contiguous `x` than on a contiguous copy of it."""
    return is_faster(lambda: layer(x), lambda: layer(x.contiguous()))


@torch.no_grad()
def _layer_inputs(model: nn.Module, layers: list[nn.Module], x: torch.Tensor
                  ) -> dict[int, torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}

    def keep(m: nn.Module, args: tuple, _out: torch.Tensor) -> None:  # None: output unchanged
        seen.setdefault(id(m), args[0].detach())

    hooks = [m.register_forward_hook(keep) for m in layers]
    was = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return seen


def _faster_sparse(layer: nn.Linear, x: torch.Tensor, transposed_output: bool = False
                   ) -> SparseLinear | None:
    """The layer as a SparseLinear with the faster of its kernels on this real input (in the
    layout it will arrive in), or None where dense is faster still."""
    sparse = SparseLinear.from_linear(layer)
    sparse.transposed_output = transposed_output
    if (x.reshape(-1, layer.in_features).shape[0] >= GATHER_MIN_BATCH
            and sparse._kernel() is not None):
        numba_kernel = SparseLinear.from_linear(layer)
        numba_kernel.transposed_output, numba_kernel.kernel = transposed_output, "numba"
        if is_faster(lambda: numba_kernel(x), lambda: sparse(x)):
            sparse = numba_kernel
    return sparse if is_faster(lambda: sparse(x), lambda: layer(x)) else None


def median_seconds(*fns: Callable[[], object], rounds: int = 7, round_seconds: float = 2e-3,
                   reps: int | None = None, warmup: int = 1) -> tuple[float, ...]:
    """Median seconds per call of each of `fns`, over `rounds` interleaved rounds (so a
    machine's slow spell hits all of them alike) of `reps` calls each; `reps` None: enough for
    a round of all of them to take ~`round_seconds`. `warmup` untimed calls each come first
    (first calls compile or allocate). Rounds of a few calls of a 30 µs layer flipped
    decisions from run to run: keep rounds ≳ 1 ms."""
    for _ in range(warmup):
        for f in fns:
            f()
    if reps is None:
        t0 = time.perf_counter()
        for f in fns:
            f()
        reps = max(1, min(1000, round(round_seconds / max(time.perf_counter() - t0, 1e-7))))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for out, f in zip(times, fns):
            t0 = time.perf_counter()
            for _ in range(reps):
                f()
            out.append((time.perf_counter() - t0) / reps)
    return tuple(statistics.median(t) for t in times)


@torch.inference_mode()
def is_faster(first: Callable[[], object], second: Callable[[], object], rounds: int = 7,
              round_seconds: float = 2e-3) -> bool:
    """Whether `first()` takes less time than `second()` (`median_seconds`)."""
    a, b = median_seconds(first, second, rounds=rounds, round_seconds=round_seconds)
    return a < b


# ---------------------------------------------------------------- compressed checkpoints
#
# A sparse file is a .safetensors file (no pickle: loading it cannot run code). Each float
# tensor that a bitmask makes smaller is stored as NAME/bitmask (uint8, 8 entries per byte, most
# significant bit first) and NAME/values (the entries that are not +0.0, in order: -0.0 is kept
# as a value, so the round trip is bit-identical); every other tensor is stored as NAME. The
# metadata holds the format and version, each entry's encoding, shape and dtype, and a SHA-256
# of all of it and the tensor bytes, so a changed byte is detected.

FORMAT = "mirrorprune-sparse"
VERSION = 2
LEGACY_FORMAT = "mirrorprune-sparse-v1"  # torch.save zip of release 0.1.0, still read


class SparseFileError(UsageError):
    """A file that `load_sparse` cannot read (the message says why, in one sentence)."""


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("save_sparse/load_sparse read and write .safetensors files: "
                          "pip install 'mirrorprune[io]' (or pip install safetensors)") from None
    return safetensors


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 bitmask (8 entries per byte, most significant bit first)."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat * weights).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((bits.unsqueeze(1) >> shifts) & 1).flatten()[:n].bool()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode(name: str, t: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata entry, stored tensors) of one state-dict tensor."""
    if t.layout != torch.strided:
        t = t.to_dense()
    t = t.detach().cpu().contiguous()
    entry = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
    if t.is_floating_point() and t.numel() >= 64:
        keep = t.ne(0) | t.signbit()  # everything but +0.0 (NaN and -0.0 are kept)
        nnz = int(keep.sum())
        # the bitmask costs numel/8 bytes: store dense when that saves nothing
        if nnz * t.element_size() + t.numel() / 8 < t.numel() * t.element_size():
            return ({**entry, "encoding": "bitmask"},
                    {f"{name}/bitmask": _pack(keep), f"{name}/values": t[keep]})
    return {**entry, "encoding": "dense"}, {name: t.clone()}


def _decode(name: str, entry: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    shape, dtype = tuple(entry["shape"]), getattr(torch, entry["dtype"])
    n = math.prod(shape)
    if entry["encoding"] == "dense":
        t = stored[name]
    else:
        keep = _unpack(stored[f"{name}/bitmask"], n)
        values = stored[f"{name}/values"]
        if len(stored[f"{name}/bitmask"]) != (n + 7) // 8 or int(keep.sum()) != len(values):
            raise ValueError("bitmask and values disagree")
        t = torch.zeros(n, dtype=dtype)
        t[keep] = values
    if t.dtype != dtype or t.numel() != n:
        raise ValueError("stored tensor does not match its entry")
    return t.view(shape)


def _checksum(entries: dict, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps(entries, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}:{_dtype_name(t.dtype)}:{list(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_sparse(model: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike) -> int:
    """Write the state dict of `model` (or a state dict) as a .safetensors file in which every
    float tensor that a bitmask makes smaller is stored as that bitmask and its non-zero values;
    returns the file size in bytes. The write is atomic (a temporary file, renamed at the end,
    removed if the write fails). Exported (CSR) layers are stored as dense tensors with zeros."""
    if not isinstance(model, (nn.Module, dict)):
        raise UsageError(f"save_sparse(model, path) takes the model or a state dict first, got "
                         f"a {type(model).__name__}")
    if isinstance(model, nn.Module) and find_mirror_weights(model):
        raise UsageError("save_sparse needs a plain model; call finalize() first")
    state = model.state_dict() if isinstance(model, nn.Module) else model
    st = _safetensors()
    entries, tensors = {}, {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"save_sparse stores tensors only; {k!r} is a {type(v).__name__}")
        entries[k], stored = _encode(k, v)
        if set(stored) & set(tensors):
            raise UsageError(f"state dict key {k!r} collides with another key's encoding")
        tensors.update(stored)
    meta = {"format": FORMAT, "version": str(VERSION), "entries": json.dumps(entries),
            "sha256": _checksum(entries, tensors)}
    atomic_write(path, lambda p: st.torch.save_file(tensors, str(p), metadata=meta))
    return Path(path).stat().st_size


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None
                ) -> dict[str, torch.Tensor]:
    """Read a `save_sparse` file (or one of the torch format of release 0.1.0); returns the
    dense state dict and, given `model`, loads it (strictly) into the model too.

    Never runs code from the file. Anything that is not an intact sparse file (missing, empty,
    truncated, changed, random, foreign, or another architecture's weights for `model`) raises
    a `SparseFileError` (a ValueError) saying so in one sentence."""
    if isinstance(path, nn.Module) or not isinstance(path, (str, os.PathLike)):
        raise UsageError(f"load_sparse(path, model=None) takes the file first, got a "
                         f"{type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise SparseFileError(f"{path} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise SparseFileError(f"{path} is empty: not a sparse file written by save_sparse")
    with open(path, "rb") as f:
        legacy = f.read(4) == b"PK\x03\x04"  # a torch.save zip archive
    try:
        state = _read_legacy(path) if legacy else _read_safetensors(path)
    except SparseFileError:
        raise
    except UsageError as e:  # from load_torch
        raise SparseFileError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - any inconsistency inside the file
        raise SparseFileError(f"{path} is corrupt ({type(e).__name__}: {e}); use another copy"
                              ) from None
    if model is not None:
        _check_fits(path, state, model)
        model.load_state_dict(state)
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except st.SafetensorError as e:
        raise SparseFileError(f"{path} is not a sparse file written by save_sparse (truncated "
                              f"or another kind of file: {e})") from None
    if meta.get("format") != FORMAT:
        raise SparseFileError(f"{path} is a safetensors file but not one written by "
                              "mirrorprune.save_sparse; load it with safetensors.torch.load_file")
    if not meta.get("version", "").isdigit() or int(meta["version"]) > VERSION:
        raise SparseFileError(f"{path} was written by a newer mirrorprune (format version "
                              f"{meta.get('version')!r}); upgrade mirrorprune to read it")
    entries = json.loads(meta["entries"])
    if _checksum(entries, tensors) != meta.get("sha256"):
        raise SparseFileError(f"{path} is corrupt: its content does not match the checksum it "
                              "was saved with (a changed byte); use another copy")
    return {k: _decode(k, e, tensors) for k, e in entries.items()}


def _read_legacy(path: Path) -> dict[str, torch.Tensor]:
    blob = load_torch(path, "mirrorprune sparse file")
    if not isinstance(blob, dict) or blob.get("format") != LEGACY_FORMAT:
        raise SparseFileError(f"{path} is a torch file but not a sparse file written by "
                              "mirrorprune.save_sparse; load it with torch.load(weights_only=True)")

    def decode(e: dict | torch.Tensor) -> torch.Tensor:
        if isinstance(e, torch.Tensor):
            return e
        n = math.prod(e["shape"])
        out = torch.zeros(n, dtype=e["dtype"])
        out[_unpack(e["bitmask"], n)] = e["values"]
        return out.view(e["shape"])
    return {k: decode(v) for k, v in blob["tensors"].items()}


def _check_fits(path: Path, state: dict[str, torch.Tensor], model: nn.Module) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = [f"{what}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                 for what, items in (("missing", missing), ("unexpected", extra),
                                     ("other shapes", shapes)) if items]
        raise SparseFileError(f"{path} holds the weights of another architecture than this "
                              f"model ({'; '.join(parts)})")
