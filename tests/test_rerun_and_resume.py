"""A user's second run of the same command: nothing silently redone, replaced, restarted or lost.

Each test is a trap a newcomer hit (issue 31): the behaviour before is in its docstring.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import REPO, child_env, run_cli

QUICK = ["--set", "train.tensorboard=false", "--set", "train.log_every=1", "--set", "train.micro_batch_size=64"]


def refused(capsys, *argv) -> str:
    """A command that must stop before anything trains (exit 2), run in this process: no interpreter
    start-up (the refusals come before any model or process group exists). Returns its stderr."""
    from crossrec_dist.cli import main
    assert main([str(a) for a in argv]) == 2
    return capsys.readouterr().err


def pretrain(data, out, *extra, check=True):
    return run_cli("pretrain", "--preset", "tiny", "--data", data, "--out", out, "--domains", "d0,d1", *QUICK,
                   *extra, check=check)


@pytest.fixture(scope="module")
def finished(synth_data, tmp_path_factory):
    """A finished 4-step pretrain that kept checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    pretrain(synth_data, out, "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2")
    return out


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_rerunning_a_finished_run_is_refused_and_force_replaces_it(synth_data, finished, tmp_path, capsys,
                                                                    own_environment):
    """Before: the same pretrain into the same --out trained again silently (and the old checkpoints
    stayed for a later --resume auto to pick up)."""
    out = _copy(finished, tmp_path / "run")
    before = load_file(out / "model.safetensors")
    err = refused(capsys, "pretrain", "--preset", "tiny", "--data", synth_data, "--out", out, "--set", "train.max_steps=4")
    assert "already holds a finished pretrain run (4 steps" in err and "--force" in err and "--resume auto" in err
    assert (load_file(out / "model.safetensors")["backbone.norm.weight"] == before["backbone.norm.weight"]).all()
    proc = pretrain(synth_data, out, "--set", "train.max_steps=2", "--set", "train.seed=7", "--force")
    assert "set aside" in proc.stdout and "removed the replaced run" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 2
    assert not (out / "checkpoints").exists()          # the old run's checkpoints went with it
    assert not (tmp_path / ".run.replaced").exists()


