import pytest
import torch
from torch import nn

import mirrorprune as mp
from mirrorprune.data import ImageData
from mirrorprune.methods import METHODS, create_method
from mirrorprune.prune import unique_weights
from mirrorprune.train import TrainConfig, evaluate, train


def _tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 255, (n, 1, 6, 6), generator=g, dtype=torch.uint8)
    y = (x.float().mean((1, 2, 3)) > 127).long() + 2 * (x[:, 0, 0, 0] > 127).long()
    return ImageData("tiny", x, y, (0.5,), (0.3,))


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def _attention_net():
    """The image's 6 rows as 6 tokens through a transformer layer: MultiheadAttention's
    in_proj_weight is a prunable weight too."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(1, 2), nn.Linear(6, 8),
                         nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                         nn.Flatten(), nn.Linear(48, 10))


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True, bidirectional=True)
        self.cell = nn.GRUCell(16, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        out, _ = self.lstm(x.flatten(1, 2))  # the image's rows as a sequence
        return self.fc(self.cell(out[:, -1]))


def _recurrent_net():
    """An LSTM and a GRU cell: their weight_ih/weight_hh matrices are prunable weights."""
    torch.manual_seed(0)
    return _Recurrent()


@pytest.mark.parametrize("net", [_net, _attention_net, _recurrent_net])
@pytest.mark.parametrize("name", list(METHODS))
def test_each_method_trains_and_exports_a_plain_model_with_exact_sparsity(name, net):
    data = _tiny_data()
    model = net()
    keys = set(net().state_dict())
    hp = {"gmp": {"target": 0.5, "every": 2}, "cs": {"s_init": 0.05}}.get(name, {})
    method = create_method(name, **hp)
    log = train(model, method, data, data, TrainConfig(epochs=3, batch_size=16, lr=0.05),
                progress=False)
    assert len(log) == 3 and all(torch.isfinite(torch.tensor(r["train_loss"])) for r in log)
    assert {"l1", "q90", "q95", "q99", "zeros"} <= set(log[-1])
    plain = method.export()
    assert set(plain.state_dict()) == keys and not mp.is_wrapped(plain)
    fresh = net()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    own = mp.sparsity_report(plain).sparsity
    for s in (0.5, 0.9):
        pruned = mp.prune(plain, s)
        rep = mp.sparsity_report(pruned)
        assert rep.zeros == max(round(s * rep.params), round(own * rep.params))
    # the exported model computes what the trained one did (CS alone swaps in its hard mask)
    if name != "cs":
        assert evaluate(plain, data) == log[-1]["test_acc"]
    if name == "gmp":
        assert own == pytest.approx(0.5, abs=0.01)
    # exporting leaves the trained model intact: it still runs and exports the same again
    x = next(data.batches(8))[0]
    model.eval()
    assert torch.equal(model(x), model(x))
    assert list(method.weights()) == list(unique_weights(net()))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 method.export().state_dict().values()))


def test_method_specific_behaviour():
    assert create_method("pilot").uses_mw and not create_method("dense").uses_mw
    with pytest.raises(ValueError,
                       match=r"unknown hyperparameter.*alpha \(float >= 0, default 0.001\)"):
        create_method("pilot", alpah=1.0)
    with pytest.raises(ValueError, match="unknown method 'prune'; choose one of dense"):
        create_method("prune")
    m = create_method("gmp", target=0.9, start=0.2, end=0.6)
    m.attach(_net(), steps_per_epoch=10, epochs=10)
    assert m.sparsity_at(0) == 0 and m.sparsity_at(60) == pytest.approx(0.9)
    assert m.sparsity_at(40) == pytest.approx(0.9 * (1 - 0.5**3))
    cs = create_method("cs", t_final=100.0)
    cs.attach(_net(), 1, 3)
    cs.start_epoch(2)
    assert cs.stats()["temperature"] == pytest.approx(100.0)
    pilot = create_method("pilot", schedule="geometric", alpha=1e-3, p=0.5)
    pilot.attach(_net(), steps_per_epoch=4, epochs=10)
    assert [pilot.pilot.schedule(k) for k in (0, 3, 4, 8)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    spred = create_method("spred")
    spred.attach(_net(), 1, 1)
    assert spred.pilot.beta == 0.0


def test_powerprop_keeps_the_function_at_init():
    model = _net().eval()
    x = torch.randn(3, 1, 6, 6)
    y = model(x)
    create_method("powerprop", a=3.0).attach(model, 1, 1)
    torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


# (method, its knob, a weak and a strong value, other hyperparameters): the stronger value
# must give a sparser model after the same training: more exact zeros of its own, or at least
# 0.05 less of ‖x‖₁ outside the largest 10% of the weights (mass90)
KNOBS = [("l1", "lam", 1e-6, 2e-2, {}), ("l1_m", "lam", 1e-6, 0.3, {}),
         ("spred", "alpha", 1e-5, 0.1, {}), ("pilot", "strength", 0.02, 0.3, {}),
         ("pilot_opt", "strength", 0.02, 0.3, {}),
         ("pilot_adamw", "strength", 0.02, 1.0, {"lr_factor": 1.0}),
         ("cs", "s_init", 0.5, -0.5, {}), ("powerprop", "a", 1.0, 4.0, {}),
         ("str", "s_init", -6.0, -1.0, {}), ("gmp", "target", 0.3, 0.9, {"every": 1})]


@pytest.mark.parametrize("name, knob, weak, strong, other", KNOBS)
def test_each_knob_moves_sparsity_in_its_direction(name, knob, weak, strong, other):
    assert {m for m, *_ in KNOBS} == set(METHODS) - {"dense"}
    data = _tiny_data(128)
    out = []
    for value in (weak, strong):
        method = create_method(name, **{knob: value}, **other)
        train(_net(), method, data, None, TrainConfig(epochs=6, batch_size=16, lr=0.05),
              progress=False)
        out.append((mp.sparsity_report(method.export()).sparsity, method.stats()["mass90"]))
    (sp_weak, mass_weak), (sp_strong, mass_strong) = out
    assert sp_strong > sp_weak + 0.05 or mass_strong < mass_weak - 0.05, out
