"""x = m ⊙ w on chosen weights of any nn.Module: selection, β-initialization, collapse back.

How it works: each selected module gets its class swapped for a cached subclass in which
`weight` is a read-only property returning `weight_m * weight_w` (the two trainable tensors are
registered as ordinary parameters). This is what `torch.nn.utils.parametrize` does, minus its
per-access module call and its `parametrizations.weight.original0` state-dict names. So
`module.weight` is always current, `deepcopy`/EMA copies work, and `torch.save(model)` pickles.

Tied weights (one Parameter used by several modules) get one (m, w) pair that every sharing module
reads, so the tie survives wrapping and collapsing. Initialize weights *before* wrapping:
`nn.init.*_(module.weight)` on a wrapped module writes into a temporary product and is lost.
"""

from __future__ import annotations

import copy
import fnmatch
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from .errors import UsageError, check_number, warn_user

#: Module types whose weights are reparametrized by default (SPEC §2.1: Linear and Conv*, the
#: transposed ones included; the recurrent layers' matrices are Linear maps too): no biases, no
#: norms. `weight_names` says which tensors of a module are its weights.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.MultiheadAttention, nn.RNNBase, nn.RNNCellBase)


def default_types() -> tuple[type[nn.Module], ...]:
    """`DEFAULT_TYPES`, and Hugging Face's `Conv1D` (GPT-2's linear layers, their weight
    stored transposed) when transformers is loaded: without it no model can hold one."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return DEFAULT_TYPES + (conv1d,) if isinstance(conv1d, type) else DEFAULT_TYPES

Selector = Sequence[type[nn.Module] | str] | Callable[[nn.Module, str], bool] | None


class WeightRef(NamedTuple):
    """One selected weight: the tensor `getattr(module, attr)` of the module named `module_name`."""

    module_name: str
    module: nn.Module
    attr: str

    @property
    def name(self) -> str:
        """The weight's qualified name, e.g. "fc.weight" or "layer.0.self_attn.in_proj_weight"."""
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr

    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


@dataclass
class MirrorWeight:
    """One reparametrized tensor x = m ⊙ w, possibly shared by several modules (tied weights)."""

    names: list[str]  # qualified names of x, e.g. ["fc.weight"] (several when tied)
    modules: list[tuple[nn.Module, str]]  # (module, attribute name) pairs reading x
    m: nn.Parameter
    w: nn.Parameter

    @property
    def name(self) -> str:
        return self.names[0]

    def x(self) -> torch.Tensor:
        """The current weight m ⊙ w, without autograd history."""
        return (self.m * self.w).detach()


# ----------------------------------------------------------------------------------------------
# the class swap


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _product_property(name: str) -> property:
    m_key, w_key = name + "_m", name + "_w"

    def get(self: nn.Module) -> torch.Tensor:
        return self._parameters[m_key] * self._parameters[w_key]

    get.__doc__ = f"{name} = {m_key} ⊙ {w_key} (mirrorprune reparametrization)"
    return property(get)


def _rebuild(base: type, names: tuple[str, ...]) -> nn.Module:
    cls = _mirror_class(base, names)
    return cls.__new__(cls)


def _reduce_ex(self: nn.Module, protocol: int):
    # Dynamic classes are not importable: pickle/deepcopy rebuild them from (base, names).
    # An RNN keeps its weights in a list (_flat_weights), here products with autograd history,
    # which deepcopy refuses: the copy gets them detached and recomputes them on its forward.
    state = {k: _detached(v) for k, v in self.__getstate__().items()}
    return _rebuild, (self._mirror_base, self._mirror_names), state


def _non_leaf(v: object) -> bool:
    return isinstance(v, torch.Tensor) and not v.is_leaf


def _detached(v: object) -> object:
    """`v` with a non-leaf tensor, or those in a list (an RNN's _flat_weights), detached."""
    if _non_leaf(v):
        return v.detach()  # type: ignore[union-attr]
    if isinstance(v, list) and any(_non_leaf(t) for t in v):
        return [t.detach() if _non_leaf(t) else t for t in v]
    return v


def _no_flatten(self: nn.Module) -> None:
    """m ⊙ w is computed anew at each forward: there are no weights to flatten in place for
    cuDNN (which would rewrite those products' storage)."""


