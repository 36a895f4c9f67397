"""``crossrec experiment``: fetch -> prepare -> pretrain -> per target: methods -> distil -> report.

Every step (declared in :mod:`.plan`) runs the same CLI command a user would, in its own process
(under ``accelerate launch`` when it trains and the recipe names a launch config), writing straight
into its output folder (``--resume auto`` needs that). Its record, ``OUT/steps/.../<step>.json``, says
"started" before the command and "complete" only once the command succeeded (each written
atomically), so a step that died never looks finished. A record holds the step's settings and
hash (see plan.py), the hashes of the steps it reads from, and the run ids of their outputs it was
made from.

One loop walks the steps in order. A step is skipped only when its output marker exists
(metrics.json; stats.json, fetch.json or the synthetic log for data; serving.json), its record is
complete, its hash is the hash of the settings the recipe gives it now, and the upstream outputs it
was made from are the ones in place. Otherwise it runs; a step started earlier with the same
settings resumes its own output, so re-running after a crash continues where it stopped. An output
that no longer matches the recipe -- its settings or an upstream step's changed, an upstream step was
or is about to be re-run, or its record is gone -- is never reused and never resumed: before running
anything, the declared steps are walked once without running any, and the run stops with exit
status 2 naming each such step and each changed setting as ``key: old -> new`` (steps that can only
be declared once the data is prepared are checked again then, before any of them runs).
``--rerun-changed`` then deletes the output of exactly those steps and re-runs them and every step
downstream of them; ``--force`` redoes every step. A folder written by a crossrec whose records
have another format is refused as a whole (``--force`` redoes it).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from ..errors import InputError, RunStopped
from ..paths import inside
from . import records
from .layout import log_path, record_path
from .plan import ConfigFile, Plan, Step, pretrain_sources, unknown_domains
from .recipe import Recipe, load_recipe
from .report import write_report


class StepFailed(RunStopped):
    """A step's command failed (its own output says why above); re-running the experiment resumes it."""


@dataclass
class Verdict:
    """What a step needs: "skip" (its output is reused), "run", or "changed" (its output no longer
    matches the recipe, for ``reasons``); ``run`` is the id of the reused run."""
    action: str
    reasons: list[str] = field(default_factory=list)
    run: str | None = None


