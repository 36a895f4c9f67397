"""``crossrec experiment``: fetch -> prepare -> pretrain -> per target: methods -> distil -> report.

Every step runs the same CLI command a user would, in its own process (optionally under
``accelerate launch``), writing straight into its output folder (``--resume auto`` needs that).
Its record, ``OUT/steps/.../<step>.json``, says "started" before the command and "complete" only
once the command succeeded (each written atomically), so a step that died never looks finished.
A record holds the step's settings -- its arguments (paths inside OUT as ``<out>/...``), its launch
config and the full config YAML it read, as a dict -- and a hash of them chained with the hashes of
the steps it reads from (prepare <- fetch/synth, pretrain <- prepare, finetune <- pretrain + prepare,
distil <- its teacher's finetune, serving benchmark <- distil), plus the run ids of those steps'
outputs it was made from. A recipe with several data ``sources`` has one fetch step per source
(``fetch NAME``, into ``OUT/raw/NAME/``), and prepare reads from all of them.

A step is skipped only when its output marker exists (metrics.json; stats.json, fetch.json or the
synthetic log for data; serving.json), its record is complete, its hash is the hash of the settings
the recipe gives it now, and the upstream outputs it was made from are the ones in place. Otherwise
it runs; a step started earlier with the same settings resumes its own output, so re-running after a
crash continues where it stopped. An output that no longer matches the recipe -- its settings or an
upstream step's changed, an upstream step was or is about to be re-run, or it has no record (an older
crossrec wrote it) -- is never reused and never resumed: the run stops with exit status 2 (before
running anything, when the steps before it are finished) naming each such step and each changed
setting as ``key: old -> new``. ``--rerun-changed`` then deletes the output of exactly those steps and
re-runs them and every step downstream of them; ``--force`` redoes every step.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from ..errors import InputError, RunStopped
from ..paths import inside
from . import records
from .recipe import Recipe, load_recipe


class StepFailed(RunStopped):
    """A step's command failed (its own output says why above); re-running the experiment resumes it."""


class _CheckEnds(Exception):
    """Looking for changed steps without running any cannot go further (a later step needs an output
    that only running an earlier one would make)."""


