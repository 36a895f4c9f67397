"""The engine under every launch form a user knows, checked against one plain process.

All runs here have dropout off and the same global batch of 64 windows, so they must train the
same model: 1 process x 64; 1 process x 16 x 4 accumulation steps (plain, ZeRO-2, ZeRO-3); and
2 processes under `accelerate launch` configured (a) by an `accelerate config` YAML with a
`deepspeed_config:` block and no JSON, (b) by `--use_deepspeed --zero_stage N` flags, (c) without
DeepSpeed, by the shipped plain-DDP config. AdaLoRA's pruning under ZeRO-2 is checked against plain
DDP (two ranks, so to the bit).

Tolerances: weights 2e-5 absolute after 4 updates, logged losses 1e-5 and gradient norms 1e-4
relative; fp32 sums in another order differ by ~1e-6. Clipping is set low (0.05, the norms are
~0.17) so that it acts on every update: equal weights then also mean clipping saw the true norm.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TARGET_REGIONS, run_cli, child_env

STEPS = 4
SAME_RUN = ["--preset", "tiny", "--set", f"train.max_steps={STEPS}", "--set", "train.log_every=1",
            "--set", "train.tensorboard=false", "--set", "model.embedding_dropout=0",
            "--set", "model.attention_dropout=0", "--set", "train.warmup_ratio=0", "--set", "train.max_grad_norm=0.05"]

# What `accelerate config` writes for DeepSpeed on a CPU machine (no JSON file).
ACCELERATE_CONFIG_YAML = """\
compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  gradient_accumulation_steps: {gas}
  gradient_clipping: 0.05
  offload_optimizer_device: {offload}
  offload_param_device: none
  zero3_init_flag: {init}
  zero3_save_16bit_model: true
  zero_stage: {stage}
