"""Sparse convolutions on CPU: a pruned CNN that runs faster than its dense self.

`SparseConv2d` computes one convolution (BatchNorm folded into its weight and bias) with the
numba kernels of `sparse_conv_kernels`, fused with what follows it in the network — the
residual add and the ReLU — and keeps activations in the kernels' layouts (NCHW with a zero
border, "padded planes"; from batch 16 on, `blocked_for`, 16 images per pixel vector), so
that consecutive sparse layers hand over their outputs without a copy.
`convert_convs` finds conv (→ add) (→ ReLU) chains in a model traced with torch.fx, times each
one dense and sparse on the example input, and replaces those where sparse is faster; the
rest of the graph stays as it was (dense). `mp.export_sparse` calls it.

Where the speed comes from (issue 17): the kernel touches only the nonzero weights, each one a
contiguous multiply-add over a whole input plane; folding BatchNorm keeps the zeros; fusing
bias, residual and ReLU into the kernel's output pass and handing padded planes from layer to
layer avoid the memory traffic that otherwise eats the gain; output buffers are reused between
calls (per thread) instead of allocated, which also avoids page faults on large batches, and
shared between layers whose outputs are never alive at once, so that the activations of a
batch of 64 stay in cache.
"""

from __future__ import annotations

import functools
import operator
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from .reparam import safe_deepcopy

try:
    import numba

    from . import sparse_conv_kernels as _k
except ImportError:  # the [fast] extra is optional: convolutions then stay dense
    numba = None
    _k = None
LANES = 16  # images per pixel vector in the blocked layout (= sparse_conv_kernels.LANES)

INSTALL_HINT = "pip install 'mirrorprune[fast]' (numba) for sparse convolution kernels"
PAD = 1  # border of the padded-planes layout: enough for 3x3 convolutions with padding 1
_LOCK = threading.Lock()  # numba's default thread pool takes one parallel region at a time
# per thread: {SparseConv2d: its reused output buffer} (.pools), numba's thread count
_POOLS = threading.local()
_NO_RES = np.zeros(1, np.float32)
_NO_CLIP = -float(np.finfo(np.float32).max)  # fastmath kernels assume no infinities
# multiply-adds below which one thread is faster than starting the parallel region
_SERIAL_WORK = 200_000


def available() -> bool:
    """Whether the sparse convolution kernels can run (numba installed)."""
    return _k is not None


