"""Distil a teacher (base + a region's adapter, or any model DIR) into a compact student.

Loss per position: alpha * CE(next item) + (1 - alpha) * T^2 * KL(teacher || student) over
temperature-softened item distributions, plus optional feature distillation (MSE between the
student's hidden state, through a learned projection, and the teacher's). For big catalogues the
KL runs over each position's teacher top-k items plus shared random items instead of all items.
The teacher is frozen, in eval mode, and outside the optimizer: it never holds optimizer state.

The student's size: ``preset`` (``--preset``) names one; without it (the default) the student is the
teacher's architecture at half its width and depth (:func:`default_student_options`): half the
teacher's hidden size, rounded down to a multiple of twice its head count (an even width per head) and
at least 8 (rounded up likewise; never above the teacher's), half its layers (at least 1), its heads,
and an FFN of the same ratio to the hidden size. ``model.*`` overrides apply on top of either. A
student with as many parameters as its teacher or more is refused (exit 2) unless
``allow_student_not_smaller: true``, which runs it with a WARNING.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from ..config import load_config
from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..engine.task import LossTerms
from ..errors import InputError
from ..evaluation.record import metrics_record
from ..export.loading import load_model
from ..export.vocab import check_same_vocabulary, write_vocab
from ..models.config import CrossRecConfig
from ..models.losses import distillation_loss, full_softmax
from ..models.model import CrossRecModel
from ..models.sizing import count_parameters, param_counts
from .common import (RecommenderTask, catalogue_record, eval_users_record, evaluate_model, run_stage, seed_everything,
                     target_catalogue)
from .configs import DistillConfig, check_distill_config, check_model_options
from .pretrain import model_config


class StudentWithProjection(nn.Module):
    """What the engine trains: the student, plus the projection used by feature distillation."""

    def __init__(self, student: CrossRecModel, teacher_hidden: int):
        super().__init__()
        self.student = student
        self.projection = nn.Linear(student.config.hidden_size, teacher_hidden, bias=False)
        self.config = student.config

    def forward(self, input_ids, domain_ids=None, return_scores: bool = False, **_):
        if return_scores:
            return self.student(input_ids=input_ids, domain_ids=domain_ids, return_scores=True)
        return self.student.encode(input_ids, domain_ids)

    def tied_parameters(self):
        return self.student.tied_parameters()


# options of the default student copied from its teacher (sizes are derived, data-fixed ones are set apart)
_INHERITED = ("num_heads", "num_kv_heads", "embedding_dropout", "attention_dropout", "rms_norm_eps", "rope_theta",
              "initializer_range", "loss", "num_negatives")
_SIZES = ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads")
MIN_STUDENT_HIDDEN = 8


def default_student_options(teacher: CrossRecConfig, overrides: dict | None = None) -> dict:
    """The student's model options when no preset is given: the teacher's architecture at half its
    width and depth. Hidden size: half the teacher's, rounded down to a multiple of twice the head
    count (an even width per head, for the rotary embedding), at least 8 (rounded up to that multiple),
    never above the teacher's; layers: half the teacher's, at least 1; heads, key/value heads,
    dropouts, loss and the rest: the teacher's; FFN: the teacher's FFN-to-hidden ratio at the
    student's hidden size. ``overrides`` (``model.*``) win; the FFN follows an overridden hidden size
    unless it is overridden too. A tiny teacher (hidden 32, 2 layers, 2 heads, FFN 64) gives hidden 16,
    1 layer, 2 heads, FFN 32; ``medium`` (256, 2, 4, 1024) gives 128, 1, 4, 512."""
    overrides = overrides or {}
    heads = overrides.get("num_heads", teacher.num_heads)
    step = 2 * heads
    floor = -(-MIN_STUDENT_HIDDEN // step) * step
    hidden = min(teacher.hidden_size, max(floor, teacher.hidden_size // 2 // step * step))
    opts = {name: getattr(teacher, name) for name in _INHERITED}
    opts.update(hidden_size=hidden, num_layers=max(1, teacher.num_layers // 2))
    opts.update(overrides)
    if "intermediate_size" not in overrides:
        opts["intermediate_size"] = max(1, round(teacher.intermediate_size * opts["hidden_size"] / teacher.hidden_size))
    if "num_kv_heads" not in overrides and opts["num_heads"] % opts["num_kv_heads"]:
        opts["num_kv_heads"] = opts["num_heads"]
    return opts


def student_size_field(cfg: DistillConfig) -> str:
    """The config field that set the student's size, for a refusal to name."""
    sized = [k for k in _SIZES if k in cfg.model]
    if sized:
        return f"model.{sized[0]}"
    return "preset" if cfg.preset is not None else "model.hidden_size"


