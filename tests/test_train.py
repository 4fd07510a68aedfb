import json
import warnings

import pytest
import torch

from mirrorprune.methods import Method, create_method
from mirrorprune.train import TrainConfig, train
from test_methods import _net, _tiny_data


class _Interrupt(Exception):
    pass


def _run(out, method="pilot", stop_at=None, resume=True, **cfg):
    method = create_method(method)
    if stop_at is not None:
        start = method.start_epoch

        def start_epoch(epoch):
            if epoch == stop_at:
                raise _Interrupt
            start(epoch)

        method.start_epoch = start_epoch
    model = _net()
    log = train(model, method, _tiny_data(), _tiny_data(seed=1),
                TrainConfig(epochs=4, batch_size=16, lr=0.05, **cfg), out, resume=resume,
                progress=False)
    return model, log


@pytest.mark.parametrize("method", ["pilot", "gmp", "cs"])
def test_resume_after_interruption_is_bit_identical(tmp_path, method):
    ref, ref_log = _run(tmp_path / "a", method)
    with pytest.raises(_Interrupt):
        _run(tmp_path / "b", method, stop_at=2)
    assert json.loads((tmp_path / "b" / "log.jsonl").read_text().splitlines()[-1])["epoch"] == 2
    cfg_file = tmp_path / "b" / "config.json"
    started = {**json.loads(cfg_file.read_text()), "provenance": {"date": "when it started"}}
    cfg_file.write_text(json.dumps(started))
    model, log = _run(tmp_path / "b", method)
    # the resume keeps who started the run and adds who continued it, and after which epoch
    record = json.loads(cfg_file.read_text())
    assert record["provenance"] == {"date": "when it started"}
    assert [r["after_epoch"] for r in record["resumed"]] == [2]
    assert {"git_commit", "command", "date"} <= record["resumed"][0].keys()
    for (k, v), w in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, w), k
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa
    assert drop(log) == drop(ref_log)
    assert (tmp_path / "b" / "log.csv").read_text().count("\n") == 5
    assert json.loads((tmp_path / "b" / "config.json").read_text())["method"] == method
    # reading the finished run again keeps the record of the invocations that trained it
    recorded = {**json.loads(cfg_file.read_text()), "provenance": {"date": "when it trained"}}
    cfg_file.write_text(json.dumps(recorded))
    _run(tmp_path / "b", method)
    assert json.loads(cfg_file.read_text()) == recorded


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    _run(tmp_path, "dense")
    with pytest.raises(ValueError,
                       match="another configuration.*weight_decay: 0.0001 in the checkpoint"):
        _run(tmp_path, "dense", lr_schedule="cosine", weight_decay=0.0)
    with pytest.raises(ValueError, match="exists: resume it"):
        _run(tmp_path, "dense", resume=False)
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable training checkpoint"):
        _run(tmp_path, "dense")
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_non_finite_loss_stops_with_a_message(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss .* epoch 1, step 0 of l1"):
        model = _net()
        train(model, create_method("l1", lam=1e308), _tiny_data(), None,
              TrainConfig(epochs=1, batch_size=16), progress=False)


class _Corrupt(Method):
    """Dense training that breaks a parameter after optimizer step `at` (fault injection)."""

    def __init__(self, at, corrupt):
        super().__init__()
        self.at, self.corrupt = at, corrupt

    def after_step(self):
        super().after_step()
        if self.step_count == self.at:
            with torch.no_grad():
                self.corrupt(self.model)


def _train_until_fault(tmp_path, model, at, corrupt, match):
    with pytest.raises(FloatingPointError, match=match):
        train(model, _Corrupt(at, corrupt), _tiny_data(), None,
              TrainConfig(epochs=3, batch_size=16), tmp_path, progress=False)
    return torch.load(tmp_path / "checkpoint.pt", weights_only=True)


def test_non_finite_weight_names_the_layer_and_keeps_the_checkpoint(tmp_path):
    # a weight turns inf after the first step of epoch 2
    ck = _train_until_fault(
        tmp_path, _net(), 5, lambda m: m[4].weight.__setitem__((0, 0), float("inf")),
        r"epoch 2, step 5 of dense \(non-finite values in 4.weight\); last good checkpoint: "
        r".*checkpoint.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_non_finite_weight_the_loss_does_not_see_stops_before_the_checkpoint(tmp_path):
    # a parameter outside the forward pass turns nan in epoch 2
    model = _net()
    model.extra = torch.nn.Parameter(torch.zeros(3))
    ck = _train_until_fault(
        tmp_path, model, 6, lambda m: m.extra.fill_(float("nan")),
        r"non-finite weights at epoch 2, step 8 of dense \(non-finite values in extra\); "
        r"last good checkpoint")
    assert ck["epoch"] == 1


def test_lr_schedules():
    c = TrainConfig(lr=1.0, lr_schedule="step", milestones=(0.5,), gamma=0.1, warmup_epochs=1)
    assert c.lr_at(0, 100, 10) == pytest.approx(0.1)  # warm-up
    assert c.lr_at(20, 100, 10) == 1.0 and c.lr_at(60, 100, 10) == pytest.approx(0.1)
    cos = TrainConfig(lr=1.0)
    assert cos.lr_at(0, 100, 10) == 1.0 and cos.lr_at(100, 100, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear").validate()


@pytest.mark.parametrize("method", ["dense", "pilot", "pilot_opt"])
def test_bf16_channels_last_trains_fp32_weights_and_resumes_bit_identically(tmp_path, method):
    fast = {"precision": "bf16", "channels_last": True}
    ref, ref_log = _run(tmp_path / "a", method, **fast)
    conv = [p for p in ref.parameters() if p.dim() == 4]
    assert conv and all(p.dtype == torch.float32 for p in ref.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv)
    assert ref_log[-1]["train_loss"] < ref_log[0]["train_loss"]
    with pytest.raises(_Interrupt):
        _run(tmp_path / "b", method, stop_at=2, **fast)
    model, log = _run(tmp_path / "b", method, **fast)
    for (k, v), w in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="precision: 'bf16' in the checkpoint, 'fp32' now"):
        _run(tmp_path / "b", method, channels_last=True)


def test_bf16_changes_the_forward_not_the_evaluation(tmp_path):
    from mirrorprune.train import evaluate, model_format

    plain, _ = _run(tmp_path / "a", "dense")
    fast, _ = _run(tmp_path / "b", "dense", precision="bf16", channels_last=True)
    conv = torch.nn.Conv2d(3, 4, 3)
    assert model_format(conv) == torch.contiguous_format
    assert model_format(conv.to(memory_format=torch.channels_last)) == torch.channels_last
    # bf16 steps differ from fp32 ones, but not by much on 4 epochs
    for a, b in zip(plain.parameters(), fast.parameters()):
        assert not torch.equal(a, b)
        assert (a - b).abs().max() < 0.1 * a.abs().max() + 1e-3
    # evaluation runs in fp32 whatever the layout: a channels_last copy scores the same
    data = _tiny_data(seed=1)
    cl = fast.to(memory_format=torch.contiguous_format)
    assert evaluate(cl, data) == evaluate(fast.to(memory_format=torch.channels_last), data)


def test_unknown_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'fp16'; choose one of fp32, bf16"):
        _run(tmp_path, "dense", precision="fp16")


def test_keep_large_blocks_is_a_noop_when_asked_and_says_so(monkeypatch):
    import platform

    from mirrorprune.allocator import keep_large_blocks

    monkeypatch.setenv("MIRRORPRUNE_MALLOC", "default")
    assert keep_large_blocks() is False
    monkeypatch.delenv("MIRRORPRUNE_MALLOC")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert keep_large_blocks() is True


def test_a_run_that_learned_nothing_says_so():
    """Constant logits (a zeroed, frozen output layer) answer one class: the run warns,
    naming the method's non-default values; a run that learns does not."""
    model = _net()
    for p in model[-1].parameters():
        p.requires_grad_(False).zero_()
    with pytest.warns(UserWarning, match=r"l1: training accuracy .* no better than always "
                      r"answering the most frequent class .*here: lam=0\.5\)"):
        train(model, create_method("l1", lam=0.5), _tiny_data(), None,
              TrainConfig(epochs=1, batch_size=16, lr=0.05), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log = train(_net(), create_method("dense"), _tiny_data(), None,
                    TrainConfig(epochs=4, batch_size=16, lr=0.05), progress=False)
    data = _tiny_data()
    assert log[-1]["train_acc"] > torch.bincount(data.y).max() / len(data) + 0.02


def test_class_counts_come_from_the_labels():
    data = _tiny_data(n=90)
    data.y = torch.arange(90) % 3  # three classes, 30 each
    assert data.num_classes == 3
    sub = data.subset(30)
    assert len(sub) == 30 and torch.bincount(sub.y).tolist() == [10, 10, 10]


def test_the_command_line_shows_its_warnings_as_one_paragraph(monkeypatch):
    from mirrorprune.errors import MirrorpruneWarning, cli_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after
    cli_warnings("mirrorprune oneshot")
    assert warnings.formatwarning("it learned nothing", MirrorpruneWarning, "x.py", 3) == (
        "mirrorprune oneshot: warning: it learned nothing\n")
    assert "x.py:3: UserWarning: other" in warnings.formatwarning("other", UserWarning, "x.py", 3)
