"""No file the user did not write as code can run code: a crafted pickle in each place the
package reads (training checkpoint, iterative state, CIFAR-10 batch, sparse file) is refused
with a clear error, and its payload never runs (a sentinel file is never created)."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import mirrorprune as mp
from mirrorprune.data import load
from mirrorprune.errors import UsageError
from mirrorprune.experiments import iterative
from mirrorprune.methods import create_method
from mirrorprune.train import TrainConfig, train
from test_methods import _tiny_data


class Payload:
    """Unpickling this creates `sentinel` (what an attacker's file would do, harmlessly)."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return exec, (f"open({self.sentinel!r}, 'w').close()",)


@pytest.fixture
def sentinel(tmp_path):
    return tmp_path / "SENTINEL"


def test_the_payload_is_live(tmp_path, sentinel):
    # what the refusals below prevent: an unrestricted load runs the payload
    torch.save({"x": Payload(sentinel)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert sentinel.exists()


def test_crafted_training_checkpoint_is_refused(tmp_path, sentinel):
    def run(resume):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 10))
        return train(model, create_method("dense"), _tiny_data(), None,
                     TrainConfig(epochs=1, batch_size=16), tmp_path / "run", resume=resume,
                     progress=False)

    run(False)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    torch.save({**ck, "history": [Payload(sentinel)]}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(UsageError, match="asks to build exec, a Python object.*refuses to load"):
        run(True)
    assert not sentinel.exists()


def test_crafted_iterative_state_is_refused(tmp_path, sentinel):
    cfg = iterative.IterativeConfig(dataset="digits", cycles=1, epochs=1)
    seed = tmp_path / cfg.variant / "seed0"
    seed.mkdir(parents=True)
    torch.save({"config": {}, "rows": [Payload(sentinel)]}, seed / "state.pt")
    with pytest.raises(UsageError,
                       match="not a mirrorprune iterative-pruning state: it asks to build exec"):
        iterative.run(cfg, tmp_path, progress=False)
    assert not sentinel.exists()
    # the table reads every variant's state, even one this invocation does not run
    (seed / "state.pt").unlink()
    other = tmp_path / "lrr" / "seed0"
    other.mkdir(parents=True)
    torch.save({"rows": [Payload(sentinel)]}, other / "state.pt")
    with pytest.raises(UsageError, match="asks to build exec"):
        iterative.run(cfg, tmp_path, progress=False)
    assert not sentinel.exists() and not (tmp_path / "config-imp.json").exists()


def _cifar_folder(root, test_batch):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8),
                         b"labels": [0, 1]}, f, protocol=2)
    with open(folder / "test_batch", "wb") as f:
        f.write(test_batch)
    return folder


def test_cifar_batches_need_no_code_and_crafted_ones_are_refused(tmp_path, sentinel):
    # a batch as Python 2 / numpy 1 wrote it (numpy.core names) still loads
    good = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 4],
                         b"batch_label": b"testing batch 1 of 1"}, protocol=2)
    legacy = good.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert legacy != good or b"numpy.core" in good
    _cifar_folder(tmp_path / "ok", legacy)
    assert load("cifar10", "test", tmp_path / "ok").y.tolist() == [3, 4]
    evil = pickle.dumps({b"data": Payload(sentinel), b"labels": [0]}, protocol=2)
    _cifar_folder(tmp_path / "evil", evil)
    with pytest.raises(UsageError, match=r"not a CIFAR-10 batch: it asks for __builtin__\.exec"):
        load("cifar10", "test", tmp_path / "evil")
    assert not sentinel.exists()


def test_doctor_only_lists_and_the_working_directory_is_not_searched(tmp_path, sentinel):
    evil = pickle.dumps({b"data": Payload(sentinel), b"labels": [0]}, protocol=2)
    _cifar_folder(tmp_path / "shared" / "data", evil)
    _cifar_folder(tmp_path / "work" / "shared" / "data", evil)
    env_cmd = [sys.executable, "-m", "mirrorprune", "doctor"]
    for cmd, cwd in ((env_cmd, tmp_path / "work"),
                     ([*env_cmd, "--data-dir", str(tmp_path / "shared" / "data")], tmp_path)):
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert res.returncode == 0, res.stderr
        assert not sentinel.exists()
    assert "cifar10        found" in res.stdout and "not opened" in res.stdout


def test_crafted_sparse_file_is_refused(tmp_path, sentinel):
    blob = {"format": "mirrorprune-sparse-v1", "tensors": {"w": Payload(sentinel)}}
    torch.save(blob, tmp_path / "evil.pt")
    with pytest.raises(mp.sparse.SparseFileError, match="asks to build exec"):
        mp.load_sparse(tmp_path / "evil.pt")
    assert not sentinel.exists()
