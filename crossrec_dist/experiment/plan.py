"""The steps of an experiment, declared as data: what each runs, what it reads, where it writes.

A :class:`Step` is one command of the pipeline. Its settings -- its command's words and options (paths
inside OUT as ``<out>/...``, so they do not depend on where OUT is), its launch config when it
trains, and its full typed config as a dict -- are built from the recipe directly, and its hash is
chained over the hashes of the steps it reads from, so a step's hash changes when anything upstream
of it changes. Nothing here runs or reads an output: the runner walks the steps (runner.py).

The plan is declared in two stages, because the second needs the first's output: :meth:`Plan.data`
(fetch or synth, then prepare) and, once ``data/stats.json`` names the domains, :meth:`Plan.models`
(pretrain on the source domains, then per target every fine-tuning run, the students and their
serving benchmarks).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..methods import get_method
from ..paths import inside
from . import records
from .layout import run_folder, runs_of, target_dir
from .recipe import Recipe


@dataclass(frozen=True)
class ConfigFile:
    """A step's typed config: passed as ``--config OUT/configs/<file>.yaml``, recorded under ``section``."""
    section: str
    file: str
    value: Any


@dataclass(frozen=True, eq=False)
class Step:
    id: str                       # as logged and named in messages: "finetune d3 lora"
    parts: tuple[str, ...]        # its record OUT/steps/<parts>.json and its log OUT/logs/<parts>.log
    command: tuple[str, ...]      # the CLI words: ("data", "fetch", "movielens-1m")
    options: dict                 # flag -> what the command gets: a value, a list (the flag repeated), True (bare)
    output: Path                  # what it writes (deleted before a re-run of a changed step)
    done: Path                    # exists once it finished
    reads: tuple[str, ...] = ()   # ids of the steps whose output it reads
    config: ConfigFile | None = None
    trains: bool = False          # runs under the recipe's accelerate launch config
    side_by_side: bool = False    # with --jobs N, may run beside other such steps that it does not read
    settings: dict = field(default_factory=dict)
    upstream: dict = field(default_factory=dict)   # read step id -> its hash
    hash: str = ""

    def argv(self) -> list[str]:
        """The command line (without ``--config``)."""
        words = list(self.command)
        for flag, value in self.options.items():
            for v in value if isinstance(value, list) else [value]:
                words += [flag] if v is True else [f"{flag}={v}"] if str(v).startswith("-") else [flag, str(v)]
        return words


def pretrain_sources(recipe: Recipe, domains: list[str]) -> list[str]:
    """The domains the base is pretrained on: the recipe's ``sources``, else every non-target domain."""
    return recipe.sources or [d for d in domains if d not in recipe.targets]


def unknown_domains(recipe: Recipe, domains: list[str]) -> list[str]:
    return [d for d in recipe.targets + (recipe.sources or []) if d not in domains]


def finetune_id(target: str, method: str, seeds: list[int], seed: int, fraction: float = 1.0) -> str:
    return (f"finetune {target} {method}" + ("" if fraction == 1.0 else f" fraction {fraction:g}")
            + ("" if seed == seeds[0] else f" seed {seed}"))


