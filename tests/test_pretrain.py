"""Pretraining through the real commands: one plain process, and 2 CPU processes under ZeRO-3."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SOURCE_REGIONS, accelerate_launch, run_cli, child_env

NO_DROPOUT = ["--set", "model.embedding_dropout=0", "--set", "model.attention_dropout=0"]
SHORT = ["--set", "train.epochs=2", "--set", "train.log_every=2", "--set", "train.tensorboard=false",
         "--set", "train.warmup_ratio=0"]


def test_single_process_pretrain_writes_a_loadable_model(tiny_base, ml100k, tmp_path):
    m = json.loads((tiny_base / "metrics.json").read_text())
    assert m["stage"] == "pretrain" and m["params"]["total"] == m["params"]["trainable"] > 0
    assert m["train"]["steps"] > 0 and m["train"]["samples_per_second"] > 0
    assert set(m["per_domain"]) == set(SOURCE_REGIONS)
    assert m["test"]["ndcg@10"] > 0.0 and (tiny_base / "model.safetensors").is_file()
    # track_test: test metrics along the way, for time-to-quality curves; the kept model is the best
    # on valid, so the final test NDCG is the one recorded at the best step.
    curve = [h for h in m["history"] if "test_ndcg@10" in h]
    assert len(curve) >= 2 and all(h["seconds"] > 0 for h in curve)
    assert [h["seconds"] for h in curve] == sorted(h["seconds"] for h in curve)
    best = next(h for h in curve if h["step"] == m["train"]["best_step"])
    assert best["test_ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-6)
    # `crossrec evaluate` on the saved model reproduces the stage's own numbers.
    run_cli("evaluate", "--model", tiny_base, "--data", ml100k, "--domain", ",".join(SOURCE_REGIONS),
            "--out", tmp_path / "m.json")
    again = json.loads((tmp_path / "m.json").read_text())
    for split in ("valid", "test"):
        assert again[split]["ndcg@10"] == pytest.approx(m[split]["ndcg@10"], abs=1e-9)


@pytest.fixture(scope="module")
def zero3_run(ml100k, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    accelerate_launch("cpu_zero3_2proc.yaml", "pretrain", "--preset", "tiny", "--data", ml100k, "--out", out,
                      *SHORT, *NO_DROPOUT, *ZERO3_RUN)
    return out


ZERO3_RUN = ["--set", "train.micro_batch_size=32", "--set", "train.rank_report=true",
             "--set", "train.checkpoint_every=10", "--set", "train.eval_every=10"]


def _history(run_dir: Path, key: str) -> dict:
    return {h["step"]: h[key] for h in json.loads((run_dir / "metrics.json").read_text())["history"] if key in h}


@pytest.mark.slow
def test_zero3_partitions_parameters_and_shards_data(zero3_run):
    r0, r1 = (json.loads((zero3_run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["zero_stage"] == 3
    for name, p0 in r0["params"].items():
        p1 = r1["params"][name]
        # each rank holds about half of every partitioned parameter (ceil for odd sizes)
        assert p0["local"] == p1["local"] == -(-p0["full"] // 2), name
    for epoch in ("0", "1"):
        s0, s1 = set(r0["samples_by_epoch"][epoch]), set(r1["samples_by_epoch"][epoch])
        assert s0 and s1 and not (s0 & s1)            # different halves of the data
        assert abs(len(s0) - len(s1)) <= 1


@pytest.mark.slow
def test_zero3_consolidated_model_reproduces_training_metrics(zero3_run, ml100k):
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.stages.common import evaluate_model

    m = json.loads((zero3_run / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["zero_stage"] == 3
    model = CrossRecModel.from_pretrained(zero3_run)  # one plain process, no DeepSpeed
    ev = evaluate_model(model, PreparedData(ml100k), None, model.config.max_len)
    during = m["in_training_valid"]
    assert ev["valid"]["overall"]["ndcg@10"] == pytest.approx(during["ndcg@10"], abs=1e-4)
    assert ev["valid"]["overall"]["hr@10"] == pytest.approx(during["hr@10"], abs=1e-4)


@pytest.mark.slow
def test_one_and_two_processes_agree_on_the_loss_curve(zero3_run, ml100k, tmp_path):
    """Same global batch (64): 1 process x 64 vs 2 processes x 32 under ZeRO-3. The engine averages
    over every target of the update on all ranks, so the curves agree to float rounding (1e-5)."""
    run_cli("pretrain", "--preset", "tiny", "--data", ml100k, "--out", tmp_path, *SHORT, *NO_DROPOUT,
            "--set", "train.micro_batch_size=64")
    one = [h["loss"] for h in json.loads((tmp_path / "metrics.json").read_text())["history"] if "loss" in h]
    two = [h["loss"] for h in json.loads((zero3_run / "metrics.json").read_text())["history"] if "loss" in h]
    assert len(one) == len(two) > 5
    assert two == pytest.approx(one, rel=1e-5)


@pytest.mark.slow
def test_a_two_process_zero3_checkpoint_resumes_on_one_process(zero3_run, ml100k, tmp_path):
    """Resume on another world size: from the consolidated weights of the ZeRO-3 shards, keeping
    step, schedule and data position (Adam's moments restart). The weights are checked through
    the validation the engine runs right after such a resume: it must equal the 2-process run's
    validation at that step."""
    root = zero3_run / "checkpoints"
    latest = root / (root / "latest").read_text().strip()
    step = json.loads((latest / "trainer_state.json").read_text())["step"]
    valid_two = _history(zero3_run, "valid_ndcg@10")
    assert step in valid_two, (step, valid_two)
    proc = run_cli("pretrain", "--preset", "tiny", "--data", ml100k, "--out", tmp_path, *SHORT, *NO_DROPOUT,
                   "--set", "train.epochs=3", "--set", "train.micro_batch_size=64", "--set", "train.eval_every=10",
                   "--resume", latest)
    assert f"at step {step} " in proc.stdout and "instead of 2" in proc.stdout, proc.stdout[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    at_resume = [h for h in m["history"] if h.get("resharded_from_world") == 2]
    assert len(at_resume) == 1 and at_resume[0]["step"] == step
    assert at_resume[0]["valid_ndcg@10"] == pytest.approx(valid_two[step], abs=1e-4)
    assert m["world_size"] == 1 and m["train"]["steps"] > step
    assert max(_history(tmp_path, "loss")) > step       # it trained on after the resume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_machines_train_together_like_one_machine(zero3_run, ml100k, tmp_path):
    """Two "nodes" (machine ranks 0 and 1, one process each, rendezvous on loopback) under ZeRO-3
    give the same run as one node with two processes: same losses and validation."""
    port = _free_port()
    launcher = str(Path(sys.executable).parent / "accelerate")
    procs, logs = [], [open(tmp_path / f"machine{r}.log", "w+") for r in (0, 1)]  # files: pipes could fill and block
    for machine_rank in (0, 1):
        cmd = [launcher, "launch", "--config_file", str(REPO / "launch" / "cpu_zero3_2proc.yaml"),
               "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(machine_rank),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
               "--deepspeed_multinode_launcher", "standard",
               "-m", "crossrec_dist", "pretrain", "--preset", "tiny", "--data", str(ml100k), "--out", str(tmp_path),
               *SHORT, *NO_DROPOUT, *ZERO3_RUN]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=logs[machine_rank], stderr=subprocess.STDOUT,
                                      env=child_env({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    outputs = [(f.seek(0), f.read())[1] for f in logs]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["zero_stage"] == 3
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    one_node_loss, two_node_loss = _history(zero3_run, "loss"), _history(tmp_path, "loss")
    assert one_node_loss.keys() == two_node_loss.keys()
    for step, loss in one_node_loss.items():
        assert two_node_loss[step] == pytest.approx(loss, rel=1e-4), step
    one_node_valid, two_node_valid = _history(zero3_run, "valid_ndcg@10"), _history(tmp_path, "valid_ndcg@10")
    assert one_node_valid == pytest.approx(two_node_valid, abs=1e-4)
