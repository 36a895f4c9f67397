"""Adapt a pretrained base to one target domain.

Methods: ``lora`` / ``adalora`` (PEFT adapters; rows for items the source domains never saw stay
trainable through PEFT's trainable-token indices), ``full`` (every weight), ``head`` (only the item
embedding table, which is also the output side), ``l2sp`` (full, plus lambda * ||theta - theta_source||^2),
``scratch`` (same architecture, random init, target data only) and ``none`` (zero-shot evaluation).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..engine.config import TrainConfig
from ..engine.trainer import Engine
from ..errors import InputError
from ..evaluation.record import metrics_record, write_metrics
from ..export.adapters import apply_adapter
from ..export.fingerprint import FILE as ADAPTER_INFO, base_fingerprint
from ..export.vocab import write_vocab
from ..models.model import CrossRecModel
from .common import (evaluate_model, on_main, param_counts, seed_everything, training_batches,
                     validate_in_training)

METHODS = ("lora", "adalora", "full", "head", "l2sp", "scratch", "none")
PEFT_METHODS = ("lora", "adalora")
DEFAULT_LR = {"lora": 5e-3, "adalora": 5e-3, "head": 2e-3, "full": 5e-4, "l2sp": 5e-4, "scratch": 1e-3}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))


@dataclass
class AdaLoraOptions:
    init_r: int = 12
    target_r: int = 4
    tinit_ratio: float = 0.1      # share of the real step count before budget pruning starts
    tfinal_ratio: float = 0.2     # share at the end with the final budget fixed
    delta_t: int = 5              # steps between budget re-allocations
    orth_reg_weight: float = 0.5


@dataclass
class FinetuneConfig:
    method: str = "lora"
    lora: LoraOptions = field(default_factory=LoraOptions)
    adalora: AdaLoraOptions = field(default_factory=AdaLoraOptions)
    l2sp_weight: float = 0.01
    train_new_items: bool = True  # PEFT methods: trainable rows for items new to the target domain
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, patience=5, micro_batch_size=32,
                                                                    validate_at_start=True))


def new_item_indices(data: PreparedData, source_domains, target: str) -> list[int]:
    """Items in the target's training part that no source domain's training part contains."""
    src = data.item_counts(source_domains)
    tgt = data.item_counts([target])
    return np.flatnonzero((tgt > 0) & (src == 0)).tolist()


class FinetuneTask:
    def __init__(self, cfg: FinetuneConfig, data: PreparedData, base_dir: str, domain: str):
        if cfg.method not in METHODS:
            raise InputError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}", field="--method")
        self.cfg, self.data, self.base_dir, self.domain = cfg, data, str(base_dir), domain
        self.name = f"finetune-{cfg.method}-{domain}"
        data.domain_codes([domain])
        seed_everything(cfg.train.seed)
        base = CrossRecModel.from_pretrained(base_dir, use_safetensors=True)
        if base.config.num_items != data.num_items:
            raise InputError(f"base model has {base.config.num_items} items but the dataset has {data.num_items}; "
                             "prepare the target data with the same vocabulary", path=str(base_dir))
        self.max_len = base.config.max_len
        self.default_lr = DEFAULT_LR.get(cfg.method, 1e-3)
        self.new_items = new_item_indices(data, base.config.pretrain_domains, domain)
        self.fingerprint = base_fingerprint(base_dir)
        if cfg.method == "scratch":
            base = CrossRecModel(base.config)   # same architecture, fresh weights
        self.model = self._prepare(base)
        self.anchor = None
        if cfg.method == "l2sp":
            self.anchor = [p.detach().clone() for p in self.model.parameters()]

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps:
            return t.max_steps
        world = dist_info.world_size()
        return max(1, t.epochs * (self.batches().num_batches(world) // t.grad_accum))

    def _prepare(self, base: CrossRecModel):
        m, method = self.cfg, self.cfg.method
        if method in ("full", "l2sp", "scratch", "none"):
            return base
        if method == "head":
            for name, p in base.named_parameters():
                p.requires_grad = name.startswith("item_embeddings")
            return base
        from peft import AdaLoraConfig, LoraConfig, get_peft_model
        tokens = {"item_embeddings": self.new_items} if (m.train_new_items and self.new_items) else None
        if method == "lora":
            pc = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                            target_modules=m.lora.target_modules, trainable_token_indices=tokens)
        else:
            total = self._total_steps()
            a = m.adalora
            tinit, tfinal = int(a.tinit_ratio * total), int(a.tfinal_ratio * total)
            if tinit + tfinal >= total:
                raise InputError(f"AdaLoRA needs tinit + tfinal < total steps ({tinit} + {tfinal} >= {total}); "
                                 "train longer or lower the ratios", field="adalora.tinit_ratio")
            pc = AdaLoraConfig(init_r=a.init_r, target_r=a.target_r, tinit=tinit, tfinal=tfinal, deltaT=a.delta_t,
                               total_step=total, orth_reg_weight=a.orth_reg_weight, lora_alpha=m.lora.alpha,
                               lora_dropout=m.lora.dropout, target_modules=m.lora.target_modules,
                               trainable_token_indices=tokens)
        return get_peft_model(base, pc)

    def batches(self):
        t = self.cfg.train
        return training_batches(self.data, [self.domain], self.max_len, t.micro_batch_size, t.seed, t.window_stride)

    def loss(self, model, batch):
        out = model(**batch)
        loss = out.loss
        if self.cfg.method == "adalora":
            # AdaLoRA's orthogonality regulariser lives in PeftModel's forward for causal LMs only.
            loss = loss + self._orth_reg(model)
        if self.anchor is not None:
            penalty = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchor))
            loss = loss + self.cfg.l2sp_weight * penalty
        return loss

    def _orth_reg(self, model):
        w = self.cfg.adalora.orth_reg_weight
        if w <= 0:
            return 0.0
        reg, n = 0.0, 0
        for name, p in model.named_parameters():
            if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.numel():
                para = p @ p.T if "lora_A" in name else p.T @ p
                eye = torch.eye(*para.shape, device=p.device, dtype=p.dtype)
                reg = reg + torch.norm(para - eye, p="fro")
                n += 1
        return w * reg / max(n, 1)

    def after_backward(self, model, step: int) -> None:
        if self.cfg.method == "adalora":
            peft_model = model.module if hasattr(model, "module") else model
            peft_model.base_model.update_and_allocate(step)

    def validate(self, engine):
        return validate_in_training(engine, engine.model, self.data, [self.domain], self.max_len)

    def save(self, engine, state_dict, out_dir: Path) -> None:
        if not engine.is_main:
            return
        model = engine.unwrapped(engine.model)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        if self.cfg.method in PEFT_METHODS:
            info = {"base": str(Path(self.base_dir).resolve()), "base_fingerprint": self.fingerprint,
                    "domain": self.domain, "method": self.cfg.method, "new_items": len(self.new_items)}
            (out_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
        else:
            write_vocab(self.data, out_dir)


def check_engine_support(cfg: FinetuneConfig, engine: Engine) -> None:
    if engine.ds_config is None:
        return
    if cfg.method == "adalora" and engine.zero_stage >= 2:
        raise InputError("AdaLoRA reads full gradients after backward; ZeRO-2/3 partition them. "
                         "Use ZeRO-0/1 or no DeepSpeed for adalora (adapters are small)", field="train.deepspeed")
    if cfg.method == "l2sp" and engine.zero_stage == 3:
        raise InputError("l2sp's penalty needs whole parameters; use ZeRO-0/1/2 for l2sp", field="train.deepspeed")


def load_finetuned(out_dir: Path, base_dir: str, method: str):
    if method in PEFT_METHODS:
        return apply_adapter(CrossRecModel.from_pretrained(base_dir, use_safetensors=True), base_dir, out_dir)
    return CrossRecModel.from_pretrained(out_dir, use_safetensors=True)


def run_finetune(cfg: FinetuneConfig, base_dir: str, data_dir: str, domain: str, out: str, log=print) -> dict:
    data = data_dir if isinstance(data_dir, PreparedData) else PreparedData(data_dir)
    out = Path(out)
    if cfg.method == "none":
        return on_main(_zero_shot, cfg, base_dir, data, domain, out, log)
    task = FinetuneTask(cfg, data, base_dir, domain)
    engine = Engine(cfg.train, out, hidden_size=task.model.config.hidden_size, log=log)
    check_engine_support(cfg, engine)
    params = param_counts(task.model)
    engine.log(f"finetune {cfg.method} on {domain}: {params['trainable']:,} of {params['total']:,} parameters "
               f"trainable, {len(task.new_items)} item(s) new to the target")
    result = engine.fit(task)

    def final_eval():
        model = load_finetuned(out, base_dir, cfg.method)
        ev = evaluate_model(model, data, [domain], task.max_len, cfg.train.eval_batch_size)
        extra = {}
        if cfg.method == "adalora":
            extra["rank_pattern"] = _rank_summary(model)
        record = metrics_record(
            stage="finetune", domain=domain, method=cfg.method, params=params,
            valid=ev["valid"]["overall"], test=ev["test"]["overall"], train=result.train_record(),
            in_training_valid=result.best_valid.get("overall", {}), history=result.history,
            new_items=len(task.new_items), base=str(Path(base_dir).resolve()), lr=engine.lr,
            base_fingerprint=base_fingerprint(base_dir), config=_jsonable(asdict(cfg)),
            world_size=dist_info.world_size(), zero_stage=engine.zero_stage if engine.ds_config else None, **extra)
        write_metrics(out, record)
        log(f"finetune {cfg.method} {domain}: test ndcg@10={record['test']['ndcg@10']:.4f} "
            f"({params['trainable']:,} trainable) -> {out}")
        return record

    return on_main(final_eval)


def _zero_shot(cfg, base_dir, data, domain, out, log):
    model = CrossRecModel.from_pretrained(base_dir, use_safetensors=True)
    t0 = time.perf_counter()
    ev = evaluate_model(model, data, [domain], model.config.max_len, cfg.train.eval_batch_size)
    params = param_counts(model)
    record = metrics_record(stage="finetune", domain=domain, method="none", params={**params, "trainable": 0},
                            valid=ev["valid"]["overall"], test=ev["test"]["overall"],
                            train={"steps": 0, "seconds": round(time.perf_counter() - t0, 3), "samples_per_second": 0.0},
                            base=str(Path(base_dir).resolve()), base_fingerprint=base_fingerprint(base_dir))
    write_metrics(out, record)
    log(f"zero-shot {domain}: test ndcg@10={record['test']['ndcg@10']:.4f} -> {out}")
    return record


def _rank_summary(model) -> dict:
    pattern = model.peft_config["default"].rank_pattern or {}
    return {k: int(sum(v)) if isinstance(v, list) else int(v) for k, v in pattern.items()}


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def load_finetune_config(path, method, overrides):
    cfg = load_config(FinetuneConfig, path, overrides)
    if method:
        cfg.method = method
    return cfg