@dataclass
class _Job:
    """A step's command, ready to run: its record (written complete when it succeeds) and log file."""
    name: str
    args: list
    train: bool
    record: Path
    doc: dict
    log: Path


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
        self.runs: dict[str, str | None] = {}          # step -> id of the run whose output is in place

    # -- commands -------------------------------------------------------------------------------

    def _cli(self, *args, train: bool = False) -> None:
        """Run one step's command in the foreground (its output on ours)."""
        cmd = self._command(args, train)
        code = subprocess.run(cmd, env=self._env(alone=True)).returncode
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

    def _env(self, alone: bool = False) -> dict:
        """A step's environment. A step that runs alone (pretraining, the serving benchmarks) keeps every
        core (until 2026-12-03 it got 1 / jobs of them too: pretraining on 2 cores ran on 1 thread).
        With jobs > 1, each of the concurrent steps gets an equal share of the
        CPU cores as its torch thread count (OMP_NUM_THREADS, unless already set): on 2 cores two
        one-thread fine-tuning runs side by side do 1.30x (a Xeon) to 1.56x (an EPYC) the work of
        two-thread runs one after the other (benchmarks/parallel_jobs.py, RESULTS.md §2.5). Thread count changes float summation order, so results
        can differ in the last digits from a run with another --jobs."""
        env = {**os.environ}
        if self.jobs > 1 and not alone and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, available_cores() // self.jobs))
        return env

    @staticmethod
    def _failed(code: int, cmd: list[str]) -> StepFailed:
        return StepFailed(f"error: step failed with status {code}: {' '.join(cmd)}\n"
                          f"run the same experiment command again to resume from there")

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.out).as_posix()
        except ValueError:
            return str(path)

    # -- the pipeline ---------------------------------------------------------------------------

    def run(self) -> Path:
        t_all = time.perf_counter()
        self._open_folder()
        plan = Plan(self.r, self.out, self.jobs)
        data = plan.data()
        self._refuse_older_folder(data)
        domains = self._domains()
        later = plan.models(domains) if domains is not None and not unknown_domains(self.r, domains) else []
        self._check(data + later)       # everything that can be declared now, before anything runs
        self._execute(data)
        domains = self._domains() or []
        unknown = unknown_domains(self.r, domains)
        if unknown:
            raise InputError(f"recipe names domain(s) {unknown} the data does not have ({domains})", field="targets")
        later = plan.models(domains)
        self._check(later)
        self._execute(later)
        timings = {**self.timings, "all steps": round(sum(self.timings.values()), 2),
                   "this run": round(time.perf_counter() - t_all, 2)}
        return write_report(self.out, self.r, pretrain_sources(self.r, domains), timings)

    def _open_folder(self) -> None:
        if self.force:
            for sub in ("pretrain", "targets", "data", "steps"):
                shutil.rmtree(self.out / sub, ignore_errors=True)
        self.out.mkdir(parents=True, exist_ok=True)
        saved = None if self.force else records.read_json(self.out / "timings.json")
        self.timings = saved if isinstance(saved, dict) else {}

    def _domains(self) -> list[str] | None:
        """The prepared data's domains (data/stats.json), None before it is prepared."""
        stats = records.read_json(self.out / "data" / "stats.json")
        return list(stats.get("domains") or []) if isinstance(stats, dict) else None

    def _refuse_older_folder(self, data: list[Step]) -> None:
        """An older crossrec's folder (records of another format, or outputs and no records) is not
        reused step by step: settings it did not record cannot be compared."""
        if self.force:
            return
        docs = [records.read_json(p) for p in (self.out / "steps").rglob("*.json")]
        versions = {d.get("version") for d in docs if isinstance(d, dict)}
        others = sorted(map(str, versions - {records.VERSION}))
        if others:
            why = f"step records of format {', '.join(others)}; this one writes {records.VERSION}"
        elif not versions and any(step.done.is_file() for step in data):
            why = "step outputs without step records"
        else:
            return
        raise InputError(f"{self.out} was written by another version of crossrec ({why}), so its steps cannot be "
                         "reused; re-run with --force to redo every step in this folder, or give another --out")

    # -- the loop -------------------------------------------------------------------------------

    def _verdict(self, step: Step, runs: dict[str, str | None]) -> Verdict:
        """What ``step`` needs, given the runs in place upstream (``runs``; None: that step runs again)."""
        if self.force:
            return Verdict("run")
        rec = records.read_json(record_path(self.out, step.parts))
        marker, made = step.done.is_file(), step.done.is_file() or step.output.exists()
        if not isinstance(rec, dict):
            return Verdict("changed", [f"{self._rel(step.done)} exists but has no step record (removed, or its "
                                       "step was queued and did not start): its settings are unknown"]) \
                if marker else Verdict("run")
        if rec.get("hash") != step.hash:
            if not made:
                return Verdict("run")
            reasons = records.differences(rec, step.settings, step.upstream)
            if rec.get("state") != "complete":
                reasons.append("(its output is an unfinished run with the old settings)")
            return Verdict("changed", reasons)
        was = rec.get("upstream_runs") or {}
        stale = [d for d in step.reads if was.get(d) != runs.get(d)]
        if stale and made:
            # Same settings, but an upstream output it was made from has been (or is about to be) replaced.
            return Verdict("changed", [f"upstream step '{d}' " + ("runs again" if runs.get(d) is None else
                                                                  "was re-run after this step ran") for d in stale])
        if marker and rec.get("state") == "complete":
            return Verdict("skip", run=rec.get("run"))
        return Verdict("run")

    def _check(self, steps: list[Step]) -> None:
        """Walk ``steps`` without running any; stop (exit 2) naming every step whose output no longer
        matches the recipe. Nothing to check with --force or --rerun-changed (both re-run such steps)."""
        if self.force or self.rerun_changed:
            return
        runs, changed = dict(self.runs), []
        for step in steps:
            verdict = self._verdict(step, runs)
            runs[step.id] = verdict.run
            if verdict.action == "changed":
                changed.append((step.id, verdict.reasons))
        if changed:
            raise InputError(self._changed_message(changed))

    def _execute(self, steps: list[Step]) -> None:
        """Run the steps that need it, in order. With jobs > 1 a side-by-side step is queued and runs
        beside the other queued ones at the next ``_drain``: before a step that runs alone, or one that
        reads a queued step's output."""
        for step in steps:
            beside = step.side_by_side and self.jobs > 1
            if not beside or any(job.name in step.reads for job in self.pending):
                self._drain()
            verdict = self._verdict(step, self.runs)
            if verdict.action == "skip":
                self.runs[step.id] = verdict.run
                self.log(f"[skip] {step.id}: {self._rel(step.done)} exists and its settings are unchanged")
                continue
            if verdict.action == "changed":      # only with --rerun-changed: _check stopped otherwise
                self.log(f"[rerun] {step.id}: changed ({'; '.join(verdict.reasons)}); "
                         f"deleting {self._rel(step.output)}")
                if step.output.is_dir():
                    shutil.rmtree(step.output)
                elif step.output.exists():
                    step.output.unlink()
            job = self._job(step)
            if beside:
                self.pending.append(job)
            else:
                self._run_alone(job)
        self._drain()

    def _job(self, step: Step) -> _Job:
        """The step's command with its config file written, and its record-to-be (the old one removed)."""
        doc = {"version": records.VERSION, "step": step.id, "hash": step.hash, "run": uuid.uuid4().hex,
               "settings": step.settings, "upstream": step.upstream,
               "upstream_runs": {d: self.runs.get(d) for d in step.reads}}
        self.runs[step.id] = None
        record = record_path(self.out, step.parts)
        record.unlink(missing_ok=True)
        args = step.argv() + (["--config", self._config(step.config)] if step.config else [])
        return _Job(step.id, args, step.trains, record, doc, log_path(self.out, step.parts))

    def _config(self, config: ConfigFile) -> Path:
        """The step's typed config, written in full as the YAML its command reads."""
        path = inside(self.out / "configs", f"{config.file}.yaml")
        records.write_atomic(path, yaml.safe_dump(asdict(config.value), sort_keys=False))
        return path

    def _run_alone(self, job: _Job) -> None:
        self.log(f"[run] {job.name}")
        t0 = time.perf_counter()
        records.write_json(job.record, {**job.doc, "state": "started"})
        self._cli(*job.args, train=job.train)
        self._finish(job, time.perf_counter() - t0)

    def _finish(self, job: _Job, seconds: float) -> None:
        # Only now, with the command succeeded, does the output count as this step's.
        seconds = round(seconds, 2)
        records.write_json(job.record, {**job.doc, "state": "complete", "seconds": seconds,
                                        "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        self.runs[job.name] = job.doc["run"]
        self.timings[job.name] = seconds
        # Seconds per step as measured when the step last ran: a re-run that skips a step keeps its time.
        records.write_json(self.out / "timings.json", self.timings)

    def _drain(self) -> None:
        """Run the queued steps, ``jobs`` at a time, each one's output in its own log file (OUT/logs/);
        wait for all. A failed step stops new ones from starting; those running finish, and the run
        stops naming the failed step(s) with the end of each one's log."""
        queue, self.pending = self.pending, []
        running: list[tuple[_Job, subprocess.Popen, float]] = []
        failed: list[tuple[_Job, int]] = []
        while queue or running:
            while queue and len(running) < self.jobs and not failed:
                running.append(self._start(queue.pop(0), beside=len(running)))
            if failed and not running:
                break
            time.sleep(0.2)
            for job, proc, t0 in list(running):
                code = proc.poll()
                if code is None:
                    continue
                running.remove((job, proc, t0))
                if code == 0:
                    self._finish(job, time.perf_counter() - t0)
                    self.log(f"[done] {job.name} in {time.perf_counter() - t0:.0f} s")
                else:
                    failed.append((job, code))
        if failed:
            raise self._failed_beside(failed, len(queue))

    def _start(self, job: _Job, beside: int) -> tuple[_Job, subprocess.Popen, float]:
        records.write_json(job.record, {**job.doc, "state": "started"})
        proc = self._spawn(job.args, job.train, job.log)
        self.log(f"[run] {job.name} (beside {beside} other; log {self._rel(job.log)})")
        return job, proc, time.perf_counter()

    def _failed_beside(self, failed: list[tuple[_Job, int]], not_started: int) -> StepFailed:
        lines = []
        for job, code in failed:
            tail = "".join(job.log.read_text(errors="replace").splitlines(True)[-15:])
            lines.append(f"step '{job.name}' failed with status {code}; the end of {self._rel(job.log)}:\n{tail}")
        return StepFailed("\n".join(lines) + "run the same experiment command again to resume from there "
                          f"({not_started} queued step(s) did not start)")

    def _changed_message(self, changed: list[tuple[str, list[str]]]) -> str:
        lines = [f"the output of these steps in {self.out} does not match what the recipe asks for now, "
                 "so it is not reused:"]
        for name, reasons in changed:
            if len(reasons) == 1:
                lines.append(f"  step '{name}': {reasons[0]}")
            else:
                lines += [f"  step '{name}':"] + [f"    {r}" for r in reasons]
        lines += ["to proceed, add --rerun-changed (deletes the output of exactly these steps, then re-runs them "
                  "and every step downstream of them), or --force (redoes every step); to keep these results, "
                  "run the old recipe or give another --out"]
        return "\n".join(lines)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:       # not on Linux
        return os.cpu_count() or 1


def run_experiment(config: str, out: str, force: bool = False, overrides=(), rerun_changed: bool = False,
                   jobs: int = 1) -> Path:
    recipe = load_recipe(config, overrides)
    return Runner(recipe, Path(out), force, rerun_changed=rerun_changed, jobs=jobs).run()
