"""The engine's training configuration: what any task trained by ``engine.trainer.Engine`` is run with.

Ranges are checked by :func:`validate_train_config` before any work starts; how these values combine
with what an ``accelerate launch`` asks for is in ``engine/deepspeed_config.py``. Nothing here is
about what the model computes: a kind of task that needs more settings subclasses :class:`TrainConfig`
(the recommender stages' ``train:`` section is ``stages.train_config.RecommenderTrainConfig``) and
checks its own fields beside :func:`validate_train_config`; the engine accepts any subclass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError


SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16", "bf16_if_native")


@dataclass
class TrainConfig:
    epochs: int = 100
    max_steps: int = 0                  # >0 caps the run (and fixes the schedule length)
    max_train_seconds: float = 0.0      # >0: stop (and keep the best model) after this wall time
    micro_batch_size: int = 128         # per process
    grad_accum: int = 1
    lr: float | None = None             # None: the stage's default for its method
    weight_decay: float = 0.0
    adam_beta2: float = 0.98
    schedule: str = "cosine"            # cosine | linear | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.05
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "auto"       # auto (bf16 on a capable GPU, fp32 on CPU) | no | bf16 | fp16 |
                                        # bf16_if_native (bf16 on a GPU or CPU that computes it natively,
                                        # AVX512-BF16 / AMX: ~2x the samples/s of fp32 here; else fp32)
    gradient_checkpointing: bool = False
    deepspeed: str | None = None        # ds_configs/*.json or a name (zero2); default: what accelerate launch
                                        # asks for (a JSON, or --use_deepspeed/--zero_stage/config fields)
    zero3_init: bool | None = None      # ZeRO-3: build the model partitioned (deepspeed.zero.Init);
                                        # None = the launcher's zero3_init_flag (accelerate: on for ZeRO-3)
    eval_every: int = 0                 # steps between validations; 0 = once per epoch
    validate_at_start: bool = False     # validate the initial weights too (fine-tuning: never end worse
                                        # on valid than where it started)
    patience: int = 10                  # validations without improvement before stopping; 0 = never
    min_steps: int = 0                  # early stopping waits for this many updates: patience counts
                                        # validations, and on a small data set an epoch is a few updates
    checkpoint_every: int = 0           # steps between accelerator.save_state checkpoints; 0 = off
    keep_checkpoints: int = 2
    resume: str | None = None           # auto | PATH
    log_every: int = 20
    tensorboard: bool = True
    rank_report: bool = False           # each rank writes ranks/rank{N}.json: its parameter shards and samples


def validate_train_config(cfg: TrainConfig, prefix: str = "") -> None:
    """Ranges the dataclass types cannot say; checked before any work starts. ``prefix`` names the
    section in errors (``pretrain.`` in a recipe)."""
    positive = ("micro_batch_size", "grad_accum", "log_every")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise InputError(f"must be >= 1, got {getattr(cfg, name)}", field=f"{prefix}train.{name}")
    for name in ("epochs", "max_steps", "warmup_steps", "patience", "min_steps", "checkpoint_every", "eval_every"):
        if getattr(cfg, name) < 0:
            raise InputError(f"must be >= 0, got {getattr(cfg, name)}", field=f"{prefix}train.{name}")
    if cfg.epochs == 0 and cfg.max_steps == 0:
        raise InputError("nothing to train: epochs and max_steps are both 0", field=prefix + "train.epochs")
    if cfg.lr is not None and not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise InputError(f"must be a number > 0, got {cfg.lr}", field=prefix + "train.lr")
    for name in ("weight_decay", "max_train_seconds"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"must be a number >= 0, got {value}", field=f"{prefix}train.{name}")
    if not 0 < cfg.adam_beta2 < 1:
        raise InputError(f"must be in (0, 1), got {cfg.adam_beta2}", field=prefix + "train.adam_beta2")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise InputError(f"must be in [0, 1], got {cfg.min_lr_ratio}", field=prefix + "train.min_lr_ratio")
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"unknown schedule {cfg.schedule!r}; use {', '.join(SCHEDULES)}", field=prefix + "train.schedule")
    if cfg.keep_checkpoints < 1:
        raise InputError(f"must be >= 1, got {cfg.keep_checkpoints}", field=prefix + "train.keep_checkpoints")
    if not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0):
        raise InputError(f"must be >= 0 (0 = no clipping), got {cfg.max_grad_norm}", field=prefix + "train.max_grad_norm")
    if cfg.mixed_precision not in PRECISIONS:
        raise InputError(f"unknown mixed_precision {cfg.mixed_precision!r}; use {', '.join(PRECISIONS)}",
                         field=prefix + "train.mixed_precision")
    if not 0 <= cfg.warmup_ratio < 1:
        raise InputError(f"must be in [0, 1), got {cfg.warmup_ratio}", field=prefix + "train.warmup_ratio")
