"""``adalora``: PEFT AdaLoRA on the linear layers, its rank budget run as PEFT's own loop runs it
(``_adalora_budget.py``), optionally with a plain LoRA adapter on the item table beside it
(``table_r``: PEFT's mixed-adapter model, saved as two PEFT adapters in one folder)."""
from __future__ import annotations
# heavy imports inside functions (torch, peft, the model via ._training): the registry is read by --help
# and recipe checks, which must not pay import torch (2.6 s) and peft (5.9 s) on the 2-core CI machine

import json
import math
from dataclasses import dataclass
from typing import ClassVar

from ..errors import InputError
from ._peft import AdapterMethod
from .base import ITEM_TABLE, need


@dataclass
class AdaLoraOptions:
    init_r: int = 12
    target_r: int = 4
    tinit_ratio: float = 0.1      # share of the real step count before budget pruning starts
    tfinal_ratio: float = 0.2     # share at the end with the final budget fixed
    delta_t: int = 5              # steps between budget re-allocations
    orth_reg_weight: float = 0.5
    # PEFT's AdaLoRA has no embedding layer, so on its own it never changes the item table -- the part of
    # full fine-tuning's change that matters most across platforms (benchmarks/RESULTS.md, Transfer).
    # table_r > 0 puts a plain LoRA adapter of that rank on the item table beside AdaLoRA on the linear
    # layers (PEFT's mixed-adapter model; saved as two PEFT adapters, docs/studies.md); table_alpha:
    # None is 2 * table_r. AdaLoRA also reads lora.alpha, lora.dropout and lora.target_modules.
    table_r: int = 0
    table_alpha: int | None = None


def rank_summary(adalora_config) -> dict:
    """Module -> the rank the budget kept (PEFT's rank_pattern holds a mask per module)."""
    pattern = adalora_config.rank_pattern or {}
    return {k: int(sum(v)) if isinstance(v, list) else int(v) for k, v in pattern.items()}


def final_budget_steps(ad: AdaLoraOptions, total: int) -> int:
    """PEFT's ``tfinal`` for a run of ``total`` updates, refused when it is 0.

    PEFT fixes the final budget (target_r) at update ``total - tfinal`` exactly; the engine numbers
    updates 0..total-1, so with tfinal = 0 that update never comes and the adapter keeps whatever ranks
    the budget phase left (none pruned at all when no update of it is a multiple of delta_t): a run that
    says adalora and is not. Short runs hit this: tfinal_ratio 0.2 of 4 updates is 0.

    (No separate check that the budget phase has an update: tinit + tfinal <= (tinit_ratio +
    tfinal_ratio) * total < total, as check_options keeps the ratios' sum below 1 and plan gives
    total >= 1; PEFT's own AdaLoraConfig check of the same can therefore not fire either.)"""
    tfinal = int(ad.tfinal_ratio * total)
    if tfinal < 1:
        steps = math.ceil(1 / ad.tfinal_ratio)
        while int(ad.tfinal_ratio * steps) < 1:       # float rounding of ratio * steps
            steps += 1
        ratio = f", or adalora.tfinal_ratio to at least {math.ceil(100 / total) / 100:g} (keeping adalora.tinit_ratio " \
                f"+ adalora.tfinal_ratio below 1)" if total >= 2 else ""
        raise InputError(f"adalora.tfinal_ratio = {ad.tfinal_ratio:g} of {total} update(s) is 0 updates at the final "
                         f"rank budget (adalora.target_r), so the run would end before its ranks are pruned to it; "
                         f"raise train.max_steps (or train.epochs) to at least {max(steps, 2)} updates{ratio}",
                         field="adalora.tfinal_ratio")
    return tfinal


