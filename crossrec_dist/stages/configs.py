"""The stages' typed configs, apart from the stages: reading or checking a config (a recipe, a
``--config`` file) needs no torch, transformers or DeepSpeed, so ``crossrec experiment`` can check a
whole recipe, and skip finished steps, in a fraction of a second.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.config import TrainConfig, validate_train_config
from ..errors import InputError
from ..models.presets import MODEL_OPTIONS, PRESETS


@dataclass
class PretrainConfig:
    preset: str = "small"
    model: dict = field(default_factory=dict)     # CrossRecConfig overrides (hidden_size, loss, ...)
    train: TrainConfig = field(default_factory=TrainConfig)
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
    import math
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


METHODS = ("lora", "adalora", "full", "head", "l2sp", "scratch", "none")
PEFT_METHODS = ("lora", "adalora")
DEFAULT_LR = {"lora": 5e-3, "adalora": 5e-3, "head": 2e-3, "full": 5e-4, "l2sp": 5e-4, "scratch": 1e-3}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CATALOGUES = ("all", "target")   # FinetuneConfig.catalogue / DistillConfig.catalogue
ITEM_TABLE = "item_embeddings"   # LoRA on the item table (input and, tied, output side); not for AdaLoRA


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


@dataclass
class AdaLoraOptions:
    init_r: int = 12
    target_r: int = 4
    tinit_ratio: float = 0.1      # share of the real step count before budget pruning starts
    tfinal_ratio: float = 0.2     # share at the end with the final budget fixed
    delta_t: int = 5              # steps between budget re-allocations
    orth_reg_weight: float = 0.5
    # PEFT's AdaLoRA has no embedding layer, so on its own it never changes the item table -- the part of
    # full fine-tuning's change that matters most across platforms (benchmarks/RESULTS.md 14.6). table_r > 0
    # puts a plain LoRA adapter of that rank on the item table beside AdaLoRA on the linear layers (PEFT's
    # mixed-adapter model; saved as two PEFT adapters, README "Studies"); table_alpha: None is 2 * table_r.
    table_r: int = 0
    table_alpha: int | None = None


def table_lora(cfg) -> bool:
    """Does the adapter put LoRA on the item table (lora with it in target_modules, or adalora.table_r)?
    Then every item, new ones included, already has its own trainable column of the table's change."""
    return (cfg.method == "lora" and ITEM_TABLE in cfg.lora.target_modules) or \
        (cfg.method == "adalora" and cfg.adalora.table_r > 0)


@dataclass
class FinetuneConfig:
    method: str = "lora"
    lora: LoraOptions = field(default_factory=LoraOptions)
    adalora: AdaLoraOptions = field(default_factory=AdaLoraOptions)
    l2sp_weight: float = 0.01
    train_new_items: bool = True  # PEFT methods: trainable rows for items new to the target domain
    train_top_items: int = 0      # PEFT methods: also train whole rows of the target's K most frequent items
                                  # (PEFT trainable tokens; not with LoRA on the item table)
    train_item_bias: bool = True  # PEFT methods: retrain the base's per-item score offsets (model.item_bias)
                                  # as part of the adapter (N + 1 numbers), when the base has them
    train_fraction: float = 1.0   # share of the target's users whose histories train and validate (a seeded
                                  # sample, the same for every method at one seed); test users: all of them
    valid_targets: int = 1        # validation targets per target user: the last K items before the test
                                  # item (K - 1 of them leave training); K > 1 steadies checkpoint selection
    catalogue: str = "all"        # items ranked in validation and test: all (the base's whole vocabulary) |
                                  # target (items of the target domain's log: its platform's catalogue)
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
    catalogue: str = "all"                        # items ranked: all | target (the validation domains' items
                                                  # while training; the target's in the final record)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=100, patience=8))


