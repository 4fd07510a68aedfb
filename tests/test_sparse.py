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
    size = mp.save_sparse(model, tmp_path / "m.pt")
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    assert size < 0.15 * (tmp_path / "dense.pt").stat().st_size
    fresh = lenet_300_100(10, 784)
    state = mp.load_sparse(tmp_path / "m.pt", fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v) and torch.equal(fresh.state_dict()[k], v)
    # an exported (CSR) model saves to the same tensors
    mp.save_sparse(mp.export_sparse(model), tmp_path / "csr.pt")
    csr = mp.load_sparse(tmp_path / "csr.pt")
    assert all(torch.equal(csr[k], v) for k, v in model.state_dict().items())
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a sparse file written by mirrorprune.save_sparse"):
        mp.load_sparse(tmp_path / "other.pt")
