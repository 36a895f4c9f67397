"""Distillation: the loss by hand, alpha=1 is plain training, the student ships (HF + ONNX)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TARGET_REGIONS, run_cli
from crossrec_dist.models.losses import distillation_loss

QUICK = ["--set", "train.max_steps=6", "--set", "train.eval_every=3", "--set", "train.validate_at_start=false", "--set", "train.tensorboard=false"]


def test_kd_loss_matches_a_hand_computed_value():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[2.0, 0.0, 1.0]])
    y = torch.tensor([1])
    alpha, T = 0.25, 2.0
    ps = [math.exp(v / T) for v in (1.0, 2.0, 0.0)]
    pt = [math.exp(v / T) for v in (2.0, 0.0, 1.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    ce = -math.log(math.exp(2.0) / (math.exp(1.0) + math.exp(2.0) + 1.0))
    want = alpha * ce + (1 - alpha) * T * T * kl
    assert distillation_loss(s, t, y, alpha, T).item() == pytest.approx(want, rel=1e-6)


def test_alpha_one_is_plain_training_and_padding_is_excluded():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    y = torch.randint(1, 7, (5,))
    assert torch.equal(distillation_loss(s, t, y, 1.0, 3.0), F.cross_entropy(s, y))
    s[:, 0], t[:, 0] = -math.inf, -math.inf  # a masked (padding) column never produces NaN
    assert torch.isfinite(distillation_loss(s, t, y, 0.5, 2.0))


def test_alpha_one_task_loss_is_the_students_own_loss_and_never_runs_the_teacher(tiny_base, ml100k):
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.stages.distill import DistillConfig, DistillTask, StudentWithProjection
    cfg = DistillConfig(alpha=1.0, model={"hidden_size": 16, "intermediate_size": 32})
    task = DistillTask(cfg, PreparedData(ml100k), str(tiny_base), None, TARGET_REGIONS[0])
    model = StudentWithProjection(CrossRecModel(task.student_config), task.teacher.config.hidden_size)

    def no_teacher(*_, **__):
        raise AssertionError("the teacher ran although alpha = 1 has no teacher term")
    task.teacher.encode = no_teacher
    batch = next(task.batches().epoch(0, rank=0, world=1)).inputs
    model.eval()
    want = model.student(**batch).loss
    assert task.loss(model, batch).mean.item() == pytest.approx(want.item(), rel=1e-5)


def test_top_k_kd_loss_runs_with_student_offsets_and_reaches_them(tiny_base, ml100k):
    """``top_k``: KL over the teacher's top-k plus sampled items; a student with per-item offsets
    (``model.item_bias``) gets gradients on them from the candidates' logits."""
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.stages.distill import DistillConfig, DistillTask, StudentWithProjection
    cfg = DistillConfig(alpha=0.5, top_k=5, num_sampled=8,
                        model={"hidden_size": 16, "intermediate_size": 32, "item_bias": True})
    task = DistillTask(cfg, PreparedData(ml100k), str(tiny_base), None, TARGET_REGIONS[0])
    model = StudentWithProjection(CrossRecModel(task.student_config), task.teacher.config.hidden_size)
    assert model.student.item_bias is not None
    batch = next(task.batches().epoch(0, rank=0, world=1)).inputs
    loss = task.loss(model, batch).mean
    assert torch.isfinite(loss)
    loss.backward()
    assert model.student.item_bias.weight.grad is not None and model.student.item_bias.weight.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def student(tiny_base, ml100k, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method", "lora",
            "--out", root / "lora", *QUICK)
    # no --preset, no model.*: the default student, sized from the (tiny) teacher
    proc = run_cli("distill", "--teacher", tiny_base, "--adapter", root / "lora", "--data", ml100k,
                   "--domain", TARGET_REGIONS[0], "--out", root / "student", "--set", "feature_weight=0.1", *QUICK)
    (root / "student" / "distill.log").write_text(proc.stdout + proc.stderr)
    return root / "student"


