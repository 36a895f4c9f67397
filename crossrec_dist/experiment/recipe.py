"""Recipe: one YAML that names the data, the source/target split, and each stage's typed config.

The data section names one ``source`` (fetched or synthesised), or several ``sources`` -- each
``{name, fetch}``, fetched into its own folder and prepared together into one dataset (one item
vocabulary joined on the raw item id; ``domain_from: source`` makes each source one domain named
after it). The top-level ``sources`` are something else: the *domains* the base is pretrained on.

Every section is the same dataclass the stage's own command reads (``PretrainConfig``,
``FinetuneConfig``, ``DistillConfig``), so a typo anywhere in a recipe fails when the recipe is
loaded, naming the key, before the first step runs. ``check_recipe`` adds the cross-field rules.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import deep_merge, from_dict, load_config
from ..data.fetch import SOURCES as FETCH_SOURCES
from ..engine.deepspeed_config import resolve_path
from ..errors import InputError
from ..methods import get_method, method_names
from ..stages.configs import (DistillConfig, FinetuneConfig, PretrainConfig, check_distill_config,
                              check_finetune_config, check_pretrain_config)

FETCHABLE = tuple(FETCH_SOURCES)         # `crossrec data fetch` names
SOURCES = (*FETCHABLE, "synth")
DEFAULT_SOURCE = "movielens-100k"


@dataclass
class SourceRecipe:
    """One entry of ``data.sources``: a name (its domain with ``domain_from: source``; the prefix
    ``NAME:`` of its domains and user ids otherwise) and the data set ``crossrec data fetch`` gets."""
    name: str
    fetch: str                            # one of FETCHABLE


@dataclass
class DataRecipe:
    source: str | None = None             # one source: a FETCHABLE name or synth; None: movielens-100k
    # Several sources instead of `source`: each {name, fetch}, fetched into OUT/raw/<name>/ and
    # prepared together. Entries are read into SourceRecipe by `inputs()` (check_recipe does it first,
    # so an unknown or missing key is reported as data.sources[i].KEY).
    sources: list | None = None
    synth: dict = field(default_factory=dict)   # `crossrec data synth` options (users, items, domains, ...)
    domain_from: str | None = "user.zip_code:prefix1"
    domain_col: str | None = None
    min_user: int = 0
    min_item: int = 0

    def single(self) -> str:
        """The one source of the single-source form."""
        return self.source if self.source is not None else DEFAULT_SOURCE

    def inputs(self, path: str = "recipe") -> list[SourceRecipe]:
        """``data.sources`` as typed entries (empty for the single-source form)."""
        out = []
        if self.sources is not None and not isinstance(self.sources, list):
            raise InputError(f"expected a list of {{name, fetch}}, got {self.sources!r}", path=path,
                             field="data.sources")
        for i, entry in enumerate(self.sources or []):
            if isinstance(entry, SourceRecipe):
                out.append(entry)
                continue
            key = f"data.sources[{i}]"
            if not isinstance(entry, dict):
                raise InputError(f"expected a mapping {{name, fetch}}, got {entry!r}", path=path, field=key)
            keys = [f.name for f in dataclasses.fields(SourceRecipe)]
            missing = [k for k in keys if k not in entry]
            if missing and set(entry) <= set(keys):   # else from_dict names the unknown key (a typo?)
                raise InputError(f"missing key(s) {', '.join(missing)}", path=path, field=f"{key}.{missing[0]}")
            out.append(from_dict(SourceRecipe, entry, source=path, prefix=f"{key}."))
        return out


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
    seeds: list[int] = field(default_factory=lambda: [0])   # fine-tuning seeds per target and method: the
                                          # report gives the median and intervals over seed-averaged users
    fractions: list[float] = field(default_factory=lambda: [1.0])   # shares of the target's training users
    fraction_methods: list[str] = field(default_factory=lambda: ["scratch", "full", "lora"])  # run below 1.0
    launch: str | None = None             # accelerate config for training steps (None: one process)

    def finetune_config(self, method: str) -> FinetuneConfig:
        """The finetune section with ``method_overrides[method]`` on top."""
        doc = deep_merge(dataclasses.asdict(self.finetune), self.method_overrides.get(method, {}) or {})
        return from_dict(FinetuneConfig, {**doc, "method": method}, source="recipe",
                         prefix=f"method_overrides.{method}.")


def load_recipe(path: str, overrides=(), repo: Path | None = None) -> Recipe:
    """The recipe at ``path`` with ``--set`` overrides, checked, its data source filled in."""
    recipe = load_config(Recipe, path, overrides)
    check_recipe(recipe, path, repo)
    if recipe.data.sources is None and recipe.data.source is None:
        recipe.data.source = DEFAULT_SOURCE     # as results.json records it
    return recipe


def check_recipe(recipe: Recipe, path: str, repo: Path | None = None) -> None:
    """Cross-field rules of a recipe; every error names the recipe file and the key."""
    try:
        _check(recipe, path, repo)
    except InputError as e:
        if e.path is not None:
            raise
        raise InputError(e.message, path=path, line=e.line, field=e.field) from None


def _check_data(data: DataRecipe, path: str) -> None:
    if data.sources is None:
        if data.single() not in SOURCES:
            raise InputError(f"unknown data source {data.source!r}; choose one of {', '.join(SOURCES)}",
                             path=path, field="data.source")
        return
    if data.source is not None:
        raise InputError("give either data.source (one source) or data.sources (several), not both",
                         path=path, field="data.sources")
    if not data.sources:
        raise InputError("data.sources is empty: list at least one {name, fetch}", path=path, field="data.sources")
    if data.synth:
        raise InputError("data.synth applies to `source: synth` only, not to data.sources", path=path,
                         field="data.synth")
    seen: set[str] = set()
    for i, src in enumerate(data.inputs(path)):
        key = f"data.sources[{i}]"
        name = src.name
        # The name becomes a domain name, the user-id prefix NAME: and `--source-name`, which refuses these.
        if not name.strip() or "," in name or ":" in name or any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise InputError(f"source name {name!r} must be non-empty, without ',', ':' or control characters",
                             path=path, field=f"{key}.name")
        if name in seen:
            raise InputError(f"two sources are both called {name!r}", path=path, field=f"{key}.name")
        seen.add(name)
        if src.fetch not in FETCHABLE:
            raise InputError(f"source {name!r}: unknown data set {src.fetch!r} to fetch; choose one of "
                             f"{', '.join(FETCHABLE)}", path=path, field=f"{key}.fetch")


def _check(recipe: Recipe, path: str, repo: Path | None) -> None:
    _check_data(recipe.data, path)
    _check_domains(recipe, path)
    _check_runs(recipe, path)
    _check_methods(recipe, path)
    check_pretrain_config(recipe.pretrain, "pretrain.")
    if recipe.distill is not None:
        check_distill_config(recipe.distill, "distill.")
        if recipe.distill_from not in recipe.methods:
            raise InputError(f"distill_from {recipe.distill_from!r} is not among the methods {recipe.methods}",
                             path=path, field="distill_from")
    _check_files(recipe, path, repo or Path.cwd())


def _check_domains(recipe: Recipe, path: str) -> None:
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


def _check_runs(recipe: Recipe, path: str) -> None:
    """Seeds and data fractions of a study."""
    if not recipe.seeds or len(set(recipe.seeds)) != len(recipe.seeds) or min(recipe.seeds) < 0:
        raise InputError(f"seeds must be distinct integers >= 0, at least one; got {recipe.seeds}", path=path,
                         field="seeds")
    if not recipe.fractions or any(not 0 < f <= 1 for f in recipe.fractions) or \
            len(set(recipe.fractions)) != len(recipe.fractions):
        raise InputError(f"fractions must be distinct numbers in (0, 1]; got {recipe.fractions}", path=path,
                         field="fractions")
    if any(f < 1 for f in recipe.fractions):
        # a known method the run leaves out (`--set methods=[...]` narrowing a study) simply does not run;
        # a name that is no method is a typo
        stray = [m for m in recipe.fraction_methods if m not in method_names()]
        if stray:
            raise InputError(f"fraction_methods {stray} are not methods; the methods are {', '.join(method_names())}",
                             path=path, field="fraction_methods")


def _check_methods(recipe: Recipe, path: str) -> None:
    """Every method is registered, and its fine-tuning config (with its overrides) is valid."""
    unknown = [m for m in recipe.methods if m not in method_names()]
    if unknown or not recipe.methods:
        raise InputError(f"unknown method(s) {unknown}; choose from {', '.join(method_names())}", path=path,
                         field="methods")
    # An override for a method this run leaves out (`--set methods=[none,lora]` on a recipe that also
    # tunes adalora) is kept for the runs that include it, and checked all the same; an unknown name is a typo.
    for method in recipe.method_overrides:
        if method not in method_names():
            raise InputError(f"override for an unknown method {method!r}; the methods are {', '.join(method_names())}",
                             path=path, field=f"method_overrides.{method}")
    for method in dict.fromkeys([*recipe.methods, *recipe.method_overrides]):
        try:
            cfg = recipe.finetune_config(method)
            if get_method(method).trains:
                check_finetune_config(cfg, "finetune.")
        except InputError as e:
            field = e.field if e.field != "--method" else "methods"
            raise InputError(e.message, path=path, field=field) from None


def _check_files(recipe: Recipe, path: str, base: Path) -> None:
    """The DeepSpeed configs and the launch config a recipe names exist."""
    sections = [("pretrain", recipe.pretrain.train), ("finetune", recipe.finetune.train)]
    if recipe.distill is not None:
        sections.append(("distill", recipe.distill.train))
    for name, train in sections:
        if train.deepspeed not in (None, "none", "off"):
            try:
                resolve_path(train.deepspeed)
            except InputError:
                raise InputError(f"DeepSpeed config {train.deepspeed!r} not found", path=path,
                                 field=f"{name}.train.deepspeed") from None
    if recipe.launch and not (Path(recipe.launch).is_file() or (base / recipe.launch).is_file()):
        raise InputError(f"launch config {recipe.launch!r} not found", path=path, field="launch")
