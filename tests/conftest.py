"""Shared fixtures: one fetched + prepared MovieLens-100K and one synthetic set per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed compiles its CPU communication op on first use (a minute on 2 cores): one build per
# virtualenv, shared by every test and Slurm job, never clobbered by another venv's build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

REPO = Path(__file__).resolve().parents[1]


# An in-process run (tests that call crossrec_dist.cli.main) sets these for its one-process world and
# keeps its rendezvous port open; a child must never inherit them, or it would join that world.
_WORLD_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _WORLD_VARS}
    return {**env, **(extra or {})}


@pytest.fixture
def own_environment():
    """For tests that run the CLI in this process: a training command sets up a one-process world
    (RANK, MASTER_PORT, ...) in os.environ; restore it, so no later test or child inherits that world."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def run_cli(*args: str, check: bool = True, env: dict | None = None, timeout: int = 600):
    """Run ``python -m crossrec_dist ...`` as a user would; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "crossrec_dist", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=child_env(env), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"crossrec {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def untrained_model(data_dir, out, pretrain_domains: list[str]):
    """A tiny (untrained) model with a prepared dataset's vocabulary: enough for loading, checks and
    export, in a fraction of a second (no training)."""
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.export.vocab import write_vocab
    from crossrec_dist.models.config import CrossRecConfig
    from crossrec_dist.models.model import CrossRecModel
    data = PreparedData(data_dir)
    cfg = CrossRecConfig(num_items=data.num_items, num_domains=len(data.domain_names), domain_names=data.domain_names,
                         pretrain_domains=pretrain_domains, hidden_size=16, num_layers=1, num_heads=2, max_len=10)
    CrossRecModel(cfg).save_pretrained(out, safe_serialization=True)
    write_vocab(data, out)
    return out


@pytest.fixture(scope="session")
def ml100k_raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml100k_raw")
    run_cli("data", "fetch", "movielens-100k", "--out", out, "--timeout", "5")
    return out


@pytest.fixture(scope="session")
def ml100k(ml100k_raw, tmp_path_factory):
    """ML-100K with regions from the first zip-code digit, leave-one-out."""
    out = tmp_path_factory.mktemp("ml100k_prep")
    run_cli("prepare", "--input", ml100k_raw, "--format", "auto", "--out", out,
            "--domain-from", "user.zip_code:prefix1")
    return out


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A small synthetic log with 3 domains, prepared."""
    raw = tmp_path_factory.mktemp("synth_raw")
    run_cli("data", "synth", "--out", raw, "--users", "600", "--items", "300", "--domains", "3",
            "--mean-length", "20", "--seed", "1")
    out = tmp_path_factory.mktemp("synth_prep")
    run_cli("prepare", "--input", raw / "interactions.parquet", "--format", "parquet", "--out", out,
            "--domain-col", "domain")
    return out


def accelerate_launch(config: str, *args: str, timeout: int = 900, env: dict | None = None):
    """``accelerate launch --config_file launch/<config> -m crossrec_dist ...`` as a user would run it."""
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(REPO / "launch" / config),
           "-m", "crossrec_dist", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout,
                          env=child_env({"DS_ACCELERATOR": "cpu", **(env or {})}))
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# Regions used as targets by the adaptation tests; the base model is pretrained on the others.
TARGET_REGIONS = ("0", "3")
SOURCE_REGIONS = ("1", "2", "4", "5", "6", "7", "8", "9")
TINY_TRAIN = ["--set", "train.epochs=4", "--set", "train.log_every=5", "--set", "train.tensorboard=false"]


@pytest.fixture(scope="session")
def shifted(tmp_path_factory):
    """A synthetic log whose third domain walks its own chain (shift 0.9) and has private items, prepared,
    and a tiny base (with per-item offsets) pretrained on the other two: a target the base's
    representation tells apart, for the domain-alignment methods (stages/alignment.py) to be measured
    on. About 25 s."""
    raw, data, base = (tmp_path_factory.mktemp(n) for n in ("shifted_raw", "shifted", "shifted_base"))
    run_cli("data", "synth", "--out", raw, "--users", "600", "--items", "300", "--domains", "3",
            "--mean-length", "20", "--shift", "0.9", "--seed", "1")
    run_cli("prepare", "--input", raw / "interactions.parquet", "--format", "parquet", "--out", data,
            "--domain-col", "domain")
    run_cli("pretrain", "--preset", "tiny", "--data", data, "--out", base, "--domains", "d0,d1",
            "--set", "train.epochs=6", "--set", "train.tensorboard=false", "--set", "model.item_bias=true")
    return data, base


@pytest.fixture(scope="session")
def tiny_base(ml100k, tmp_path_factory):
    """One tiny base model, pretrained in one plain process on the source regions of ML-100K."""
    out = tmp_path_factory.mktemp("tiny_base")
    run_cli("pretrain", "--preset", "tiny", "--data", ml100k, "--out", out, "--domains", ",".join(SOURCE_REGIONS),
            *TINY_TRAIN, "--set", "train.track_test=true")
    return out
