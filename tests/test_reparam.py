import copy
import io
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mirrorprune as mp
import mirrorprune.reparam
from conftest import TiedNet, conv_net
from mirrorprune.reparam import find_mirror_weights, mirrored_names, select_weights


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0, 5.0])
def test_mirror_init_identities(beta):
    x0 = torch.randn(1000, dtype=torch.float64) * 3
    x0[:5] = 0
    m, w = mp.mirror_init(x0, beta)
    torch.testing.assert_close(m * w, x0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(m * m - w * w, torch.full_like(x0, beta), rtol=1e-12, atol=1e-12)
    assert (m > w.abs()).all() if beta > 0 else torch.allclose(m, w.abs())
    if beta == 0:  # spred: m0 = sqrt|x0|, w0 = sign(x0) sqrt|x0|
        torch.testing.assert_close(m, x0.abs().sqrt())
        torch.testing.assert_close(w, x0.sign() * x0.abs().sqrt())


@settings(max_examples=200, deadline=None)
@given(x=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50),
       beta=st.one_of(st.just(0.0), st.floats(1e-12, 1e6)))
def test_mirror_init_identities_property(x, beta):
    """m0 ⊙ w0 = x0 and m0² − w0² = β for any weights and β (float64, relative to scale)."""
    x0 = torch.tensor(x, dtype=torch.float64)
    m, w = mp.mirror_init(x0, beta)
    scale = torch.hypot(torch.full_like(x0, beta), 2 * x0)  # = m² + w², what cancels
    assert torch.isfinite(m).all() and torch.isfinite(w).all() and (m >= 0).all()
    assert ((m * w - x0).abs() <= 1e-12 * (x0.abs() + 1e-300)).all()
    assert ((m * m - w * w - beta).abs() <= 1e-12 * scale + 1e-300).all()


def _outputs_equal(model, x):
    model.eval()
    y0 = model(x)
    keys = list(model.state_dict())
    pilot = mp.PILoT(model, schedule=1e-3)
    torch.testing.assert_close(model(x), y0, rtol=1e-5, atol=1e-6)
    for mw in pilot.weights:  # the identities hold on the stored float32 tensors
        torch.testing.assert_close(mw.m * mw.m - mw.w * mw.w, torch.ones_like(mw.m),
                                   rtol=1e-5, atol=1e-5)
    return pilot, keys


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_wrapping_keeps_conv_outputs(dim):
    model = conv_net(dim)
    x = torch.randn(2, 2, *([6] * dim))
    model(x)  # materialize the LazyLinear
    pilot, _ = _outputs_equal(model, x)
    assert len(pilot.weights) == 3
    assert {type(m).__name__ for m, _ in (mw.modules[0] for mw in pilot.weights)} >= {"Linear"}


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_transposed_convolutions_are_selected_by_default(dim):
    """SPEC §2.1's nn.Conv* includes the transposed ones (a U-Net's decoder)."""
    torch.manual_seed(0)
    conv = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dim - 1]
    model = nn.Sequential(conv(2, 3, 2, stride=2), nn.ReLU(), conv(3, 2, 3, padding=1))
    pilot, keys = _outputs_equal(model, torch.randn(2, 2, *([3] * dim)))
    assert [mw.name for mw in pilot.weights] == ["0.weight", "2.weight"]
    plain = pilot.finalize(0.5)
    assert list(plain.state_dict()) == keys and type(plain[0]) is conv


def test_wrapping_keeps_linear_outputs_and_state_dict_names():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x0 = model[0].weight.detach().clone()
    pilot, keys = _outputs_equal(model, torch.randn(3, 8))
    assert list(model.state_dict()) == ["0.weight_m", "0.weight_w", "0.bias",
                                        "2.weight_m", "2.weight_w", "2.bias"]
    torch.testing.assert_close(model[0].weight, x0)
    assert isinstance(model[0], nn.Linear) and "Linear" in repr(model)
    assert list(pilot.finalize(0.0).state_dict()) == keys


def test_tied_weights_share_one_pair():
    model = TiedNet()
    x = torch.randn(4, 6)
    pilot, keys = _outputs_equal(model, x)
    assert len(pilot.weights) == 1 and pilot.weights[0].names == ["enc.weight", "dec.weight"]
    assert model.enc.weight_m is model.dec.weight_m
    assert len(list(model.parameters())) == 4  # m, w, two biases
    out = pilot.finalize(0.5)
    assert out.enc.weight is out.dec.weight
    assert list(out.state_dict()) == keys
    assert mp.sparsity_report(out).params == 36  # counted once


def test_tie_to_unselected_module_is_refused():
    model = TiedNet()
    with pytest.raises(ValueError, match="tied"):
        mp.PILoT(model, 1e-3, exclude=("dec",))


