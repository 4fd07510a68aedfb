import time

import numpy as np
import pytest
import torch
from torch import nn

import mirrorprune as mp
from mirrorprune.models import lenet_300_100, small_cnn


def _sparse_lenet(sparsity=0.95, seed=0):
    torch.manual_seed(seed)
    return mp.prune(lenet_300_100(10, 784), sparsity, scope="layer")


GATHER = mp.sparse.GATHER_MIN_BATCH  # from here on the gather kernel, below it the CSR product


@pytest.mark.parametrize("batch", [1, 7, GATHER - 1, GATHER, 64])
def test_export_sparse_same_outputs(batch):
    model = _sparse_lenet().eval()
    sparse = mp.export_sparse(model)
    assert sum(isinstance(m, mp.SparseLinear) for m in sparse.modules()) == 3
    assert not any(isinstance(m, mp.SparseLinear) for m in model.modules())  # a copy
    x = torch.randn(batch, 1, 28, 28)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)
    assert "sparsity=0.950" in repr(sparse)


@pytest.mark.parametrize("batch", [3, 40])  # the CSR product and the gather kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_linear_shapes_dtypes_and_edge_cases(batch, dtype):
    torch.manual_seed(0)
    for bias in (True, False):
        layer = mp.prune(nn.Sequential(nn.Linear(30, 20, bias=bias)), 0.9)[0].to(dtype)
        sparse = mp.SparseLinear.from_linear(layer)
        x = torch.randn(batch, 5, 30, dtype=dtype)  # leading dims are kept, like nn.Linear
        y = sparse(x)
        assert y.shape == (batch, 5, 20) and y.dtype == dtype and y.is_contiguous()
        torch.testing.assert_close(y, layer(x))
    empty = mp.SparseLinear(torch.zeros(4, 6, dtype=dtype), torch.arange(4, dtype=dtype))
    torch.testing.assert_close(empty(torch.randn(batch, 6, dtype=dtype)),
                               torch.arange(4, dtype=dtype).expand(batch, 4))


@pytest.mark.parametrize("batch", [2, 64])
def test_sparse_chain_hands_over_transposed_activations(batch):
    torch.manual_seed(0)
    model = mp.prune(nn.Sequential(
        nn.Linear(40, 30), nn.ReLU(), nn.Dropout(0.5), nn.Linear(30, 20), nn.Tanh(),
        nn.Linear(20, 10), nn.LayerNorm(10), nn.Linear(10, 5)), 0.85, scope="layer").eval()
    sparse = mp.export_sparse(model)
    flags = [m.transposed_output for m in sparse if isinstance(m, mp.SparseLinear)]
    # into a sparse layer through elementwise modules only: yes; into LayerNorm or out: no
    assert flags == [True, True, False, False]
    x = torch.randn(batch, 40)
    y = sparse(x)
    torch.testing.assert_close(y, model(x))
    assert y.is_contiguous() and y.view(-1).shape == (batch * 5,)
    # a subclass of Sequential may route data its own way: left contiguous
    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)
    res = mp.export_sparse(mp.prune(Residual(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), 0.85,
                                    scope="layer"))
    assert [m.transposed_output for m in res if isinstance(m, mp.SparseLinear)] == [False, False]


