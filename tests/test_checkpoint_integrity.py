"""Checkpoints are trusted input: every file of a checkpoint must match the manifest.json written
when it was saved before anything in it is loaded (DeepSpeed and accelerate load some of its files
with pickle). One real 2-step run writes the checkpoint; each test damages a copy of it and resumes."""
import hashlib
import json
import pickle
import os
import shutil
import subprocess

import pytest

from conftest import run_cli
from crossrec_dist.cli import main
from crossrec_dist.engine import checkpoint as ckpt
from crossrec_dist.errors import InputError

STEP = "step_00000002"


def _args(data, out, steps):
    return ["pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out), "--set", f"train.max_steps={steps}",
            "--set", "train.checkpoint_every=2", "--set", "train.log_every=1", "--set", "train.tensorboard=false",
            "--set", "train.micro_batch_size=64", "--resume", "auto"]


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(ckpt.TRUST_ENV, raising=False)   # whatever the caller's shell says


@pytest.fixture(scope="module")
def saved(ml100k, tmp_path_factory):
    """The checkpoints/ folder of a real 2-step run (plain accelerate path)."""
    out = tmp_path_factory.mktemp("ckpt_source")
    run_cli(*_args(ml100k, out, 2), env={ckpt.TRUST_ENV: ""})
    return out / "checkpoints"


@pytest.fixture
def run_dir(saved, tmp_path):
    """A fresh output folder holding a copy of those checkpoints and nothing else (no metrics.json)."""
    shutil.copytree(saved, tmp_path / "checkpoints")
    return tmp_path


def _resume(data, run_dir, capfd, env=None):
    """Resume in this process (a refusal then costs no interpreter start); with ``env``, in a subprocess.
    The in-process run's one-process world (RANK, MASTER_PORT, ...) is removed from this process's
    environment afterwards, so later tests' children never try to join it."""
    if env is not None:
        return run_cli(*_args(data, run_dir, 4), check=False, env=env)
    capfd.readouterr()
    saved = dict(os.environ)
    try:
        code = main(_args(data, run_dir, 4))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess([], code, out, err)


