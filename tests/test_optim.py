"""PILoT as an optimizer (SPEC §2.5c): the dual step is exact in the log domain, equals gradient
descent on (m, w) to first order, resumes bit-identically, and works where users train."""

import math

import pytest
import torch
from torch import nn

import mirrorprune as mp
from mirrorprune import schedules as S
from mirrorprune.errors import UsageError
from mirrorprune.optim import PILoTAdamW, PILoTSGD, mirror_step, param_groups

mpmath = pytest.importorskip("mpmath")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _reference(x: float, b: float, log_c: float, log_c_next: float) -> float:
    mpmath.mp.dps = 50
    c, c_next = mpmath.e ** log_c, mpmath.e ** log_c_next
    return float(c_next * mpmath.sinh(mpmath.asinh(mpmath.mpf(x) / c) - b))


@settings(max_examples=300, deadline=None)
@given(x=st.one_of(st.just(0.0), st.floats(-1e30, 1e30, allow_nan=False),
                   st.floats(-1e-3, 1e-3, allow_nan=False)),
       b=st.one_of(st.floats(-5, 5), st.floats(-1e-3, 1e-3)),
       log_c=st.one_of(st.floats(-1e4, 5), st.floats(-30, 5)), dA=st.floats(0, 2),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_the_step_is_exact_in_the_log_domain(x, b, log_c, dA, dtype):
    xt = torch.tensor([x], dtype=dtype)
    bt = torch.tensor([b], dtype=dtype)
    work = torch.promote_types(dtype, torch.float32)  # as the optimizers compute
    got = mirror_step(xt.to(work), bt.to(work), log_c, log_c - 4 * dA).to(dtype)
    ref = _reference(float(xt), float(bt), log_c, log_c - 4 * dA)
    assert torch.isfinite(got).all()
    tol = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 8e-3}[dtype]
    tiny = torch.finfo(dtype).tiny
    # the size of the terms that cancel when z − b ≈ 0: no method does better than rounding them
    xs, bs = float(xt), float(bt)
    c = math.exp(log_c)
    scale = (abs(xs) * math.cosh(bs) + math.hypot(xs, c) * abs(math.sinh(bs))) * math.exp(-4 * dA)
    assert abs(float(got) - ref) <= tol * max(abs(ref), scale) + 8 * tiny


def _lstsq(seed=0, n=12, d=6):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(d, n, generator=g, dtype=torch.float64)
    return Z, Z @ torch.randn(n, generator=g, dtype=torch.float64)


def _loss(x, Z, Y):
    return 0.5 * (Z @ x - Y).square().sum() / len(Y)


def test_one_step_is_gradient_descent_on_m_and_w_to_first_order():
    Z, Y = _lstsq()
    x0 = torch.linspace(-1, 1, 12, dtype=torch.float64)
    errors = []
    for eta in (1e-2, 5e-3, 2.5e-3):
        dA = 0.3 * eta  # the strength spread over flow time: ΔA ∝ η
        # optimizer form
        x = nn.Parameter(x0.clone())
        opt = PILoTSGD([{"params": [x], "mirror": True}], lr=eta,
                       strength=S.Strength(1e9, horizon=1, shape="linear", end=1.0))
        opt.strength = _FixedDelta(dA)
        _loss(x, Z, Y).backward()
        opt.step()
        # m ⊙ w form: decoupled decay e^{−2ΔA}, then a gradient step on m and w
        m0, w0 = mp.mirror_init(x0, 1.0)
        m, w = m0.clone().requires_grad_(), w0.clone().requires_grad_()
        _loss(m * w, Z, Y).backward()
        with torch.no_grad():
            m_new = math.exp(-2 * dA) * m - eta * m.grad
            w_new = math.exp(-2 * dA) * w - eta * w.grad
        errors.append(float((x.detach() - m_new * w_new).abs().max()))
    # second order: halving η quarters the difference
    assert errors[0] / errors[1] == pytest.approx(4, rel=0.1)
    assert errors[1] / errors[2] == pytest.approx(4, rel=0.1)


class _FixedDelta(S.Schedule):
    decoupled = True

    def __init__(self, dA):
        self.dA = dA

    def delta(self, k):
        return self.dA

    def alpha(self, k):
        return 0.0


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))


def _data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


def _steps(model, opt, k, sched=None, clip=None):
    x, y = _data()
    losses = []
    for _ in range(k):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched:
            sched.step()
        losses.append(loss.item())
    return losses


def _sgd(model, horizon=60, **kw):
    return PILoTSGD(param_groups(model, weight_decay=1e-3), lr=0.1, momentum=0.9,
                    strength=S.Strength(0.5, horizon=horizon), **kw)


