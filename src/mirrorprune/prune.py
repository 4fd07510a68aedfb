"""Exact-count magnitude pruning, finalize (collapse m ⊙ w, prune, export), sparsity reports.

Pruning hands off "dense tensors with zeros": the result is a plain model whose state_dict loads
with strict=True into an unmodified instance of the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import UsageError, check_number
from .reparam import (
    MirrorWeight,
    Selector,
    collapse,
    find_mirror_weights,
    mirrored_names,
    safe_deepcopy,
    select_weights,
)

SCOPES = ("global", "layer")


def check_sparsity(sparsity: float) -> float:
    """`sparsity` as a float in [0, 1) (numpy scalars welcome), else a UsageError."""
    return check_number(sparsity, "sparsity (e.g. 0.9)", low=0, high=1, high_open=True)


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise UsageError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


def magnitude_masks(
    tensors: Mapping[str, torch.Tensor], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks removing exactly round(sparsity · N) smallest-magnitude entries.

    N is the total size of all tensors (scope="global") or each tensor's size (scope="layer");
    `round` is Python's (half to even). Ties are broken by position (first entries go first),
    so the count is exact and the result deterministic.
    """
    sparsity, scope = check_sparsity(sparsity), check_scope(scope)
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise UsageError(f"{name} has non-finite entries; cannot rank weights by magnitude")
    if scope == "layer":
        return {name: _keep_mask(t.detach().abs().flatten(), sparsity).view_as(t)
                for name, t in tensors.items()}
    dtype = torch.float32
    for t in tensors.values():  # rank in the widest dtype present, so no new ties appear
        dtype = torch.promote_types(dtype, t.dtype)
    flat = torch.cat([t.detach().abs().flatten().to(dtype) for t in tensors.values()])
    keep = _keep_mask(flat, sparsity)
    out, i = {}, 0
    for name, t in tensors.items():
        out[name] = keep[i : i + t.numel()].view_as(t)
        i += t.numel()
    return out


def pruned_mass(tensors: Mapping[str, torch.Tensor], sparsity: float) -> float:
    """Fraction of the total ‖x‖₁ that global pruning to `sparsity` would remove: ~0 when the
    weights are already effectively that sparse."""
    flat = torch.cat([t.detach().abs().flatten().double() for t in tensors.values()])
    total = float(flat.sum())
    removed = float(flat[~_keep_mask(flat, check_sparsity(sparsity))].sum())
    return removed / total if total > 0 else 0.0


def _keep_mask(mag: torch.Tensor, sparsity: float) -> torch.Tensor:
    # The k smallest, ties at the threshold taken in index order: what a stable argsort's
    # first k are, in linear time and without an index per entry (large models).
    k = round(sparsity * mag.numel())
    keep = torch.ones(mag.numel(), dtype=torch.bool, device=mag.device)
    if k:
        threshold = mag.kthvalue(k).values
        below = mag < threshold
        keep[below] = False
        keep[torch.nonzero(mag == threshold).flatten()[: k - int(below.sum())]] = False
    return keep


