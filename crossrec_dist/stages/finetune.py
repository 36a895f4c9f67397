"""Adapt a pretrained base to one target domain.

Methods: ``lora`` / ``adalora`` (PEFT adapters; rows for items the source domains never saw stay
trainable through PEFT's trainable-token indices; the per-item offsets, if the base has them, through
``modules_to_save``), ``full`` (every weight), ``head`` (only the item embedding table, which is also
the output side, and the offsets), ``l2sp`` (full, plus lambda * ||theta - theta_source||^2),
``scratch`` (same architecture, random init, target data only) and ``none`` (zero-shot evaluation).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..config import load_config
from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..engine.task import LossTerms
from ..engine.trainer import Engine
from ..errors import InputError
from ..evaluation.record import metrics_record, write_metrics
from ..export.adapters import TABLE_ADAPTER, apply_adapter, save_mixed_adapter
from ..export.fingerprint import FILE as ADAPTER_INFO, base_fingerprint
from ..export.vocab import check_same_vocabulary, write_vocab
from ..models.loading import load_model_config
from ..models.model import CrossRecModel
from ..models.sizing import param_counts
from .adalora_budget import AdaLoraBudget
from .common import (RecommenderTask, catalogue_record, evaluate_model, on_main, run_stage, seed_everything,
                     target_catalogue)
from .configs import (DEFAULT_LR, ITEM_TABLE, METHODS, PEFT_METHODS, FinetuneConfig, check_finetune_config,
                      table_lora)

def new_item_indices(data: PreparedData, source_domains, target: str) -> list[int]:
    """Items in the target's training part that no source domain's training part contains."""
    src = data.item_counts(source_domains)
    tgt = data.item_counts([target])
    return np.flatnonzero((tgt > 0) & (src == 0)).tolist()


def trainable_rows(cfg, data: PreparedData, domain: str, new_items: list[int],
                   users: np.ndarray | None = None) -> list[int]:
    """Item-table rows a PEFT adapter trains whole (PEFT trainable tokens): the items new to the target
    (``train_new_items``) and its ``train_top_items`` most frequent training items. A low-rank update
    of the table spreads its few directions over every item; these rows give the items that most of
    the target's interactions fall on a full-rank update, at 64 numbers each (hidden 64). Counted on
    the training part of ``users``' sequences (all of the domain's when None): a subsampled run
    learns nothing from users it does not train on. None under LoRA on the table, which already gives
    every item, new ones included, its own trainable column (PEFT cannot wrap that table twice)."""
    if cfg.method not in PEFT_METHODS or table_lora(cfg):
        return []
    rows = set(new_items) if cfg.train_new_items else set()
    if cfg.train_top_items > 0:
        counts = data.item_counts([domain], only=users)
        counts[0] = 0
        order = np.argsort(-counts, kind="stable")
        rows.update(int(i) for i in order[:cfg.train_top_items] if counts[i] > 0)
    return sorted(rows)


def sample_users(data: PreparedData, domain: str, fraction: float, seed: int) -> np.ndarray | None:
    """A seeded sample of ``fraction`` of the domain's sequences (None: all). The same for every
    method at one seed, so methods are compared on the same training users; a larger fraction at the
    same seed contains the smaller one (one permutation, cut at different lengths)."""
    if fraction >= 1:
        return None
    seqs = np.flatnonzero(data.sequence_mask([domain]))
    order = np.random.default_rng(seed).permutation(len(seqs))
    n = max(1, int(round(fraction * len(seqs))))
    return np.sort(seqs[order[:n]])


class FinetuneTask(RecommenderTask):
    def __init__(self, cfg: FinetuneConfig, data: PreparedData, base_dir: str, domain: str):
        if cfg.method not in METHODS:
            raise InputError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}", field="--method")
        self.cfg, self.train, self.data, self.base_dir, self.domain = cfg, cfg.train, data, str(base_dir), domain
        self.name = f"finetune-{cfg.method}-{domain}"
        self.valid_targets = cfg.valid_targets
        self.train_users = sample_users(data, domain, cfg.train_fraction, cfg.train.seed)
        data.domain_codes([domain])
        self.base_config = load_model_config(base_dir)
        check_same_vocabulary(base_dir, data, "base model")
        self.max_len, self.hidden_size = self.base_config.max_len, self.base_config.hidden_size
        self.default_lr = DEFAULT_LR.get(cfg.method, 1e-3)
        self.new_items = new_item_indices(data, self.base_config.pretrain_domains, domain)
        self.token_rows = trainable_rows(cfg, data, domain, self.new_items, self.train_users)
        self.fingerprint = base_fingerprint(base_dir)
        self.catalogue = target_catalogue(cfg, data, domain)
        self.anchor = None
        self.budget = None    # AdaLoRA's rank budget (adalora only)
        # AdaLoRA plus LoRA on the item table: one PEFT mixed model, saved as two adapters
        self.mixed = cfg.method == "adalora" and cfg.adalora.table_r > 0

    def train_domains(self):
        return [self.domain]

    def build_model(self, engine):
        check_engine_support(self.cfg, engine)
        seed_everything(self.train.seed)
        if self.cfg.method == "scratch":   # same architecture, fresh weights
            model = engine.construct(lambda: CrossRecModel(self.base_config))
        else:
            with self._load_context(engine):
                model = self._adapt(CrossRecModel.from_pretrained(self.base_dir, use_safetensors=True), engine)
        if self.cfg.method == "l2sp":
            self.anchor = [p.detach().clone() for p in model.parameters()]
        if self.cfg.method == "adalora":
            self.budget = AdaLoraBudget(model, mixed=self.mixed)
        self.params = param_counts(model)
        return model

    def _load_context(self, engine):
        """PEFT copies new-item rows out of a ZeRO-3 partitioned table with a CUDA-only gather (peft
        0.21: "right now, only CUDA is implemented"); without CUDA the base is loaded whole and
        DeepSpeed partitions it when the engine is prepared."""
        rows = self.cfg.method in PEFT_METHODS and self.token_rows
        if rows and engine.settings.zero3_init and not torch.cuda.is_available():
            engine.log("zero3_init: the base is loaded whole (PEFT's trainable-token rows need CUDA to be "
                       "built on partitioned weights); DeepSpeed partitions it when training starts")
            return engine.unpartitioned()
        return contextlib.nullcontext()

    def describe(self) -> str:
        users = "" if self.train_users is None else \
            f"; trains and validates on {len(self.train_users)} sampled user(s) (train_fraction {self.cfg.train_fraction})"
        return (f"finetune {self.cfg.method} on {self.domain}: {self.params['trainable']:,} of "
                f"{self.params['total']:,} parameters trainable, {len(self.new_items)} item(s) new to the target"
                + users)

    def _adapt(self, base: CrossRecModel, engine):
        m, method = self.cfg, self.cfg.method
        if method in ("full", "l2sp"):
            return base
        if method == "head":
            for name, p in base.named_parameters():
                p.requires_grad = name.startswith(("item_embeddings", "item_bias"))
            return base
        from peft import AdaLoraConfig, LoraConfig, get_peft_model
        # Empty under LoRA on the item table (trainable_rows): PEFT cannot wrap that table twice.
        tokens = {ITEM_TABLE: self.token_rows} if self.token_rows else None
        # The per-item offsets are what shifts most between platforms (popularity): the adapter carries
        # its own copy of them (PEFT modules_to_save), N + 1 numbers.
        save = ["item_bias"] if (m.train_item_bias and base.item_bias is not None) else None
        if method == "lora":
            pc = LoraConfig(r=m.lora.r, lora_alpha=m.lora.alpha, lora_dropout=m.lora.dropout,
                            target_modules=m.lora.target_modules, trainable_token_indices=tokens,
                            modules_to_save=save, rank_pattern=dict(m.lora.rank_pattern),
                            alpha_pattern=dict(m.lora.alpha_pattern))
        else:
            total = engine.plan(self.batches()).total_updates   # the engine's own arithmetic
            a = m.adalora
            tinit, tfinal = int(a.tinit_ratio * total), int(a.tfinal_ratio * total)
            if tinit + tfinal >= total:
                raise InputError(f"AdaLoRA needs tinit + tfinal < total steps ({tinit} + {tfinal} >= {total}); "
                                 "train longer or lower the ratios", field="adalora.tinit_ratio")
            pc = AdaLoraConfig(init_r=a.init_r, target_r=a.target_r, tinit=tinit, tfinal=tfinal, deltaT=a.delta_t,
                               total_step=total, orth_reg_weight=a.orth_reg_weight, lora_alpha=m.lora.alpha,
                               lora_dropout=m.lora.dropout, target_modules=m.lora.target_modules,
                               trainable_token_indices=tokens, modules_to_save=None if a.table_r else save)
            if a.table_r:
                # AdaLoRA cannot adapt an embedding: the table gets plain LoRA, carrying the offsets too,
                # in PEFT's mixed-adapter model (a PeftModel holds one adapter type).
                table = LoraConfig(r=a.table_r, lora_alpha=a.table_alpha or 2 * a.table_r,
                                   lora_dropout=m.lora.dropout, target_modules=[ITEM_TABLE], modules_to_save=save)
                model = get_peft_model(base, table, adapter_name=TABLE_ADAPTER, mixed=True)
                model.add_adapter("default", pc)
                model.set_adapter(["default", TABLE_ADAPTER])
                return model
        return get_peft_model(base, pc)

    def loss(self, model, inputs) -> LossTerms:
        penalty = 0.0
        if self.cfg.method == "adalora":
            # AdaLoRA's orthogonality regulariser lives in PeftModel's forward for causal LMs only.
            penalty = self._orth_reg(model)
        if self.anchor is not None:
            penalty = penalty + self.cfg.l2sp_weight * sum(((p - a) ** 2).sum()
                                                           for p, a in zip(model.parameters(), self.anchor))
        return LossTerms(model(**inputs).loss, penalty)

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
        if self.budget is not None:
            self.budget.read_gradients(step)

    def after_step(self, model, step: int, grad_scale: float = 1.0) -> None:
        if self.budget is not None:
            self.budget.allocate(step, grad_scale)

    def checkpoint_state(self, model) -> dict:
        """AdaLoRA's budget so far: PEFT keeps it in the adapter config, not in the weights, and a run
        resumed past the final-budget step masks with it every step (without it, PEFT fails on None).
        The importance averages behind it restart on resume."""
        pattern = self.budget.config.rank_pattern if self.budget is not None else None
        return {"rank_pattern": pattern} if pattern else {}

    def restore_checkpoint_state(self, model, state: dict) -> None:
        if self.budget is not None and state.get("rank_pattern"):
            self.budget.config.rank_pattern = state["rank_pattern"]

    def save(self, engine, state_dict, out_dir: Path) -> None:
        if not engine.is_main:
            return
        model = engine.unwrapped(engine.model)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.mixed:
            save_mixed_adapter(model, state_dict, out_dir)
        else:
            model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
        if self.cfg.method in PEFT_METHODS:
            info = {"base": str(Path(self.base_dir).resolve()), "base_fingerprint": self.fingerprint,
                    "domain": self.domain, "method": self.cfg.method, "new_items": len(self.new_items)}
            if self.mixed:
                info.update(adapters={"default": "adalora", TABLE_ADAPTER: "lora"},
                            rank_pattern=_rank_summary(self.budget.config))
            (out_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2))
        else:
            write_vocab(self.data, out_dir)

    def final_record(self, engine, result) -> dict:
        model = load_finetuned(engine.out_dir, self.base_dir, self.cfg.method)
        ev = evaluate_model(model, self.data, [self.domain], self.max_len, self.train.eval_batch_size,
                            catalogue=self.catalogue)
        extra = {}
        if self.cfg.method == "adalora":
            extra["rank_pattern"] = (_rank_summary(model.peft_config["default"]) if not self.mixed else
                                     json.loads((engine.out_dir / ADAPTER_INFO).read_text())["rank_pattern"])
        extra.update(catalogue_record(self.catalogue, self.data))
        return metrics_record(
            stage="finetune", domain=self.domain, method=self.cfg.method, params=self.params,
            valid=ev["valid"]["overall"], test=ev["test"]["overall"], train=result.train_record(),
            in_training_valid=result.best_valid.get("overall", {}), history=result.history,
            new_items=len(self.new_items), trainable_rows=len(self.token_rows),
            base=str(Path(self.base_dir).resolve()), lr=engine.lr,
            base_fingerprint=self.fingerprint, config=_jsonable(asdict(self.cfg)),
            world_size=dist_info.world_size(), zero_stage=engine.zero_stage if engine.ds_config else None,
            grad_accum=engine.settings.grad_accum, test_ranks=ev["test"]["examples"],
            train_users=None if self.train_users is None else len(self.train_users), **extra)


def check_engine_support(cfg: FinetuneConfig, engine: Engine) -> None:
    if cfg.method == "adalora" and engine.precision == "fp16":    # e.g. from a DeepSpeed JSON's fp16 block
        raise _fp16_refused()
    if engine.ds_config is None:
        return
    if cfg.method == "adalora" and engine.zero_stage == 3:
        raise InputError("AdaLoRA prunes its weights in place; ZeRO-3 partitions them. "
                         "Use ZeRO-0/1/2 or no DeepSpeed for adalora (adapters are small)", field="train.deepspeed")
    if cfg.method == "l2sp" and engine.zero_stage == 3:
        raise InputError("l2sp's penalty needs whole parameters; use ZeRO-0/1/2 for l2sp", field="train.deepspeed")


def _fp16_refused() -> InputError:
    return InputError("AdaLoRA's importance scores read the gradients, which fp16 loss scaling multiplies "
                      "(and an overflow step makes inf); use bf16 or fp32 for adalora", field="train.mixed_precision")


def load_finetuned(out_dir: Path, base_dir: str, method: str):
    if method in PEFT_METHODS:
        return apply_adapter(CrossRecModel.from_pretrained(base_dir, use_safetensors=True), base_dir, out_dir)
    return CrossRecModel.from_pretrained(out_dir, use_safetensors=True)


def run_finetune(cfg: FinetuneConfig, base_dir: str, data_dir: str, domain: str, out: str, log=print) -> dict:
    data = data_dir if isinstance(data_dir, PreparedData) else PreparedData(data_dir)
    check_same_vocabulary(base_dir, data, "base model")
    if cfg.method == "none":
        return on_main(_zero_shot, cfg, base_dir, data, domain, Path(out), log)
    if cfg.method == "adalora" and "fp16" in (cfg.train.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION")):
        raise _fp16_refused()            # before the engine: accelerate would set fp16 up first
    return run_stage(FinetuneTask(cfg, data, base_dir, domain), out, log=log)


def _zero_shot(cfg, base_dir, data, domain, out, log):
    model = CrossRecModel.from_pretrained(base_dir, use_safetensors=True)
    t0 = time.perf_counter()
    catalogue = target_catalogue(cfg, data, domain)
    ev = evaluate_model(model, data, [domain], model.config.max_len, cfg.train.eval_batch_size, catalogue=catalogue)
    params = param_counts(model)
    record = metrics_record(stage="finetune", domain=domain, method="none", params={**params, "trainable": 0},
                            valid=ev["valid"]["overall"], test=ev["test"]["overall"],
                            train={"steps": 0, "seconds": round(time.perf_counter() - t0, 3), "samples_per_second": 0.0},
                            base=str(Path(base_dir).resolve()), base_fingerprint=base_fingerprint(base_dir),
                            test_ranks=ev["test"]["examples"], **catalogue_record(catalogue, data))
    write_metrics(out, record)
    log(f"zero-shot {domain}: test ndcg@10={record['test']['ndcg@10']:.4f} -> {out}")
    return record


def _rank_summary(adalora_config) -> dict:
    pattern = adalora_config.rank_pattern or {}
    return {k: int(sum(v)) if isinstance(v, list) else int(v) for k, v in pattern.items()}


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def load_finetune_config(path, method, overrides):
    cfg = load_config(FinetuneConfig, path, overrides)
    if method:
        cfg.method = method
    check_finetune_config(cfg)
    return cfg
