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
    run_cli("distill", "--teacher", tiny_base, "--adapter", root / "lora", "--data", ml100k,
            "--domain", TARGET_REGIONS[0], "--out", root / "student", "--set", "model.hidden_size=16",
            "--set", "model.intermediate_size=32", "--set", "feature_weight=0.1", *QUICK)
    return root / "student"


def test_student_is_smaller_and_loads_with_from_pretrained_alone(student):
    from transformers import AutoConfig  # noqa: F401  (no trust_remote_code, no hub)

    from crossrec_dist import CrossRecModel
    m = json.loads((student / "metrics.json").read_text())
    assert m["stage"] == "distill" and m["params"]["total"] < m["teacher"]["params"]["total"]
    model = CrossRecModel.from_pretrained(student)
    assert model.config.hidden_size == 16 and sum(p.numel() for p in model.parameters()) == m["params"]["total"]
    assert not any(k.startswith("projection") for k in model.state_dict())


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