def unique_weights(
    model: nn.Module, include: Selector = None, exclude: Selector = ()
) -> dict[str, nn.Parameter]:
    """The selected prunable weights of a plain model by qualified name, tied ones once."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for ref in select_weights(model, include, exclude):
        p = ref.module._parameters[ref.attr]
        if id(p) not in seen:  # tied weights count once
            seen.add(id(p))
            out[ref.name] = p
    return out


@torch.no_grad()
def _apply_masks(params: Mapping[str, nn.Parameter], sparsity: float, scope: str) -> None:
    masks = magnitude_masks(params, sparsity, scope)
    for name, p in params.items():
        p.masked_fill_(~masks[name], 0.0)  # +0.0: multiplying would leave -0.0 behind


def prune(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    include: Selector = None,
    exclude: Selector = (),
    inplace: bool = False,
) -> nn.Module:
    """Magnitude-prune a plain (not reparametrized) model to exactly `sparsity`.

    The selection (include/exclude) is the same as PILoT's. Returns a pruned copy unless inplace.
    """
    check_sparsity(sparsity), check_scope(scope)
    if find_mirror_weights(model):
        raise UsageError("model is reparametrized as m ⊙ w: use finalize() (or PILoT.finalize())")
    model = model if inplace else safe_deepcopy(model)
    _apply_masks(unique_weights(model, include, exclude), sparsity, scope)
    return model


def finalize(
    model: nn.Module, sparsity: float, scope: str = "global", inplace: bool = False
) -> nn.Module:
    """Collapse every m ⊙ w of a wrapped model into its weight, prune exactly, return a plain model.

    Pruning covers exactly the reparametrized weights. By default the wrapped model is left
    untouched (so training can continue, or several sparsities can be exported from one run)
    and a plain copy is returned; with inplace=True the model itself is unwrapped.
    If some weights are already exactly zero beyond the requested count, sparsity exceeds the
    target: zeros are never revived.
    """
    check_sparsity(sparsity), check_scope(scope)
    if not find_mirror_weights(model):
        raise UsageError(
            "model has no m ⊙ w reparametrization (it was never wrapped, or was finalized in "
            "place already): wrap it with mirrorprune.PILoT first, or use mirrorprune.prune() "
            "for a plain model"
        )
    model = model if inplace else safe_deepcopy(model)
    weights = find_mirror_weights(model)
    collapsed = collapse(weights)
    _apply_masks({mw.name: collapsed[mw.name] for mw in weights}, sparsity, scope)
    return model


# ----------------------------------------------------------------------------------------------
# reports


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    params: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "sparsity": self.sparsity}


@dataclass
class SparsityReport:
    """Per-tensor sparsity of the prunable weights; `str()` gives a table."""

    layers: list[LayerSparsity]

    @property
    def params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.layers)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    def as_dicts(self) -> list[dict]:
        total = {"name": "total", "shape": [], "params": self.params, "zeros": self.zeros,
                 "sparsity": self.sparsity}
        return [r.as_dict() for r in self.layers] + [total]

    def __str__(self) -> str:
        rows = [(r.name, "x".join(map(str, r.shape)), r.params, r.zeros, r.sparsity)
                for r in self.layers]
        rows.append(("total", "", self.params, self.zeros, self.sparsity))
        w = max(len("layer"), *(len(r[0]) for r in rows))
        s = max(len("shape"), *(len(r[1]) for r in rows))
        lines = [f"{'layer':<{w}}  {'shape':<{s}}  {'params':>10}  {'zeros':>10}  {'sparsity':>8}"]
        lines.append("-" * len(lines[0]))
        for i, (n, sh, p, z, sp) in enumerate(rows):
            if i == len(rows) - 1:
                lines.append("-" * len(lines[0]))
            lines.append(f"{n:<{w}}  {sh:<{s}}  {p:>10,}  {z:>10,}  {sp:>8.2%}")
        return "\n".join(lines)


@torch.no_grad()
def sparsity_report(
    model: nn.Module, include: Selector = None, exclude: Selector = ()
) -> SparsityReport:
    """Exact zeros of each prunable weight (x = m ⊙ w for a wrapped model), tied ones once.

    For a wrapped model the rows are its reparametrized weights; otherwise the weights that
    include/exclude select (default: those of `reparam.default_types()`).
    """
    mirror: Sequence[MirrorWeight] = find_mirror_weights(model)
    if mirror and (include is not None or exclude):
        raise UsageError("include/exclude apply to plain models; a wrapped model reports m ⊙ w")
    if mirror:
        tensors = {mw.name: mw.x() for mw in mirror}
    else:
        tensors = {n: p.detach() for n, p in unique_weights(model, include, exclude).items()}
    return SparsityReport([
        LayerSparsity(n, tuple(t.shape), t.numel(), int((t == 0).sum())) for n, t in tensors.items()
    ])


def is_wrapped(model: nn.Module) -> bool:
    """True if some module of `model` carries the m ⊙ w reparametrization."""
    return any(mirrored_names(mod) for mod in model.modules())