def test_groups_select_like_pilot():
    model = _model()
    groups = param_groups(model, weight_decay=1e-3)
    assert [g["mirror"] for g in groups] == [True, False]
    assert [p.shape for p in groups[0]["params"]] == [torch.Size([32, 10]), torch.Size([3, 32])]
    assert groups[1]["weight_decay"] == 1e-3 and groups[0]["weight_decay"] == 0.0
    keep_last = param_groups(model, exclude=("2",))
    assert [p.shape for p in keep_last[0]["params"]] == [torch.Size([32, 10])]
    with pytest.raises(UsageError, match="no parameter group has mirror=True"):
        PILoTSGD(model.parameters(), lr=0.1)


def test_plain_groups_equal_torch_sgd():
    a, b = _model(), _model()
    opt_a = PILoTSGD([{"params": [a[0].weight], "mirror": True},
                      {"params": [p for n, p in a.named_parameters() if n != "0.weight"],
                       "weight_decay": 1e-3}], lr=0.1, momentum=0.9, nesterov=True,
                     strength=S.Strength(0.1, horizon=10))
    opt_b = torch.optim.SGD([p for n, p in b.named_parameters() if n != "0.weight"], lr=0.1,
                            momentum=0.9, nesterov=True, weight_decay=1e-3)
    x, y = _data()
    for _ in range(5):
        for opt, m in ((opt_a, a), (opt_b, b)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        with torch.no_grad():  # b's first layer follows a's, so both see the same inputs
            b[0].weight.copy_(a[0].weight)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        if n != "0.weight":
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_realized_strength_and_learning_rate_schedules():
    model = _model()
    opt = _sgd(model, horizon=60)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=60)
    opt.strength.bind(lr=sched)
    losses = _steps(model, opt, 60, sched=sched)
    st = opt.stats()
    assert st["A"] == pytest.approx(0.5) and st["step"] == 60
    assert st["log_c"] == pytest.approx(math.log(0.5) - 4 * 0.5)
    assert losses[-1] < losses[0] and all(math.isfinite(v) for v in losses)
    # η_k is read from the group at every step: with lr 0 the weights only decay, x ← x·c'/c
    w = model[0].weight.detach().clone()
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.strength = _FixedDelta(0.01)
    _steps(model, opt, 1)
    torch.testing.assert_close(model[0].weight, w * math.exp(-0.04))


def test_state_dict_resumes_bit_identically(tmp_path):
    ref = _model()
    opt = _sgd(ref)
    _steps(ref, opt, 20)
    a = _model()
    opt_a = _sgd(a)
    _steps(a, opt_a, 12)
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    b = _model(seed=5)
    b.load_state_dict(ck["model"])
    opt_b = _sgd(b)
    opt_b.load_state_dict(ck["opt"])
    _steps(b, opt_b, 8)
    for p, q in zip(ref.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert opt_b.stats() == opt.stats()


def test_compile_autocast_and_clipping():
    model = _model()
    opt = _sgd(model)
    compiled = torch.compile(model, backend="eager")  # no compiler needed for the check
    x, y = _data()
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert opt.stats()["step"] == 3


def test_low_precision_parameters_and_prune():
    model = _model().to(torch.bfloat16)
    opt = PILoTSGD(param_groups(model), lr=0.1, momentum=0.9,
                   strength=S.Strength(1.0, horizon=30))
    x, y = _data()
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.bfloat16()), y).backward()
        opt.step()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    pruned = mp.prune(model, 0.9)
    assert mp.sparsity_report(pruned).sparsity == pytest.approx(0.9, abs=1e-3)


def test_adamw_variant_trains():
    model = _model()
    opt = PILoTAdamW(param_groups(model, weight_decay=1e-2), lr=1e-2,
                     strength=S.Strength(0.3, horizon=60))
    losses = _steps(model, opt, 60)
    assert losses[-1] < 0.8 * losses[0] and opt.stats()["A"] == pytest.approx(0.3)


def test_bad_arguments():
    model = _model()
    with pytest.raises(UsageError, match="beta"):
        PILoTSGD(param_groups(model), lr=0.1, beta=0.0)
    with pytest.raises(UsageError, match="nesterov"):
        PILoTSGD(param_groups(model), lr=0.1, nesterov=True)
    opt = PILoTSGD(param_groups(model), lr=0.1)  # Strength() without a horizon
    with pytest.raises(UsageError, match="needs its horizon"):
        _steps(model, opt, 1)