def _mirror_class(base: type, names: tuple[str, ...]) -> type:
    key = (base, names)
    if key not in _CLASSES:
        ns: dict[str, object] = {n: _product_property(n) for n in names}
        ns.update(_mirror_base=base, _mirror_names=names, __reduce_ex__=_reduce_ex)
        if issubclass(base, nn.RNNBase):
            ns["flatten_parameters"] = _no_flatten
        ns["__module__"] = base.__module__
        _CLASSES[key] = type(base.__name__, (base,), ns)
    return _CLASSES[key]


def mirrored_names(module: nn.Module) -> tuple[str, ...]:
    """Attribute names reparametrized on this module (empty if none)."""
    return getattr(type(module), "_mirror_names", ())


def _base_class(module: nn.Module) -> type:
    return getattr(type(module), "_mirror_base", type(module))


# ----------------------------------------------------------------------------------------------
# selection


def _as_tuple(x: object) -> tuple:
    if x is None:
        return ()
    if isinstance(x, (str, type)):
        return (x,)
    return tuple(x)  # type: ignore[arg-type]


def _matches(module: nn.Module, name: str, pattern: type | str) -> bool:
    if isinstance(pattern, type):
        return isinstance(module, pattern)
    return fnmatch.fnmatchcase(name, pattern)


def weight_names(module: nn.Module) -> tuple[str, ...]:
    """The attribute names of a module's prunable weights: `weight`; for MultiheadAttention
    its input projection (`in_proj_weight`, or q/k/v_proj_weight when key and value have their
    own sizes; its out_proj is an nn.Linear of its own); for RNN/LSTM/GRU every layer's and
    direction's weight_ih, weight_hh (and LSTM's weight_hr) matrices; for their cells
    weight_ih and weight_hh."""
    base = _base_class(module)
    if issubclass(base, nn.MultiheadAttention):
        return (("in_proj_weight",) if module._qkv_same_embed_dim
                else ("q_proj_weight", "k_proj_weight", "v_proj_weight"))
    if issubclass(base, nn.RNNBase):
        return tuple(n for n in module._flat_weights_names if n.startswith("weight_"))
    if issubclass(base, nn.RNNCellBase):
        return ("weight_ih", "weight_hh")
    return ("weight",)


def _prunable(module: nn.Module) -> bool:
    return all(isinstance(module._parameters.get(a), nn.Parameter)
               or a in mirrored_names(module) for a in weight_names(module))


