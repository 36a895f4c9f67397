"""Preemption and crashes: a run interrupted (SIGUSR1 or SIGKILL) and resumed ends with the same
weights as an uninterrupted one (CPU, deterministic settings; dropout on, so RNG state matters)."""
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import REPO, run_cli, child_env

STEPS = 12


def _args(data, out, checkpoint_every):
    return ["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--set", f"train.max_steps={STEPS}",
            "--set", f"train.checkpoint_every={checkpoint_every}", "--set", "train.log_every=1",
            "--set", "train.tensorboard=false", "--set", "train.micro_batch_size=64", "--resume", "auto"]


@pytest.fixture(scope="module")
def uninterrupted(ml100k, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_cli(*_args(ml100k, out, 1000))
    return load_file(out / "model.safetensors")


def _interrupt(args, sig, at_step):
    """Start the run, send ``sig`` once it logged ``at_step``; returns (returncode, output)."""
    proc = subprocess.Popen([sys.executable, "-m", "crossrec_dist", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=child_env({"PYTHONUNBUFFERED": "1"}))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"step {at_step}/"):
            proc.send_signal(sig)
            break
    rest, _ = proc.communicate(timeout=300)
    return proc.returncode, "".join(lines) + (rest or "")


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k


@pytest.mark.parametrize("sig,exit_code,said", [(signal.SIGUSR1, 1, "preempted by signal at step "),
                                                 (signal.SIGINT, 130, "interrupted (Ctrl-C) at step ")],
                         ids=["sigusr1", "ctrl-c"])
def test_signal_checkpoints_and_resume_matches(ml100k, tmp_path, uninterrupted, sig, exit_code, said):
    """SIGUSR1 (Slurm) and Ctrl-C alike: a checkpoint at the next update, a message saying how to resume."""
    args = _args(ml100k, tmp_path, 1000)  # no periodic checkpoints: the signal alone must save one
    code, out = _interrupt(args, sig, 5)
    assert code == exit_code and said in out and "--resume auto" in out, out[-2000:]
    assert not (tmp_path / "metrics.json").exists()
    assert (tmp_path / "checkpoints" / "latest").is_file()
    proc = run_cli(*args)
    assert "resumed from" in proc.stdout
    _same(load_file(tmp_path / "model.safetensors"), uninterrupted)


def test_sigkill_at_a_random_step_then_resume_matches(ml100k, tmp_path, uninterrupted):
    args = _args(ml100k, tmp_path, 2)
    kill_at = random.Random(time.time_ns()).randint(3, STEPS - 2)
    code, out = _interrupt(args, signal.SIGKILL, kill_at)
    assert code == -signal.SIGKILL
    latest = (tmp_path / "checkpoints" / "latest").read_text()
    assert int(latest.split("_")[1]) <= kill_at  # never points past what was written
    run_cli(*args)
    _same(load_file(tmp_path / "model.safetensors"), uninterrupted)
