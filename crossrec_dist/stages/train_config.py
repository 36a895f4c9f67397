"""The recommender stages' ``train:`` section: the engine's :class:`TrainConfig` plus what only
next-item training and ranking evaluation need.

Like ``stages/configs.py`` it needs no torch, transformers or DeepSpeed (a recipe is checked in a
fraction of a second). The YAML keys are the same as ever: ``train.eval_batch_size``,
``train.track_test``, ``train.window_stride`` sit beside the engine's ``train.lr`` etc.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..engine.config import TrainConfig, validate_train_config
from ..errors import InputError

__all__ = ["RecommenderTrainConfig", "validate_recommender_train_config"]


@dataclass
class RecommenderTrainConfig(TrainConfig):
    eval_batch_size: int = 1024         # users per batch when ranking the catalogue (validation and test)
    track_test: bool = False            # also record test NDCG/HR at each validation (benchmarks' time-to-
                                        # quality curves); selection and early stopping still use valid only
    window_stride: int = 0              # training windows per sequence: 0 = non-overlapping max_len chunks
    eval_users: int = 0                 # validation and the final evaluation rank a sample of this many users
                                        # (seeded by train.seed, the same users every time); 0 = all of them


def validate_recommender_train_config(cfg: RecommenderTrainConfig, prefix: str = "") -> None:
    """The engine's checks (:func:`~crossrec_dist.engine.config.validate_train_config`), then this
    section's own fields. ``prefix`` names the section in errors (``pretrain.`` in a recipe)."""
    validate_train_config(cfg, prefix)
    if cfg.eval_batch_size < 1:
        raise InputError(f"must be >= 1, got {cfg.eval_batch_size}", field=prefix + "train.eval_batch_size")
    if cfg.eval_users < 0:
        raise InputError(f"must be >= 0 (0: every user), got {cfg.eval_users}", field=prefix + "train.eval_users")
    if cfg.window_stride < 0:
        raise InputError(f"must be >= 0, got {cfg.window_stride}", field=prefix + "train.window_stride")
