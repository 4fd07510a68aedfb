"""Sparse convolution export (issue 17): the numba kernel against F.conv2d, and the traced
conversion of whole CNNs against the pruned model they came from."""

import random
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mirrorprune as mp
import mirrorprune.sparse
from mirrorprune import sparse_conv
from mirrorprune.models import create_model
from mirrorprune.sparse_conv import SparseConv2d, pad_planes, unpad
from test_fast import Branchy, _trained_bn

pytestmark = pytest.mark.skipif(not sparse_conv.available(),
                                reason="numba not installed (pip install mirrorprune[fast])")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _sparse_conv(cin, cout, k, stride, padding, bias, sparsity=0.9, seed=0, groups=1,
                 dilation=1) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, bias=bias, groups=groups,
                     dilation=dilation).eval()
    with torch.no_grad():
        conv.weight[torch.rand_like(conv.weight) < sparsity] = 0
    return conv


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (1, 2, 0),
                                              (3, 1, 0), ((3, 1), 1, (1, 0)), (5, 1, 2),
                                              (7, 2, 3), ((5, 3), 1, (2, 3))])
@pytest.mark.parametrize("batch", [1, 7, 16, 64])
@pytest.mark.parametrize("blocked", [False, True])
def test_kernel_equals_conv2d(k, stride, padding, batch, blocked):
    conv = _sparse_conv(8, 12, k, stride, padding, bias=batch % 2 == 1)
    x = torch.randn(batch, 8, 11, 14)  # odd, non-square
    ref = conv(x).detach()
    unit = SparseConv2d(conv)
    xp = pad_planes(x, blocked)
    assert xp.dim() == (5 if blocked else 4)
    assert _rel(unpad(unit(xp), x), ref) < 1e-5
    # residual (plain and padded) and ReLU, fused
    res = torch.randn_like(ref)
    relu = SparseConv2d(conv, relu=True, reuse_output=True)
    want = F.relu(ref + res)
    assert _rel(unpad(relu(xp, res, 0), x), want) < 1e-5
    assert _rel(unpad(relu(xp, pad_planes(res, blocked), sparse_conv.PAD), x), want) < 1e-5
    # the border of the padded output stays zero: the next layer reads it as padding
    out = relu(xp, res, 0)
    assert out[:, :, 0].abs().max() == 0 and out[:, :, :, -1].abs().max() == 0


@pytest.mark.parametrize("cin,cout,groups", [(8, 12, 2), (8, 8, 8), (8, 16, 8)])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("batch", [3, 16])
def test_grouped_and_depthwise_convolutions(cin, cout, groups, stride, batch):
    conv = _sparse_conv(cin, cout, 3, stride, 1, bias=True, sparsity=0.5, groups=groups)
    x = torch.randn(batch, cin, 9, 10)
    unit = SparseConv2d(conv, relu=True)
    assert unit.sparsity == pytest.approx(float((conv.weight == 0).float().mean()))
    assert _rel(unpad(unit(pad_planes(x)), x), F.relu(conv(x)).detach()) < 1e-5


def test_the_layout_follows_the_batch_and_mixed_layouts_are_refused():
    assert sparse_conv.LANES == sparse_conv._k.LANES
    assert [sparse_conv.blocked_for(n) for n in (1, 15, 16, 17, 20, 28, 64)] == \
        [False, False, True, False, False, True, True]
    x = torch.randn(40, 3, 5, 6)
    xp = pad_planes(x)
    assert xp.shape == (3, 3, 7, 8, 16) and xp[2, :, :, :, 8:].abs().max() == 0
    assert torch.equal(unpad(xp, 40), x) and torch.equal(unpad(xp, x), x)
    with pytest.raises(ValueError, match="batch size"):
        unpad(xp)
    unit = SparseConv2d(_sparse_conv(3, 4, 3, 1, 1, bias=True))
    with pytest.raises(ValueError, match="residual"):
        unit(xp, pad_planes(torch.randn(40, 4, 5, 6), blocked=False), sparse_conv.PAD)


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 2, 0)])
def test_kernel_handles_empty_rows_and_fully_zero_weights(k, stride, padding):
    # a layer pruned away entirely (global pruning at 99% does that to some): its bias only
    conv = _sparse_conv(4, 6, k, stride, padding, bias=True, sparsity=1.0)
    for x in (torch.randn(3, 4, 5, 5), torch.randn(16, 4, 5, 5)):
        assert _rel(unpad(SparseConv2d(conv)(pad_planes(x)), x), conv(x).detach()) < 1e-6