class Plan:
    """The steps declared so far, by id; each new step's hash is chained over those it reads."""

    def __init__(self, recipe: Recipe, out: Path, jobs: int = 1):
        self.r, self.out, self.jobs = recipe, Path(out), jobs
        self.steps: dict[str, Step] = {}

    def add(self, id: str, parts: tuple[str, ...], command: tuple[str, ...], options: dict, *, output: Path,
            done: Path, reads: tuple[str, ...] = (), config: ConfigFile | None = None, trains: bool = False,
            side_by_side: bool = False) -> Step:
        settings: dict = {"command": " ".join(command), "options": {k: self._value(v) for k, v in options.items()}}
        if trains:
            settings["launch"] = self.r.launch
        if config is not None:
            settings[config.section] = yaml.safe_load(yaml.safe_dump(asdict(config.value), sort_keys=False))
        settings = records.plain(settings)
        upstream = {d: self.steps[d].hash for d in reads}
        step = Step(id, parts, command, options, output, done, reads, config, trains, side_by_side, settings,
                    upstream, records.digest(settings, upstream))
        self.steps[id] = step
        return step

    def _value(self, value):
        """An option as recorded: a path inside OUT as ``<out>/...``, a list item by item, a bare flag as
        True, anything else as the string the command receives."""
        if isinstance(value, list):
            return [self._value(v) for v in value]
        if isinstance(value, Path):
            try:
                return "<out>/" + value.resolve().relative_to(self.out.resolve()).as_posix()
            except ValueError:
                pass
        return value if value is True else str(value)

    # -- stage 1: the data ------------------------------------------------------------------------

    def data(self) -> list[Step]:
        """Fetch each source (or synthesise), then prepare: one dataset in OUT/data."""
        r, raw, data = self.r, self.out / "raw", self.out / "data"
        if r.data.sources is not None:
            srcs = r.data.inputs()
            fetched = [self._fetch(f"fetch {s.name}", ("fetch", s.name), s.fetch, inside(raw, s.name)) for s in srcs]
            inputs = {"--input": [s.output for s in fetched], "--format": "auto",
                      "--source-name": [s.name for s in srcs]}
        elif r.data.single() == "synth":
            options = {f"--{k.replace('_', '-')}": str(v) for k, v in r.data.synth.items()}
            fetched = [self.add("synth", ("synth",), ("data", "synth"), {"--out": raw, **options}, output=raw,
                                done=raw / "interactions.parquet")]
            inputs = {"--input": raw / "interactions.parquet", "--format": "parquet"}
        else:
            fetched = [self._fetch("fetch", ("fetch",), r.data.single(), raw)]
            inputs = {"--input": raw, "--format": "auto"}
        options = {**inputs, "--domain-from": r.data.domain_from, "--domain-col": r.data.domain_col,
                   "--min-user": r.data.min_user, "--min-item": r.data.min_item, "--out": data}
        options = {k: v for k, v in options.items() if v not in (None, "")}
        prepare = self.add("prepare", ("prepare",), ("prepare",), options, output=data, done=data / "stats.json",
                           reads=tuple(s.id for s in fetched))
        return [*fetched, prepare]

    def _fetch(self, id: str, parts: tuple[str, ...], name: str, dest: Path) -> Step:
        return self.add(id, parts, ("data", "fetch", name), {"--out": dest}, output=dest, done=dest / "fetch.json")

    # -- stage 2: the models, once the data's domains are known ------------------------------------

    def models(self, domains: list[str]) -> list[Step]:
        """Pretrain, then per target: every fine-tuning run, then the students and their benchmarks."""
        r, base = self.r, self.out / "pretrain"
        steps = [self.add("pretrain", ("pretrain",), ("pretrain",), {
            "--data": self.out / "data", "--out": base, "--domains": ",".join(pretrain_sources(r, domains)),
            "--resume": "auto"}, output=base, done=base / "metrics.json", reads=("prepare",),
            config=ConfigFile("pretrain", "pretrain", r.pretrain), trains=True)]
        for target in r.targets:
            steps += [self._finetune(target, m, fraction, seed) for m in r.methods for fraction, seed in runs_of(r, m)]
            if r.distill is not None:
                steps += self._distill(target)
        return steps

    def _finetune(self, target: str, method: str, fraction: float, seed: int) -> Step:
        r = self.r
        cfg = r.finetune_config(method)
        if seed != cfg.train.seed:
            cfg = replace(cfg, train=replace(cfg.train, seed=seed))
        if fraction != 1.0:
            cfg = replace(cfg, train_fraction=fraction)
        name = run_folder(method, r.seeds, seed, fraction)
        dest = target_dir(self.out, target, name)
        options = {"--base": self.out / "pretrain", "--data": self.out / "data", "--domain": target,
                   "--method": method, "--out": dest, "--resume": "auto"}
        return self.add(finetune_id(target, method, r.seeds, seed, fraction), ("finetune", target, name),
                        ("finetune",), options, output=dest, done=dest / "metrics.json", reads=("pretrain", "prepare"),
                        config=ConfigFile("finetune", f"finetune_{name}", cfg), trains=get_method(method).trains,
                        side_by_side=True)

    def _distill(self, target: str) -> list[Step]:
        """Two students of the target's teacher (first seed, all users), each followed by a serving
        benchmark. With jobs > 1 both students are declared first (they train side by side), then the
        benchmarks (each runs alone: it times requests)."""
        r = self.r
        teacher = target_dir(self.out, target, r.distill_from)
        adapter = {"--adapter": teacher} if get_method(r.distill_from).output == "adapter" else {}
        teacher_model = self.out / "pretrain" if adapter else teacher
        students, benches = [], []
        for kind, cfg in (("student_kd", r.distill), ("student_ce", replace(r.distill, alpha=1.0))):
            dest = target_dir(self.out, target, kind)
            students.append(self.add(f"distill {target} {kind}", ("distill", target, kind), ("distill",), {
                "--teacher": teacher_model, **adapter, "--data": self.out / "data", "--domain": target, "--out": dest,
                "--resume": "auto"}, output=dest, done=dest / "metrics.json",
                reads=(finetune_id(target, r.distill_from, r.seeds, r.seeds[0]),),
                config=ConfigFile("distill", kind, cfg), trains=True, side_by_side=True))
            bench = dest / "serving.json"
            benches.append(self.add(f"serving benchmark {target} {kind}", ("serving", target, kind), ("bench-serve",), {
                "--student": dest, "--teacher": teacher_model, **adapter, "--onnx": True, "--out": bench},
                output=bench, done=bench, reads=(students[-1].id,)))
        return [*students, *benches] if self.jobs > 1 else [s for pair in zip(students, benches) for s in pair]
