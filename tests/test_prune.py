import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mirrorprune as mp


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 4))


def _zeros(model):
    return {r.name: r.zeros for r in mp.sparsity_report(model).layers}


@pytest.mark.parametrize("sparsity", [0.0, 0.2, 0.5, 0.9, 0.97, 0.999])
def test_global_finalize_is_exact_and_loads_strictly(sparsity):
    model = _net()
    keys = list(model.state_dict())
    pilot = mp.PILoT(model, 1e-3)
    n = sum(mw.m.numel() for mw in pilot.weights)
    x = {mw.name: mw.x() for mw in pilot.weights}
    out = pilot.finalize(sparsity)
    assert sum(_zeros(out).values()) == round(sparsity * n)
    assert list(out.state_dict()) == keys
    fresh = _net()
    fresh.load_state_dict(out.state_dict(), strict=True)
    # the survivors are exactly the largest |x|, unchanged in value
    all_x = torch.cat([t.flatten() for t in x.values()])
    kept = torch.cat([dict(out.named_parameters())[k].detach().flatten() for k in x])
    k = round(sparsity * n)
    if k:
        thresh = all_x.abs().sort().values[k - 1]
        assert (kept[all_x.abs() > thresh] == all_x[all_x.abs() > thresh]).all()
    inp = torch.randn(2, 3, 6, 6)
    out.eval(), fresh.eval()
    torch.testing.assert_close(fresh(inp), out(inp))


def test_layer_scope_prunes_each_tensor_exactly():
    pilot = mp.PILoT(_net(), 1e-3)
    out = pilot.finalize(0.7, scope="layer")
    for row in mp.sparsity_report(out).layers:
        assert row.zeros == round(0.7 * row.params)


def test_ties_are_broken_deterministically_and_counts_stay_exact():
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(0.5)  # 20 equal magnitudes
        model[1].weight.copy_(torch.tensor([[0.5, -0.5, 1.0, 2.0, 0.5]] * 3))
    pilot = mp.PILoT(model, 0.0)
    for s in (0.3, 0.5, 0.77):
        a, b = pilot.finalize(s), pilot.finalize(s)
        assert sum(_zeros(a).values()) == round(s * 35)
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    masks = mp.magnitude_masks({"a": torch.ones(5), "b": torch.ones(5)}, 0.4)
    assert masks["a"].tolist() == [False] * 4 + [True] and masks["b"].all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=60), st.floats(0, 0.999),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_masks_remove_the_first_k_of_a_stable_sort(values, sparsity, dtype):
    """The definition, ties (many here) included: the k smallest magnitudes, equal ones in
    index order, as the first k of a stable argsort."""
    mag = torch.tensor(values, dtype=dtype)
    keep = torch.ones(len(values), dtype=torch.bool)
    keep[torch.argsort(mag, stable=True)[:round(sparsity * len(values))]] = False
    assert torch.equal(mp.magnitude_masks({"x": mag}, sparsity)["x"], keep)


def test_finalize_twice_and_inplace():
    model = _net()
    pilot = mp.PILoT(model, 1e-3)
    before = copy.deepcopy(model.state_dict())
    a, b = pilot.finalize(0.9), pilot.finalize(0.9)
    assert a is not model and mp.is_wrapped(model) and not mp.is_wrapped(a)
    for k, v in model.state_dict().items():  # the wrapped model is untouched
        assert torch.equal(v, before[k])
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(p, q)
    c = pilot.finalize(0.9, inplace=True)
    assert c is model and not mp.is_wrapped(model)
    for p, q in zip(a.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q)
    with pytest.raises(RuntimeError, match="finalized in place"):
        pilot.finalize(0.9)
    with pytest.raises(RuntimeError, match="finalized in place"):
        pilot.step()
    with pytest.raises(ValueError, match="never wrapped"):
        mp.finalize(model, 0.9)


def test_prune_plain_model_and_errors():
    model = _net()
    out = mp.prune(model, 0.5, exclude=("0",))
    z = _zeros(out)
    assert z["0.weight"] == 0 and z["4.weight"] + z["6.weight"] == round(0.5 * (1280 + 40))
    assert mp.sparsity_report(model).zeros == 0  # a copy by default
    for bad in (1.0, -0.1, float("nan"), "0.9", True):
        with pytest.raises(ValueError, match=r"sparsity .*must be a finite number in \[0, 1\)"):
            mp.prune(model, bad)
    with pytest.raises(ValueError, match="scope must be one of"):
        mp.prune(model, 0.5, scope="per-layer")
    mp.PILoT(model, 1e-3)
    with pytest.raises(ValueError, match="use finalize"):
        mp.prune(model, 0.5)
    with torch.no_grad():
        model[4].weight_m[0, 0] = float("nan")
    with pytest.raises(ValueError, match="4.weight has non-finite entries"):
        mp.finalize(model, 0.5)


def test_sparsity_report_table_and_data():
    out = mp.PILoT(_net(), 1e-3).finalize(0.8)
    rep = mp.sparsity_report(out)
    assert [r.name for r in rep.layers] == ["0.weight", "4.weight", "6.weight"]
    assert rep.params == 216 + 1280 + 40 and rep.zeros == round(0.8 * rep.params)
    data = rep.as_dicts()
    assert data[-1]["name"] == "total" and data[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert data[0]["shape"] == [8, 3, 3, 3]
    text = str(rep)
    assert "0.weight" in text and "8x3x3x3" in text and "80.01%" in text  # 1229 of 1536


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=4),
       sparsity=st.floats(0, 0.999), scope=st.sampled_from(["global", "layer"]),
       seed=st.integers(0, 2**16))
def test_finalize_exact_sparsity_property(shapes, sparsity, scope, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(i, o) for i, o in shapes])
    pilot = mp.PILoT(model, 1e-3, beta=1.0)
    for mw in pilot.weights:
        torch.testing.assert_close(mw.m * mw.w, mw.x())
    rep = mp.sparsity_report(pilot.finalize(sparsity, scope))
    if scope == "global":
        assert rep.zeros == round(sparsity * rep.params)
    else:
        assert all(r.zeros == round(sparsity * r.params) for r in rep.layers)


def test_pruned_checkpoint_file_round_trip(tmp_path):
    out = mp.PILoT(_net(), 1e-3).finalize(0.9, scope="layer")
    torch.save(out.state_dict(), tmp_path / "pruned.pt")
    fresh = _net()
    fresh.load_state_dict(torch.load(tmp_path / "pruned.pt", weights_only=True), strict=True)
    for (k, p), q in zip(out.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), k
    assert mp.sparsity_report(fresh).zeros == mp.sparsity_report(out).zeros