def check_student_smaller(cfg: DistillConfig, student: int, teacher: int) -> str | None:
    """Refuse (exit 2, naming the field) a student with at least the teacher's parameter count unless
    ``allow_student_not_smaller``; allowed, the WARNING line to log (None when the student is smaller)."""
    if student < teacher:
        return None
    share = f"the student has {student:,} params, {student / teacher:.1%} of the teacher's {teacher:,}"
    if not cfg.allow_student_not_smaller:
        ways = ([f"a smaller --preset than {cfg.preset!r}", "no --preset (sized from the teacher: half its hidden size "
                 "and layers)"] if cfg.preset is not None else [])
        ways.append("smaller --set model.hidden_size=H / --set model.num_layers=L")
        raise InputError(f"{share}; a distilled student should be smaller than its teacher: pick a smaller student "
                         f"({', or '.join(ways)}) or set allow_student_not_smaller=true "
                         "(--set allow_student_not_smaller=true) to distil into it anyway",
                         field=student_size_field(cfg))
    return f"WARNING: {share}: not smaller than its teacher (allowed by allow_student_not_smaller=true)"


def _teacher_core(teacher) -> CrossRecModel:
    return teacher.get_base_model() if hasattr(teacher, "get_base_model") else teacher


def pca_projection(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Teacher item table (N+1, Ht) -> (N+1, dim) on its top principal directions, scale matched."""
    w = weight[1:].float()
    centered = w - w.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    proj = weight.float() @ v[:dim].t()
    proj[0] = 0
    return proj * (0.02 / proj[1:].std().clamp_min(1e-8))


class DistillTask(RecommenderTask):
    def __init__(self, cfg: DistillConfig, data: PreparedData, teacher_dir: str, adapter: str | None, domain: str,
                 allow_unverified_adapter: bool = False):
        check_distill_config(cfg)
        self.cfg, self.train, self.data, self.domain = cfg, cfg.train, data, domain
        self.teacher_dir, self.adapter = str(teacher_dir), adapter
        self.name = f"distill-{domain}"
        data.domain_codes([domain])
        seed_everything(cfg.train.seed)
        check_same_vocabulary(teacher_dir, data, "teacher")
        # before the engine: the teacher is never partitioned
        teacher = load_model(teacher_dir, adapter, allow_unverified_adapter)
        if hasattr(teacher, "merge_and_unload"):
            teacher = teacher.merge_and_unload()  # serving-equivalent teacher, one plain module
        self.teacher = teacher.eval().requires_grad_(False)
        tcfg: CrossRecConfig = self.teacher.config
        if tcfg.num_items != data.num_items:
            raise InputError(f"teacher has {tcfg.num_items} items, the dataset {data.num_items}", path=teacher_dir)
        fixed = dict(num_items=tcfg.num_items, num_domains=tcfg.num_domains, domain_names=tcfg.domain_names,
                     pretrain_domains=tcfg.pretrain_domains, use_domain_embedding=tcfg.use_domain_embedding,
                     max_len=tcfg.max_len,
                     **({} if "item_bias" in cfg.model else {"item_bias": getattr(tcfg, "item_bias", False)}))
        if cfg.preset is not None:
            self.student_config = model_config(cfg.preset, cfg.model, **fixed)
        else:
            options = default_student_options(tcfg, cfg.model)
            check_model_options(options)
            try:
                self.student_config = CrossRecConfig(**{**options, **fixed})
            except (TypeError, ValueError) as e:
                raise InputError(f"bad model option: {e}", field="model") from None
        self.max_len, self.hidden_size = self.student_config.max_len, self.student_config.hidden_size
        # before the engine: a student that is no smaller than its teacher is refused before any training
        self.warning = check_student_smaller(cfg, count_parameters(self.student_config),
                                             param_counts(self.teacher)["total"])
        self.default_lr = 2e-3
        target = cfg.catalogue == "target"
        self.catalogue = data.catalogue(self.validation_domains()) if target else None   # selects the checkpoint
        self.target_catalogue = target_catalogue(cfg, data, domain)            # the reported metrics

    def build_model(self, engine):
        model = engine.construct(lambda: StudentWithProjection(CrossRecModel(self.student_config),
                                                               self.teacher.config.hidden_size))
        if self.cfg.init_from_teacher:
            table = model.student.item_embeddings.weight
            with engine.gathered([table], modifier_rank=0), torch.no_grad():
                if table.numel():
                    table.copy_(pca_projection(self.teacher.item_weight(), self.hidden_size))
            bias, teacher_bias = model.student.item_bias, self.teacher.output_bias()
            if bias is not None and teacher_bias is not None:
                with engine.gathered([bias.weight], modifier_rank=0), torch.no_grad():
                    if bias.weight.numel():
                        bias.weight.copy_(teacher_bias)
        self.params = param_counts(model.student)
        self.teacher_params = param_counts(self.teacher)
        return model

    def describe(self) -> str:
        c = self.student_config
        how = f"preset {self.cfg.preset}" if self.cfg.preset is not None else "sized from the teacher"
        line = (f"distill {self.domain}: student {self.params['total']:,} params = "
                f"{self.params['total'] / self.teacher_params['total']:.1%} of the teacher's "
                f"{self.teacher_params['total']:,} ({how}: hidden {c.hidden_size}, {c.num_layers} layer(s), "
                f"{c.num_heads} heads, FFN {c.intermediate_size})")
        return f"{self.warning}\n{line}" if self.warning else line

    def train_domains(self):
        """The transfer set: KD needs inputs, not the target's labels, so by default the student also
        learns the regional teacher's behaviour on every other domain's sequences (small regions alone
        starve a student); ``transfer: target`` restricts it to the region."""
        return None if self.cfg.transfer == "all" else [self.domain]

    def validation_domains(self):
        """``select_on: transfer`` selects on the transfer set's validation users: a small region's own
        (56-96 users on ML-100K) swing by +-0.02 NDCG@10 between epochs, so checkpoints picked on
        them are partly picked by noise. The reported metrics are always the region's own."""
        return self.train_domains() if self.cfg.select_on == "transfer" else [self.domain]

    def loss(self, model, inputs) -> LossTerms:
        cfg = self.cfg
        labels = inputs["labels"]
        mask = labels > 0
        h_s = model(input_ids=inputs["input_ids"], domain_ids=inputs["domain_ids"])[mask]
        core = model.module if hasattr(model, "module") else model
        if cfg.alpha >= 1.0 and cfg.feature_weight <= 0:
            # no teacher term: the student's own next-item loss, without the teacher's forward pass
            return LossTerms(full_softmax(h_s, core.student.item_weight(), labels[mask],
                                          bias=core.student.output_bias()))
        with torch.no_grad():
            self.teacher.to(h_s.device)
            h_t = self.teacher.encode(inputs["input_ids"], inputs["domain_ids"])[mask]
        w_s, b_s = core.student.item_weight(), core.student.output_bias()
        y = labels[mask]
        if cfg.top_k:
            with torch.no_grad():
                t_full = self.teacher.item_scores(h_t)
                t_full[:, 0] = -math.inf
                top = t_full.topk(cfg.top_k, dim=-1).indices
                rand = torch.randint(1, w_s.shape[0], (cfg.num_sampled,), device=y.device)
                cand = torch.cat([y[:, None], top, rand.expand(len(y), -1)], 1)   # label is column 0
            s_logits = (h_s[:, None, :] * w_s[cand]).sum(-1)
            if b_s is not None:
                s_logits = s_logits + b_s[cand]
            t_logits = t_full.gather(1, cand)
            target = torch.zeros_like(y)
        else:
            s_logits = core.student.item_scores(h_s)
            with torch.no_grad():
                t_logits = self.teacher.item_scores(h_t)
            s_logits[:, 0] = -math.inf
            t_logits[:, 0] = -math.inf
            target = y
        loss = distillation_loss(s_logits, t_logits, target, cfg.alpha, cfg.temperature)
        if cfg.feature_weight > 0:
            loss = loss + cfg.feature_weight * ((core.projection(h_s) - h_t) ** 2).mean()
        return LossTerms(loss)

    def save(self, engine, state_dict, out_dir: Path) -> None:
        if not engine.is_main:
            return
        core = engine.unwrapped(engine.model)
        sd = None
        if state_dict is not None:
            sd = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        core.student.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        write_vocab(self.data, out_dir)

    def final_record(self, engine, result) -> dict:
        student = CrossRecModel.from_pretrained(engine.out_dir, use_safetensors=True)
        ev = evaluate_model(student, self.data, [self.domain], self.max_len, self.train.eval_batch_size,
                            catalogue=self.target_catalogue, device=engine.device, users=self.train.eval_users,
                            seed=self.train.seed)
        tev = evaluate_model(self.teacher, self.data, [self.domain], self.max_len, self.train.eval_batch_size,
                             catalogue=self.target_catalogue, device=engine.device, users=self.train.eval_users,
                             seed=self.train.seed)
        return metrics_record(
            stage="distill", domain=self.domain, method="kd" if self.cfg.alpha < 1 else "ce", params=self.params,
            valid=ev["valid"]["overall"], test=ev["test"]["overall"], train=result.train_record(),
            in_training_valid=result.best_valid.get("overall", {}), history=result.history,
            teacher={"model": self.teacher_dir, "adapter": self.adapter, "params": self.teacher_params,
                     "valid": tev["valid"]["overall"], "test": tev["test"]["overall"]},
            kept_test_ndcg=ev["test"]["overall"]["ndcg@10"] / max(tev["test"]["overall"]["ndcg@10"], 1e-12),
            config=asdict(self.cfg), world_size=dist_info.world_size(), test_ranks=ev["test"]["examples"],
            **catalogue_record(self.target_catalogue, self.data),
            **eval_users_record(self.train, ev, self.data, [self.domain]))


def run_distill(cfg: DistillConfig, teacher: str, adapter: str | None, data_dir: str, domain: str, out: str,
                log=print, allow_unverified_adapter: bool = False) -> dict:
    task = DistillTask(cfg, PreparedData(data_dir), teacher, adapter, domain, allow_unverified_adapter)
    return run_stage(task, out, log=log)


def load_distill_config(path, preset, overrides):
    cfg = load_config(DistillConfig, path, overrides)
    if preset:
        cfg.preset = preset
    check_distill_config(cfg)
    return cfg