def _refused(proc, run_dir, file, what):
    """Exit 2, one message naming ``file`` and saying ``what``, no traceback, and nothing trained."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    err = proc.stderr
    assert f"crossrec: error: {file}, field '--resume': " in err, err[-2000:]
    assert what in err and "trusted input" in err and "--resume at another checkpoint" in err, err[-2000:]
    assert "resumed from" not in proc.stdout
    assert not (run_dir / "metrics.json").exists()          # did not quietly start over either
    assert not (run_dir / "checkpoints" / "step_00000004").exists()


class _Marker:
    """A pickle that, when unpickled, creates ``path`` (stands in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _plant(victim, marker):
    """Replace ``victim`` with a code-running pickle of exactly the same size (so only the hash tells)."""
    payload = pickle.dumps(_Marker(marker), protocol=2)
    size = victim.stat().st_size
    assert len(payload) < size
    victim.write_bytes(payload + b"\0" * (size - len(payload)))   # pickle stops at STOP: the padding is ignored
    assert victim.stat().st_size == size


def test_manifest_covers_every_file(saved):
    folder = saved / STEP
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert sorted([*listed, ckpt.MANIFEST]) == on_disk          # every file, nothing more
    # our own files and accelerate's pickles are all covered, and nothing else is lying around
    assert {"trainer_state.json", "rng_rank0.safetensors", "model.safetensors", "optimizer.bin",
            "random_states_0.pkl"} <= set(listed)
    for rel, e in listed.items():
        data = (folder / rel).read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest(), rel
    assert not list(saved.glob("*.tmp")) and not (folder / (ckpt.MANIFEST + ".tmp")).exists()


def test_truncated_file_is_refused(ml100k, run_dir, capfd):
    victim = run_dir / "checkpoints" / STEP / "optimizer.bin"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    _refused(_resume(ml100k, run_dir, capfd), run_dir, victim, f"is truncated: {len(data) // 2:,} bytes, {len(data):,}")


def test_planted_pickle_is_never_loaded(ml100k, run_dir, tmp_path, capfd):
    """accelerate's RNG pickle swapped for one that runs code: refused, the code never ran, no fresh start."""
    marker = tmp_path / "pwned"
    victim = run_dir / "checkpoints" / STEP / "random_states_0.pkl"
    _plant(victim, marker)
    _refused(_resume(ml100k, run_dir, capfd), run_dir, victim, "changed since it was saved")
    assert not marker.exists()


def test_planted_pickle_in_deepspeed_shard_is_never_loaded(tmp_path):
    """A resume on another world size reads DeepSpeed's shards through zero_to_fp32, which unpickles
    them with weights_only=False: the manifest is what stands between a swapped shard and its code."""
    import torch

    folder, marker = tmp_path / STEP, tmp_path / "pwned"
    (folder / ckpt.DS_TAG).mkdir(parents=True)
    (folder / ckpt.STATE).write_text(json.dumps({"step": 2, "world": 2}))
    (folder / "latest").write_text(ckpt.DS_TAG)
    shard = folder / ckpt.DS_TAG / "mp_rank_00_model_states.pt"   # the first file zero_to_fp32 unpickles
    torch.save({"module": {"w": torch.zeros(256)}, "ds_version": "0"}, shard)
    torch.save({"optimizer_state_dict": {}}, folder / ckpt.DS_TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ckpt.write_manifest(folder)
    _plant(shard, marker)
    for read in (ckpt.consolidated_weights, ckpt.read_state):
        with pytest.raises(InputError) as e:
            read(folder)
        assert e.value.path == str(shard) and "changed since it was saved" in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("damage, what", [
    ("extra", "is not in the manifest"),
    ("missing", "is missing"),
    ("grown", "changed since it was saved: "),
    ("same-size-edit-after-verified", "changed since it was saved: its sha256"),
    ("bad-manifest", "unreadable manifest"),
])
def test_other_damage_is_refused(run_dir, damage, what):
    folder = run_dir / "checkpoints" / STEP
    ckpt.read_state(folder)                                # intact: accepted (and remembered as verified)
    victim = {"extra": folder / "custom_checkpoint_0.pkl", "missing": folder / "rng_rank0.safetensors",
              "grown": folder / "model.safetensors", "same-size-edit-after-verified": folder / "optimizer.bin",
              "bad-manifest": folder / ckpt.MANIFEST}[damage]
    if damage == "extra":
        victim.write_bytes(pickle.dumps({"x": 1}))
    elif damage == "missing":
        victim.unlink()
    elif damage == "grown":
        with open(victim, "ab") as f:
            f.write(b"\0")
    elif damage == "same-size-edit-after-verified":
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.write_text("{not json")
    for read in (ckpt.read_state, ckpt.consolidated_weights):
        with pytest.raises(InputError) as e:
            read(folder)
        assert e.value.path == str(victim) and e.value.field == "--resume" and what in e.value.message


def test_checkpoint_without_manifest_needs_the_override(ml100k, run_dir, capfd):
    manifest = run_dir / "checkpoints" / STEP / ckpt.MANIFEST
    manifest.unlink()
    proc = _resume(ml100k, run_dir, capfd)
    _refused(proc, run_dir, manifest, "has no manifest.json")
    assert f"{ckpt.TRUST_ENV}=1" in proc.stderr

    proc = _resume(ml100k, run_dir, capfd, env={ckpt.TRUST_ENV: "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and f"loaded unchecked because {ckpt.TRUST_ENV}=1" in proc.stderr
    assert (run_dir / "metrics.json").is_file()
    assert (run_dir / "checkpoints" / "step_00000004" / ckpt.MANIFEST).is_file()   # new checkpoints carry one