def select_weights(
    model: nn.Module, include: Selector = None, exclude: Selector = ()
) -> list[WeightRef]:
    """The prunable weights of the selected modules, in `named_modules` order.

    include: None (`default_types()`: nn.Linear, nn.Conv*, nn.MultiheadAttention, the
        recurrent layers, Hugging Face's Conv1D), a sequence of module types and/or fnmatch
        globs on module names, or a predicate `fn(module, name) -> bool` (torchao's filter_fn).
    exclude: types and/or name globs removed from that selection (e.g. ("conv1", "fc") keeps the
        first and last layer of a ResNet dense).
    A type or glob covers the modules inside the ones it names: an excluded block's layers are
    excluded; an included block's layers of the default types are included.
    A module's weights are those `weight_names` gives. Modules that already carry the
    reparametrization count by their original class.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, mod) for n, mod in model.named_modules()]
    if callable(include) and not isinstance(include, type):
        chosen = [(n, mod) for n, mod in named if include(mod, n)]
    else:
        defaults = default_types()
        patterns = _as_tuple(include) or defaults
        _check_patterns(patterns, named, "include")
        named_by, inside = _within(named, patterns)
        chosen = [(n, mod) for n, mod in named if id(mod) in named_by
                  or (id(mod) in inside and isinstance(mod, defaults))]
    excl = _as_tuple(exclude)
    _check_patterns(excl, named, "exclude")
    gone = set().union(*_within(named, excl))
    chosen = [(n, mod) for n, mod in chosen if id(mod) not in gone]
    _refuse_managed(chosen)
    unsupported = [(n, mod) for n, mod in chosen if not _prunable(mod)
                   and any(isinstance(p, nn.Parameter) for p in mod._parameters.values())]
    if include is not None and unsupported:
        # asked for explicitly, but their weights are not a `weight` Parameter (e.g. a custom
        # layer's `kernel`): say so rather than skip them
        shown = _listed([f"{n or '<root>'} ({type(m).__name__}: "
                         f"{', '.join(list(m._parameters)[:3])})" for n, m in unsupported])
        raise UsageError(
            f"include selects modules PILoT cannot reparametrize: {shown}. Supported are modules "
            "whose weight is a Parameter named `weight` (nn.Linear, nn.Conv*, nn.Embedding, "
            "...), nn.MultiheadAttention and the recurrent layers; leave these out of include, "
            "or exclude them")
    refs, tied = _untie(named, [WeightRef(n, mod, a) for n, mod in chosen if _prunable(mod)
                                for a in weight_names(mod)], include is not None, gone)
    lazy = [ref.name for ref in refs if nn.parameter.is_lazy(ref.module._parameters.get(ref.attr))]
    if lazy:
        raise UsageError(
            f"{_listed(lazy)}: not initialized yet (a Lazy module): call the model on one "
            "batch first, so that its weights have their shapes and values")
    left = _left_dense(named, refs + tied, gone) if include is None else None
    if not refs:
        raise UsageError(
            "include/exclude select no prunable weight (a module with a `weight` parameter, "
            "nn.MultiheadAttention or a recurrent layer; default: nn.Linear, nn.Conv*, "
            "nn.MultiheadAttention, RNN/LSTM/GRU and their cells, Hugging Face's Conv1D). Pass "
            "include=[...] with module types or name globs; "
            f"{_names_hint(named)}{'. ' + left if left else ''}"
        )
    if left:
        _warn_once(left)
    return refs


def _within(named: list[tuple[str, nn.Module]], patterns: tuple) -> tuple[set[int], set[int]]:
    """The ids of the modules `patterns` name, and of the modules inside those: a name glob
    or type stands for a part of the model (exclude=("layers.0",) keeps that block's layers
    dense; include=[nn.MultiheadAttention] takes its out_proj too)."""
    named_by = {id(m) for n, m in named if any(_matches(m, n, p) for p in patterns)}
    inside = {id(sub) for _, m in named if id(m) in named_by for sub in m.modules()
              if sub is not m}
    return named_by, inside


def _check_patterns(patterns: tuple, named: list[tuple[str, nn.Module]], what: str) -> None:
    for p in patterns:
        if not isinstance(p, (str, type)):
            raise UsageError(f"{what} entries must be module types or name globs, got {p!r}")
        if isinstance(p, str) and not any(fnmatch.fnmatchcase(n, p) for n, _ in named):
            raise UsageError(f"{what} pattern {p!r} matches no module; {_names_hint(named)}")


def _untie(named: list[tuple[str, nn.Module]], refs: list[WeightRef], explicit: bool,
           excluded: set[int]) -> tuple[list[WeightRef], list[WeightRef]]:
    """(`refs` without the weights tied to a tensor outside them, those weights): one
    Parameter cannot be both m ⊙ w and dense, nor pruned in one place only. A language model's
    output layer tied to its input embedding (outside the default selection) stays dense with
    it, and a warning says so; where include or exclude split a tie on purpose, that is an
    error."""
    holders: dict[int, list[WeightRef]] = {}
    for n, mod in named:
        for a, p in mod._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append(WeightRef(n, mod, a))
    inside = {(id(ref.module), ref.attr) for ref in refs}
    kept, tied = [], []
    for ref in refs:
        p = ref.module._parameters.get(ref.attr)  # None when already m ⊙ w
        outside = [h for h in holders.get(id(p), []) if p is not None
                   and (id(h.module), h.attr) not in inside]
        if not outside:
            kept.append(ref)
        elif explicit or any(id(h.module) in excluded for h in outside):
            raise UsageError(
                f"{ref.name!r} is tied to {outside[0].name!r}, which is not selected; include "
                "or exclude both modules so the tie is kept")
        else:
            tied.append((ref, outside[0]))
    if tied:
        shown = _listed([f"{ref.name} (tied to {h.name})" for ref, h in tied])
        _warn_once(
            f"{shown} stay{'s' if len(tied) == 1 else ''} "
            "dense: the Parameter is shared with a tensor outside the default selection (an "
            "embedding), and both must stay alike. include=[...] both (e.g. nn.Embedding) to "
            "sparsify them together; exclude=[...] silences this")
    return kept, [ref for ref, _ in tied]


_SHOWN: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _SHOWN:  # once: wrapping, pruning and export all select
        _SHOWN.add(message)
        warn_user(message)


def _left_dense(named: list[tuple[str, nn.Module]], refs: list[WeightRef],
                excluded: set[int]) -> str | None:
    """What to say about the matrices the default selection (`refs`, and the weights `_untie`
    already named) leaves dense without being asked to, if any: those of other module types
    (a layer of the user's own: include=[...] takes it if its matrix is a Parameter named
    `weight`). Embeddings are left out by design (SPEC §2.1); a selected module's other
    tensors (biases) by definition."""
    # a selected module's submodules too: a parametrization's `original`
    taken = {id(sub) for ref in refs for sub in ref.module.modules()} | excluded
    left = [(f"{n}.{pn}" if n else pn, type(mod).__name__, p.numel())
            for n, mod in named
            if id(mod) not in taken
            and not isinstance(mod, (nn.Embedding, nn.EmbeddingBag))
            for pn, p in mod._parameters.items() if p is not None and p.dim() >= 2]
    if not left:
        return None
    total = sum(k for *_, k in left)
    return (
        f"{len(left)} weight {'matrix' if len(left) == 1 else 'matrices'} ({total:,} "
        f"parameters) stay{'s' if len(left) == 1 else ''} dense, outside the default "
        "selection (nn.Linear, nn.Conv*, nn.MultiheadAttention, RNN/LSTM/GRU, Conv1D): "
        f"{_listed([f'{q} ({t}, {k:,})' for q, t, k in left])}. include=[...] adds other "
        "module types whose weight is a Parameter named `weight`; a module's parameters under "
        "other names cannot be reparametrized. exclude=[...] silences this for the modules "
        "named")


def _listed(items: list[str], most: int = 5, sep: str = ", ") -> str:
    """The first `most` items, and how many more there are: every list a message shows."""
    return sep.join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most
                                     else "")


def _weight_manager(mod: nn.Module) -> str | None:
    """What computes one of this module's weights (`weight_names`) instead of it being its own
    Parameter, if anything: torch's parametrize, pruning masks, old-style weight/spectral norm
    hooks."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for a in weight_names(mod):
        if a in mirrored_names(mod):
            continue
        if parametrize.is_parametrized(mod, a):
            return "a torch.nn.utils.parametrize parametrization"
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == a:
                return f"a torch.nn.utils.prune mask ({a}_orig, {a}_mask)"
            if isinstance(hook, WeightNorm) and hook.name == a:
                return f"weight_norm ({a}_g, {a}_v)"
            if isinstance(hook, SpectralNorm) and hook.name == a:
                return f"spectral_norm ({a}_orig)"
        if a not in mod._parameters and isinstance(getattr(mod, a, None), torch.Tensor):
            return "something other than a Parameter (a buffer, or a hook)"
    return None


