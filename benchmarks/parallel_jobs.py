"""Two fine-tuning runs one after the other with every core, vs side by side with half each.

``crossrec experiment --jobs N`` runs fine-tuning steps N at a time, each with cores / N torch threads
(``Runner._env``). Whether that pays depends on how well one run uses the cores: on 2 cores a
fine-tuning step of the main job spends much of its time in small kernels and Python, so two
one-thread runs should do more work per second than one two-thread run. This measures it with the
main job's own LoRA config: two seeds, ``train.max_steps`` updates each, first serially with
OMP_NUM_THREADS = cores, then concurrently with cores / 2 each, and records both wall times, their
ratio, and each run's test NDCG@10 (the thread count changes float summation order, so the last
digits may differ between the two ways).

usage: python -m benchmarks.parallel_jobs --study runs/ml_cross_platform --domain ml100k [--steps 150]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, record
from crossrec_dist.experiment.runner import available_cores


def command(study: Path, domain: str, steps: int, seed: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "crossrec_dist", "finetune", "--config", str(study / "configs" / "finetune_lora.yaml"),
            "--base", str(study / "pretrain"), "--data", str(study / "data"), "--domain", domain,
            "--method", "lora", "--out", str(out), "--set", f"train.max_steps={steps}", "--set", f"train.seed={seed}"]


def run_all(study: Path, domain: str, steps: int, threads: int, concurrent: bool, tag: str) -> tuple[float, list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    outs = [OUT / f"parallel_jobs_{tag}_seed{s}" for s in (0, 1)]
    for o in outs:
        shutil.rmtree(o, ignore_errors=True)
    cmds = [command(study, domain, steps, s, o) for s, o in zip((0, 1), outs)]
    t0 = time.perf_counter()
    if concurrent:
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL) for c in cmds]
        if any(p.wait() for p in procs):
            raise SystemExit(f"a {tag} run failed")
    else:
        for c in cmds:
            subprocess.run(c, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return wall, [json.loads((o / "metrics.json").read_text())["test"]["ndcg@10"] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, required=True, help="a finished crossrec experiment folder")
    ap.add_argument("--domain", required=True)
    ap.add_argument("--steps", type=int, default=150)
    a = ap.parse_args()
    cores = available_cores()
    serial, serial_ndcg = run_all(a.study, a.domain, a.steps, cores, False, "serial")
    side, side_ndcg = run_all(a.study, a.domain, a.steps, max(1, cores // 2), True, "side_by_side")
    record("parallel_jobs", {
        "command": f"python -m benchmarks.parallel_jobs --study {a.study} --domain {a.domain} --steps {a.steps}",
        "cores": cores, "steps_per_run": a.steps,
        "serial_seconds": round(serial, 1), "side_by_side_seconds": round(side, 1),
        "throughput_ratio": round(serial / side, 3),
        "test_ndcg@10": {"serial": serial_ndcg, "side_by_side": side_ndcg},
    })


if __name__ == "__main__":
    main()
