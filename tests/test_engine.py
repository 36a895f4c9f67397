"""Engine behaviours through the real command: DeepSpeed configs, resume, bad configs."""
import json

import pytest
from safetensors.torch import load_file

from conftest import run_cli

FAST = ["--set", "train.log_every=1", "--set", "train.tensorboard=false", "--set", "model.embedding_dropout=0",
        "--set", "model.attention_dropout=0", "--set", "train.micro_batch_size=64"]


def _losses(out):
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["history"] if "loss" in h]


@pytest.fixture(scope="module")
def plain_run(ml100k, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    run_cli("pretrain", "--preset", "tiny", "--data", ml100k, "--out", out, "--set", "train.max_steps=4", *FAST)
    return out


@pytest.mark.parametrize("ds", ["zero1", "zero3_offload"])
def test_deepspeed_configs_train_like_plain_torch(ds, plain_run, ml100k, tmp_path):
    """One process under each ZeRO config follows the same loss curve as no DeepSpeed at all
    (ZeRO-2 and ZeRO-3 with accumulation: tests/test_launch.py)."""
    run_cli("pretrain", "--preset", "tiny", "--data", ml100k, "--out", tmp_path, "--set", "train.max_steps=4",
            "--set", f"train.deepspeed={ds}", *FAST)
    assert _losses(tmp_path) == pytest.approx(_losses(plain_run), rel=1e-4)
    assert json.loads((tmp_path / "metrics.json").read_text())["zero_stage"] == {"zero1": 1, "zero2": 2}.get(ds, 3)


def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(ml100k, tmp_path):
    """With dropout on: data position, optimizer, schedule and RNG must all be restored."""
    common = ["--preset", "tiny", "--data", ml100k, "--set", "train.max_steps=8", "--set", "train.checkpoint_every=4",
              "--set", "train.log_every=1", "--set", "train.tensorboard=false", "--set", "train.micro_batch_size=64"]
    run_cli("pretrain", *common, "--out", tmp_path / "full")
    ckpt = tmp_path / "full" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000008" and (ckpt / "step_00000004").is_dir()
    run_cli("pretrain", *common, "--out", tmp_path / "resumed", "--resume", ckpt / "step_00000004")
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    assert _losses(tmp_path / "resumed")[-4:] == pytest.approx(_losses(tmp_path / "full")[-4:], rel=1e-6)


def test_bad_config_key_is_a_clear_error(ml100k, tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.001\n  epoch: 3\n")
    proc = run_cli("pretrain", "--config", tmp_path / "c.yaml", "--data", ml100k, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "train.epoch" in proc.stderr and "c.yaml" in proc.stderr
    proc = run_cli("pretrain", "--preset", "huge", "--data", ml100k, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "huge" in proc.stderr
    proc = run_cli("pretrain", "--preset", "tiny", "--data", ml100k, "--out", tmp_path / "o",
                   "--set", "train.deepspeed=ds_configs/nope.json", check=False)
    assert proc.returncode == 2 and "nope.json" in proc.stderr


def test_a_diverging_run_stops_with_a_clear_message(ml100k, tmp_path):
    proc = run_cli("pretrain", "--preset", "tiny", "--data", ml100k, "--out", tmp_path, "--set", "train.lr=1e30",
                   "--set", "train.max_grad_norm=0", "--set", "train.warmup_ratio=0", "--set", "train.max_steps=20",
                   "--set", "train.tensorboard=false", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "at step" in proc.stderr
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "metrics.json").exists()