class _TiedLM(nn.Module):
    """A language model whose output layer shares its input embedding's Parameter."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.mid = nn.Embedding(20, 8), nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(torch.relu(self.mid(self.emb(t))))


def test_a_head_tied_to_the_embedding_stays_dense_by_default(monkeypatch):
    monkeypatch.setattr(mirrorprune.reparam, "_SHOWN", set())
    with pytest.warns(UserWarning, match=r"head.weight \(tied to emb.weight\) stays dense") as seen:
        pilot = mp.PILoT(_TiedLM(), 1e-3)
    assert [w.filename for w in seen] == [__file__]  # attributed to the caller
    assert [mw.name for mw in pilot.weights] == ["mid.weight"]
    model = _TiedLM()
    emb = model.emb.weight.detach().clone()
    pruned = mp.prune(model, 0.5)  # the embedding is not pruned through the tie
    assert torch.equal(pruned.emb.weight, emb) and pruned.head.weight is pruned.emb.weight
    assert (pruned.mid.weight == 0).float().mean() == 0.5
    both = mp.PILoT(_TiedLM(), 1e-3, include=[nn.Embedding, nn.Linear])  # sparsified together
    assert both.weights[0].names == ["emb.weight", "head.weight"]
    with pytest.raises(ValueError, match="'head.weight' is tied to 'emb.weight', which is not "
                       "selected"):
        mp.PILoT(_TiedLM(), 1e-3, include=[nn.Linear])  # a tie split on purpose


def test_copy_pickle_and_device_moves_keep_the_reparametrization():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    mp.PILoT(model, 1e-3)
    x = torch.randn(3, 5)
    y = model(x)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), y)
    assert clone[0].weight_m is not model[0].weight_m
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False)(x), y)
    torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), y)
    model.double()
    assert model[0].weight.dtype == torch.float64


def test_include_exclude_selection():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    assert [mw.name for mw in mp.PILoT(copy.deepcopy(model), 0.0).weights] == ["0.weight",
                                                                               "3.weight"]
    assert [mw.name for mw in mp.PILoT(copy.deepcopy(model), 0.0, exclude=("3",)).weights] == [
        "0.weight"]
    assert [mw.name for mw in mp.PILoT(copy.deepcopy(model), 0.0,
                                       include=[nn.Linear]).weights] == ["3.weight"]
    pred = mp.PILoT(copy.deepcopy(model), 0.0, include=lambda mod, name: name == "0")
    assert [mw.name for mw in pred.weights] == ["0.weight"]
    bn = mp.PILoT(copy.deepcopy(model), 0.0, include=["1"])  # explicit opt-in is allowed
    assert [mw.name for mw in bn.weights] == ["1.weight"]


def test_a_pattern_stands_for_the_part_of_the_model_it_names():
    """A name glob or type covers the modules inside what it names: excluding a block keeps
    its layers dense (it used to match only the container, which has no weight, and did
    nothing); including one takes its layers of the default types (not its BatchNorm)."""
    block = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2))
    model = nn.Sequential(block, nn.Flatten(), nn.Linear(2, 3))
    assert [r.name for r in select_weights(model, exclude=("0",))] == ["2.weight"]
    assert [r.name for r in select_weights(model, include=("0",))] == ["0.0.weight"]
    layer = nn.TransformerEncoderLayer(8, 2, 16)
    assert [r.name for r in select_weights(layer, exclude=[nn.MultiheadAttention])] == [
        "linear1.weight", "linear2.weight"]
    assert [r.name for r in select_weights(layer, include=["self_attn"])] == [
        "self_attn.in_proj_weight", "self_attn.out_proj.weight"]


@pytest.mark.parametrize("kwargs, match", [
    ({"include": [nn.LSTM]}, "select no prunable weight"),
    ({"exclude": ("0", "2")}, "select no prunable weight"),
    ({"exclude": ("fc*",)}, "exclude pattern 'fc\\*' matches no module"),
    ({"include": ["nope"]}, "include pattern 'nope' matches no module"),
    ({"include": [3]}, "include entries"),
    ({"beta": -1.0}, r"beta \(m0² − w0²; paper: 1.0\) must be a finite number >= 0"),
    ({"beta": float("nan")}, "beta .*must be a finite number"),
    ({"schedule": -1e-3}, "alpha must be a finite number >= 0"),
    ({"schedule": "geometric"}, "schedule must be"),
])
def test_invalid_arguments_name_the_problem(kwargs, match):
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    kwargs = {"schedule": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        mp.PILoT(model, **kwargs)
    assert not find_mirror_weights(model)  # a refused wrap leaves the model untouched


class _Kernel(nn.Module):  # a layer whose matrix is not named `weight`
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return x @ self.kernel


def test_unsupported_layer_types_are_named(monkeypatch):
    monkeypatch.setattr(mirrorprune.reparam, "_SHOWN", set())  # messages are shown once
    model = nn.ModuleDict({"mine": _Kernel(), "att": nn.MultiheadAttention(4, 2),
                           "fc": nn.Linear(4, 2)})
    with pytest.raises(ValueError, match=r"cannot reparametrize: mine \(_Kernel: kernel"):
        mp.PILoT(model, 1e-3, include=[_Kernel, nn.MultiheadAttention, nn.Linear])
    assert not find_mirror_weights(model)
    with pytest.warns(UserWarning, match=r"1 weight matrix \(16 parameters\) stays dense.*"
                      r"mine.kernel \(_Kernel, 16\)\. include"):
        pilot = mp.PILoT(model, 1e-3)  # the default selection takes attention and Linear
    assert [mw.name for mw in pilot.weights] == ["att.in_proj_weight", "att.out_proj.weight",
                                                 "fc.weight"]


def _attention(**kw):
    att = nn.MultiheadAttention(8, 2, batch_first=True, **kw)
    kdim, vdim = kw.get("kdim", 8), kw.get("vdim", 8)
    q, k, v = torch.randn(2, 4, 8), torch.randn(2, 5, kdim), torch.randn(2, 5, vdim)
    return att, lambda mod: mod(q, k, v)[0]


def _recurrent(cls, **kw):
    mod = cls(3, 6, **kw)
    x = torch.randn(2, 5, 3) if issubclass(cls, nn.RNNBase) else torch.randn(2, 3)
    return mod, lambda m: (lambda y: y[0] if isinstance(y, tuple) else y)(m(x))


@pytest.mark.parametrize("make, names", [
    (lambda: _attention(), ["in_proj_weight"]),
    (lambda: _attention(kdim=3, vdim=5), ["q_proj_weight", "k_proj_weight", "v_proj_weight"]),
    (lambda: _recurrent(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True),
     [f"weight_{k}_l{i}{d}" for i in (0, 1) for d in ("", "_reverse") for k in ("ih", "hh")]),
    (lambda: _recurrent(nn.LSTM, proj_size=2), ["weight_ih_l0", "weight_hh_l0",
                                                "weight_hr_l0"]),
    (lambda: _recurrent(nn.GRU, bias=False), ["weight_ih_l0", "weight_hh_l0"]),
    (lambda: _recurrent(nn.GRUCell), ["weight_ih", "weight_hh"]),
], ids=["attention", "attention-kv", "lstm", "lstm-proj", "gru", "gru-cell"])
def test_attention_and_recurrent_weights_are_mirrored(make, names):
    """MultiheadAttention's input projection(s) and the recurrent layers' matrices (which an
    RNN reads through its cached _flat_weights list) are wrapped as m ⊙ w with m0² − w0² = β:
    the function kept (in training and eval mode), gradients reaching w, copies and pickles
    intact, collapsed back to the plain class with the original parameter names."""
    torch.manual_seed(0)
    mod, run = make()
    base, keys = type(mod), list(mod.state_dict())
    before = {a: getattr(mod, a).detach().clone() for a in names}
    ys = [run(mod.train()), run(mod.eval())]
    pilot = mp.PILoT(mod, 1e-3, beta=0.5)
    assert [mw.name for mw in pilot.weights][:len(names)] == names
    assert mirrored_names(mod) == tuple(names) and isinstance(mod, base)
    for a in names:
        m, w = mod._parameters[a + "_m"], mod._parameters[a + "_w"]
        torch.testing.assert_close(m * w, before[a])
        torch.testing.assert_close(m * m - w * w, torch.full_like(m, 0.5))
    with torch.no_grad():
        for y, mode in zip(ys, (mod.train, mod.eval)):
            mode()
            torch.testing.assert_close(run(mod), y)
            torch.testing.assert_close(run(copy.deepcopy(mod)), y)
            torch.testing.assert_close(run(pickle.loads(pickle.dumps(mod))), y)
    run(mod.train()).sum().backward()
    assert all(mod._parameters[a + "_w"].grad is not None for a in names)
    plain = pilot.finalize(0.5)
    assert type(plain) is base and list(plain.state_dict()) == keys
    assert mp.sparsity_report(plain).sparsity == pytest.approx(0.5, abs=0.01)
    with torch.no_grad():  # the plain model computes with its own Parameters
        for a in names:
            getattr(plain, a).zero_()
        assert not torch.allclose(run(plain), run(mod))


def test_the_default_selection_says_once_which_matrices_it_leaves_dense(monkeypatch):
    monkeypatch.setattr(mirrorprune.reparam, "_SHOWN", set())

    class Custom(nn.Module):  # a layer of the user's own: its `weight` is a Parameter
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 6))

    model = nn.ModuleDict({"emb": nn.Embedding(9, 6), "mine": Custom(), "up":
                           nn.Bilinear(2, 3, 4), "fc": nn.Linear(6, 2)})
    with pytest.warns(UserWarning) as seen:
        mp.prune(copy.deepcopy(model), 0.5)
        mp.prune(copy.deepcopy(model), 0.5)  # the same message: shown once
    assert len(seen) == 1
    msg = str(seen[0].message)
    assert "2 weight matrices (54 parameters)" in msg and "mine.weight (Custom, 30)" in msg
    assert "up.weight (Bilinear, 24)" in msg and "emb" not in msg  # embeddings: by design
    monkeypatch.setattr(mirrorprune.reparam, "_SHOWN", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked for: no warning
        mp.prune(copy.deepcopy(model), 0.5, exclude=["mine", "up"])
        mp.prune(copy.deepcopy(model), 0.5, include=[nn.Linear, Custom])
    with pytest.raises(ValueError, match=r"select no prunable weight.*1 weight matrix \(30 "
                       r"parameters\) stays dense.*mine.weight \(Custom, 30\)"):
        mp.PILoT(nn.ModuleDict({"emb": nn.Embedding(9, 6), "mine": Custom()}), 1e-3)


def test_model_without_prunable_weights_and_double_wrap():
    with pytest.raises(ValueError, match="select no prunable weight"):
        mp.PILoT(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), 1e-3)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        mp.PILoT("resnet", 1e-3)
    model = nn.Linear(3, 3)
    mp.PILoT(model, 1e-3)
    with pytest.raises(ValueError, match="already reparametrized"):
        mp.PILoT(model, 1e-3)
    lazy = nn.Sequential(nn.Linear(3, 4), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"1.weight: not initialized yet .*call the model"):
        mp.PILoT(lazy, 1e-3)
    assert not find_mirror_weights(lazy)  # nothing wrapped halfway
    lazy(torch.randn(1, 3))
    assert len(mp.PILoT(lazy, 1e-3).weights) == 2


class _Scale(nn.Module):
    def forward(self, w):
        return 2 * w


def _managed(kind):
    """A LeNet-like net whose middle layer's weight is computed by `kind`."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    if kind == "parametrize":
        torch.nn.utils.parametrize.register_parametrization(net[2], "weight", _Scale())
    elif kind == "prune":
        torch.nn.utils.prune.l1_unstructured(net[2], "weight", amount=0.5)
    elif kind == "weight_norm":
        net[2] = torch.nn.utils.weight_norm(net[2])
    elif kind == "spectral_norm":
        net[2] = torch.nn.utils.spectral_norm(net[2])
    net(torch.randn(4, 8))  # old-style hooks leave the computed weight on the module
    return net


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
@pytest.mark.parametrize("kind, named", [
    ("parametrize", "parametrize"), ("prune", "torch.nn.utils.prune mask"),
    ("weight_norm", "weight_norm"), ("spectral_norm", "spectral_norm")])