def test_default_student_is_half_the_teacher_and_loads_with_from_pretrained_alone(student, tiny_base):
    """Without a preset the student is the teacher at half width and depth (tiny: hidden 32 -> 16,
    2 layers -> 1, FFN 64 -> 32), strictly smaller, and the log says its share of the teacher."""
    from crossrec_dist import CrossRecModel
    m = json.loads((student / "metrics.json").read_text())
    n, t = m["params"]["total"], m["teacher"]["params"]["total"]
    assert m["stage"] == "distill" and n < t and m["config"]["preset"] is None
    teacher = json.loads((tiny_base / "config.json").read_text())
    model = CrossRecModel.from_pretrained(student)
    c = model.config
    t_cfg = (teacher["hidden_size"], teacher["num_layers"], teacher["num_heads"], teacher["intermediate_size"])
    assert (c.hidden_size, c.num_layers, c.num_heads, c.intermediate_size) == (
        t_cfg[0] // 2, t_cfg[1] // 2, t_cfg[2], t_cfg[3] // 2)
    assert sum(p.numel() for p in model.parameters()) == n
    assert not any(k.startswith("projection") for k in model.state_dict())
    log = (student / "distill.log").read_text()
    assert f"student {n:,} params = {n / t:.1%} of the teacher's {t:,} (sized from the teacher" in log
    assert "WARNING" not in log


def test_default_student_rule():
    from crossrec_dist.models.presets import preset_config
    from crossrec_dist.stages.distill import default_student_options
    for name, want in (("tiny", (16, 1, 2, 32)), ("small", (32, 1, 2, 128)), ("medium", (128, 1, 4, 512)),
                       ("base", (128, 2, 4, 512)), ("1b", (1024, 12, 16, 2816))):
        o = default_student_options(preset_config(name))
        assert (o["hidden_size"], o["num_layers"], o["num_heads"], o["intermediate_size"]) == want, name
    # at least 8 wide (a multiple of twice the heads), never wider than the teacher; overrides win
    assert default_student_options(preset_config("tiny", hidden_size=12))["hidden_size"] == 8
    assert default_student_options(preset_config("tiny", hidden_size=4))["hidden_size"] == 4
    o = default_student_options(preset_config("tiny"), {"hidden_size": 8, "num_layers": 2})
    assert (o["hidden_size"], o["num_layers"], o["intermediate_size"]) == (8, 2, 16)


def test_a_student_as_large_as_its_teacher_is_refused_naming_the_field(tiny_base, ml100k, tmp_path):
    args = ("distill", "--teacher", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0],
            "--set", "train.max_steps=1", "--set", "train.validate_at_start=false", "--set", "train.tensorboard=false")
    proc = run_cli(*args, "--out", tmp_path / "a", "--preset", "tiny", check=False)   # = the teacher's preset
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "field 'preset'" in proc.stderr and "100.0% of the teacher's" in proc.stderr
    assert "allow_student_not_smaller=true" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a" / "metrics.json").exists()
    proc = run_cli(*args, "--out", tmp_path / "b", "--set", "model.hidden_size=64", check=False)   # bigger
    assert proc.returncode == 2 and "field 'model.hidden_size'" in proc.stderr, proc.stderr[-2000:]


def test_a_student_as_large_as_its_teacher_runs_when_allowed_with_a_warning(tiny_base, ml100k, tmp_path):
    proc = run_cli("distill", "--teacher", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0],
                   "--out", tmp_path / "s", "--preset", "tiny", "--set", "allow_student_not_smaller=true",
                   "--set", "train.max_steps=1", "--set", "train.validate_at_start=false",
                   "--set", "train.tensorboard=false")
    out = proc.stdout + proc.stderr
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["params"]["total"] == m["teacher"]["params"]["total"]
    assert "WARNING: the student has" in out and "100.0% of the teacher's" in out


def test_onnx_export_matches_pytorch(student, tmp_path):
    from crossrec_dist.export.onnx import onnx_parity
    run_cli("export", "--base", student, "--out", tmp_path, "--onnx")
    assert onnx_parity(tmp_path / "base", tmp_path / "base" / "model.onnx") < 1e-4  # stated tolerance


def test_serving_benchmark_reports_both_models(student, tiny_base, tmp_path):
    run_cli("bench-serve", "--student", student, "--teacher", tiny_base, "--out", tmp_path / "s.json",
            "--requests", "20", "--batch", "32", "--onnx")
    res = json.loads((tmp_path / "s.json").read_text())
    for runtime in (res, res["onnxruntime"]):
        for who in ("teacher", "student"):
            assert runtime[who]["p50_ms"] > 0 and runtime[who]["p99_ms"] >= runtime[who]["p50_ms"]
            assert runtime[who]["batch_users_per_second"] > 0
        assert runtime["speedup_p50"] == runtime["teacher"]["p50_ms"] / runtime["student"]["p50_ms"]
    assert res["student"]["params"] < res["teacher"]["params"]


@pytest.mark.parametrize("option", ["transfer", "select_on"])
def test_unknown_distill_choice_names_its_field(option):
    from crossrec_dist.errors import InputError
    from crossrec_dist.stages.distill import DistillConfig, DistillTask
    with pytest.raises(InputError, match=f"field '{option}'"):
        DistillTask(DistillConfig(**{option: "everything"}), None, "no-teacher", None, "0")