class Runner:
    def __init__(self, recipe: Recipe, out: Path, force: bool = False, log=print, rerun_changed: bool = False,
                 jobs: int = 1):
        self.r, self.out, self.force, self.log = recipe, Path(out), force, log
        self.rerun_changed = rerun_changed
        if jobs < 1:
            raise InputError(f"must be >= 1, got {jobs}", field="--jobs")
        if jobs > 1 and recipe.launch:
            raise InputError(f"steps run under accelerate launch ({recipe.launch}) take the machine's "
                             "processes themselves; run them one at a time (--jobs 1)", field="--jobs")
        self.jobs = jobs
        self.pending: list[_Job] = []                  # steps queued to run side by side (jobs > 1)
        self.timings: dict[str, float] = {}
        self.hashes: dict[str, str] = {}               # step -> hash of its settings now, chained
        self.runs: dict[str, str | None] = {}          # step -> id of the run whose output is in place
        self.changed: list[tuple[str, list[str]]] = []  # steps whose output no longer matches the recipe
        self.checking = False                          # True: find changed steps, run none
        self.upgraded: dict[str, str] = {}             # step -> its hash before its record was upgraded

    def _cli(self, *args, train: bool = False) -> None:
        """Run one step's command in the foreground (its output on ours)."""
        cmd = self._command(args, train)
        code = subprocess.run(cmd, env=self._env()).returncode
        if code != 0:
            raise self._failed(code, cmd)

    def _spawn(self, args, train: bool, log: Path) -> subprocess.Popen:
        """Start one step's command in the background, its output to ``log``."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            return subprocess.Popen(self._command(args, train), env=self._env(), stdout=f, stderr=subprocess.STDOUT)

    def _command(self, args, train: bool) -> list[str]:
        if train and self.r.launch:
            return [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", self.r.launch,
                    "-m", "crossrec_dist", *map(str, args)]
        return [sys.executable, "-m", "crossrec_dist", *map(str, args)]

    def _env(self) -> dict:
        """A step's environment. With jobs > 1, each of the concurrent steps gets an equal share of the
        CPU cores as its torch thread count (OMP_NUM_THREADS, unless already set): on 2 cores two
        one-thread fine-tuning runs side by side do 1.30x (a Xeon) to 1.56x (an EPYC) the work of
        two-thread runs one after the other (benchmarks/parallel_jobs.py, RESULTS.md §20). Thread count changes float summation order, so results
        can differ in the last digits from a run with another --jobs."""
        env = {**os.environ}
        if self.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, available_cores() // self.jobs))
        return env

    @staticmethod
    def _failed(code: int, cmd: list[str]) -> StepFailed:
        return StepFailed(f"error: step failed with status {code}: {' '.join(cmd)}\n"
                          f"run the same experiment command again to resume from there")

    # -- settings and records -------------------------------------------------------------------

    def _arg(self, value) -> str:
        """A command-line value as recorded: a path inside OUT as ``<out>/...`` (so the hash does not
        depend on where OUT is), anything else as the string the command receives."""
        if isinstance(value, Path):
            try:
                return "<out>/" + value.resolve().relative_to(self.out.resolve()).as_posix()
            except ValueError:
                pass
        return str(value)

    def _settings(self, args, config, train: bool) -> dict:
        """Everything the step's command depends on besides its inputs' content."""
        words, options, items, i = [], {}, list(args), 0
        while i < len(items):
            a = items[i]
            if isinstance(a, str) and a.startswith("--"):
                key, eq, value = a.partition("=")
                if not eq:
                    nxt = items[i + 1] if i + 1 < len(items) else None
                    if nxt is None or (isinstance(nxt, str) and nxt.startswith("--")):
                        value = True
                    else:
                        value, i = self._arg(nxt), i + 1
                if key in options:
                    # A repeated option (prepare's --input/--source-name per source): every value, in
                    # order. An option given once stays a plain value, so older records keep their hash.
                    was = options[key]
                    options[key] = [*(was if isinstance(was, list) else [was]), value]
                else:
                    options[key] = value
            else:
                words.append(self._arg(a))
            i += 1
        settings: dict = {"command": " ".join(words), "options": options}
        if train:
            settings["launch"] = self.r.launch
        if config is not None:
            section, _, cfg = config
            settings[section] = yaml.safe_load(yaml.safe_dump(asdict(cfg), sort_keys=False))
        return records.plain(settings)

    def _config(self, name: str, cfg) -> Path:
        """The step's typed config, written in full as the YAML its command reads."""
        path = inside(self.out / "configs", f"{name}.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        records.write_atomic(path, yaml.safe_dump(asdict(cfg), sort_keys=False))
        return path

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.out).as_posix()
        except ValueError:
            return str(path)

    def _step(self, name: str, parts: tuple[str, ...], args: list, *, done: Path, output: Path,
              deps: tuple[str, ...] = (), config: tuple | None = None, train: bool = False,
              side_by_side: bool = False) -> None:
        """Run one step unless its ``done`` marker exists and its record matches its settings now.

        ``parts`` name its record (``OUT/steps/<parts>.json``); ``output`` is what it writes (deleted
        before a re-run of a changed step); ``config`` is ``(recipe section, file name, typed config)``,
        passed as ``--config``. ``side_by_side``: with jobs > 1 the step is queued and runs beside
        other queued steps at the next ``_drain`` (steps that need none of each other's outputs).
        """
        if not (side_by_side and self.jobs > 1):
            self._drain()        # a step that runs alone waits for the queued ones (it may read their output)
        settings = self._settings(args, config, train)
        upstream = {d: self.hashes[d] for d in deps}
        upstream_runs = {d: self.runs.get(d) for d in deps}   # None: that step runs again now
        digest = records.digest(settings, upstream)
        self.hashes[name], self.runs[name] = digest, None
        path = inside(self.out / "steps", *parts[:-1], f"{parts[-1]}.json")
        rec = records.read_json(path)
        rec = rec if isinstance(rec, dict) else None
        marker = done.is_file()
        action, reasons = "run", []
        if self.force:
            pass
        elif rec is None:
            if marker:
                action, reasons = "changed", [f"{self._rel(done)} exists but has no step record (made by an older "
                                              "crossrec, or by a step that did not finish): its settings are unknown"]
        elif rec.get("hash") == digest or (marker and self._upgrade(name, path, rec, settings, upstream, config, digest)):
            was = rec.get("upstream_runs") or {}
            stale = [d for d in deps if was.get(d) != upstream_runs[d]]
            if stale and (marker or output.exists()):
                # Same settings, but an upstream output it was made from has been (or is about to be) replaced.
                action = "changed"
                reasons = [f"upstream step '{d}' " + ("runs again" if upstream_runs[d] is None else
                                                      "was re-run after this step ran") for d in stale]
            elif marker and rec.get("state") == "complete":
                action = "skip"
        elif marker or output.exists():
            action, reasons = "changed", records.differences(rec, settings, upstream, self.upgraded)
            if rec.get("state") != "complete":
                reasons.append("(its output is an unfinished run with the old settings)")

        if action == "skip":
            self.runs[name] = rec.get("run")
            if not self.checking:
                self.log(f"[skip] {name}: {self._rel(done)} exists and its settings are unchanged")
            return
        if action == "changed":
            if self.checking or not self.rerun_changed:
                self.changed.append((name, reasons))
                self.checking = True          # run nothing more; only look for further changes
                return
            self.log(f"[rerun] {name}: changed ({'; '.join(reasons)}); deleting {self._rel(output)}")
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()
        if self.checking:
            return
        run_id = uuid.uuid4().hex
        doc = {"version": records.VERSION, "step": name, "hash": digest, "run": run_id, "settings": settings,
               "upstream": upstream, "upstream_runs": upstream_runs}
        path.unlink(missing_ok=True)
        cmd = list(args) + (["--config", self._config(config[1], config[2])] if config else [])
        job = _Job(name, cmd, train, path, doc, inside(self.out / "logs", *parts[:-1], f"{parts[-1]}.log"))
        if side_by_side and self.jobs > 1:
            self.pending.append(job)
            return
        self.log(f"[run] {name}")
        t0 = time.perf_counter()
        records.write_json(path, {**doc, "state": "started"})
        self._cli(*cmd, train=train)
        self._finish(job, time.perf_counter() - t0)

    def _finish(self, job: "_Job", seconds: float) -> None:
        # Only now, with the command succeeded, does the output count as this step's.
        seconds = round(seconds, 2)
        records.write_json(job.record, {**job.doc, "state": "complete", "seconds": seconds,
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.runs[job.name] = job.doc["run"]
        self.timings[job.name] = seconds
        self._save_timings()

    def _drain(self) -> None:
        """Run the queued steps, ``jobs`` at a time, each one's output in its own log file (OUT/logs/);
        wait for all. A failed step stops new ones from starting; those running finish, and the run
        stops naming the failed step(s) with the end of each one's log."""
        queue, self.pending = self.pending, []
        running: list[tuple[_Job, subprocess.Popen, float]] = []
        failed: list[tuple[_Job, int]] = []
        while queue or running:
            while queue and len(running) < self.jobs and not failed:
                job = queue.pop(0)
                records.write_json(job.record, {**job.doc, "state": "started"})
                proc = self._spawn(job.args, job.train, job.log)
                self.log(f"[run] {job.name} (beside {len(running)} other; log {self._rel(job.log)})")
                running.append((job, proc, time.perf_counter()))
            if failed and not running:
                break
            time.sleep(0.2)
            for entry in list(running):
                job, proc, t0 = entry
                code = proc.poll()
                if code is None:
                    continue
                running.remove(entry)
                if code == 0:
                    self._finish(job, time.perf_counter() - t0)
                    self.log(f"[done] {job.name} in {time.perf_counter() - t0:.0f} s")
                else:
                    failed.append((job, code))
        if failed:
            lines = []
            for job, code in failed:
                tail = "".join(job.log.read_text(errors="replace").splitlines(True)[-15:])
                lines.append(f"step '{job.name}' failed with status {code}; the end of {self._rel(job.log)}:\n{tail}")
            raise StepFailed("\n".join(lines) + "run the same experiment command again to resume from there "
                             f"({len(queue)} queued step(s) did not start)")

    def _upgrade(self, name, path, rec, settings, upstream, config, digest) -> bool:
        """A finished step whose record lacks only settings added since, at their defaults, is the same
        step: its record is rewritten with today's settings and hash (and said so), instead of
        making every step of an older folder look changed after an upgrade."""
        defaults = {}
        if config is not None:
            section, _, cfg = config
            defaults = {section: yaml.safe_load(yaml.safe_dump(asdict(type(cfg)()), sort_keys=False))}
        added = records.only_new_defaults(rec, settings, upstream, records.plain(defaults), self.upgraded)
        if added is None:
            return False
        if not self.checking:
            self.log(f"[upgrade] {name}: record gains {', '.join(added)} at the default"
                     if added else f"[upgrade] {name}: record follows its upgraded upstream steps")
            records.write_json(path, {**rec, "hash": digest, "settings": settings, "upstream": upstream})
        self.upgraded[name] = rec.get("hash")
        return True

    def _save_timings(self) -> None:
        """Seconds per step as measured when the step last ran: a re-run that skips a step keeps its time."""
        records.write_json(self.out / "timings.json", self.timings)

    def _stop_if_changed(self) -> None:
        if not self.changed:
            return
        lines = [f"the output of these steps in {self.out} does not match what the recipe asks for now, "
                 "so it is not reused:"]
        for name, reasons in self.changed:
            if len(reasons) == 1:
                lines.append(f"  step '{name}': {reasons[0]}")
            else:
                lines += [f"  step '{name}':"] + [f"    {r}" for r in reasons]
        lines += ["to proceed, add --rerun-changed (deletes the output of exactly these steps, then re-runs them "
                  "and every step downstream of them), or --force (redoes every step); to keep these results, "
                  "run the old recipe or give another --out"]
        raise InputError("\n".join(lines))

    # -- the pipeline ---------------------------------------------------------------------------

    def run(self) -> Path:
        r, out = self.r, self.out
        if self.force:
            for sub in ("pretrain", "targets", "data", "steps"):
                shutil.rmtree(out / sub, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        if not self.force:
            saved = records.read_json(out / "timings.json")
            self.timings = saved if isinstance(saved, dict) else {}
        t_all = time.perf_counter()
        if not (self.force or self.rerun_changed):
            # First look for changed steps without running any, so the run stops before doing work.
            self.checking = True
            try:
                self._steps()
            except _CheckEnds:
                pass
            self._stop_if_changed()
            self.checking = False
        try:
            sources = self._steps()
        except _CheckEnds:
            sources = None
        self._stop_if_changed()     # a change found only once the steps before it had run
        timings = {**self.timings, "all steps": round(sum(self.timings.values()), 2),
                   "this run": round(time.perf_counter() - t_all, 2)}
        from .report import write_report
        return write_report(out, r, sources, timings)

    def _steps(self) -> list[str]:
        """Every step in order; returns the source domains. While ``self.checking`` nothing runs."""
        r, out = self.r, self.out
        data = out / "data"
        raw = out / "raw"
        if r.data.sources is not None:
            # Several sources: one fetch step each, into OUT/raw/<name>/; prepare reads them all, in order.
            fetched, inputs, names = [], [], []
            for src in r.data.inputs():
                dest, step = inside(raw, src.name), f"fetch {src.name}"
                self._step(step, ("fetch", src.name), ["data", "fetch", src.fetch, "--out", dest],
                           done=dest / "fetch.json", output=dest)
                fetched.append(step)
                inputs += ["--input", dest]
                names += ["--source-name", src.name]
            prep = [*inputs, "--format", "auto", *names]
        elif r.data.single() == "synth":
            args = [f"--{k.replace('_', '-')}={v}" for k, v in r.data.synth.items()]
            fetched = ["synth"]
            self._step("synth", ("synth",), ["data", "synth", "--out", raw, *args],
                       done=raw / "interactions.parquet", output=raw)
            prep = ["--input", raw / "interactions.parquet", "--format", "parquet"]
        else:
            fetched = ["fetch"]
            self._step("fetch", ("fetch",), ["data", "fetch", r.data.single(), "--out", raw],
                       done=raw / "fetch.json", output=raw)
            prep = ["--input", raw, "--format", "auto"]
        if r.data.domain_from:
            prep += ["--domain-from", r.data.domain_from]
        if r.data.domain_col:
            prep += ["--domain-col", r.data.domain_col]
        prep += ["--min-user", r.data.min_user, "--min-item", r.data.min_item]
        self._step("prepare", ("prepare",), ["prepare", *prep, "--out", data], done=data / "stats.json",
                   output=data, deps=tuple(fetched))

        if self.checking and not (data / "stats.json").is_file():
            raise _CheckEnds
        stats = json.loads((data / "stats.json").read_text())
        domains = list(stats["domains"])
        unknown = [d for d in r.targets + (r.sources or []) if d not in domains]
        if unknown:
            if self.checking:
                raise _CheckEnds
            raise InputError(f"recipe names domain(s) {unknown} the data does not have ({domains})", field="targets")
        sources = r.sources or [d for d in domains if d not in r.targets]
        base = out / "pretrain"
        self._step("pretrain", ("pretrain",), [
            "pretrain", "--data", data, "--out", base, "--domains", ",".join(sources), "--resume", "auto"],
            done=base / "metrics.json", output=base, deps=("prepare",), config=("pretrain", "pretrain", r.pretrain),
            train=True)

        for target in r.targets:
            for method in r.methods:
                # The first seed keeps the plain names (targets/T/METHOD); others are METHOD.seedS.
                # Zero-shot is deterministic: it runs once.
                for fraction, seed in runs_of(r, method):
                    cfg = r.finetune_config(method)
                    if seed != cfg.train.seed:
                        cfg = replace(cfg, train=replace(cfg.train, seed=seed))
                    if fraction != 1.0:
                        cfg = replace(cfg, train_fraction=fraction)
                    name = run_folder(method, r.seeds, seed, fraction)
                    dest = inside(out, "targets", target, name)
                    self._step(f"finetune {target} {method}" + ("" if fraction == 1.0 else f" fraction {fraction:g}")
                               + ("" if seed == r.seeds[0] else f" seed {seed}"), ("finetune", target, name), [
                        "finetune", "--base", base, "--data", data, "--domain", target, "--method", method,
                        "--out", dest, "--resume", "auto"], done=dest / "metrics.json", output=dest,
                        deps=("pretrain", "prepare"), config=("finetune", f"finetune_{name}", cfg),
                        train=method != "none", side_by_side=True)
            self._drain()
            if r.distill is not None:
                self._distill(target, base, data)
        self._drain()
        return sources

    def _distill(self, target: str, base: Path, data: Path) -> None:
        teacher = inside(self.out, "targets", target, self.r.distill_from)
        teacher_step = f"finetune {target} {self.r.distill_from}"
        if self.checking and not (teacher / "metrics.json").is_file():
            raise _CheckEnds       # whether the teacher is an adapter is known once it has run
        adapter = ["--adapter", teacher] if (teacher / "adapter_config.json").is_file() else []
        teacher_model = base if adapter else teacher
        kinds = (("student_kd", self.r.distill), ("student_ce", replace(self.r.distill, alpha=1.0)))
        # With jobs > 1 both students train side by side, then each serving benchmark runs alone (it
        # times requests); one at a time, each student is followed by its benchmark.
        order = ([("distill", k) for k in kinds] + [("serving", k) for k in kinds] if self.jobs > 1 else
                 [(step, k) for k in kinds for step in ("distill", "serving")])
        for step, (kind, doc) in order:
            dest = inside(self.out, "targets", target, kind)
            if step == "distill":
                self._step(f"distill {target} {kind}", ("distill", target, kind), [
                    "distill", "--teacher", teacher_model, *adapter, "--data", data, "--domain", target,
                    "--out", dest, "--resume", "auto"], done=dest / "metrics.json", output=dest,
                    deps=(teacher_step,), config=("distill", kind, doc), train=True, side_by_side=True)
                continue
            bench = dest / "serving.json"
            self._step(f"serving benchmark {target} {kind}", ("serving", target, kind), [
                "bench-serve", "--student", dest, "--teacher", teacher_model, *adapter, "--onnx", "--out", bench],
                done=bench, output=bench, deps=(f"distill {target} {kind}",))


@dataclass
class _Job:
    """A step's command, ready to run: its record (written complete when it succeeds) and log file."""
    name: str
    args: list
    train: bool
    record: Path
    doc: dict
    log: Path


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        return os.cpu_count() or 1


def run_folder(method: str, seeds: list[int], seed: int, fraction: float = 1.0) -> str:
    """``METHOD`` for all users and the first seed (what every recipe wrote before seeds and fractions),
    then ``.fracF`` for a share of the users and ``.seedS`` for another seed."""
    return method + ("" if fraction == 1.0 else f".frac{fraction:g}") + ("" if seed == seeds[0] else f".seed{seed}")


def runs_of(recipe, method: str) -> list[tuple[float, int]]:
    """(fraction, seed) of every fine-tuning run of ``method``: zero-shot once (it neither trains nor
    draws); other methods at every seed, and at the fractions below 1 when in ``fraction_methods``."""
    if method == "none":
        return [(1.0, recipe.seeds[0])]
    fractions = [f for f in recipe.fractions if f == 1.0 or method in recipe.fraction_methods]
    if 1.0 not in fractions:
        fractions.append(1.0)
    return [(f, s) for f in sorted(fractions, reverse=True) for s in recipe.seeds]


def run_experiment(config: str, out: str, force: bool = False, overrides=(), rerun_changed: bool = False,
                   jobs: int = 1) -> Path:
    recipe = load_recipe(config, overrides)
    return Runner(recipe, Path(out), force, rerun_changed=rerun_changed, jobs=jobs).run()