class AdaLora(AdapterMethod):
    name = "adalora"
    summary = "PEFT AdaLoRA adapter (rank budget over the linear layers; optional LoRA on the item table)"
    options = AdaLoraOptions
    default_lr: ClassVar[float] = 5e-3
    refuses_zero3 = ("AdaLoRA prunes its weights in place; ZeRO-3 partitions them. "
                     "Use ZeRO-0/1/2 or no DeepSpeed for adalora (adapters are small)")
    refuses_fp16 = ("AdaLoRA's importance scores read the gradients, which fp16 loss scaling multiplies "
                    "(and an overflow step makes inf); use bf16 or fp32 for adalora")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.mixed = cfg.adalora.table_r > 0
        self.budget = None

    @classmethod
    def check_options(cls, cfg, prefix: str = "") -> None:
        ad, p = cfg.adalora, prefix
        need(ad.target_r >= 1, p + "adalora.target_r", f"must be >= 1, got {ad.target_r}")
        need(ad.init_r >= ad.target_r, p + "adalora.target_r",
             f"the final rank {ad.target_r} exceeds the initial rank init_r={ad.init_r}")
        need(0 <= ad.tinit_ratio < 1, p + "adalora.tinit_ratio", f"must be in [0, 1), got {ad.tinit_ratio}")
        # 0 is refused: the final budget is fixed at update total - tfinal, which the updates 0..total-1
        # reach only when tfinal >= 1 (see final_budget_steps).
        need(0 < ad.tfinal_ratio < 1, p + "adalora.tfinal_ratio",
             f"must be in (0, 1) (0: the final budget, adalora.target_r, is never reached), got {ad.tfinal_ratio}")
        need(ad.tinit_ratio + ad.tfinal_ratio < 1, p + "adalora.tfinal_ratio",
             f"{p}adalora.tinit_ratio + {p}adalora.tfinal_ratio = {ad.tinit_ratio + ad.tfinal_ratio:g} leaves no "
             f"steps for budget allocation; lower one or both so that their sum is below 1")
        need(ad.delta_t >= 1, p + "adalora.delta_t", f"must be >= 1, got {ad.delta_t}")
        need(ad.orth_reg_weight >= 0, p + "adalora.orth_reg_weight", f"must be >= 0, got {ad.orth_reg_weight}")
        need(ad.table_r >= 0, p + "adalora.table_r", f"must be >= 0 (0: no adapter on {ITEM_TABLE}), got {ad.table_r}")
        need(ad.table_alpha is None or ad.table_alpha > 0, p + "adalora.table_alpha",
             f"must be > 0 (or null: 2 * table_r), got {ad.table_alpha}")

    @classmethod
    def check_config(cls, cfg, prefix: str = "") -> None:
        lo = cfg.lora
        need(not (lo.rank_pattern or lo.alpha_pattern), prefix + "lora.rank_pattern",
             "AdaLoRA sets each module's rank itself (adalora.init_r / target_r); rank_pattern is for lora")
        need(ITEM_TABLE not in lo.target_modules, prefix + "lora.target_modules",
             f"AdaLoRA adapts linear layers only; drop {ITEM_TABLE} for adalora")

    @classmethod
    def adapts_item_table(cls, cfg) -> bool:
        return cfg.adalora.table_r > 0

    def build(self, task, engine):
        from ._adalora_budget import AdaLoraBudget
        model = super().build(task, engine)
        self.budget = AdaLoraBudget(model, mixed=self.mixed)
        return model

    def adapt(self, task, base, engine):
        from ._training import TABLE_ADAPTER, AdaLoraConfig, LoraConfig, get_peft_model
        lo, a = self.cfg.lora, self.cfg.adalora
        total = engine.plan(task.batches()).total_updates   # the engine's own arithmetic
        tinit, tfinal = int(a.tinit_ratio * total), final_budget_steps(a, total)
        save = self.modules_to_save(base)
        pc = AdaLoraConfig(init_r=a.init_r, target_r=a.target_r, tinit=tinit, tfinal=tfinal, deltaT=a.delta_t,
                           total_step=total, orth_reg_weight=a.orth_reg_weight, lora_alpha=lo.alpha,
                           lora_dropout=lo.dropout, target_modules=lo.target_modules,
                           trainable_token_indices=self.token_rows(task), modules_to_save=None if a.table_r else save)
        if not a.table_r:
            return get_peft_model(base, pc)
        # AdaLoRA cannot adapt an embedding: the table gets plain LoRA, carrying the offsets too,
        # in PEFT's mixed-adapter model (a PeftModel holds one adapter type).
        table = LoraConfig(r=a.table_r, lora_alpha=a.table_alpha or 2 * a.table_r,
                           lora_dropout=lo.dropout, target_modules=[ITEM_TABLE], modules_to_save=save)
        model = get_peft_model(base, table, adapter_name=TABLE_ADAPTER, mixed=True)
        model.add_adapter("default", pc)
        model.set_adapter(["default", TABLE_ADAPTER])
        return model

    def penalty(self, model):
        from ._training import orthogonality
        return orthogonality(model, self.cfg.adalora.orth_reg_weight)

    def after_backward(self, model, step: int) -> None:
        self.budget.read_gradients(step)

    def after_step(self, model, step: int, grad_scale: float = 1.0) -> None:
        self.budget.allocate(step, grad_scale)

    def checkpoint_state(self, model) -> dict:
        """AdaLoRA's budget so far: PEFT keeps it in the adapter config, not in the weights, and a run
        resumed past the final-budget step masks with it every step (without it, PEFT fails on None).
        The importance averages behind it restart on resume."""
        pattern = self.budget.config.rank_pattern
        return {"rank_pattern": pattern} if pattern else {}

    def restore_checkpoint_state(self, model, state: dict) -> None:
        if state.get("rank_pattern"):
            self.budget.config.rank_pattern = state["rank_pattern"]

    def adapter_info(self, task) -> dict:
        info = super().adapter_info(task)
        if self.mixed:
            from ._training import TABLE_ADAPTER
            info.update(adapters={"default": "adalora", TABLE_ADAPTER: "lora"},
                        rank_pattern=rank_summary(self.budget.config))
        return info

    def record(self, task, model, out_dir) -> dict:
        if not self.mixed:
            return {"rank_pattern": rank_summary(model.peft_config["default"])}
        from ._training import ADAPTER_INFO
        return {"rank_pattern": json.loads((out_dir / ADAPTER_INFO).read_text())["rank_pattern"]}
