"""The stages' typed configs, apart from the stages: reading or checking a config (a recipe, a
``--config`` file) needs no torch, transformers or DeepSpeed, so ``crossrec experiment`` can check a
whole recipe, and skip finished steps, in a fraction of a second.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass

from ..errors import InputError
from ..methods import ITEM_TABLE, all_methods, get_method
from ..models.presets import MODEL_OPTIONS, PRESETS
from .train_config import RecommenderTrainConfig, validate_recommender_train_config


@dataclass
class PretrainConfig:
    preset: str = "small"
    model: dict = field(default_factory=dict)     # CrossRecConfig overrides (hidden_size, loss, ...)
    train: RecommenderTrainConfig = field(default_factory=RecommenderTrainConfig)
    domains: list[str] | None = None              # source domains; None = all


def check_preset(preset: str, overrides: dict, field_prefix: str = "") -> None:
    """The preset exists, every model override is a CrossRecConfig option, and the merged options
    have the right types, ranges and shapes (heads divide the hidden size, ...)."""
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}", field=field_prefix + "preset")
    bad = sorted(set(overrides) - set(MODEL_OPTIONS))
    if bad:
        raise InputError(f"unknown model option(s) {bad}", field=f"{field_prefix}model.{bad[0]}")
    check_model_options({**PRESETS[preset], **overrides}, field_prefix + "model.")


# name -> (type, lower bound, upper bound, lower inclusive): ranges of the numeric model options.
_MODEL_RANGES = {
    "hidden_size": (int, 1, None, True), "num_layers": (int, 1, None, True), "num_heads": (int, 1, None, True),
    "num_kv_heads": (int, 1, None, True), "intermediate_size": (int, 1, None, True), "max_len": (int, 1, None, True),
    "num_negatives": (int, 1, None, True), "num_items": (int, 1, None, True), "num_domains": (int, 1, None, True),
    "embedding_dropout": (float, 0, 1, True), "attention_dropout": (float, 0, 1, True),
    "rms_norm_eps": (float, 0, None, False), "rope_theta": (float, 0, None, False),
    "initializer_range": (float, 0, None, False),
}


def check_model_options(options: dict, prefix: str = "model.") -> None:
    """Types and ranges of model options (a preset merged with overrides); errors name ``prefix + key``."""
    for name, value in options.items():
        if name in _MODEL_RANGES:
            if value is None and name in ("num_kv_heads", "intermediate_size"):
                continue
            kind, lo, hi, lo_inclusive = _MODEL_RANGES[name]
            ok_type = (isinstance(value, int) and not isinstance(value, bool)) if kind is int else \
                (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
            if not ok_type:
                raise InputError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}",
                                 field=prefix + name)
            if value < lo or (value == lo and not lo_inclusive) or (hi is not None and value >= hi):
                rng = f"{'>=' if lo_inclusive else '>'} {lo}" + (f" and < {hi}" if hi is not None else "")
                raise InputError(f"must be {rng}, got {value!r}", field=prefix + name)
    if "loss" in options and options["loss"] not in ("full", "sampled"):
        raise InputError(f"unknown loss {options['loss']!r}; use full or sampled", field=prefix + "loss")
    for name in ("use_domain_embedding", "item_bias"):
        if name in options and not isinstance(options[name], bool):
            raise InputError(f"expected true/false, got {options[name]!r}", field=prefix + name)
    for name in ("domain_names", "pretrain_domains"):
        if name in options and not isinstance(options[name], (list, tuple)):
            raise InputError(f"expected a list, got {options[name]!r}", field=prefix + name)
    hidden, heads = options.get("hidden_size"), options.get("num_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise InputError(f"{heads} heads do not divide hidden_size {hidden}", field=prefix + "num_heads")
    kv = options.get("num_kv_heads")
    if isinstance(kv, int) and isinstance(heads, int) and heads % kv:
        raise InputError(f"{kv} key/value heads do not divide num_heads {heads}", field=prefix + "num_kv_heads")


CATALOGUES = ("all", "target")   # FinetuneConfig.catalogue / DistillConfig.catalogue
# FinetuneConfig.align: how stages/alignment.py pulls the source's and target's representations together
ALIGNMENTS = ("none", "coral", "mmd", "adversarial")


def finetune_config_class(methods) -> type:
    """The fine-tuning config class for ``methods``: the fields every method shares, then one section
    per method with options (``lora:``, ``adalora:``, ``l2sp:`` ...), so that a new method's options
    need no edit here."""
    shared = [
        ("method", str, field(default="lora")),
        ("train_new_items", bool, field(default=True)),   # adapters: trainable rows for items new to the target
        ("train_top_items", int, field(default=0)),       # adapters: also train whole rows of the target's K most
                                                          # frequent items (PEFT trainable tokens; not with LoRA
                                                          # on the item table)
        ("train_item_bias", bool, field(default=True)),   # adapters: retrain the base's per-item score offsets
                                                          # (model.item_bias) as part of the adapter, N + 1 numbers
        ("train_fraction", float, field(default=1.0)),    # share of the target's users whose histories train and
                                                          # validate (a seeded sample, the same for every method at
                                                          # one seed); test users: all of them
        ("valid_targets", int, field(default=3)),         # validation targets per target user: the last K items
                                                          # before the test item (K - 1 of them leave training)
        ("init_adapter", str | None, field(default=None)),      # adapter methods: start from this adapter of the same
                                                          # base (the region's current one) instead of from zero:
                                                          # re-adaptation as the region's data grows
        ("source_replay", float, field(default=0.0)),     # mix this many source sequences per target sequence
                                                          # into fine-tuning (a seeded sample of the base's
                                                          # pretraining domains, from --data): less forgetting
        ("align", str, field(default="none")),            # none | coral | mmd | adversarial: between the source
                                                          # (source_replay) and target rows' representations
                                                          # of each micro-batch: a distance added to the loss,
                                                          # or a domain discriminator through gradient reversal
        ("align_weight", float, field(default=1.0)),
        ("must_beat_base", bool, field(default=True)),    # keep a step only if it beats the base (step 0) on
                                                          # validation by a paired 95% interval over users;
                                                          # otherwise the base is kept (and exported as such)
        ("catalogue", str, field(default="all")),         # items ranked in validation and test: all (the base's
                                                          # vocabulary) | target (items of the target's own log)
        ("train", RecommenderTrainConfig, field(default_factory=lambda: RecommenderTrainConfig(
            epochs=100, patience=5, micro_batch_size=32, validate_at_start=True))),
    ]
    sections = [(m.name, m.options, field(default_factory=m.options)) for m in methods if m.options]
    cls = make_dataclass("FinetuneConfig", shared + sections)
    cls.__module__ = __name__
    cls.__doc__ = ("The fine-tuning config (``crossrec finetune --config``; a recipe's ``finetune:``): the method, "
                   "options every method shares, ``train:``, and each method's own section.")
    return cls


FinetuneConfig = finetune_config_class(all_methods())


@dataclass
class DistillConfig:
    preset: str | None = None                     # student preset; None: sized from the teacher
                                                  # (stages/distill.py: default_student_options)
    model: dict = field(default_factory=dict)     # student CrossRecConfig overrides (on the preset or that size)
    allow_student_not_smaller: bool = False       # else a student with >= the teacher's parameters is refused
    alpha: float = 0.5                             # weight of the true-next-item CE (1 = no teacher)
    temperature: float = 1.0
    feature_weight: float = 0.0                   # hidden-state distillation through a learned projection
    init_from_teacher: bool = True                # student item table = teacher's, projected (PCA)
    top_k: int = 0                                 # >0: KL over teacher top-k + sampled items, not all items
    num_sampled: int = 256
    transfer: str = "all"                         # sequences the student learns from: all | target
    select_on: str = "target"                     # validation users that pick the checkpoint and stop early:
                                                  # target (the region's) | transfer (the transfer set's)
    catalogue: str = "all"                        # items ranked: all | target (the validation domains' items
                                                  # while training; the target's in the final record)
    train: RecommenderTrainConfig = field(default_factory=lambda: RecommenderTrainConfig(epochs=100, patience=8))


def _need(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InputError(message, field=field_name)


def check_pretrain_config(cfg: PretrainConfig, prefix: str = "") -> None:
    """Everything about a pretrain config that can be known before reading data."""
    check_preset(cfg.preset, cfg.model, prefix)
    validate_recommender_train_config(cfg.train, prefix)


def check_finetune_config(cfg, prefix: str = "") -> None:
    """Everything about a finetune config that can be known before reading data (the AdaLoRA
    schedule against the real step count is checked once the data says how many steps there are)."""
    method = get_method(cfg.method)
    validate_recommender_train_config(cfg.train, prefix)
    for m in all_methods():
        m.check_options(cfg, prefix)
    method.check_config(cfg, prefix)
    p = prefix
    _need(cfg.valid_targets >= 1, p + "valid_targets", f"must be >= 1, got {cfg.valid_targets}")
    _need(cfg.train_top_items >= 0, p + "train_top_items", f"must be >= 0, got {cfg.train_top_items}")
    _need(not (cfg.train_top_items and method.adapts_item_table(cfg)), p + "train_top_items",
          f"LoRA on {ITEM_TABLE} already adapts every row; PEFT cannot also train whole rows of that table "
          "(use one or the other)")
    _need(cfg.catalogue in CATALOGUES, p + "catalogue",
          f"unknown catalogue {cfg.catalogue!r}; choose one of {', '.join(CATALOGUES)}")
    _need(0 < cfg.train_fraction <= 1, p + "train_fraction", f"must be in (0, 1], got {cfg.train_fraction}")
    _need(math.isfinite(cfg.source_replay) and cfg.source_replay >= 0, p + "source_replay",
          f"must be >= 0 (source sequences per target sequence), got {cfg.source_replay}")
    _need(cfg.align in ALIGNMENTS, p + "align", f"unknown alignment {cfg.align!r}; choose {', '.join(ALIGNMENTS)}")
    _need(cfg.align == "none" or cfg.source_replay > 0, p + "align",
          "aligning needs source rows in each batch: set source_replay (e.g. 1.0, as many source sequences as target)")
    _need(math.isfinite(cfg.align_weight) and cfg.align_weight >= 0, p + "align_weight",
          f"must be >= 0, got {cfg.align_weight}")
    _need(not cfg.init_adapter or method.output == "adapter", p + "init_adapter",
          f"{cfg.method} does not train an adapter; init_adapter warm-starts adapter methods (lora)")


def check_distill_config(cfg: DistillConfig, prefix: str = "") -> None:
    p = prefix
    if cfg.preset is None:   # sized from the teacher: only the overrides can be checked before loading it
        bad = sorted(set(cfg.model) - set(MODEL_OPTIONS))
        _need(not bad, f"{p}model.{bad[0] if bad else ''}", f"unknown model option(s) {bad}")
        check_model_options(cfg.model, p + "model.")
    else:
        check_preset(cfg.preset, cfg.model, p)
    _need(isinstance(cfg.allow_student_not_smaller, bool), p + "allow_student_not_smaller",
          f"expected true/false, got {cfg.allow_student_not_smaller!r}")
    validate_recommender_train_config(cfg.train, p)
    _need(0.0 <= cfg.alpha <= 1.0, p + "alpha", f"must be in [0, 1], got {cfg.alpha}")
    _need(math.isfinite(cfg.temperature) and cfg.temperature > 0, p + "temperature",
          f"must be > 0, got {cfg.temperature}")
    _need(cfg.feature_weight >= 0, p + "feature_weight", f"must be >= 0, got {cfg.feature_weight}")
    _need(cfg.top_k >= 0, p + "top_k", f"must be >= 0 (0 = all items), got {cfg.top_k}")
    _need(cfg.num_sampled >= 1, p + "num_sampled", f"must be >= 1, got {cfg.num_sampled}")
    for name, allowed in (("transfer", ("all", "target")), ("select_on", ("transfer", "target")),
                          ("catalogue", CATALOGUES)):
        _need(getattr(cfg, name) in allowed, p + name, f"must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