def test_compiled_step_equals_the_eager_one(monkeypatch):
    from mirrorprune import optim

    monkeypatch.setenv("MIRRORPRUNE_COMPILE", "1")
    monkeypatch.setattr(optim, "_COMPILED", [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 50, generator=g) * torch.logspace(-8, 1, 50)
    b = torch.randn(300, 50, generator=g) * 0.8  # both forms (|b| <= 1 and > 1)
    got = x.clone()
    optim.mirror_update_([got], [b / 2], 2.0, -3.0, -3.2)
    if optim._COMPILED[0] is None:
        pytest.skip("torch.compile is not available here: the eager step is used")
    # both float32 evaluations agree with float64 to the rounding of the terms that cancel
    ref = mirror_step(x.double(), b.double(), -3.0, -3.2)
    xd, bd = x.double(), b.double()
    h = torch.hypot(xd, torch.tensor(math.exp(-3.0), dtype=torch.float64))
    scale = xd.abs() * bd.cosh() + h * bd.sinh().abs()
    for y in (got, mirror_step(x, b, -3.0, -3.2)):
        assert ((y.double() - ref).abs() <= 2e-6 * scale * math.exp(-0.8) + 1e-30).all()


def test_hugging_face_trainer(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import BertConfig, BertForSequenceClassification, Trainer

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg)  # randomly initialized, nothing downloaded
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (256, 16), generator=g)
    data = [{"input_ids": t, "labels": int(t[0] < 32)} for t in tokens]
    steps = 30
    opt = PILoTSGD(param_groups(model, weight_decay=1e-4), lr=0.05, momentum=0.9,
                   strength=S.Strength(0.2, horizon=steps))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    opt.strength.bind(lr=sched)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=16,
        report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    out = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched)).train()
    assert math.isfinite(out.training_loss)
    assert opt.stats()["step"] == steps and opt.stats()["A"] == pytest.approx(0.2)
    pruned = mp.prune(model, 0.9)
    fresh = BertForSequenceClassification(cfg)
    fresh.load_state_dict(pruned.state_dict(), strict=True)
    assert mp.sparsity_report(fresh).sparsity == pytest.approx(0.9, abs=1e-4)


