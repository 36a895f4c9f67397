"""Recipe: one YAML that names the data, the source/target split, and each stage's config."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataRecipe:
    source: str = "movielens-100k"        # movielens-100k | movielens-1m | synth
    synth: dict = field(default_factory=dict)   # `crossrec data synth` options (users, items, domains, ...)
    domain_from: str | None = "user.zip_code:prefix1"
    domain_col: str | None = None
    min_user: int = 0
    min_item: int = 0


@dataclass
class Recipe:
    name: str = "experiment"
    data: DataRecipe = field(default_factory=DataRecipe)
    targets: list[str] = field(default_factory=list)
    sources: list[str] | None = None      # None: every domain that is not a target
    methods: list[str] = field(default_factory=lambda: ["none", "scratch", "full", "lora", "adalora"])
    pretrain: dict = field(default_factory=dict)   # a `crossrec pretrain --config` document
    finetune: dict = field(default_factory=dict)   # a `crossrec finetune --config` document (method set per run)
    method_overrides: dict = field(default_factory=dict)  # method -> finetune config overrides
    distill: dict = field(default_factory=dict)    # a `crossrec distill --config` document; {} = skip
    distill_from: str = "lora"            # which fine-tuned teacher to distil per target
    launch: str | None = None             # accelerate config for training steps (None: one process)
