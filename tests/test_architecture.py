"""The architecture's promises: small functions, public imports only, one registry of methods
with typed configs, schedules by name, training-loop callbacks and optimizers usable by any
method, and the diagonal experiment's own copy of the initialization equal to the library's."""

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import mirrorprune as mp
from mirrorprune import schedules as S
from mirrorprune.callbacks import Callback, FixedMasks, Rewind
from mirrorprune.config import describe
from mirrorprune.errors import UsageError
from mirrorprune.methods import METHODS, Method, create_method, register_method
from mirrorprune.prune import unique_weights
from mirrorprune.train import OPTIMIZERS, TrainConfig, train
from test_methods import _net, _tiny_data

SRC = Path(__file__).resolve().parents[1] / "src" / "mirrorprune"


def _functions():
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.name}:{n.name} ({n.end_lineno - n.lineno + 1})" for p, n in _functions()
            if n.end_lineno - n.lineno + 1 > 80]
    assert not long, long


def test_modules_import_only_public_names_of_each_other():
    private = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                private += [f"{path.name}: {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not private, private


def test_every_method_is_registered_with_a_typed_documented_config():
    assert list(METHODS) == ["dense", "l1", "l1_m", "spred", "pilot", "pilot_opt", "pilot_adamw",
                             "cs", "powerprop", "str", "gmp"]
    for name, cls in METHODS.items():
        assert cls.name == name and dataclasses.is_dataclass(cls.Config)
        for f in dataclasses.fields(cls.Config):
            assert f.metadata["help"] and describe(cls.Config, f).startswith(f.name)
        assert create_method(name).hp == cls.defaults
    with pytest.raises(ValueError, match="registered twice"):
        register_method("pilot")(type("Again", (Method,), {}))
    with pytest.raises(UsageError, match=r"pilot.alpha must be a finite number >= 0"):
        create_method("pilot", alpha="abc")
    with pytest.raises(UsageError, match=r"gmp.every must be an integer >= 1, got 2.5"):
        create_method("gmp", every=2.5)
    with pytest.raises(UsageError, match="pilot.schedule must be one of strength, target"):
        create_method("pilot", schedule="cosine")


def test_no_mirror_method_switches_off_what_it_inherits():
    from mirrorprune.methods import DecayedMirror, L1OnM, MirrorMethod, PilotMethod, Spred

    assert L1OnM.__bases__ == (MirrorMethod,) and DecayedMirror.__bases__ == (MirrorMethod,)
    assert Spred.__bases__ == (DecayedMirror,) and PilotMethod.__bases__ == (DecayedMirror,)
    # hooks a subclass may not replace by a do-nothing version of the base's work
    for cls in (L1OnM, Spred, PilotMethod):
        for hook in ("attach", "before_step", "param_groups", "stats"):
            own = cls.__dict__.get(hook)
            assert own is None or own.__code__.co_code != (lambda self: None).__code__.co_code


def test_each_method_says_how_it_is_aimed_at_a_target():
    aimed = {name: cls.aim(0.9, 39.1) for name, cls in METHODS.items()}
    assert aimed["gmp"] == {"target": 0.9}
    assert aimed["pilot"]["schedule"] == "target" and aimed["pilot"]["target"] == 0.9
    assert set(aimed["spred"]) == {"alpha"} and set(aimed["str"]) == {"s_init"}
    assert all(aimed[m] == {} for m in ("dense", "l1", "l1_m", "cs", "powerprop", "pilot_opt",
                                        "pilot_adamw"))
    for name, hp in aimed.items():
        create_method(name, **hp)  # valid values


def test_schedules_by_name():
    geo = S.from_name("geometric", 1e-3, epochs=10, steps_per_epoch=4, decay_to=0.01)
    assert geo(0) == geo(3) == 1e-3 and geo(4) == pytest.approx(1e-3 * 0.01 ** 0.1)
    assert geo(39) == pytest.approx(1e-3 * 0.01 ** 0.9)
    half = S.from_name("half", 2e-3, epochs=4, steps_per_epoch=3)
    assert [half(k) for k in (0, 5, 6, 11)] == [2e-3, 2e-3, 0.0, 0.0]
    ctl = S.from_name("target", 1e-3, epochs=4, steps_per_epoch=3, target=0.9, p=0.5)
    assert isinstance(ctl, S.TargetController) and ctl.target == 0.9
    assert set(S.SCHEDULES) == {"strength", "geometric", "constant", "harmonic", "quadratic",
                                "half", "target"}
    with pytest.raises(UsageError, match="unknown schedule .cosine.; choose one of strength"):
        S.from_name("cosine", 1e-3, 4, 3)
    with pytest.raises(UsageError, match="needs a target"):
        S.from_name("target", 1e-3, 4, 3)


@pytest.mark.parametrize("name", ["dense", "l1", "l1_m", "spred", "pilot", "pilot_opt", "gmp"])
def test_fixed_masks_hold_pruned_weights_at_zero_for_any_method(name):
    plain = mp.prune(_net(), 0.6)
    masks = {n: p != 0 for n, p in unique_weights(plain).items()}
    method = create_method(name, **({"target": 0.3} if name == "gmp" else {}))
    model = _net()
    train(model, method, _tiny_data(), None, TrainConfig(epochs=2, batch_size=16, lr=0.05),
          progress=False, callbacks=[FixedMasks(masks)])
    for n, w in method.weights().items():
        assert (w[~masks[n]] == 0).all(), n
    assert mp.sparsity_report(method.export()).sparsity >= 0.6 - 1e-9


def test_fixed_masks_refuse_methods_that_cannot_hold_them():
    plain = mp.prune(_net(), 0.5)
    masks = {n: p != 0 for n, p in unique_weights(plain).items()}
    with pytest.raises(UsageError, match="computes its weight from other tensors"):
        train(_net(), create_method("str"), _tiny_data(), None, TrainConfig(epochs=1),
              progress=False, callbacks=[FixedMasks(masks)])


def test_rewind_keeps_an_epochs_weights_and_survives_resume(tmp_path):
    seen = {}

    class Record(Callback):
        def on_epoch_end(self, run, epoch, row):
            seen[epoch] = {k: v.clone() for k, v in run.model.state_dict().items()}

    rewind = Rewind(1)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    train(_net(), create_method("pilot"), _tiny_data(), None, cfg, tmp_path, progress=False,
          callbacks=[rewind, Record()])
    assert all(torch.equal(rewind.snapshot[k], v) for k, v in seen[0].items())
    again = Rewind(1)  # a finished run resumed: the snapshot comes back from the checkpoint
    train(_net(), create_method("pilot"), _tiny_data(), None, cfg, tmp_path, resume=True,
          progress=False, callbacks=[again, Callback()])
    assert all(torch.equal(again.snapshot[k], v) for k, v in seen[0].items())


def test_optimizer_by_name():
    assert set(OPTIMIZERS) >= {"sgd", "adamw"}
    log = train(_net(), create_method("pilot"), _tiny_data(), None,
                TrainConfig(epochs=4, batch_size=16, lr=3e-3, optimizer="adamw"), progress=False)
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    with pytest.raises(UsageError, match="unknown optimizer 'lion'; choose one of sgd"):
        TrainConfig(optimizer="lion").validate()


def test_diag_initialization_is_the_librarys():
    # diag keeps its own vectorized copy (per-run β) so that its committed results stay
    # bit-identical; it must agree with reparam.mirror_init to rounding
    from mirrorprune.experiments import diag

    x0 = diag.make_problem(diag.DiagConfig())["x0"]
    for beta in (1.0, 0.0):
        b = torch.full((x0.shape[0], 1), beta, dtype=torch.float64)
        m, w = diag._init(x0, b, is_l1_x=torch.zeros_like(b))
        m_lib, w_lib = mp.mirror_init(x0, beta)
        torch.testing.assert_close(m, m_lib, rtol=4e-16, atol=0)
        torch.testing.assert_close(w, w_lib, rtol=4e-16, atol=1e-300)
