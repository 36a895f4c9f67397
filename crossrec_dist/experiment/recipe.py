"""Recipe: one YAML that names the data, the source/target split, and each stage's typed config.

Every section is the same dataclass the stage's own command reads (``PretrainConfig``,
``FinetuneConfig``, ``DistillConfig``), so a typo anywhere in a recipe fails when the recipe is
loaded, naming the key, before the first step runs. ``check_recipe`` adds the cross-field rules.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import deep_merge, from_dict
from ..errors import InputError
from ..stages.configs import (METHODS, DistillConfig, FinetuneConfig, PretrainConfig, check_distill_config,
                              check_finetune_config, check_pretrain_config)

SOURCES = ("movielens-100k", "movielens-1m", "synth")


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
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)   # the method is set per run
    method_overrides: dict = field(default_factory=dict)  # method -> finetune config overrides
    distill: DistillConfig | None = None  # None: no distillation
    distill_from: str = "lora"            # which fine-tuned teacher to distil per target
    launch: str | None = None             # accelerate config for training steps (None: one process)

    def finetune_config(self, method: str) -> FinetuneConfig:
        """The finetune section with ``method_overrides[method]`` on top."""
        doc = deep_merge(dataclasses.asdict(self.finetune), self.method_overrides.get(method, {}) or {})
        return from_dict(FinetuneConfig, {**doc, "method": method}, source="recipe",
                         prefix=f"method_overrides.{method}.")


def check_recipe(recipe: Recipe, path: str, repo: Path | None = None) -> None:
    """Cross-field rules of a recipe; every error names the recipe file and the key."""
    try:
        _check(recipe, path, repo)
    except InputError as e:
        if e.path is not None:
            raise
        raise InputError(e.message, path=path, line=e.line, field=e.field) from None


def _check(recipe: Recipe, path: str, repo: Path | None) -> None:
    if recipe.data.source not in SOURCES:
        raise InputError(f"unknown data source {recipe.data.source!r}; choose one of {', '.join(SOURCES)}",
                         path=path, field="data.source")
    if not recipe.targets:
        raise InputError("the recipe names no target domains", path=path, field="targets")
    for key, names in (("targets", recipe.targets), ("sources", recipe.sources or [])):
        # Names are data (a region may be called anything); folders for them go through paths.inside.
        blank = [n for n in names if not str(n).strip()]
        if blank:
            raise InputError(f"empty domain name {blank[0]!r}", path=path, field=key)
        twice = sorted({str(n) for n in names if list(map(str, names)).count(str(n)) > 1})
        if twice:
            raise InputError(f"domain(s) {twice} listed more than once", path=path, field=key)
    unknown = [m for m in recipe.methods if m not in METHODS]
    if unknown or not recipe.methods:
        raise InputError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}", path=path, field="methods")
    for method in recipe.method_overrides:
        if method not in recipe.methods:
            raise InputError(f"override for method {method!r}, which the recipe does not run", path=path,
                             field=f"method_overrides.{method}")
    for method in recipe.methods:
        try:
            cfg = recipe.finetune_config(method)
            if method != "none":
                check_finetune_config(cfg, "finetune.")
        except InputError as e:
            field = e.field if e.field != "--method" else "methods"
            raise InputError(e.message, path=path, field=field) from None
    check_pretrain_config(recipe.pretrain, "pretrain.")
    if recipe.distill is not None:
        check_distill_config(recipe.distill, "distill.")
        if recipe.distill_from not in recipe.methods:
            raise InputError(f"distill_from {recipe.distill_from!r} is not among the methods {recipe.methods}",
                             path=path, field="distill_from")
    base = repo or Path.cwd()
    sections = [("pretrain", recipe.pretrain.train), ("finetune", recipe.finetune.train)]
    if recipe.distill is not None:
        sections.append(("distill", recipe.distill.train))
    for name, train in sections:
        if train.deepspeed not in (None, "none", "off"):
            from ..engine.deepspeed_config import resolve_path
            try:
                resolve_path(train.deepspeed)
            except InputError:
                raise InputError(f"DeepSpeed config {train.deepspeed!r} not found", path=path,
                                 field=f"{name}.train.deepspeed") from None
    if recipe.launch and not (Path(recipe.launch).is_file() or (base / recipe.launch).is_file()):
        raise InputError(f"launch config {recipe.launch!r} not found", path=path, field="launch")
