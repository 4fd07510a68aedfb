"""A real run killed with SIGKILL and resumed ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("sklearn")  # the bundled digits data
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _cli(*args):
    return [sys.executable, "-m", "mirrorprune", *args, "--quiet"]


def _kill_when(cmd, ready, timeout=120):
    """Start cmd, SIGKILL it once ready() holds; assert it really was killed."""
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.time()
    while not ready():
        assert p.poll() is None, f"finished before it could be killed: {p.stderr.read()}"
        assert time.time() - t0 < timeout
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    assert p.wait() == -signal.SIGKILL


def _run(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def _log(path):  # the per-epoch log without its wall-clock column
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in path.read_text().splitlines()]


def test_sigkill_mid_training_then_resume_is_bit_identical(tmp_path):
    args = ["oneshot", "--dataset", "digits", "--methods", "pilot", "--seeds", "1",
            "--epochs", "40"]
    _run(_cli(*args, "--out", str(tmp_path / "ref")))
    run = tmp_path / "run"
    ckpt = run / "runs" / "pilot" / "seed0" / "checkpoint.pt"

    def mid_training():  # a few epochs written, so the kill lands inside a later one
        try:
            return len((ckpt.parent / "log.jsonl").read_text().splitlines()) >= 3
        except OSError:
            return False

    _kill_when(_cli(*args, "--out", str(run)), mid_training)
    done = torch.load(ckpt, weights_only=True)["epoch"]
    assert 3 <= done < 40
    _run(_cli(*args, "--out", str(run), "--resume"))
    ref = tmp_path / "ref" / "runs" / "pilot" / "seed0"
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    b = torch.load(ckpt, weights_only=True)
    assert a["epoch"] == b["epoch"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _log(ref / "log.jsonl") == _log(ckpt.parent / "log.jsonl")
    # the results files are identical byte for byte
    for f in ("oneshot.csv", "oneshot.md"):
        assert (tmp_path / "ref" / f).read_bytes() == (run / f).read_bytes()


def test_sigkill_mid_cycle_of_iterative_pruning_then_resume(tmp_path):
    args = ["iterative", "--mode", "lrr", "--pilot", "--dataset", "digits", "--cycles", "3",
            "--epochs", "12", "--seeds", "1"]
    _run(_cli(*args, "--out", str(tmp_path / "ref")))
    run = tmp_path / "run"
    cycle = run / "lrr+pilot" / "seed0" / "cycle01" / "log.jsonl"

    def mid_cycle():  # cycle 1 has begun and written some epochs
        try:
            return len(cycle.read_text().splitlines()) >= 2
        except OSError:
            return False

    _kill_when(_cli(*args, "--out", str(run)), mid_cycle)
    _run(_cli(*args, "--out", str(run)))  # iterative runs always resume
    assert (tmp_path / "ref" / "iterative.csv").read_bytes() == (run / "iterative.csv").read_bytes()
    for c in ("cycle00", "cycle01", "cycle02", "cycle03"):
        ref = torch.load(tmp_path / "ref" / "lrr+pilot" / "seed0" / c / "checkpoint.pt",
                         weights_only=True)["model"]
        got = torch.load(run / "lrr+pilot" / "seed0" / c / "checkpoint.pt",
                         weights_only=True)["model"]
        assert all(torch.equal(ref[k], got[k]) for k in ref), c


def test_two_processes_writing_one_file_use_their_own_temporary_files(tmp_path):
    """Two runs building the same data cache at once: each writes its own NAME.<pid>.tmp, so
    neither renames the other's half-written file away (a FileNotFoundError before)."""
    from mirrorprune.files import write_text

    target = tmp_path / "cache.txt"
    code = ("import sys, time\nfrom mirrorprune.files import write_text\n"
            "start = float(sys.argv[2])\nwhile time.time() < start: pass\n"
            "while time.time() < start + 1.5:\n    write_text(sys.argv[1], 'x' * 10_000)\n")
    start = str(time.time() + 3)  # both begin together, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), start],
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    write_text(target, "done")
    assert target.read_text() == "done" and not list(tmp_path.glob("*.tmp"))
