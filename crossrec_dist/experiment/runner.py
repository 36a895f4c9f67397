"""``crossrec experiment``: fetch -> prepare -> pretrain -> per target: methods -> distil -> report.

Every step runs the same CLI command a user would, in its own process (optionally under
``accelerate launch``), and is skipped when its output is complete (its metrics.json, or stats.json
for data), so re-running after a crash continues where it stopped; ``--force`` redoes everything.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from ..config import load_config
from ..errors import InputError, RunStopped
from .recipe import Recipe, check_recipe


class StepFailed(RunStopped):
    """A step's command failed (its own output says why above); re-running the experiment resumes it."""


class Runner:
    def __init__(self, recipe: Recipe, out: Path, force: bool = False, log=print):
        self.r, self.out, self.force, self.log = recipe, out, force, log
        self.timings: dict[str, float] = {}

    def _cli(self, *args, train: bool = False) -> None:
        if train and self.r.launch:
            cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", self.r.launch,
                   "-m", "crossrec_dist", *map(str, args)]
        else:
            cmd = [sys.executable, "-m", "crossrec_dist", *map(str, args)]
        proc = subprocess.run(cmd, env={**os.environ})
        if proc.returncode != 0:
            raise StepFailed(f"error: step failed with status {proc.returncode}: {' '.join(cmd)}\n"
                             f"run the same experiment command again to resume from there")

    def _step(self, name: str, done: Path, fn) -> None:
        if done.is_file() and not self.force:
            self.log(f"[skip] {name}: {done} exists")
            return
        self.log(f"[run] {name}")
        t0 = time.perf_counter()
        fn()
        self.timings[name] = round(time.perf_counter() - t0, 2)
        self._save_timings()

    def _save_timings(self) -> None:
        """Seconds per step as measured when the step last ran: a re-run that skips a step keeps its time."""
        path = self.out / "timings.json"
        path.write_text(json.dumps(self.timings, indent=2))

    def _config(self, name: str, cfg) -> Path:
        """The step's typed config, written in full as the YAML its command reads."""
        path = self.out / "configs" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        return path

    def run(self) -> Path:
        r, out = self.r, self.out
        if self.force:
            for sub in ("pretrain", "targets", "data"):
                shutil.rmtree(out / sub, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        if (out / "timings.json").is_file() and not self.force:
            self.timings = json.loads((out / "timings.json").read_text())
        t_all = time.perf_counter()
        data = out / "data"
        raw = out / "raw"
        if r.data.source == "synth":
            args = [f"--{k.replace('_', '-')}={v}" for k, v in r.data.synth.items()]
            self._step("synth", raw / "interactions.parquet", lambda: self._cli("data", "synth", "--out", raw, *args))
            prep = ["--input", raw / "interactions.parquet", "--format", "parquet"]
        else:
            self._step("fetch", raw / "fetch.json", lambda: self._cli("data", "fetch", r.data.source, "--out", raw))
            prep = ["--input", raw, "--format", "auto"]
        if r.data.domain_from:
            prep += ["--domain-from", r.data.domain_from]
        if r.data.domain_col:
            prep += ["--domain-col", r.data.domain_col]
        prep += ["--min-user", r.data.min_user, "--min-item", r.data.min_item]
        self._step("prepare", data / "stats.json", lambda: self._cli("prepare", *prep, "--out", data))

        stats = json.loads((data / "stats.json").read_text())
        domains = list(stats["domains"])
        unknown = [d for d in r.targets + (r.sources or []) if d not in domains]
        if unknown:
            raise InputError(f"recipe names domain(s) {unknown} the data does not have ({domains})", field="targets")
        sources = r.sources or [d for d in domains if d not in r.targets]
        base = out / "pretrain"
        self._step("pretrain", base / "metrics.json", lambda: self._cli(
            "pretrain", "--config", self._config("pretrain", r.pretrain), "--data", data, "--out", base,
            "--domains", ",".join(sources), "--resume", "auto", train=True))

        for target in r.targets:
            for method in r.methods:
                doc = r.finetune_config(method)
                dest = out / "targets" / target / method
                self._step(f"finetune {target} {method}", dest / "metrics.json", lambda: self._cli(
                    "finetune", "--config", self._config(f"finetune_{method}", doc), "--base", base, "--data", data,
                    "--domain", target, "--method", method, "--out", dest, "--resume", "auto", train=method != "none"))
            if r.distill is not None:
                self._distill(target, base, data)
        timings = {**self.timings, "all steps": round(sum(self.timings.values()), 2),
                   "this run": round(time.perf_counter() - t_all, 2)}
        from .report import write_report
        return write_report(out, r, sources, timings)

    def _distill(self, target: str, base: Path, data: Path) -> None:
        teacher = self.out / "targets" / target / self.r.distill_from
        adapter = ["--adapter", teacher] if (teacher / "adapter_config.json").is_file() else []
        teacher_model = base if adapter else teacher
        for kind, doc in (("student_kd", self.r.distill), ("student_ce", replace(self.r.distill, alpha=1.0))):
            dest = self.out / "targets" / target / kind
            self._step(f"distill {target} {kind}", dest / "metrics.json", lambda: self._cli(
                "distill", "--config", self._config(kind, doc), "--teacher", teacher_model, *adapter,
                "--data", data, "--domain", target, "--out", dest, "--resume", "auto", train=True))
            bench = dest / "serving.json"
            self._step(f"serving benchmark {target} {kind}", bench, lambda: self._cli(
                "bench-serve", "--student", dest, "--teacher", teacher_model, *adapter, "--onnx", "--out", bench))


def run_experiment(config: str, out: str, force: bool = False, overrides=()) -> Path:
    recipe = load_config(Recipe, config, overrides)
    check_recipe(recipe, config)
    return Runner(recipe, Path(out), force).run()