def _refuse_managed(chosen: list[tuple[str, nn.Module]]) -> None:
    managed = [(n, why) for n, mod in chosen if (why := _weight_manager(mod))]
    if managed:
        shown = _listed([f"{n or '<root>'}: {why}" for n, why in managed], sep="; ")
        raise UsageError(
            f"cannot reparametrize weights that are computed by {shown}. Leave these modules out "
            f"(exclude=[{', '.join(repr(n) for n, _ in managed[:3])}]), or make the weight a "
            "plain Parameter first (parametrize.remove_parametrizations, prune.remove, "
            "remove_weight_norm / remove_spectral_norm)")
    sparse = [n for n, mod in chosen
              if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse]
    if sparse:
        raise UsageError(
            f"{_listed(sparse)}: embeddings with sparse=True produce sparse gradients, "
            "to which PILoT cannot add its decay; construct them with sparse=False or exclude "
            "them")


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """copy.deepcopy that also works when a module holds non-leaf tensors as attributes
    (weight_norm / spectral_norm hooks leave the computed weight there after a forward pass;
    an RNN keeps its parametrized weights in a list), which deepcopy refuses: the copy gets
    them detached, and its hook or forward recomputes them."""
    stash = []
    for mod in model.modules():
        for k, v in list(vars(mod).items()):
            if (d := _detached(v)) is not v:
                stash.append((mod, k, v))
                mod.__dict__[k] = d
    try:
        return copy.deepcopy(model)
    finally:
        for mod, k, v in stash:
            mod.__dict__[k] = v