def test_kernel_equals_conv2d_on_random_shapes():
    """Random groups (1, 2, 3 or one per input channel), channel counts, kernel sizes (1, 2, 3,
    5), dilations (1-3), strides, paddings (0-3), sizes down to the kernel's extent, batches,
    sparsities (0 to 1), ReLU and residuals, twice each (a reused output buffer must come back
    with a zero border), in both layouts."""
    rng = random.Random(0)
    for _ in range(60):
        kh, kw = rng.choice([1, 2, 3, 5]), rng.choice([1, 2, 3, 5])
        groups = rng.choice([1, 1, 2, 3, "depthwise"])
        cin = rng.randint(1, 12) if groups == "depthwise" else groups * rng.randint(1, 4)
        groups = cin if groups == "depthwise" else groups
        conv = _sparse_conv(cin, groups * rng.randint(1, 4), (kh, kw), rng.choice([1, 2]),
                            (rng.randint(0, 3), rng.randint(0, 3)), rng.random() < 0.5,
                            sparsity=rng.choice([0.0, 0.5, 0.9, 0.99, 1.0]),
                            seed=rng.randint(0, 999), groups=groups,
                            dilation=(rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2, 3])))
        blocked = rng.random() < 0.5
        sh, sw = (d * (k - 1) + 1 for d, k in zip(conv.dilation, (kh, kw)))
        x = torch.randn(rng.choice([1, 2, 3, 16, 17, 33]), conv.in_channels,
                        rng.randint(sh, sh + 12), rng.randint(sw, sw + 12))
        ref = conv(x).detach()
        res = torch.randn_like(ref)
        unit = SparseConv2d(conv, relu=True, reuse_output=rng.random() < 0.5)
        for _ in range(2):
            out = unit(pad_planes(x, blocked), pad_planes(res, blocked), sparse_conv.PAD)
            assert _rel(unpad(out, x), F.relu(ref + res)) < 1e-5
            assert sum(out[:, :, i].abs().sum() + out[:, :, :, i].abs().sum()
                       for i in (0, -1)) == 0


def test_unsupported_convolutions_are_refused_with_the_reason():
    for conv, why in [(nn.Conv2d(4, 4, 3, stride=3), "stride"),
                      (nn.Conv2d(4, 4, 3, padding="same"), "padding"),
                      (nn.Conv2d(4, 4, 3).double(), "float32")]:
        assert why in sparse_conv.supported(conv)
        with pytest.raises(ValueError, match=why):
            SparseConv2d(conv)


@pytest.fixture
def always_sparse(monkeypatch):
    """Convert every candidate whatever the timing says (the timing is tested on its own)."""
    monkeypatch.setattr(mirrorprune.sparse, "is_faster", lambda a, b, **kw: True)


