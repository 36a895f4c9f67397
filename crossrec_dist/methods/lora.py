"""``lora``: PEFT LoRA on the body's linear layers (and, with ``item_embeddings`` in target_modules, on the
item table); the item table's new rows and the per-item offsets as in every PEFT method (``_peft.py``)."""
from __future__ import annotations
# heavy imports inside functions (torch, peft, the model via ._training): the registry is read by --help
# and recipe checks, which must not pay import torch (2.6 s) and peft (5.9 s) on the 2-core CI machine

from dataclasses import dataclass, field
from typing import ClassVar

from ._peft import AdapterMethod
from .base import ALL_LINEAR, ITEM_TABLE, need


@dataclass
class LoraOptions:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))
    # Per-module rank and alpha (PEFT's rank_pattern / alpha_pattern), keyed by a target module's name:
    # e.g. item_embeddings: 16 gives the item table rank 16 and every other module r. The table's rank
    # costs (items + hidden) numbers per rank, a linear layer's (in + out): where full fine-tuning's
    # change needs its rank (benchmarks/delta_rank.py) decides which to spend a budget on. A module in
    # rank_pattern but not in alpha_pattern keeps lora.alpha, so its scale alpha/rank shrinks: give both.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int] = field(default_factory=dict)


class Lora(AdapterMethod):
    name = "lora"
    summary = "PEFT LoRA adapter (linear layers; optionally the item table)"
    options = LoraOptions
    default_lr: ClassVar[float] = 5e-3

    @classmethod
    def check_options(cls, cfg, prefix: str = "") -> None:
        # AdaLoRA reads lora.alpha, dropout and target_modules too: checked whichever method runs.
        lo, p = cfg.lora, prefix
        need(lo.r >= 1, p + "lora.r", f"must be >= 1, got {lo.r}")
        need(lo.alpha > 0, p + "lora.alpha", f"must be > 0, got {lo.alpha}")
        need(0 <= lo.dropout < 1, p + "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
        need(bool(lo.target_modules), p + "lora.target_modules", "needs at least one module")
        unknown = [m for m in lo.target_modules if m not in ALL_LINEAR + [ITEM_TABLE]]
        need(not unknown, p + "lora.target_modules", f"unknown module(s) {unknown}; the model's linear layers are "
             f"{', '.join(ALL_LINEAR)}, and its item table is {ITEM_TABLE}")
        for name in ("rank_pattern", "alpha_pattern"):
            for module, v in getattr(lo, name).items():
                need(module in lo.target_modules, f"{p}lora.{name}.{module}",
                     f"{module!r} is not one of lora.target_modules ({', '.join(lo.target_modules)})")
                need(v >= 1, f"{p}lora.{name}.{module}", f"must be >= 1, got {v}")

    @classmethod
    def adapts_item_table(cls, cfg) -> bool:
        return ITEM_TABLE in cfg.lora.target_modules

    def adapt(self, task, base, engine):
        from ._training import LoraConfig, get_peft_model
        lo = self.cfg.lora
        pc = LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                        trainable_token_indices=self.token_rows(task), modules_to_save=self.modules_to_save(base),
                        rank_pattern=dict(lo.rank_pattern), alpha_pattern=dict(lo.alpha_pattern))
        return get_peft_model(base, pc)