def _need(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InputError(message, field=field_name)


def check_pretrain_config(cfg: PretrainConfig, prefix: str = "") -> None:
    """Everything about a pretrain config that can be known before reading data."""
    check_preset(cfg.preset, cfg.model, prefix)
    validate_train_config(cfg.train, prefix)


def check_finetune_config(cfg: FinetuneConfig, prefix: str = "") -> None:
    """Everything about a finetune config that can be known before reading data (the AdaLoRA
    schedule against the real step count is checked once the data says how many steps there are)."""
    import math
    _need(cfg.method in METHODS, "--method", f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    validate_train_config(cfg.train, prefix)
    lo, ad = cfg.lora, cfg.adalora
    p = prefix
    _need(lo.r >= 1, p + "lora.r", f"must be >= 1, got {lo.r}")
    _need(lo.alpha > 0, p + "lora.alpha", f"must be > 0, got {lo.alpha}")
    _need(0 <= lo.dropout < 1, p + "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    _need(bool(lo.target_modules), p + "lora.target_modules", "needs at least one module")
    unknown = [m for m in lo.target_modules if m not in ALL_LINEAR + [ITEM_TABLE]]
    _need(not unknown, p + "lora.target_modules", f"unknown module(s) {unknown}; the model's linear layers are "
          f"{', '.join(ALL_LINEAR)}, and its item table is {ITEM_TABLE}")
    for name in ("rank_pattern", "alpha_pattern"):
        for module, v in getattr(lo, name).items():
            _need(module in lo.target_modules, f"{p}lora.{name}.{module}",
                  f"{module!r} is not one of lora.target_modules ({', '.join(lo.target_modules)})")
            _need(v >= 1, f"{p}lora.{name}.{module}", f"must be >= 1, got {v}")
    _need(not (cfg.method == "adalora" and (lo.rank_pattern or lo.alpha_pattern)), p + "lora.rank_pattern",
          "AdaLoRA sets each module's rank itself (adalora.init_r / target_r); rank_pattern is for lora")
    _need(not (cfg.method == "adalora" and ITEM_TABLE in lo.target_modules), p + "lora.target_modules",
          f"AdaLoRA adapts linear layers only; drop {ITEM_TABLE} for adalora")
    _need(ad.target_r >= 1, p + "adalora.target_r", f"must be >= 1, got {ad.target_r}")
    _need(ad.init_r >= ad.target_r, p + "adalora.target_r",
          f"the final rank {ad.target_r} exceeds the initial rank init_r={ad.init_r}")
    for name in ("tinit_ratio", "tfinal_ratio"):
        v = getattr(ad, name)
        _need(0 <= v < 1, f"{p}adalora.{name}", f"must be in [0, 1), got {v}")
    _need(ad.tinit_ratio + ad.tfinal_ratio < 1, p + "adalora.tfinal_ratio",
          f"tinit_ratio + tfinal_ratio = {ad.tinit_ratio + ad.tfinal_ratio:g} leaves no steps for budget allocation")
    _need(ad.delta_t >= 1, p + "adalora.delta_t", f"must be >= 1, got {ad.delta_t}")
    _need(ad.orth_reg_weight >= 0, p + "adalora.orth_reg_weight", f"must be >= 0, got {ad.orth_reg_weight}")
    _need(ad.table_r >= 0, p + "adalora.table_r", f"must be >= 0 (0: no adapter on {ITEM_TABLE}), got {ad.table_r}")
    _need(ad.table_alpha is None or ad.table_alpha > 0, p + "adalora.table_alpha",
          f"must be > 0 (or null: 2 * table_r), got {ad.table_alpha}")
    _need(cfg.valid_targets >= 1, p + "valid_targets", f"must be >= 1, got {cfg.valid_targets}")
    _need(cfg.train_top_items >= 0, p + "train_top_items", f"must be >= 0, got {cfg.train_top_items}")
    _need(not (cfg.train_top_items and table_lora(cfg)), p + "train_top_items",
          f"LoRA on {ITEM_TABLE} already adapts every row; PEFT cannot also train whole rows of that table "
          "(use one or the other)")
    _need(cfg.catalogue in CATALOGUES, p + "catalogue",
          f"unknown catalogue {cfg.catalogue!r}; choose one of {', '.join(CATALOGUES)}")
    _need(0 < cfg.train_fraction <= 1, p + "train_fraction", f"must be in (0, 1], got {cfg.train_fraction}")
    _need(math.isfinite(cfg.l2sp_weight) and cfg.l2sp_weight >= 0, p + "l2sp_weight",
          f"must be >= 0, got {cfg.l2sp_weight}")


def check_distill_config(cfg: DistillConfig, prefix: str = "") -> None:
    import math
    p = prefix
    check_preset(cfg.preset, cfg.model, p)
    validate_train_config(cfg.train, p)
    _need(0.0 <= cfg.alpha <= 1.0, p + "alpha", f"must be in [0, 1], got {cfg.alpha}")
    _need(math.isfinite(cfg.temperature) and cfg.temperature > 0, p + "temperature",
          f"must be > 0, got {cfg.temperature}")
    _need(cfg.feature_weight >= 0, p + "feature_weight", f"must be >= 0, got {cfg.feature_weight}")
    _need(cfg.top_k >= 0, p + "top_k", f"must be >= 0 (0 = all items), got {cfg.top_k}")
    _need(cfg.num_sampled >= 1, p + "num_sampled", f"must be >= 1, got {cfg.num_sampled}")
    for name, allowed in (("transfer", ("all", "target")), ("select_on", ("transfer", "target")),
                          ("catalogue", CATALOGUES)):
        _need(getattr(cfg, name) in allowed, p + name, f"must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