def test_weights_computed_by_torch_utilities_are_refused_by_name(kind, named):
    with pytest.raises(ValueError, match=rf"2: .*{named}.*exclude=\['2'\]"):
        mp.PILoT(_managed(kind), 1e-3)
    net = _managed(kind)
    pilot = mp.PILoT(net, 1e-3, exclude=("2",))  # the way out
    x = torch.randn(4, 8)
    net(x).sum().backward()
    pilot.step(lr=0.1)
    plain = pilot.finalize(0.5).eval()  # never crashes on the excluded, hook-managed layer
    assert not mp.is_wrapped(plain)
    torch.testing.assert_close(plain(x), mp.finalize(net, 0.5).eval()(x))


def test_sparse_embeddings_are_refused_up_front():
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="0: embeddings with sparse=True.*sparse=False"):
        mp.PILoT(model, 1e-3, include=[nn.Embedding])
    mp.PILoT(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), 1e-3, include=[nn.Embedding])


def test_numpy_numbers_are_accepted_and_bad_learning_rates_refused():
    import numpy as np

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    pilot = mp.PILoT(model, np.float32(1e-3), beta=np.float32(1.0))
    for s in (np.float32(0.5), np.float64(0.5), np.int64(0)):
        assert mp.sparsity_report(pilot.finalize(s)).sparsity == pytest.approx(float(s), abs=0.01)
    for lr in (float("nan"), -0.1, float("inf"), "0.1"):
        with pytest.raises(ValueError, match="lr .*must be a finite number >= 0"):
            pilot.step(lr=lr)
    assert pilot.steps == 0
