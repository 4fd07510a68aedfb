"""User errors through the real CLI (a subprocess each): one paragraph on stderr with the
problem and the fix, exit status 2, no traceback — and before any data is loaded or any file
is written (the output folder is unchanged, byte for byte)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mirrorprune.cli import main
from mirrorprune.schedules import DEFAULT_STRENGTH

pytest.importorskip("matplotlib")
BASE = ["oneshot", "--dataset", "digits", "--methods", "dense,pilot", "--seeds", "1",
        "--epochs", "1", "--quiet"]


def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "mirrorprune", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()} if folder.exists() else {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An output folder holding one finished oneshot run."""
    out = tmp_path_factory.mktemp("finished")
    assert main([*BASE, "--out", str(out)]) == 0
    return out


def _refused(args, out, *needles):
    before = _snapshot(out)
    res = _cli(*args)
    assert res.returncode == 2, (args, res.stdout, res.stderr)
    err = res.stderr.strip()
    assert "Traceback" not in res.stderr and "\n" not in err, err
    assert err.startswith("mirrorprune ") and ": error: " in err, err
    for n in needles:
        assert n in err, (n, err)
    assert _snapshot(out) == before  # nothing written, nothing changed
    return err


@pytest.mark.parametrize("extra, needles", [
    (["--hp", "pilot.alpha=-1"], ["pilot.alpha must be a finite number >= 0, got -1"]),
    (["--hp", "pilot.alpha=abc"], ["pilot.alpha must be a finite number >= 0, got 'abc'"]),
    (["--hp", "pilot.schedule=geometric", "--hp", "pilot.alpha=100"],
     ["pilot.alpha 100 is too large for the learning rate 0.1"]),
    (["--hp", "pilot.alpha=2e-3"], ["pilot.alpha applies to the α schedules"]),
    (["--hp", "pilot.nope=1"], ["unknown hyperparameter(s) ['nope']",
                                "valid: strength (float >= 0", "schedule (strength | target"]),
    (["--hp", "pilot.schedule=target"], ["needs pilot.target"]),
    (["--exclude", "nomatch"], ["exclude pattern 'nomatch' matches no module"]),
    (["--epochs", "0"], ["--epochs must be >= 1"]),
    (["--epochs", "-3"], ["--epochs must be >= 1"]),
    (["--seeds", "0"], ["--seeds must be >= 1"]),
    (["--methods", "pilot,pilot"], ["names pilot more than once"]),
    (["--data-dir", "/nonexistent"], ["data directory /nonexistent does not exist"]),
])
def test_bad_options_are_one_paragraph_before_any_work(tmp_path, extra, needles):
    out = tmp_path / "out"
    args = [*BASE, "--out", out, *extra]
    if extra[0] == "--methods":
        args = [a for a in args if a != "dense,pilot"]
        args.remove("--methods")
        args += ["--methods", extra[1]]
    _refused(args, out, *needles)
    assert not out.exists()


def test_truncated_dataset_and_unwritable_out(tmp_path):
    (tmp_path / "data").mkdir()
    x = np.zeros((4, 28, 28), np.uint8)
    np.savez(tmp_path / "data" / "mnist.npz", x_train=x, y_train=np.zeros(4), x_test=x,
             y_test=np.zeros(4))
    whole = (tmp_path / "data" / "mnist.npz").read_bytes()
    (tmp_path / "data" / "mnist.npz").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    args = ["oneshot", "--dataset", "mnist", "--data-dir", tmp_path / "data", "--quiet"]
    _refused([*args, "--out", out], out, "mnist.npz is corrupt or truncated")
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    _refused([*BASE, "--out", tmp_path / "file" / "out"], tmp_path / "file" / "out",
             "cannot be created", "is a file, not a folder")
    _refused([*BASE, "--out", "/proc/mirrorprune-out"], Path("/proc/mirrorprune-out"),
             "cannot be written")


def test_existing_runs_are_not_overwritten(finished):
    _refused([*BASE, "--out", finished], finished, "exists: resume it (--resume")
    err = _refused([*BASE, "--out", finished, "--resume", "--hp", "pilot.strength=3"], finished,
                   "was made with another configuration", "hparams")
    assert f"'strength': {DEFAULT_STRENGTH!r}" in err and "'strength': 3" in err
    # other shared settings are refused before any run is looked at
    _refused([*BASE[:-3], "--epochs", "2", "--quiet", "--out", finished, "--resume"], finished,
             "holds results made with other settings", "epochs: 1 there, 2 now")
    assert main([*BASE, "--out", str(finished), "--resume"]) == 0  # the same run is reused


def test_other_commands_report_the_same_way(tmp_path):
    out = tmp_path / "out"
    _refused(["targets", "--dataset", "digits", "--sparsities", "0.9,0.9", "--out", out], out,
             "more than once")
    _refused(["targets", "--dataset", "digits", "--hp", "gmp.every=0.5", "--methods", "gmp",
              "--out", out], out, "gmp.every must be an integer")
    _refused(["iterative", "--mode", "imp", "--dataset", "digits", "--epochs", "0", "--out",
              out], out, "--epochs")
    _refused(["iterative", "--mode", "imp", "--pilot", "--alpha", "10", "--dataset", "digits",
              "--out", out], out, "too large for the learning rate")
    _refused(["demo", "--seeds", "0"], out, "--seeds must be >= 1")