def _names_hint(named: list[tuple[str, nn.Module]]) -> str:
    return "the model's modules are: " + _listed(
        [f"{n or '<root>'} ({type(m).__name__})" for n, m in named], most=12)


# ----------------------------------------------------------------------------------------------
# wrapping and collapsing


def mirror_init(x0: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """m0, w0 with m0 ⊙ w0 = x0 and m0² − w0² = β (SPEC §2.2), computed in float64.

    m0 = sqrt((β + sqrt(β² + 4 x0²)) / 2) > |w0|; β = 0 gives spred's m0 = sqrt|x0|,
    w0 = sign(x0) sqrt|x0|.
    """
    x = x0.detach().to(torch.float64)
    m = torch.sqrt((beta + torch.hypot(torch.full_like(x, beta), 2 * x)) / 2)  # no under/overflow
    w = torch.where(m > 0, x / m.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(x))
    return m.to(x0.dtype), w.to(x0.dtype)


def check_beta(beta: float) -> float:
    return check_number(beta, "beta (m0² − w0²; paper: 1.0)", low=0)


def wrap(
    model: nn.Module, beta: float = 1.0, include: Selector = None, exclude: Selector = ()
) -> list[MirrorWeight]:
    """Reparametrize the selected weights of `model` in place as m ⊙ w; returns them.

    The network function is unchanged (up to float rounding of m0·w0).
    """
    beta = check_beta(beta)
    refs = select_weights(model, include, exclude)
    if any(mirrored_names(ref.module) for ref in refs):
        raise UsageError("model is already reparametrized by mirrorprune; wrap it only once")
    # Group by tensor identity so tied weights share one (m, w) pair.
    by_id: dict[int, list[WeightRef]] = {}
    for ref in refs:
        by_id.setdefault(id(ref.module._parameters[ref.attr]), []).append(ref)
    out = []
    for group in by_id.values():
        p = group[0].module._parameters[group[0].attr]
        m0, w0 = mirror_init(p, beta)
        m = nn.Parameter(m0, requires_grad=p.requires_grad)
        w = nn.Parameter(w0, requires_grad=p.requires_grad)
        for _, mod, a in group:
            _replace_params(mod, (a,), {a + "_m": m, a + "_w": w})
            mod.__class__ = _mirror_class(_base_class(mod), (*mirrored_names(mod), a))
        out.append(MirrorWeight([ref.name for ref in group],
                                [(ref.module, ref.attr) for ref in group], m, w))
    return out


def _replace_params(mod: nn.Module, old: tuple[str, ...], new: dict[str, nn.Parameter]) -> None:
    # Put the new parameters where the first old one stood, so state_dict key order is kept.
    items = list(mod._parameters.items())
    mod._parameters.clear()
    for k, v in items:
        if k == old[0]:
            mod._parameters.update(new)
        elif k not in old:
            mod._parameters[k] = v


def find_mirror_weights(model: nn.Module) -> list[MirrorWeight]:
    """The reparametrized tensors of a wrapped model (in module order, tied ones once)."""
    found: dict[int, MirrorWeight] = {}
    for n, mod in model.named_modules():
        for a in mirrored_names(mod):
            m, w = mod._parameters[a + "_m"], mod._parameters[a + "_w"]
            qual = f"{n}.{a}" if n else a
            if id(m) in found:
                found[id(m)].names.append(qual)
                found[id(m)].modules.append((mod, a))
            else:
                found[id(m)] = MirrorWeight([qual], [(mod, a)], m, w)
    return list(found.values())


def collapse(weights: Sequence[MirrorWeight]) -> dict[str, nn.Parameter]:
    """Replace each m ⊙ w by an ordinary Parameter holding its value; restores original classes.

    Returns {qualified name: new Parameter}. Idempotent in effect: collapsed modules are plain.
    """
    out = {}
    for mw in weights:
        p = nn.Parameter(mw.x().clone(), requires_grad=mw.m.requires_grad)
        for mod, a in mw.modules:
            _replace_params(mod, (a + "_m", a + "_w"), {a: p})
            rest = tuple(x for x in mirrored_names(mod) if x != a)
            base = _base_class(mod)
            mod.__class__ = _mirror_class(base, rest) if rest else base
        for name in mw.names:
            out[name] = p
    return out


def iter_mw_params(weights: Sequence[MirrorWeight]) -> Iterator[nn.Parameter]:
    for mw in weights:
        yield mw.m
        yield mw.w