def test_force_keeps_the_old_run_when_the_new_one_fails(synth_data, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    proc = run_cli("pretrain", "--preset", "tiny", "--data", synth_data, "--out", out, "--domains", "nowhere",
                   "--force", *QUICK, check=False)        # fails once training starts, after the old run is set aside
    aside = tmp_path / ".run.replaced"
    assert proc.returncode != 0 and aside.is_dir() and (aside / "metrics.json").is_file()
    assert str(aside) in proc.stdout + proc.stderr


def test_resume_auto_on_a_finished_run_does_nothing_and_never_passes_max_steps(synth_data, finished, tmp_path):
    """Before: --resume auto on a finished run trained one step past max_steps (step 5/4)."""
    out = _copy(finished, tmp_path / "run")
    stamp = (out / "metrics.json").stat().st_mtime_ns
    proc = pretrain(synth_data, out, "--set", "train.max_steps=4", "--resume", "auto")
    assert "nothing to do" in proc.stdout and (out / "metrics.json").stat().st_mtime_ns == stamp
    # A run that died after its last checkpoint but before metrics.json: nothing left to train either.
    (out / "metrics.json").unlink()
    proc = pretrain(synth_data, out, "--set", "train.max_steps=4", "--resume", "auto")
    assert "nothing left to train" in proc.stdout and "step 5/" not in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 4


def test_resume_auto_with_a_larger_budget_continues_from_the_last_checkpoint(synth_data, finished, tmp_path):
    out = _copy(finished, tmp_path / "run")
    proc = pretrain(synth_data, out, "--set", "train.max_steps=6", "--set", "train.checkpoint_every=2",
                    "--resume", "auto")
    assert "resumed from" in proc.stdout and "step_00000004 at step 4" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 6


def test_a_latest_pointer_to_a_missing_checkpoint_is_refused_and_nothing_is_deleted(synth_data, finished, tmp_path):
    """Before: --resume auto started again at step 0 and rotated the older checkpoints away."""
    out = _copy(finished, tmp_path / "run")
    (out / "metrics.json").unlink()                       # an unfinished run
    (out / "checkpoints" / "latest").write_text("step_00000099")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = pretrain(synth_data, out, "--set", "train.max_steps=4", "--set", "train.checkpoint_every=1",
                    "--set", "train.keep_checkpoints=1", "--resume", "auto", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "step_00000099" in proc.stderr and "missing" in proc.stderr and "step_00000004" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_an_unfinished_run_needs_resume_or_force(synth_data, finished, tmp_path, capsys, own_environment):
    out = _copy(finished, tmp_path / "run")
    (out / "metrics.json").unlink()
    args = ("pretrain", "--preset", "tiny", "--data", synth_data, "--out", out)
    assert "unfinished pretrain run (checkpoints up to step 4)" in refused(capsys, *args)
    assert "not both" in refused(capsys, *args, "--force", "--resume", "auto")


def test_resuming_a_checkpoint_of_another_model_size_is_refused_by_name(synth_data, finished, tmp_path):
    """Before: a size-mismatch traceback from deep in accelerate, exit 1."""
    out = _copy(finished, tmp_path / "run")
    (out / "metrics.json").unlink()
    proc = pretrain(synth_data, out, "--set", "train.max_steps=6", "--set", "model.hidden_size=64",
                    "--resume", "auto", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "written by another model" in proc.stderr and "32]" in proc.stderr and "64]" in proc.stderr


def test_rotation_never_removes_the_checkpoint_just_written(synth_data, finished, tmp_path):
    """Resuming from an earlier checkpoint (step 2) with keep_checkpoints=1: before, the new step 3 was
    rotated away at once (names sorted, the old step 4 ranked newer) and ``latest`` pointed at nothing."""
    out = _copy(finished, tmp_path / "run")
    (out / "metrics.json").unlink()
    pretrain(synth_data, out, "--set", "train.max_steps=3", "--set", "train.checkpoint_every=1",
             "--set", "train.keep_checkpoints=1", "--resume", str(out / "checkpoints" / "step_00000002"))
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == "step_00000003" and (out / "checkpoints" / latest / "trainer_state.json").is_file()


def test_a_config_section_of_the_wrong_type_is_refused_even_with_set(synth_data, tmp_path, capsys, own_environment):
    """Before: ``train: 5`` in the file was silently replaced by ``--set train.max_steps=2``."""
    (tmp_path / "bad.yaml").write_text("train: 5\n")
    err = refused(capsys, "pretrain", "--config", tmp_path / "bad.yaml", "--set", "train.max_steps=2", "--data",
                  synth_data, "--out", tmp_path / "out")
    assert "bad.yaml, field 'train': expected a mapping, got 5" in err and not (tmp_path / "out").exists()


def test_finetune_regions_refuse_replacing_an_adapter_and_resume_skips_finished_ones(synth_data, finished, tmp_path,
                                                                                     capsys, own_environment):
    """Before: ``finetune --domains d2`` again into the same --out replaced the d2 adapter silently."""
    out = tmp_path / "regions"
    args = ["finetune", "--base", finished, "--data", synth_data, "--domains", "d2", "--method", "lora",
            "--out", out, *QUICK, "--set", "train.max_steps=2"]
    run_cli(*args)
    weights = out / "d2" / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    err = refused(capsys, *args)
    assert "region 'd2'" in err and "--force" in err
    proc = run_cli(*args, "--resume", "auto")
    assert "nothing to do" in proc.stdout and weights.stat().st_mtime_ns == stamp
    run_cli(*args, "--force", "--set", "train.seed=3")
    assert weights.stat().st_mtime_ns != stamp and not (out / ".d2.replaced").exists()


def test_multi_process_exits_never_abort_beside_a_busy_cpu(tmp_path):
    """Before: a 2-process ZeRO-3 run's rank aborted at exit with "terminate called without an active
    exception" on a busy machine (Gloo process groups freed during interpreter finalization). Launched
    ranks now leave through cli.exit_process; here 4 Gloo ranks that leave with their group alive, beside
    2 busy processes, 3 times. A plain exit aborted in 9 of 15 such runs (benchmarks/teardown_stress.py)."""
    script = tmp_path / "exit.py"
    script.write_text("import torch, torch.distributed as dist\n"
                      "from crossrec_dist.cli import exit_process\n"
                      "dist.init_process_group('gloo')\n"
                      "t = torch.ones(1000)\n"
                      "[dist.all_reduce(t) for _ in range(20)]\n"
                      "box = [{'x': 1}] if dist.get_rank() == 0 else [None]\n"
                      "dist.broadcast_object_list(box, src=0)\n"
                      "exit_process(0)\n")
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for i in range(3):
            proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "4",
                                   "--master_port", str(29850 + i), str(script)], capture_output=True, text=True,
                                  timeout=120, cwd=REPO, env=child_env())
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    finally:
        for h in hogs:
            h.kill()
