"""Training configuration, shared by all stages."""
from __future__ import annotations

from dataclasses import dataclass


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
    mixed_precision: str = "auto"       # auto (bf16 on a capable GPU, fp32 on CPU) | no | bf16 | fp16
    gradient_checkpointing: bool = False
    deepspeed: str | None = None        # ds_configs/*.json; default: the one accelerate launch names
    eval_every: int = 0                 # steps between validations; 0 = once per epoch
    eval_batch_size: int = 1024
    validate_at_start: bool = False     # validate the initial weights too (fine-tuning: never end worse
                                        # on valid than where it started)
    track_test: bool = False            # also record test NDCG/HR at each validation (benchmarks' time-to-
                                        # quality curves); selection and early stopping still use valid only
    patience: int = 10                  # validations without improvement before stopping; 0 = never
    checkpoint_every: int = 0           # steps between accelerator.save_state checkpoints; 0 = off
    keep_checkpoints: int = 2
    resume: str | None = None           # auto | PATH
    log_every: int = 20
    tensorboard: bool = True
    window_stride: int = 0              # training windows per sequence: 0 = non-overlapping max_len chunks
    rank_report: bool = False           # each rank writes ranks/rank{N}.json: its parameter shards and samples