class OwnNet(nn.Module):
    """A user's CNN: functional ReLUs, `torch.relu`, an in-place add, a max-pool, a 5x5, a
    depthwise and a dilated convolution, a 1x1 stride-2 projection and a second output of
    intermediate features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16))
        self.a = nn.Conv2d(16, 16, 5, padding=2)  # wider than the layout's border
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise
        self.b = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.bn_b = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.proj = nn.Conv2d(16, 24, 1, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = F.relu(self.stem(x))
        y = self.bn_b(self.b(torch.relu(self.dw(torch.relu(self.a(h))))))
        y += h
        h = F.relu(y)
        z = self.down(h) + self.proj(h)
        return self.head(self.pool(z.relu()).mean((2, 3))), h


def _pruned(model: nn.Module, shape, sparsity=0.9) -> nn.Module:
    return mp.prune(_trained_bn(model, shape), sparsity)


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn", "own"])
def test_exported_cnn_equals_the_pruned_model(name, always_sparse):
    model = _pruned(OwnNet() if name == "own" else create_model(name), (3, 32, 32))
    exported, report = mp.export_sparse(model, example_input=torch.randn(2, 3, 32, 32),
                                        report=True)
    convs = [d for d in report if len(d.shape) == 4]
    assert convs and all(d.sparse or "min_sparsity" in d.reason for d in convs)
    assert any("ReLU" in d.reason for d in convs if d.sparse)
    if name != "vgg16_bn":
        assert any("residual" in d.reason for d in convs if d.sparse)
    units = [m for m in exported.modules() if isinstance(m, SparseConv2d)]
    if name == "resnet20":  # outputs never alive at once share a buffer (checked below)
        assert all(u.reuse_output for u in units) and len({u.slot for u in units}) < len(units)
    with torch.inference_mode():
        for batch, hw in [(1, (32, 32)), (7, (32, 32)), (16, (32, 48)), (64, (32, 32)),
                          (40, (48, 32))]:  # 40: blocked, the last group of 16 part empty
            for x in (torch.randn(batch, 3, *hw), torch.randn(batch, 3, *hw)):
                # the second input runs through the same buffers: the layers' cached calls
                ref, out = model(x), exported(x)
                for r, o in zip(*((ref, out) if isinstance(ref, tuple) else ([ref], [out]))):
                    assert _rel(o, r) < 1e-4


def test_outputs_that_escape_are_not_overwritten_by_the_next_call(always_sparse):
    model = _pruned(OwnNet(), (3, 16, 16))
    exported = mp.export_sparse(model, example_input=torch.randn(2, 3, 16, 16))
    x1, x2 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        first = exported(x1)
        kept = [t.clone() for t in first]
        exported(x2)
        for a, b in zip(first, kept):
            assert torch.equal(a, b)


def test_moving_an_exported_model_renews_its_cached_calls(always_sparse):
    """share_memory() moves every buffer's storage: a cached call must not read the old one."""
    model = _pruned(create_model("resnet20"), (3, 32, 32))
    exported = mp.export_sparse(model, example_input=torch.randn(2, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        exported(x), exported(x)  # the second call is cached
        unit = next(m for m in exported.modules() if isinstance(m, SparseConv2d))
        before = unit.values.data_ptr()
        exported.share_memory()
        assert unit.values.data_ptr() != before
        assert _rel(exported(x), model(x)) < 1e-4


def test_an_exported_model_pickles_and_so_does_one_from_before_shared_buffers(always_sparse):
    """fx pickles the generated code and traces it again on load (which failed on the layout
    functions); units pickled by an older version lack `slots`, `slot` and `_generation`:
    they fall back to one buffer per unit and a fresh cache."""
    import io
    import pickle

    model = _pruned(create_model("resnet20"), (3, 32, 32))
    exported = mp.export_sparse(model, example_input=torch.randn(2, 3, 32, 32))
    buf = io.BytesIO()
    torch.save(exported, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    def nodes(gm):
        return [(n.op, n.target) for n in gm.graph.nodes]

    assert nodes(loaded) == nodes(exported)
    for unit in exported.modules():
        if isinstance(unit, SparseConv2d):
            for name in ("slots", "slot", "_generation"):
                unit.__dict__.pop(name, None)
    old = pickle.loads(pickle.dumps(exported))
    with torch.inference_mode():
        for batch in (2, 2, 16, 16):  # both layouts, each twice (the second call is cached)
            x = torch.randn(batch, 3, 32, 32)
            ref = model(x)
            assert _rel(loaded(x), ref) < 1e-4 and _rel(old(x), ref) < 1e-4


def test_an_exported_model_is_freed_with_its_buffers_and_cached_calls(always_sparse):
    import gc
    import weakref

    exported = mp.export_sparse(_pruned(create_model("resnet20"), (3, 32, 32)),
                                example_input=torch.randn(2, 3, 32, 32))
    with torch.inference_mode():
        for batch in (16, 16, 2, 2):  # both layouts, each twice (the second call is cached)
            exported(torch.randn(batch, 3, 32, 32))
    units = [weakref.ref(m) for m in exported.modules() if isinstance(m, SparseConv2d)]
    del exported
    gc.collect()
    assert units and all(u() is None for u in units)


def test_two_threads_at_once_and_two_models_do_not_share_buffers(always_sparse):
    models = [_pruned(create_model("resnet20"), (3, 32, 32), s) for s in (0.9, 0.95)]
    exported = [mp.export_sparse(m, example_input=torch.randn(4, 3, 32, 32)) for m in models]
    xs = [torch.randn(4, 3, 32, 32) for _ in range(4)]
    with torch.inference_mode():
        want = [[m(x) for x in xs] for m in models]
    errors = []

    def work(i: int) -> None:
        with torch.inference_mode():
            for _ in range(5):
                for x, w in zip(xs, want[i % 2]):
                    errors.append(_rel(exported[i % 2](x), w))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4 * 5 * 4 and max(errors) < 1e-4


def test_dense_where_dense_is_faster(monkeypatch):
    monkeypatch.setattr(mirrorprune.sparse, "is_faster", lambda a, b, **kw: False)
    model = _pruned(create_model("resnet20"), (3, 32, 32))
    exported, report = mp.export_sparse(model, example_input=torch.randn(2, 3, 32, 32),
                                        report=True)
    assert exported is not model and not any(d.sparse for d in report)
    assert any("dense" in d.reason and "faster" in d.reason for d in report)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        assert _rel(exported(x), model(x)) < 1e-4  # BatchNorm folded, nothing else


@pytest.mark.parametrize("inplace", [False, True])
def test_the_callers_model_is_left_as_it_was(inplace, always_sparse):
    model = _pruned(create_model("resnet20"), (3, 32, 32))
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        before = model(x)
    exported = mp.export_sparse(model, example_input=x, inplace=inplace)
    with torch.inference_mode():
        assert _rel(model(x), before) < 1e-5  # BatchNorm not folded into it twice
        assert _rel(exported(x), before) < 1e-4


def test_untraceable_model_stays_dense_with_the_reason():
    model = _pruned(Branchy(), (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    exported, report = mp.export_sparse(model, example_input=x, report=True)
    assert any("not traceable" in d.reason for d in report if len(d.shape) == 4)
    with torch.inference_mode():
        assert _rel(exported(x), model(x)) < 1e-5


def test_without_numba_convolutions_stay_dense_and_say_what_to_install(monkeypatch):
    monkeypatch.setattr(sparse_conv, "_k", None)
    model = _pruned(create_model("resnet20"), (3, 32, 32))
    with pytest.warns(UserWarning, match=r"mirrorprune\[fast\]"):
        exported, report = mp.export_sparse(model, example_input=torch.randn(2, 3, 32, 32),
                                            report=True)
    assert all(not d.sparse and "numba" in d.reason for d in report if len(d.shape) == 4)


def test_without_example_input_convolutions_stay_dense():
    model = _pruned(create_model("resnet20"), (3, 32, 32))
    _, report = mp.export_sparse(model, report=True)
    assert all("example_input" in d.reason for d in report if len(d.shape) == 4)