def test_compiled_update_of_a_whole_model_equals_the_eager_one(monkeypatch):
    """The compiled path takes every float32 weight of a group at once (flat, any shape and
    rank), the eager one each tensor; bf16 and channels_last weights always go eagerly."""
    from mirrorprune import optim

    def train(compile_: str, layout=torch.contiguous_format):
        monkeypatch.setenv("MIRRORPRUNE_COMPILE", compile_)
        monkeypatch.setattr(optim, "_COMPILED", [])
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Flatten(),
                              nn.Linear(8 * 6 * 6, 10)).to(memory_format=layout)
        opt = PILoTSGD(param_groups(model), lr=0.05, momentum=0.9,
                       strength=S.Strength(0.5, horizon=5))
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            opt.zero_grad()
            x = torch.randn(16, 3, 8, 8, generator=g).to(memory_format=layout)
            nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,), generator=g)
                                        ).backward()
            opt.step()
        return model, optim._COMPILED[0]

    eager, _ = train("0")
    compiled, fn = train("1")
    if fn is None:
        pytest.skip("torch.compile is not available here: the eager step is used")
    for a, b in zip(eager.parameters(), compiled.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    cl, _ = train("1", torch.channels_last)  # eager per tensor, same numbers, layout kept
    for a, b in zip(eager.parameters(), cl.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert cl[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("c", [0.3, 1e-15, 2.0 ** -61, 1e12])
def test_fused_step_forms_agree_with_the_float64_reference(dtype, c):
    """The branch-free step the compiled update uses (hypot, or sqrt(x² + c²) where c allows),
    over |x| from 1e-30 to 1e30 and |b| from 1e-8 to 10: within a few ulps of the terms."""
    from mirrorprune.optim import _SQRT_C_RANGE, _fused_step

    g = torch.Generator().manual_seed(0)
    n = 20_000
    x = (torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(-30, 30, n,
                                                                           dtype=torch.float64))
    b = torch.randn(n, generator=g, dtype=torch.float64) * torch.logspace(
        -8, 1, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    x, b = x.to(dtype).double(), b.to(dtype).double()  # the inputs as the dtype holds them
    ref = mirror_step(x, b, math.log(c), math.log(c * 0.999))
    ratio = math.exp(math.log(c * 0.999) - math.log(c))  # as mirror_step forms it
    h = torch.hypot(x, torch.tensor(c, dtype=torch.float64))
    scale = (x.abs() * b.cosh() + h * b.sinh().abs()) * 0.999
    eps = torch.finfo(dtype).eps
    ok = ref.abs() < torch.finfo(dtype).max / 10  # float32 overflows where float64 does not
    for sqrt_h in (False, True):
        if sqrt_h and not _SQRT_C_RANGE[0] <= c <= _SQRT_C_RANGE[1]:
            continue
        y = _fused_step(x.to(dtype), b.to(dtype), torch.tensor(c, dtype=dtype),
                        torch.tensor(ratio, dtype=dtype), sqrt_h).double()
        assert ((y - ref).abs()[ok] <= 8 * eps * scale[ok]).all()


def test_compiled_small_step_form_equals_the_eager_one(monkeypatch):
    """Steps with every |b| <= SMALL_B take the small-step form alone (4 terms): still exact
    to float32 rounding against float64, on weights from 1e-8 to 10."""
    from mirrorprune import optim

    monkeypatch.setenv("MIRRORPRUNE_COMPILE", "1")
    monkeypatch.setattr(optim, "_COMPILED", [])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 50, generator=g) * torch.logspace(-8, 1, 50)
    b = (torch.rand(300, 50, generator=g) * 2 - 1) * optim.SMALL_B
    calls = []
    optim._compiled()
    small = optim._COMPILED[1]
    if small is None:
        pytest.skip("torch.compile is not available here: the eager step is used")
    monkeypatch.setattr(optim, "_COMPILED", [optim._COMPILED[0],
                                             lambda *a: (calls.append(1), small(*a)),
                                             *optim._COMPILED[2:]])
    got = x.clone()
    optim.mirror_update_([got], [b / 2], 2.0, -3.0, -3.2)
    assert calls, "the small-step form was not used"
    ref = mirror_step(x.double(), b.double(), -3.0, -3.2)
    xd, bd = x.double(), b.double()
    h = torch.hypot(xd, torch.tensor(math.exp(-3.0), dtype=torch.float64))
    scale = xd.abs() * bd.cosh() + h * bd.sinh().abs()
    assert ((got.double() - ref).abs() <= 2e-6 * scale * math.exp(-0.8) + 1e-30).all()


@pytest.mark.parametrize("kw", [{}, {"nesterov": True}, {"dampening": 0.3}])
@pytest.mark.parametrize("lr", [0.05, 3.0])  # 3.0: some |b| > SMALL_B, the large-step pass
def test_fused_momentum_and_update_equal_the_separate_steps(monkeypatch, kw, lr):
    """On CPU float32, PILoTSGD's mirror group takes momentum and update in one compiled call
    (and a second one for the large steps); same weights, buffers and strength as eager."""
    from mirrorprune import optim

    def train(compile_: str):
        monkeypatch.setenv("MIRRORPRUNE_COMPILE", compile_)
        monkeypatch.setattr(optim, "_COMPILED", [])
        model = _model()
        opt = PILoTSGD(param_groups(model, weight_decay=1e-3), lr=lr, momentum=0.9,
                       strength=S.Strength(0.5, horizon=6), **kw)
        calls = []
        if compile_ == "1":
            optim._compiled()
            fused = optim._COMPILED[2]
            if fused is None:
                pytest.skip("torch.compile is not available here: the eager step is used")
            full = optim._COMPILED[0]
            optim._COMPILED[2] = lambda *a: (calls.append("fused"), fused(*a))[1]
            optim._COMPILED[0] = lambda *a: (calls.append("large"), full(*a))[1]
        _steps(model, opt, 6)
        return model, opt, calls

    eager, e_opt, _ = train("0")
    fused, f_opt, calls = train("1")
    # every step but the first (no momentum buffer yet); the large-step pass only at lr 3
    assert calls.count("fused") == 5 and ("large" in calls) == (lr > 1)
    # lr 3 is chaotic: rounding differences (fused multiply-adds) grow to ~1e-5 of the scale
    tol = 1e-6 if lr < 1 else 1e-4
    for a, b in zip(eager.parameters(), fused.parameters()):
        ma, mb = e_opt.state[a]["momentum_buffer"], f_opt.state[b]["momentum_buffer"]
        assert (a - b).abs().max() <= tol * a.abs().max()
        assert (ma - mb).abs().max() <= tol * ma.abs().max()
    assert e_opt.stats() == f_opt.stats()


def test_gpt2_is_sparsified_by_default(monkeypatch):
    """Hugging Face's GPT-2 computes with its own Conv1D (weight stored transposed): the default
    selection takes its attention and MLP layers; the output layer tied to the token embedding
    stays dense with it, and says so."""
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    import mirrorprune.reparam

    monkeypatch.setattr(mirrorprune.reparam, "_SHOWN", set())
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    with pytest.warns(UserWarning, match=r"lm_head.weight \(tied to transformer.wte.weight\)"):
        pilot = mp.PILoT(model, 1e-3)
    assert [mw.name for mw in pilot.weights[:4]] == [
        f"transformer.h.0.{n}.weight" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                "mlp.c_proj")] and len(pilot.weights) == 8
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    pilot.step(lr=0.1)
    fresh = GPT2LMHeadModel(cfg)
    fresh.load_state_dict(pilot.finalize(0.5).state_dict(), strict=True)
    assert mp.sparsity_report(fresh).sparsity == pytest.approx(0.5, abs=1e-3)