distributed_type: DEEPSPEED
downcast_bf16: 'no'
machine_rank: 0
main_training_function: main
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: true
"""


def _history(out: Path, key: str) -> list[float]:
    return [h[key] for h in json.loads((out / "metrics.json").read_text())["history"] if key in h]


def assert_same_run(out: Path, ref: Path) -> None:
    a, b = load_file(ref / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 2e-5, worst
    assert _history(out, "loss") == pytest.approx(_history(ref, "loss"), rel=1e-5)
    assert _history(out, "grad_norm") == pytest.approx(_history(ref, "grad_norm"), rel=1e-4)


def launch(args: list[str], *cli: str, tmp: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *args, "-m", "crossrec_dist", *map(str, cli)]
    with open(tmp / "launch.log", "w+") as log:   # a file, not a pipe: 2 ranks' output could fill it and block
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                              env=child_env({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                                             "CUDA_VISIBLE_DEVICES": ""}))   # CPU forms, also on a GPU host
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, output[-6000:]
    proc.stdout = output
    return proc


@pytest.fixture(scope="module")
def reference(ml100k, tmp_path_factory):
    """One plain process, micro-batch 64, no accumulation."""
    out = tmp_path_factory.mktemp("ref")
    run_cli("pretrain", "--data", ml100k, "--out", out, *SAME_RUN, "--set", "train.micro_batch_size=64")
    norms = _history(out, "grad_norm")
    assert len(norms) == STEPS and min(norms) > 0.05    # clipping acts on every update
    return out


@pytest.mark.parametrize("deepspeed", [None, "zero2", "zero3"])
def test_accumulation_is_exact(deepspeed, reference, ml100k, tmp_path):
    """grad_accum=4 x micro 16 == grad_accum=1 x micro 64: same weights, losses and gradient norms."""
    ds = ["--set", f"train.deepspeed={deepspeed}"] if deepspeed else []
    run_cli("pretrain", "--data", ml100k, "--out", tmp_path, *SAME_RUN, *ds,
            "--set", "train.micro_batch_size=16", "--set", "train.grad_accum=4")
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["grad_accum"] == 4 and m["train"]["steps"] == STEPS
    assert_same_run(tmp_path, reference)


@pytest.mark.slow
def test_accelerate_config_yaml_zero3_with_zero_init(reference, ml100k, tmp_path):
    """(a) ZeRO-3, zero3_init_flag true, the YAML's 2 accumulation steps x 2 processes x micro 16."""
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text(ACCELERATE_CONFIG_YAML.format(gas=2, offload="none", init="true", stage=3))
    out = tmp_path / "out"
    proc = launch(["--config_file", str(cfg)], "pretrain", "--data", ml100k, "--out", out, *SAME_RUN,
                  "--set", "train.micro_batch_size=16", "--set", "train.rank_report=true", tmp=tmp_path)
    assert "zero3 (zero.Init)" in proc.stdout and "grad_accum=2" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert (m["world_size"], m["zero_stage"], m["zero3_init"], m["grad_accum"]) == (2, 3, True, 2)
    assert_same_run(out, reference)
    # Built partitioned: right after construction no rank holds any parameter in full, only its half;
    # and never afterwards outside a gather: after DeepSpeed took the model and after every update,
    # no partitioned parameter is materialised (DeepSpeed's persistent small ones aside).
    for rank in (0, 1):
        report = json.loads((out / "ranks" / f"rank{rank}.json").read_text())
        built = report["built"]
        assert built and all(p["materialized"] == 0 and p["local"] == -(-p["full"] // 2) for p in built.values())
        held = report["held_outside_gather"]
        assert set(held) == {"engine_prepared", *(f"step_{s}" for s in range(1, STEPS + 1))}, sorted(held)
        assert all(h["partitioned"] == 0 for h in held.values()), held
        full = sum(p["full"] for p in built.values())
        assert all(h["persistent"] < 0.05 * full for h in held.values()), (held, full)


@pytest.mark.slow
def test_accelerate_config_yaml_zero2_with_cpu_offload_distills(tiny_base, ml100k, tmp_path):
    """(a) ZeRO-2 with the optimizer offloaded to CPU, for `crossrec distill`."""
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text(ACCELERATE_CONFIG_YAML.format(gas=1, offload="cpu", init="false", stage=2))
    out = tmp_path / "student"
    launch(["--config_file", str(cfg)], "distill", "--teacher", tiny_base, "--data", ml100k,
           "--domain", TARGET_REGIONS[0], "--out", out, "--set", "model.hidden_size=16", "--set", "train.max_steps=4",
           "--set", "train.micro_batch_size=32", "--set", "train.tensorboard=false", tmp=tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert m["stage"] == "distill" and m["world_size"] == 2 and m["train"]["steps"] == 4
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_flags_zero3_pretrain(reference, ml100k, tmp_path):
    """(b) `--use_deepspeed --zero_stage 3` (accelerate's default: zero3_init on), micro 32 x 2 processes."""
    out = tmp_path / "out"
    launch(["--num_processes", "2", "--use_deepspeed", "--zero_stage", "3"], "pretrain", "--data", ml100k,
           "--out", out, *SAME_RUN, "--set", "train.micro_batch_size=32", tmp=tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert (m["world_size"], m["zero_stage"], m["zero3_init"]) == (2, 3, True)
    assert_same_run(out, reference)


@pytest.mark.slow
def test_flags_zero2_finetune_with_replay_alignment_and_warm_start(shifted, tmp_path):
    """(b) `--use_deepspeed --zero_stage 2 --gradient_accumulation_steps 2` on 2 CPU processes: LoRA with
    source replay and MMD alignment, the launcher's accumulation used; then, warm-started from that
    adapter (--init-adapter), source replay with the adversarial discriminator (its weights partitioned
    and updated with the adapter's). Each output loads with plain peft and scores as the run's own final
    record says (validation too, against the in-training one); no discriminator is saved."""
    from peft import PeftModel

    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.stages.common import evaluate_model
    data_dir, base = shifted
    common = ["finetune", "--base", base, "--data", data_dir, "--domain", "d2", "--method", "lora",
              "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.micro_batch_size=16",
              "--set", "train.validate_at_start=false", "--set", "train.tensorboard=false",
              # the trained adapter whatever it scores, validated as the final record is (one target per user)
              "--set", "must_beat_base=false", "--set", "valid_targets=1", "--set", "source_replay=1.0"]
    first, second = tmp_path / "mmd", tmp_path / "adversarial"
    launch(["--num_processes", "2", "--use_deepspeed", "--zero_stage", "2", "--gradient_accumulation_steps", "2"],
           *common, "--set", "align=mmd", "--out", first, tmp=tmp_path)
    proc = launch(["--num_processes", "2", "--use_deepspeed", "--zero_stage", "2"],
                  *common, "--set", "align=adversarial", "--set", "align_weight=0.1", "--init-adapter", first,
                  "--out", second, tmp=tmp_path)
    assert "a domain discriminator" in proc.stdout
    data = PreparedData(data_dir)
    for out, kind, accum in ((first, "mmd", 2), (second, "adversarial", 1)):
        m = json.loads((out / "metrics.json").read_text())
        assert (m["world_size"], m["zero_stage"], m["grad_accum"], m["train"]["steps"]) == (2, 2, accum, 4)
        assert m["align"]["kind"] == kind and m["source_replay"]["sequences"] > 0
        tensors = load_file(out / "adapter_model.safetensors")
        assert not any("discriminator" in k for k in tensors)
        assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
        model = PeftModel.from_pretrained(CrossRecModel.from_pretrained(base), str(out))
        ev = evaluate_model(model, data, ["d2"], model.config.max_len)
        assert ev["test"]["overall"]["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-4)
        assert ev["valid"]["overall"]["ndcg@10"] == pytest.approx(m["in_training_valid"]["ndcg@10"], abs=1e-4)
    m = json.loads((second / "metrics.json").read_text())
    assert m["selection"]["start"] == "init_adapter" and m["warm_start"]


@pytest.mark.slow
def test_flags_zero2_offsets_saves_a_model_from_pretrained_loads(shifted, tmp_path):
    """``offsets`` (only the per-item offsets train) under ZeRO-2 on 2 CPU processes: the saved whole model
    loads with plain from_pretrained and differs from the base in item_bias alone."""
    from crossrec_dist.models.model import CrossRecModel
    data_dir, base = shifted
    out = tmp_path / "offsets"
    launch(["--num_processes", "2", "--use_deepspeed", "--zero_stage", "2"],
           "finetune", "--base", base, "--data", data_dir, "--domain", "d2", "--method", "offsets", "--out", out,
           "--set", "train.max_steps=3", "--set", "train.eval_every=3", "--set", "train.micro_batch_size=16",
           "--set", "train.validate_at_start=false", "--set", "train.tensorboard=false", "--set", "must_beat_base=false",
           tmp=tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert (m["world_size"], m["zero_stage"], m["train"]["steps"]) == (2, 2, 3)
    before = CrossRecModel.from_pretrained(base).state_dict()
    after = CrossRecModel.from_pretrained(out).state_dict()
    assert {k for k in before if not torch.equal(before[k], after[k])} == {"item_bias.weight"}


@pytest.mark.slow
def test_plain_ddp_on_cpu_with_the_shipped_config(reference, ml100k, tmp_path):
    """(c) no DeepSpeed: `launch/cpu_ddp_2proc.yaml`, 2 processes x micro 32. On a machine without
    CUDA accelerate settles on DistributedType.NO under torchrun and does not wrap the model in DDP
    unless told the world is CPU processes; the ranks then trained apart (grad norms of one rank's
    32 windows, not of the 64) and rank 0 saved its own model."""
    out = tmp_path / "out"
    launch(["--config_file", str(REPO / "launch" / "cpu_ddp_2proc.yaml")], "pretrain", "--data", ml100k,
           "--out", out, *SAME_RUN, "--set", "train.micro_batch_size=32", tmp=tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    assert (m["world_size"], m["zero_stage"]) == (2, None)
    assert_same_run(out, reference)


ADALORA_RUN = ["--method", "adalora", "--set", "train.max_steps=12", "--set", "train.eval_every=4",
               "--set", "train.tensorboard=false", "--set", "train.warmup_ratio=0", "--set", "lora.dropout=0",
               "--set", "train.micro_batch_size=16",
               "--set", "adalora.init_r=4", "--set", "adalora.target_r=2", "--set", "adalora.delta_t=2",
               "--set", "adalora.table_r=4", "--set", "train_top_items=0", "--set", "must_beat_base=false"]


@pytest.mark.slow
@pytest.mark.parametrize("clip, stages", [(0, [2]), (0.05, [0, 2])])
def test_flags_zero_adalora_prunes_as_plain_ddp(clip, stages, reference, ml100k, tmp_path):
    """(b) AdaLoRA (with its item-table LoRA) under `--use_deepspeed --zero_stage 2` (and 0) against plain DDP
    (the shipped cpu_ddp_2proc.yaml), both 2 processes x micro 16 from the same base (`reference`,
    dropout off). ZeRO-2 keeps the gradients in its partitions (PEFT's importance scores must read them
    assembled; before, PEFT failed on a None gradient) and updates an fp32 master copy (the pruning
    must be written there too, or the next step undoes it: then other ranks get pruned, weights
    differ by ~3e-2). Without clipping, two ranks' reductions are exact sums: the two runs must be the
    same to the bit. With clipping on every update (0.05; norms ~2) DeepSpeed clips inside its step,
    after the gradients were read, and the engine hands its factor on: the same ranks, weights within
    1e-6 (without the factor other ranks are pruned, weights 3e-2 apart). ZeRO-0 (DeepSpeed without a
    ZeRO optimizer) keeps no gradient norm; the engine measures it before the step.
    (Against one process, fp32 sums in another order flip near-tied importance scores.)"""
    common = ["finetune", "--base", reference, "--data", ml100k, "--domain", TARGET_REGIONS[0], *ADALORA_RUN,
              "--set", f"train.max_grad_norm={clip}"]
    ddp = tmp_path / "ddp"
    launch(["--config_file", str(REPO / "launch" / "cpu_ddp_2proc.yaml")], *common, "--out", ddp, tmp=tmp_path)
    a = json.loads((ddp / "metrics.json").read_text())
    assert (a["world_size"], a["zero_stage"]) == (2, None)
    assert sum(a["rank_pattern"].values()) == 2 * len(a["rank_pattern"])
    assert set(a["rank_pattern"].values()) != {2}          # a budget moved between modules, not 2 each
    for stage in stages:
        zero = tmp_path / f"zero{stage}"
        launch(["--num_processes", "2", "--use_deepspeed", "--zero_stage", str(stage)], *common, "--out", zero,
               tmp=tmp_path)
        b = json.loads((zero / "metrics.json").read_text())
        assert (b["world_size"], b["zero_stage"]) == (2, stage) and b["rank_pattern"] == a["rank_pattern"]
        for sub in ("", "item_table/"):
            x, y = load_file(ddp / f"{sub}adapter_model.safetensors"), load_file(zero / f"{sub}adapter_model.safetensors")
            assert x.keys() == y.keys()
            assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-6
        e = [t for k, t in load_file(zero / "adapter_model.safetensors").items() if "lora_E" in k]
        assert sum(int((t != 0).sum()) for t in e) == sum(a["rank_pattern"].values())   # pruned: exactly zero
        assert _history(zero, "loss") == pytest.approx(_history(ddp, "loss"), rel=1e-6)
        assert _history(zero, "grad_norm") == pytest.approx(_history(ddp, "grad_norm"), rel=1e-5)


@pytest.mark.slow
def test_conflicting_accumulation_values_stop_before_training(ml100k, tmp_path):
    cfg = tmp_path / "accelerate.yaml"
    cfg.write_text(ACCELERATE_CONFIG_YAML.format(gas=2, offload="none", init="false", stage=2))
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", str(cfg), "-m", "crossrec_dist",
           "pretrain", "--data", str(ml100k), "--out", str(tmp_path / "out"), "--preset", "tiny",
           "--set", "train.grad_accum=4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=child_env({"DS_ACCELERATOR": "cpu"}))
    # each rank exits 2 with our message; the launcher then reports the failed children itself
    assert proc.returncode != 0 and "exitcode: 2" in proc.stderr
    assert "crossrec: error: field 'train.grad_accum'" in proc.stderr and "gradient_accumulation_steps=2" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr, proc.stderr[-3000:]
