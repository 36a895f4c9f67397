"""The stages' typed configs, apart from the stages: reading or checking a config (a recipe, a
``--config`` file) needs no torch, transformers or DeepSpeed, so ``crossrec experiment`` can check a
whole recipe, and skip finished steps, in a fraction of a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.config import TrainConfig
from ..errors import InputError
from ..models.presets import MODEL_OPTIONS, PRESETS


@dataclass
class PretrainConfig:
    preset: str = "small"
    model: dict = field(default_factory=dict)     # CrossRecConfig overrides (hidden_size, loss, ...)
    train: TrainConfig = field(default_factory=TrainConfig)
    domains: list[str] | None = None              # source domains; None = all


def check_preset(preset: str, overrides: dict, field_prefix: str = "") -> None:
    """The preset exists and every model override is a CrossRecConfig option."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", field=field_prefix + "preset")
    bad = sorted(set(overrides) - set(MODEL_OPTIONS))
    if bad:
        raise InputError(f"unknown model option(s) {bad}", field=f"{field_prefix}model.{bad[0]}")


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


@dataclass
class DistillConfig:
    preset: str = "tiny"
    model: dict = field(default_factory=dict)     # student CrossRecConfig overrides
    alpha: float = 0.5                             # weight of the true-next-item CE (1 = no teacher)
    temperature: float = 1.0
    feature_weight: float = 0.0                   # hidden-state distillation through a learned projection
    init_from_teacher: bool = True                # student item table = teacher's, projected (PCA)
    top_k: int = 0                                 # >0: KL over teacher top-k + sampled items, not all items
    num_sampled: int = 256
    transfer: str = "all"                         # sequences the student learns from: all | target
    select_on: str = "target"                     # validation users that pick the checkpoint and stop early:
                                                  # target (the region's) | transfer (the transfer set's)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, patience=8))