@pytest.mark.parametrize("batch", [16, 64, 100])
def test_sparse_layer_hands_a_dense_one_its_output_transposed(batch):
    """A dense nn.Linear multiplies a transposed input without a copy, so a sparse layer
    feeding one skips its transpose back; with numba the batch >= 16 product is its kernel."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(),
                          nn.Linear(30, 7))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(40, 50) < 0.05)  # sparse enough; the others dense
        model[0].weight[3] = 0  # an empty row: only its bias
    model.eval()
    sparse, report = mp.export_sparse(model, min_sparsity=0.8, report=True)
    assert [d.sparse for d in report] == [True, False, False]
    assert sparse[0].transposed_output
    for kernel in ("gather", "numba"):
        sparse[0].kernel = kernel
        for x in (torch.randn(batch, 50), torch.randn(2, batch, 50),
                  torch.randn(50, batch).t()):
            with torch.inference_mode():
                torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)  # grad mode


@pytest.mark.parametrize("faster", [True, False])
def test_export_times_the_layout_a_sparse_layer_hands_a_dense_one(monkeypatch, faster):
    """With an example input, the dense consumer of a sparse layer is timed on the transposed
    input and on a contiguous one (LeNet's 100→10 layer is 3x slower transposed): the export
    keeps the faster, and the outputs are the same either way."""
    from mirrorprune import sparse as sparse_mod

    seen = []

    def timed(layer, x):
        seen.append((layer, x.is_contiguous(), tuple(x.shape)))
        return faster

    monkeypatch.setattr(sparse_mod, "_transposed_is_faster", timed)
    monkeypatch.setattr(sparse_mod, "is_faster", lambda first, second, **kw: True)  # sparse
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 30), nn.ReLU(),
                          nn.Linear(30, 7), nn.Linear(7, 3))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(40, 50) < 0.05)  # the first sparse, the others dense
    model.eval()
    x = torch.randn(24, 50)
    sparse = mp.export_sparse(model, min_sparsity=0.8, example_input=x)
    assert isinstance(sparse[0], mp.SparseLinear) and type(sparse[2]) is nn.Linear
    assert [(type(m).__name__, c, shape) for m, c, shape in seen] == [("Linear", False,
                                                                      (24, 40))]
    assert seen[0][0] is sparse[2] and sparse[0].transposed_output is faster
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [16, 33, 64])
def test_sparse_linear_kernels_agree_and_export_times_them(monkeypatch, batch):
    """From batch 16 a float32 SparseLinear computes with the gather kernel or (kernel="numba",
    numba installed) the numba one: the same outputs, for 2-d, 3-d and transposed inputs.
    export_sparse with an example input keeps the faster one and says which; without numba,
    gather."""
    from mirrorprune import sparse_conv

    torch.manual_seed(0)
    model = mp.prune(nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)), 0.9,
                     scope="layer").eval()
    layer = mp.SparseLinear.from_linear(model[0])
    fast = mp.SparseLinear.from_linear(model[0])
    fast.kernel = "numba"
    for x in (torch.randn(batch, 64), torch.randn(3, batch, 64), torch.randn(64, batch).t()):
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), model[0](x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(layer(x), model[0](x), rtol=1e-5, atol=1e-6)
    x = torch.randn(batch, 64)
    for numba_here in (sparse_conv.available(), False):
        if not numba_here:
            monkeypatch.setattr(sparse_conv, "_k", None)
        sparse, report = mp.export_sparse(model, min_sparsity=0.5, example_input=x,
                                          report=True)
        kernels = [m.kernel for m in sparse if isinstance(m, mp.SparseLinear)]
        assert all(f"{k} kernel from batch 16" in d.reason
                   for k, d in zip(kernels, [d for d in report if d.sparse]))
        assert numba_here or set(kernels) <= {"gather"}
        with torch.inference_mode():
            torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-6)


def test_export_times_a_layer_on_the_layout_its_input_will_arrive_in(monkeypatch):
    """After a layer chosen sparse, the next Linear in the chain is timed on a transposed input
    (what it will get), the first on the contiguous one."""
    from mirrorprune import sparse as sparse_mod

    seen = []
    real = sparse_mod._faster_sparse

    def spy(layer, x, transposed_output=False):
        seen.append((x.is_contiguous(), transposed_output))
        return real(layer, x, transposed_output)

    monkeypatch.setattr(sparse_mod, "_faster_sparse", spy)
    monkeypatch.setattr(sparse_mod, "is_faster", lambda first, second, **kw: True)  # all sparse
    model = _sparse_lenet(0.95)
    mp.export_sparse(model, min_sparsity=0.0, example_input=torch.randn(32, 1, 28, 28))
    assert seen == [(True, True), (False, True), (False, False)]


def test_exported_model_deep_copies_and_pickles_after_use(tmp_path):
    """copy.deepcopy and torch.save of a whole exported model, also once its layers ran (and
    cached their kernel arrays): torch alone cannot deep-copy a CSR tensor."""
    import copy

    model = _sparse_lenet(0.95)
    x = torch.randn(32, 1, 28, 28)
    sparse = mp.export_sparse(model)
    for m in sparse.modules():
        if isinstance(m, mp.SparseLinear):
            m.kernel = "numba"
    with torch.inference_mode():
        y = sparse(x)
        for other in (copy.deepcopy(sparse), copy.deepcopy(sparse)):
            torch.testing.assert_close(other(x), y)
        torch.save(sparse, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        torch.testing.assert_close(loaded(x), y)
    assert [getattr(m, "kernel", None) for m in loaded.modules()] == \
        [getattr(m, "kernel", None) for m in sparse.modules()]


def test_export_sparse_keeps_dense_layers_and_refuses_wrapped():
    model = _sparse_lenet(0.5)
    assert not any(isinstance(m, mp.SparseLinear) for m in mp.export_sparse(model).modules())
    assert all(isinstance(m, mp.SparseLinear) for m in mp.export_sparse(model, 0.4).modules()
               if isinstance(m, (nn.Linear, mp.SparseLinear)))
    cnn = mp.prune(small_cnn(10, 1), 0.95)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(mp.export_sparse(cnn).eval()(x), cnn.eval()(x),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="plain model"):
        mp.export_sparse(mp.PILoT(lenet_300_100(), 1e-4).model)
    with pytest.raises(ValueError, match="min_sparsity"):
        mp.export_sparse(model, 1.5)


def test_median_seconds_interleaves_rounds_and_orders_by_time():
    from mirrorprune.sparse import median_seconds

    calls = []
    median_seconds(lambda: calls.append("a"), lambda: calls.append("b"), rounds=2, reps=3)
    assert "".join(calls) == "ab" + ("aaa" + "bbb") * 2  # one warm-up call each, then rounds
    calls.clear()
    median_seconds(lambda: calls.append("a"), rounds=1, warmup=0, round_seconds=0.0)
    assert calls == ["a", "a"]  # the call that sizes the rounds, then one round of one call
    fast, slow = median_seconds(lambda: time.sleep(1e-3), lambda: time.sleep(4e-3), rounds=3)
    assert 1e-3 <= fast < slow and slow >= 4e-3


def test_export_sparse_with_example_input_times_each_layer():
    model = _sparse_lenet(0.98).eval()
    x = torch.randn(64, 1, 28, 28)
    sparse = mp.export_sparse(model, example_input=x)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)
    n = sum(isinstance(m, mp.SparseLinear) for m in sparse.modules())
    assert 0 <= n <= 3 and model.training is False

    class WithUnused(nn.Module):  # a layer the example input never reaches stays dense
        def __init__(self):
            super().__init__()
            self.net, self.unused = model, nn.Linear(50, 50)
            nn.init.zeros_(self.unused.weight)

        def forward(self, x):
            return self.net(x)

    assert isinstance(mp.export_sparse(WithUnused()).unused, mp.SparseLinear)
    assert type(mp.export_sparse(WithUnused(), example_input=x).unused) is nn.Linear


def test_transformer_block_stays_correct():
    torch.manual_seed(0)
    block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    block = mp.prune(block, 0.9, scope="layer").eval()
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(mp.export_sparse(block)(x), block(x), rtol=1e-5, atol=1e-5)


def test_save_load_sparse_round_trip_is_exact_and_small(tmp_path):
    model = _sparse_lenet(0.95)
    size = mp.save_sparse(model, tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    assert size < 0.15 * (tmp_path / "dense.pt").stat().st_size
    fresh = lenet_300_100(10, 784)
    state = mp.load_sparse(tmp_path / "m.safetensors", fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v) and torch.equal(fresh.state_dict()[k], v)
    # an exported (CSR) model saves to the same tensors
    mp.save_sparse(mp.export_sparse(model), tmp_path / "csr.pt")
    csr = mp.load_sparse(tmp_path / "csr.pt")
    assert all(torch.equal(csr[k], v) for k, v in model.state_dict().items())
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a sparse file written by mirrorprune.save_sparse"):
        mp.load_sparse(tmp_path / "other.pt")


def _state_with_signed_zeros():
    torch.manual_seed(0)
    model = mp.prune(lenet_300_100(10, 784), 0.95)
    w = model[1].weight.data
    w[0, :5] = -0.0  # -0.0 and NaN are values, not zeros: they must come back as they were
    w[1, 0] = float("nan")
    return model


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def test_sparse_files_are_safetensors_and_round_trip_bit_for_bit(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model = _state_with_signed_zeros()
    size = mp.save_sparse(model, tmp_path / "m.safetensors")
    assert size == (tmp_path / "m.safetensors").stat().st_size
    state = mp.load_sparse(tmp_path / "m.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(_bits(state[k]), _bits(v)), k
    raw = st.load_file(tmp_path / "m.safetensors")  # a standard file: any safetensors reader
    assert raw["1.weight/values"].numel() < 0.06 * 784 * 300
    assert not list(tmp_path.glob("*.tmp"))


def test_pruning_leaves_no_negative_zeros():
    torch.manual_seed(0)
    pruned = mp.prune(lenet_300_100(10, 784), 0.9)
    w = torch.cat([p.flatten() for p in pruned.parameters()])
    assert not ((w == 0) & w.signbit()).any()


def test_every_changed_byte_is_detected_or_harmless(tmp_path):
    pytest.importorskip("safetensors")
    model = _sparse_lenet(0.95)
    path = tmp_path / "m.safetensors"
    mp.save_sparse(model, path)
    good = path.read_bytes()
    ref = mp.load_sparse(path)
    rng = np.random.default_rng(0)
    header = int.from_bytes(good[:8], "little") + 8
    positions = list(rng.integers(0, header, 40)) + list(rng.integers(header, len(good), 80))
    for i in positions:
        bad = bytearray(good)
        bad[i] ^= 0x10
        path.write_bytes(bytes(bad))
        try:
            got = mp.load_sparse(path)
        except mp.sparse.SparseFileError:
            continue
        # a change the format ignores (e.g. in the header's padding) loads the same weights
        assert all(torch.equal(_bits(got[k]), _bits(v)) for k, v in ref.items()), i
    bad = bytearray(good)
    bad[len(good) - 3] ^= 1  # a value's low bit
    path.write_bytes(bytes(bad))
    with pytest.raises(mp.sparse.SparseFileError, match="checksum"):
        mp.load_sparse(path)


def _legacy_file(model, path):
    """The torch format that release 0.1.0 wrote."""
    enc = {}
    for k, t in model.state_dict().items():
        if t.numel() >= 64:
            mask = t != 0
            enc[k] = {"shape": tuple(t.shape), "dtype": t.dtype,
                      "bitmask": mp.sparse._pack(mask), "values": t[mask].clone()}
        else:
            enc[k] = t.clone()
    torch.save({"format": "mirrorprune-sparse-v1", "tensors": enc}, path)


def test_bad_sparse_files_get_one_sentence(tmp_path):
    with pytest.raises(ValueError, match=r"load_sparse\(path, model=None\) takes the file first"):
        mp.load_sparse(nn.Linear(2, 2), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"save_sparse\(model, path\) takes the model"):
        mp.save_sparse(tmp_path / "m.safetensors", nn.Linear(2, 2))
    pytest.importorskip("safetensors")
    import safetensors.torch

    model = _sparse_lenet(0.95)
    good = tmp_path / "good.safetensors"
    mp.save_sparse(model, good)
    _legacy_file(model, tmp_path / "legacy.pt")  # still read, without pickle's code paths
    assert all(torch.equal(a, b) for a, b in zip(mp.load_sparse(tmp_path / "legacy.pt").values(),
                                                 model.state_dict().values()))
    files = {"empty": b"", "random": bytes(range(256)) * 8,
             "truncated": good.read_bytes()[:-100], "header only": good.read_bytes()[:200]}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    torch.save(model.state_dict(), tmp_path / "torch dict")
    torch.save(model.state_dict(), tmp_path / "torch dict trunc")
    (tmp_path / "torch dict trunc").write_bytes((tmp_path / "torch dict").read_bytes()[:500])
    safetensors.torch.save_file({"a": torch.zeros(3)}, tmp_path / "foreign safetensors")
    for name in [*files, "torch dict", "torch dict trunc", "foreign safetensors", "missing"]:
        with pytest.raises(mp.sparse.SparseFileError) as e:
            mp.load_sparse(tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and "Re-running" not in msg and str(tmp_path / name) in msg, msg
    with pytest.raises(mp.sparse.SparseFileError, match="another architecture.*missing: 0.weight"):
        mp.load_sparse(good, small_cnn(10, 1))


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    st = pytest.importorskip("safetensors.torch")
    path = tmp_path / "m.safetensors"
    mp.save_sparse(_sparse_lenet(0.9), path)
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        mp.save_sparse(_sparse_lenet(0.95), path)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


def test_transformer_encoder_exports_under_no_grad():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2)
    enc = mp.prune(enc, 0.9, scope="layer").eval()
    fast, report = mp.export_sparse(enc, min_sparsity=0.5, report=True)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():  # PyTorch's fused inference path, which reads the dense weights
        torch.testing.assert_close(fast(x), enc(x), rtol=1e-5, atol=1e-5)
    kept = [d for d in report if "fused inference path" in d.reason]
    assert len(kept) == 6 and not any(d.sparse for d in report)  # linear1, linear2, out_proj
    assert "layers.0.linear1" in str(report)
    attention = [d for d in report if d.name.endswith("self_attn.in_proj_weight")]
    assert len(attention) == 2 and all(d.sparsity == pytest.approx(0.9, abs=0.01)
                                       and d.shape == (96, 32) for d in attention)


def test_the_report_names_every_prunable_weight():
    """Layers without a sparse kernel here (Conv1d, transposed convolutions, recurrent layers,
    attention's input projection) stay dense and the report says so, with their sparsity."""
    model = nn.ModuleDict({"conv": nn.Conv1d(2, 4, 3), "up": nn.ConvTranspose2d(4, 2, 2),
                           "rnn": nn.GRU(4, 4), "fc": nn.Linear(4, 2)})
    pruned = mp.prune(model, 0.9, scope="layer")
    _, report = mp.export_sparse(pruned, report=True, min_sparsity=0.5)
    rows = {d.name: d for d in report}
    assert set(rows) == {"conv", "up", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "fc"}
    assert all(rows[n].sparsity == pytest.approx(0.9, abs=0.05) for n in rows)
    gru = rows["rnn.weight_hh_l0"]
    assert gru.reason == "GRU: no sparse kernel (nn.Linear and nn.Conv2d have one)"
    assert not gru.sparse and rows["fc"].sparse


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 7, 16, 64])
def test_low_precision_export_at_every_batch_size(dtype, batch):
    model = _sparse_lenet(0.95).to(dtype).eval()
    fast, report = mp.export_sparse(model, report=True)
    assert all(d.sparse and "no CSR product for" in d.reason for d in report)
    x = torch.randn(batch, 1, 28, 28, dtype=dtype)
    with torch.no_grad():
        y = fast(x)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), model(x).float(), rtol=0.05, atol=0.05)
