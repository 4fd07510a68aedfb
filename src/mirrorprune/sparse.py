"""Sparse export that pays off: Linear layers computing with a CSR weight, and compressed
checkpoints (bitmask + non-zero values) that round-trip exactly.

Which layers become sparse is a measured rule: on CPU the sparse product beats the dense one
only once the weight is sparse enough — for a 4096x4096 layer from 80% at batch 1 (from 60% at
batch 64), below that dense wins (benchmarks/results/inference) — and, for small layers at
small batches, hardly ever; `export_sparse(..., example_input=x)` therefore times each candidate
layer on its real input and keeps the faster form. Convolutions stay dense: PyTorch has no
sparse convolution kernel.

The kernel: a sparse layer computes yᵀ = W xᵀ. From `GATHER_MIN_BATCH` rows on it gathers the
rows of xᵀ that each output needs and sums them weighted (`gather_product`: `embedding_bag`
over the CSR arrays), vectorized over the batch and 1.6-5x faster than torch's CSR product at
batch 32-256; below that it calls the CSR product (`torch.sparse.mm`), faster there on most
layers. Both need xᵀ contiguous: that transpose is the one overhead, so inside an nn.Sequential
a sparse layer feeding another one (through elementwise modules only) hands over its output
untransposed.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .files import save_torch
from .reparam import find_mirror_weights

# Measured on 2 CPU cores (benchmarks/results/inference): sparse pays from about this sparsity on.
MIN_SPARSITY = 0.8
# Batch from which `gather_product` beats torch's CSR product (benchmarks/results/inference,
# kernel table: 300x784, 1024x1024 and 4096x4096 layers at 80-98% sparsity).
GATHER_MIN_BATCH = 16
# Modules that apply elementwise and keep their input's memory layout: a transposed activation
# passes through them unchanged (torch preserves strides of dense tensors in unary ops).
_LAYOUT_KEEPING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
                   nn.ELU, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Dropout, nn.Identity)
FORMAT = "mirrorprune-sparse-v1"


class SparseLinear(nn.Module):
    """y = x Wᵀ + b with W held as a CSR tensor (the same outputs as the nn.Linear it replaces,
    up to float summation order).

    `transposed_output=True` returns y as a transposed (non-contiguous) view — what the next
    SparseLinear wants as input; `export_sparse` sets it only where it knows the consumer.
    """

    transposed_output: bool = False

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # xᵀ contiguous (free when x is a transposed output of the previous SparseLinear)
        xt = x.reshape(-1, self.in_features).t().contiguous()
        if xt.shape[1] >= GATHER_MIN_BATCH:
            y = gather_product(self.weight, xt)
        else:
            y = torch.sparse.mm(self.weight, xt)
        if self.bias is not None:
            y = y.add_(self.bias.unsqueeze(1))  # y is fresh: in place is safe
        y = y.t() if self.transposed_output else y.t().contiguous()
        return y.reshape(*x.shape[:-1], self.out_features)

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


def export_sparse(model: nn.Module, min_sparsity: float = MIN_SPARSITY,
                  example_input: torch.Tensor | None = None, inplace: bool = False) -> nn.Module:
    """A copy of a plain (finalized) model in which every nn.Linear with at least `min_sparsity`
    exact zeros becomes a `SparseLinear` (CSR weight); other layers are left as they are.

    With `example_input` (a batch like the ones you will serve), each such layer is also timed
    dense and sparse on the input it receives, and only those where sparse is faster are replaced:
    small layers at batch 1 often are not (benchmarks/results/inference). For inference: the
    sparse layers hold buffers, not trainable parameters.
    """
    if not 0 <= min_sparsity <= 1:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity!r}")
    if find_mirror_weights(model):
        raise ValueError("export_sparse needs a plain model; call finalize() (or "
                         "pilot.finalize(sparsity)) first to get one")
    out = model if inplace else copy.deepcopy(model)
    # exactly nn.Linear: subclasses (e.g. MultiheadAttention's out_proj) are read through
    # .weight by their owner and must stay dense
    chosen = [(mod, name, child) for mod in out.modules()
              for name, child in mod.named_children()
              if type(child) is nn.Linear
              and (child.weight == 0).float().mean().item() >= min_sparsity]
    if example_input is not None:
        inputs = _layer_inputs(out, [c for _, _, c in chosen], example_input)
        chosen = [(mod, name, c) for mod, name, c in chosen
                  if id(c) in inputs and _sparse_is_faster(c, inputs[id(c)])]
    for mod, name, child in chosen:
        setattr(mod, name, SparseLinear.from_linear(child))
    _chain_transposed(out)
    return out


def _chain_transposed(model: nn.Module) -> None:
    """Inside a plain nn.Sequential (whose data flow is known), let a SparseLinear whose output
    reaches another SparseLinear through layout-keeping modules only skip transposing back:
    the next one would transpose it again."""
    for seq in model.modules():
        if type(seq) is not nn.Sequential:  # subclasses may route data differently
            continue
        mods = list(seq)
        for i, m in enumerate(mods):
            if isinstance(m, SparseLinear):
                j = i + 1
                while j < len(mods) and type(mods[j]) in _LAYOUT_KEEPING:
                    j += 1
                m.transposed_output = j < len(mods) and isinstance(mods[j], SparseLinear)


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


@torch.inference_mode()
def _sparse_is_faster(layer: nn.Linear, x: torch.Tensor, rounds: int = 7) -> bool:
    """Median over interleaved rounds of dense vs CSR time on this layer's real input."""
    sparse = SparseLinear.from_linear(layer)
    t = {"dense": [], "sparse": []}
    for _ in range(rounds):
        for key, f in (("dense", layer), ("sparse", sparse)):
            t0 = time.perf_counter()
            for _ in range(5):
                f(x)
            t[key].append(time.perf_counter() - t0)
    return statistics.median(t["sparse"]) < statistics.median(t["dense"])