def supported(conv: nn.Module) -> str | None:
    """None if `conv` can compute with the sparse kernel, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} (only nn.Conv2d)"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r} (only numeric zeros)"
    if conv.stride not in ((1, 1), (2, 2)):
        return f"stride={conv.stride} (only 1 or 2)"
    if conv.weight.dtype != torch.float32:
        return f"{conv.weight.dtype} weights (only float32)"
    if conv.weight.device.type != "cpu":
        return f"on {conv.weight.device} (the kernel is for CPU)"
    return None


class _Plan(NamedTuple):
    """A convolution's call on one input size: output size, the source planes (stride 2:
    `phase` = (phases used, hq, wq)), each nonzero's source plane and offset in it; `base`:
    for the blocked layout, which reads any stride straight from the padded input, the
    nonzero's offset there in floats; numpy views of the weights, and the multiply-adds per
    image (planes layout)."""
    ho: int
    wo: int
    phase: tuple | None
    width: int
    src_plane: int
    chan: np.ndarray
    off: np.ndarray
    base: np.ndarray
    indptr: np.ndarray
    values: np.ndarray
    bias: np.ndarray
    work: int


class SparseConv2d(nn.Module):
    """relu?(conv(x) + bias + residual?) with the convolution's weight held as its nonzeros.

    Input and output are padded planes: NCHW float32 with a zero border of `PAD` pixels
    (`pad_planes` makes one from an ordinary tensor, `unpad` views the interior). `residual`,
    when given, is added before the ReLU: an ordinary NCHW tensor of the output's shape
    (res_pad=0) or padded planes (res_pad=PAD). Any zero padding: beyond PAD the unit copies
    its input into a wider border (`border`) first. Inference only (no autograd)."""

    # class-level defaults, so that units pickled before these attributes existed still run
    slot: int | None = None  # which of its model's shared buffers (_share_buffers)
    _generation = 0  # counts _apply calls: every thread's cached call goes stale
    border = PAD  # of the input the kernel reads (more than PAD for padding beyond PAD)
    groups = 1
    dilation = (1, 1)

    def __init__(self, conv: nn.Conv2d, relu: bool = False, reuse_output: bool = False):
        super().__init__()
        why = supported(conv)
        if why is not None:
            raise ValueError(f"SparseConv2d cannot compute this convolution: {why}")
        w = conv.weight.detach()
        self.out_channels, per_group, self.kh, self.kw = w.shape
        self.in_channels, self.groups = conv.in_channels, conv.groups
        self.dilation = conv.dilation
        self.stride = conv.stride[0]
        self.padding = conv.padding
        self.relu = relu
        # whether the output buffer may be reused by the next call: only when nothing of this
        # call's output outlives the forward pass (convert_convs decides)
        self.reuse_output = reuse_output
        o, c, ky, kx = (t.to(torch.int64) for t in torch.nonzero(w, as_tuple=True))
        # row-major nonzeros (sorted by output channel): the CSR rows of the kernel
        self.register_buffer("values", w[o, c, ky, kx].float().contiguous())
        c = c + o // (self.out_channels // self.groups) * per_group  # grouped: its input slice
        self.register_buffer("indptr", torch.cat([torch.zeros(1, dtype=torch.int64),
                                                  torch.bincount(o, minlength=len(w))
                                                  .cumsum(0)]))
        # where each nonzero reads in the padded input: channel, row and column shift
        self.register_buffer("chan", c)
        # padding beyond the layout's border: the unit widens its input's zero border itself
        self.border = max(PAD, *self.padding)
        self.register_buffer("dy", ky * self.dilation[0] + self.border - self.padding[0])
        self.register_buffer("dx", kx * self.dilation[1] + self.border - self.padding[1])
        b = torch.zeros(len(w)) if conv.bias is None else conv.bias.detach().float()
        self.register_buffer("bias", b.contiguous())
        self._plans: dict[tuple[int, int, int], tuple] = {}

    @property
    def sparsity(self) -> float:
        return 1 - self.values.numel() * self.groups / (self.out_channels * self.in_channels
                                                        * self.kh * self.kw)

    @property
    def span(self) -> tuple[int, int]:
        """The kernel's extent in the input (dilation spreads its taps)."""
        return (self.dilation[0] * (self.kh - 1) + 1, self.dilation[1] * (self.kw - 1) + 1)

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: the cached views go stale
        self._plans.clear()
        self._generation += 1
        return super()._apply(fn, recurse)

    def _plan(self, c: int, hp: int, wp: int) -> _Plan:
        """Everything about a call that depends only on the padded input size c x hp x wp
        (cached: one entry per size)."""
        key = (c, hp, wp)
        if key not in self._plans:
            if c != self.in_channels:
                raise ValueError(f"SparseConv2d expects {self.in_channels} input channels, "
                                 f"got {c}")
            h, w = hp - 2 * self.border, wp - 2 * self.border
            ho = (h + 2 * self.padding[0] - self.span[0]) // self.stride + 1
            wo = (w + 2 * self.padding[1] - self.span[1]) // self.stride + 1
            if ho < 1 or wo < 1:
                raise ValueError(f"input of {h}x{w} pixels (padding {self.padding}) is smaller "
                                 f"than the kernel's extent {self.span[0]}x{self.span[1]}")
            dy, dx = self.dy.numpy(), self.dx.numpy()
            if self.stride == 1:
                width, phase, chan = wp, None, self.chan.numpy()
                off = dy * wp + dx
                src_plane = hp * wp
            else:  # phase (dy % 2, dx % 2) at (dy // 2, dx // 2) in planes of hq x wq
                my = int(dy.max(initial=0)) // 2
                mx = int(dx.max(initial=0)) // 2
                wq = max((wp + 1) // 2, wo + mx)
                hq = max((hp + 1) // 2, ho + my)
                used, k = np.unique((dy % 2) * 2 + dx % 2, return_inverse=True)
                if not len(used):  # no nonzero weight: one phase to read nothing from
                    used = np.zeros(1, np.int64)
                width, phase = wq, (used.astype(np.int64), hq, wq)
                chan = k.reshape(-1) * c + self.chan.numpy()
                off = (dy // 2) * wq + dx // 2
                src_plane = hq * wq
            chan, off = chan.astype(np.int64), off.astype(np.int64)
            self._plans[key] = _Plan(
                ho, wo, phase, width, src_plane, chan, off,
                ((self.chan.numpy() * hp * wp + dy * wp + dx) * LANES).astype(np.uint64),
                self.indptr.numpy(), self.values.numpy(), self.bias.numpy(),
                self.values.numel() * ((ho - 1) * width + wo))
        return self._plans[key]

    def _output(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A zeroed tensor, or when `reuse_output`, this thread's buffer of the unit's slot in
        its model (`slots`, `slot`: see _share_buffers), else of the unit itself."""
        if not self.reuse_output:
            return _zeros(shape)
        pools = getattr(_POOLS, "pools", None)
        if pools is None:
            pools = _POOLS.pools = weakref.WeakKeyDictionary()
        owner = getattr(self, "slots", None) or self
        mine = pools.setdefault(owner, {})
        buf = mine.get(self.slot)
        if buf is None or buf.shape != shape:  # zero border once: the kernel writes the inside
            buf = mine[self.slot] = _zeros(shape)
        return buf

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                res_pad: int = 0) -> torch.Tensor:
        calls = getattr(_POOLS, "calls", None)
        if calls is None:
            calls = _POOLS.calls = weakref.WeakKeyDictionary()
        last = calls.get(self)
        if (last is not None and last[0] is x and last[1] is residual and last[2] == res_pad
                and last[5] == self._generation):
            run_kernel(*last[3])  # the same buffers as this thread's last call: same arguments
            return last[4]
        call, out, cacheable = self._prepare(x, residual, res_pad)
        run_kernel(*call)
        # Inside a ResNet the inputs are the buffers earlier layers reuse: when both are (they
        # carry their numpy view, which no one resizes) and so is the output, the next call
        # with the same buffers takes the same arguments (~4 µs of ~10 per batch-1 layer).
        # The entry holds them, so their ids cannot be reused by other tensors meanwhile.
        calls[self] = ((x, residual, res_pad, call, out, self._generation)
                       if cacheable and all(hasattr(t, "_mirrorprune_flat") for t in (x, residual)
                                            if t is not None) else None)
        return out

    def _prepare(self, x: torch.Tensor, residual: torch.Tensor | None, res_pad: int
                 ) -> tuple[tuple, torch.Tensor, bool]:
        """Check the input, take the output buffer and build the kernel call (`run_kernel`'s
        arguments); the flag says whether the call may be reused for the same buffers."""
        blocked = x.dim() == 5
        if x.dtype != torch.float32 or not (x.dim() == 4 or blocked and x.shape[-1] == LANES):
            raise ValueError(f"SparseConv2d takes float32 padded planes (N, C, H+{2 * PAD}, "
                             f"W+{2 * PAD}) or their blocked form (N/{LANES}, C, H+{2 * PAD}, "
                             f"W+{2 * PAD}, {LANES}): see pad_planes; got {x.dtype} of shape "
                             f"{tuple(x.shape)}")
        cacheable = self.reuse_output
        if self.border > PAD:  # a copy with a wider zero border: new each call
            e = self.border - PAD
            x = F.pad(x, (0, 0) * blocked + (e, e, e, e)).contiguous()
            cacheable = False
        n, c, hp, wp = x.shape[:4]  # n: images, or groups of LANES images when blocked
        pl = self._plan(c, hp, wp)
        lanes = (LANES,) if blocked else ()
        out = self._output((n, self.out_channels, pl.ho + 2 * PAD, pl.wo + 2 * PAD, *lanes))
        if residual is None:
            res, res_img, res_plane, res_w = _NO_RES, 0, -1, 0  # res_plane -1: none
        else:
            if blocked and residual.dim() == 4 and res_pad == 0:  # a dense layer's output
                residual = _blocked(residual, 0)
            if residual.shape != (n, self.out_channels, pl.ho + 2 * res_pad,
                                  pl.wo + 2 * res_pad, *lanes):
                raise ValueError(f"residual of shape {tuple(residual.shape)} does not match "
                                 f"the output {tuple(out.shape)} (border {res_pad})")
            res = _flat(residual)
            res_w = pl.wo + 2 * res_pad
            res_plane = (pl.ho + 2 * res_pad) * res_w
            res_img = self.out_channels * res_plane
        xs, outs = _flat(x), _flat(out)
        lo = 0.0 if self.relu else _NO_CLIP
        if blocked:  # tasks: blocks of output rows
            return ((_k.sparse_conv_blocked, _k.sparse_conv_blocked_parallel,
                     (xs, outs, res, pl.indptr, pl.base, pl.values, pl.bias, lo, c * hp * wp,
                      wp, res_img, res_plane, res_w, res_pad, n, self.out_channels,
                      pl.wo + 2 * PAD, PAD, pl.ho, pl.wo, self.stride),
                     n * LANES * pl.work, lambda threads: max(1, n * pl.ho // (4 * threads))),
                    out, cacheable)
        n_planes = c if pl.phase is None else len(pl.phase[0]) * c
        n_out = self.out_channels  # not self in the closure: the call cache keeps it
        if pl.phase is not None:
            with _LOCK:
                xs = _phases(x, xs.reshape(x.shape), *pl.phase).reshape(-1)
        # tasks: whole images, or blocks of channels when images are few
        return ((_k.sparse_conv, _k.sparse_conv_parallel,
                 (xs, outs, res, pl.indptr, pl.chan, pl.off, pl.values, pl.bias, lo,
                  n_planes * pl.src_plane, pl.src_plane, pl.width,
                  (pl.ho - 1) * pl.width + pl.wo, res_img, res_plane, res_w, res_pad, n,
                  self.out_channels, pl.wo + 2 * PAD, PAD, pl.ho, pl.wo),
                 n * pl.work, lambda threads: -(-n_out // max(1, 4 * threads // n))),
                out, cacheable and pl.phase is None)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({self.kh}, {self.kw}), "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, relu={self.relu}, sparsity={self.sparsity:.3f}")


def _zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A zeroed float32 tensor carrying its flat numpy view (`_flat` reads it: making the view
    on every call cost ~1 µs a tensor, a tenth of a batch-1 layer's time)."""
    buf = torch.zeros(shape)
    buf._mirrorprune_flat = buf.numpy().reshape(-1)
    return buf


def _flat(t: torch.Tensor) -> np.ndarray:
    """t's data as a flat float32 numpy array (a view where t is contiguous float32)."""
    flat = getattr(t, "_mirrorprune_flat", None)
    return flat if flat is not None else t.detach().float().contiguous().numpy().reshape(-1)


def _phases(x: torch.Tensor, xs: np.ndarray, used: np.ndarray, hq: int, wq: int
            ) -> np.ndarray:
    """The stride-2 phases `used` of x (`xs`: its numpy view): one strided torch copy when
    the phases tile x exactly (even sizes), else the numba kernel."""
    n, c, hp, wp = x.shape
    if hp != 2 * hq or wp != 2 * wq:
        return _k.phases(xs, used, hq, wq)
    grid = x.detach().view(n, c, hq, 2, wq, 2)
    if len(used) == 4:
        out = grid.permute(0, 3, 5, 1, 2, 4).contiguous()
    else:
        out = torch.stack([grid[:, :, :, int(k) // 2, :, int(k) % 2] for k in used], 1)
    return out.numpy().reshape(n, len(used) * c, hq * wq)


def run_kernel(serial: Any, parallel: Any, args: tuple, work: int, blocks: Any,
               serial_work: int = _SERIAL_WORK) -> None:
    """serial(*args) on this thread when the work (multiply-adds) is below `serial_work` or
    torch has one thread, else parallel(*args, blocks(threads)) on numba's pool with torch's
    thread count (`torch.get_num_threads()`, capped by numba's pool), one parallel region at
    a time."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    with _LOCK:
        if threads == 1 or work < serial_work:
            serial(*args)
        else:
            if getattr(_POOLS, "threads", None) != threads:  # numba's setting is per thread
                numba.set_num_threads(threads)
                _POOLS.threads = threads
            parallel(*args, blocks(threads))


def blocked_for(batch: int) -> bool:
    """Whether a batch of this size runs in the blocked layout: at least LANES images, and
    at most a quarter of them added as padding to fill the last group."""
    return batch >= LANES and -batch % LANES <= batch // 4


def pad_planes(x: torch.Tensor, blocked: bool | None = None) -> torch.Tensor:
    """x (N, C, H, W) as padded planes: float32, contiguous, zero border of PAD; or, when
    `blocked` (default: `blocked_for(N)`), their blocked form (N/LANES rounded up, C, H+2 PAD,
    W+2 PAD, LANES), image i at [i // LANES, ..., i % LANES], the missing images zero."""
    if blocked if blocked is not None else blocked_for(len(x)):
        return _blocked(x, PAD)
    return F.pad(x.float(), (PAD, PAD, PAD, PAD)).contiguous()


def _blocked(x: torch.Tensor, pad: int) -> torch.Tensor:
    n, c, h, w = x.shape
    g = -(-n // LANES)
    xp = F.pad(x.float(), (pad, pad, pad, pad, 0, 0, 0, g * LANES - n))
    return xp.view(g, LANES, c, h + 2 * pad, w + 2 * pad).permute(0, 2, 3, 4, 1).contiguous()


def unpad(x: torch.Tensor, batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The interior of padded planes as (N, C, H, W): a view; of the blocked form, a copy of
    its first `batch` images (an int, or a tensor whose first dimension is N)."""
    if x.dim() == 4:
        return x[:, :, PAD:-PAD, PAD:-PAD]
    if batch is None:
        raise ValueError("unpad of the blocked layout needs the batch size (batch=N)")
    n = batch if isinstance(batch, int) else len(batch)
    g, c, hp, wp, lanes = x.shape
    inner = x[:, :, PAD:-PAD, PAD:-PAD].permute(0, 4, 1, 2, 3)
    return inner.reshape(g * lanes, c, hp - 2 * PAD, wp - 2 * PAD)[:n]


# ---------------------------------------------------------------- graph conversion

_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
# consumers that read an activation and return a new tensor: a unit's reused buffer may feed
# them (anything else might keep a view of it past the forward pass)
_READING_MODULES = (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveMaxPool2d)
_READING_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d,
                      F.conv2d, F.linear, torch.mean)
_READING_METHODS = ("mean", "sum", "amax", "amin")


def _is_relu(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return type(gm.get_submodule(n.target)) is nn.ReLU
    if n.op == "call_function":
        return n.target in _RELU_FUNCTIONS and len(n.args) == 1
    return n.op == "call_method" and n.target in ("relu", "relu_") and len(n.args) == 1


def _added_to(n: fx.Node, conv: fx.Node) -> fx.Node | None:
    """The other operand if `n` is `conv + other` (or `other + conv`) without scaling."""
    if n.kwargs or len(n.args) != 2:
        return None
    if not ((n.op == "call_function" and n.target in _ADD_FUNCTIONS)
            or (n.op == "call_method" and n.target in ("add", "add_"))):
        return None
    a, b = n.args
    if n.target in (operator.iadd, "add_") and a is not conv:
        return None  # `other += conv(x)` changes `other` in place: leave it to torch
    other = b if a is conv else a if b is conv else None
    return other if isinstance(other, fx.Node) and other is not conv else None


def _reads_only(gm: fx.GraphModule, n: fx.Node) -> bool:
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), (*_READING_MODULES, SparseConv2d))
    if n.op == "call_method":
        return n.target in _READING_METHODS
    return n.op == "call_function" and (n.target in _READING_FUNCTIONS or n.target is pad_planes)


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's value (for shapes and timing)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = out = super().run_node(n)
        return out


@dataclass
class _Match:
    conv: fx.Node
    tail: fx.Node  # the node whose value the unit replaces
    residual: fx.Node | None = None
    relu: bool = False
    notes: list[str] = field(default_factory=list)


def _match(gm: fx.GraphModule, conv: fx.Node) -> _Match:
    m = _Match(conv, conv)
    users = list(conv.users)
    if len(users) == 1:
        other = _added_to(users[0], conv)
        if other is not None:
            m.residual, m.tail = other, users[0]
            m.notes.append("+ residual")
    users = list(m.tail.users)
    if len(users) == 1 and _is_relu(gm, users[0]):
        m.relu, m.tail = True, users[0]
        m.notes.append("+ ReLU")
    return m


def convert_convs(gm: fx.GraphModule, example_input: torch.Tensor, min_sparsity: float
                  ) -> list:
    """Replace, in place, each sparse enough nn.Conv2d of the traced model `gm` (BatchNorm
    already folded) that computes faster with `SparseConv2d` on `example_input` — fused with
    a following residual add and ReLU — by one; returns an `ExportDecision` per convolution."""
    from .sparse import ExportDecision, is_faster

    with torch.inference_mode():
        rec = _Recorder(gm)
        rec.run(example_input)
    values = rec.values
    decisions = []
    padded: dict[fx.Node, fx.Node] = {}  # unpad(u) node -> unit node u (padded planes)
    batch: dict[fx.Node, fx.Node] = {}  # unit node -> an NCHW node of its batch size
    units: list[fx.Node] = []
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), nn.Conv2d):
            continue
        conv = gm.get_submodule(node.target)
        sp = (conv.weight == 0).float().mean().item()
        d = ExportDecision(node.target, tuple(conv.weight.shape), sp, False, "")
        decisions.append(d)
        x = values.get(node.args[0]) if node.args else None
        why = supported(conv)
        if why is not None:
            d.reason = why
        elif sp < min_sparsity:
            d.reason = f"sparsity below min_sparsity {min_sparsity:g}"
        elif len(node.args) != 1 or node.kwargs or not isinstance(x, torch.Tensor) \
                or x.dim() != 4 or x.dtype != torch.float32:
            d.reason = "input is not one float32 NCHW tensor"
        if d.reason:
            continue
        m = _match(gm, node)
        res = values.get(m.residual) if m.residual is not None else None
        if m.residual is not None and (not isinstance(res, torch.Tensor)
                                       or res.shape != values[node].shape
                                       or res.dtype != torch.float32):
            m = _Match(node, node)  # broadcasting or other dtype: the add stays dense
            res = None
        unit = SparseConv2d(conv, relu=m.relu)
        xp = pad_planes(x)
        dense = _dense_chain(conv, m.relu)
        if not is_faster(functools.partial(unit, xp, res), functools.partial(dense, x, res)):
            d.reason = "dense (BatchNorm folded, channels_last) is faster on the example input"
            continue
        d.sparse = True
        d.reason = " ".join(["numba kernel", *m.notes])
        name = f"sparse_{node.target.replace('.', '_')}"
        gm.add_submodule(name, unit)
        src = node.args[0]
        with graph.inserting_before(m.tail.next):
            xin = padded.get(src) or graph.call_function(pad_planes, (src,))
            ref = batch.get(xin, src)
            if m.residual is None:
                u = graph.call_module(name, (xin,))
            elif m.residual in padded:
                u = graph.call_module(name, (xin, padded[m.residual], PAD))
            else:
                u = graph.call_module(name, (xin, m.residual, 0))
            v = graph.call_function(unpad, (u, ref))
        m.tail.replace_all_uses_with(v)
        values[v] = values[m.tail]
        padded[v] = u
        batch[u] = ref
        units.append(u)
    for u in units:  # a residual converted after its consumer: hand it over padded
        if len(u.args) == 3 and u.args[1] in padded:
            u.args = (u.args[0], padded[u.args[1]], PAD)
    graph.eliminate_dead_code()
    _share_buffers(gm, units, {u: tuple(values[v].shape) for v, u in padded.items()})
    gm.delete_all_unused_submodules()
    gm._tracer_cls = graph._tracer_cls = _Tracer
    gm.recompile()
    return decisions


class _Tracer(fx.Tracer):
    """The tracer that rebuilds an exported model's graph when it is unpickled (fx pickles
    the generated code and traces it again): the layout functions stay calls, as built."""

    def __init__(self, *args: Any, autowrap_functions: tuple = (), **kwargs: Any):
        super().__init__(*args, autowrap_functions=(*autowrap_functions, pad_planes, unpad),
                         **kwargs)


class _Slots:
    """The identity of one exported model's shared output buffers (a weak key of the
    per-thread pools; copied and pickled along with the model)."""


def _share_buffers(gm: fx.GraphModule, units: list[fx.Node],
                   shapes: dict[fx.Node, tuple]) -> None:
    """Let units reuse output buffers where nothing can keep a view of them, and share them
    between units whose outputs are never alive at once (same shape on the example input):
    a ResNet then cycles through a few buffers that stay in cache instead of one per layer
    (at batch 64, one per layer is 60 MB, and memory traffic ate most of the kernel's gain)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ends: dict[fx.Node, list] = {}  # node -> the (shape, slot)s free once it has run
    free: dict[tuple, list[int]] = {}
    slots, count, is_unit = _Slots(), 0, set(units)
    for n in gm.graph.nodes:
        if n in is_unit:
            unit = gm.get_submodule(n.target)
            views = [r for r in n.users if r.op == "call_function" and r.target is unpad]
            unit.reuse_output = all(_reads_only(gm, r) or (r in views and all(
                _reads_only(gm, rr) for rr in r.users)) for r in n.users)
            if unit.reuse_output:
                users = [*n.users, *(rr for r in views for rr in r.users)]
                pool = free.setdefault(shapes[n], [])
                unit.slots, unit.slot = slots, pool.pop() if pool else count
                count += unit.slot == count
                ends.setdefault(max(users, key=order.get), []).append((shapes[n], unit.slot))
        for shape, slot in ends.pop(n, []):  # after n's own output took its slot
            free[shape].append(slot)


def _dense_chain(conv: nn.Conv2d, relu: bool):
    """The dense computation a unit replaces, in its fastest dense form (channels_last)."""
    cl = safe_deepcopy(conv).to(memory_format=torch.channels_last)

    def f(x: torch.Tensor, res: torch.Tensor | None) -> torch.Tensor:
        y = cl(x.contiguous(memory_format=torch.channels_last))
        if res is not None:
            y = y + res
        return y.relu() if relu else y
    return f