# ---------------------------------------------------------------- compressed checkpoints


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 bitmask (8 entries per byte, most significant bit first)."""
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % 8)]).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (flat * weights).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return ((bits.unsqueeze(1) >> shifts) & 1).flatten()[:n].bool()


def _encode(t: torch.Tensor) -> dict | torch.Tensor:
    if t.layout != torch.strided:
        t = t.to_dense()
    if not t.is_floating_point() or t.numel() < 64:
        return t.clone()
    mask = t != 0
    nnz = int(mask.sum())
    # the bitmask costs numel/8 bytes: store dense when that saves nothing
    if nnz * t.element_size() + t.numel() / 8 >= t.numel() * t.element_size():
        return t.clone()
    return {"shape": tuple(t.shape), "dtype": t.dtype, "bitmask": _pack(mask.cpu()),
            "values": t[mask].cpu().clone()}


def _decode(e: dict | torch.Tensor) -> torch.Tensor:
    if isinstance(e, torch.Tensor):
        return e
    n = 1
    for s in e["shape"]:
        n *= s
    out = torch.zeros(n, dtype=e["dtype"])
    out[_unpack(e["bitmask"], n)] = e["values"]
    return out.view(e["shape"])


def save_sparse(model: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike) -> int:
    """Write the state dict of `model` (or a state dict) with every sufficiently sparse float
    tensor stored as a bitmask and its non-zero values; returns the file size in bytes.
    The write is atomic (temporary file, then rename)."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    if isinstance(model, nn.Module) and find_mirror_weights(model):
        raise ValueError("save_sparse needs a plain model; call finalize() first")
    save_torch({"format": FORMAT, "tensors": {k: _encode(v) for k, v in state.items()}}, path)
    return Path(path).stat().st_size


def load_sparse(path: str | os.PathLike, model: nn.Module | None = None
                ) -> dict[str, torch.Tensor]:
    """Read a `save_sparse` file; returns the dense state dict and, given `model`, loads it
    (strictly) into the model too."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mirrorprune sparse checkpoint (written by "
                         "mirrorprune.save_sparse); load a plain one with torch.load")
    state = {k: _decode(v) for k, v in blob["tensors"].items()}
    if model is not None:
        model.load_state_dict(state)
    return state
