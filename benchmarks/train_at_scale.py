"""Training and evaluating on a prepared log of 250M interactions: memory per rank, and a 2-rank ZeRO-3
run that evaluates a seeded sample of users over a 1M-item catalogue.

Input: a big prepared folder (``benchmarks.prepare_scale --keep-last`` leaves the 2.5e8 one) and a
baseline folder prepared from the log's first 200,000 users (``crossrec data synth`` with the same
options and ``--users 200000`` writes exactly that chunk): the same model and catalogue, so what a run
costs above the baseline is what its data costs.

Each run is ``accelerate launch --num_processes 2 --use_deepspeed --zero_stage 3 -m crossrec_dist pretrain
--preset tiny --set model.loss=sampled`` (a full softmax over 1M items would need ~6 GiB of logits per
micro-batch) with ``train.eval_users`` users for validation and the final evaluation, to the end
(``train.max_steps``); every rank's RssAnon / RssFile is sampled from /proc every 0.2 s (peaks).

usage: python -m benchmarks.train_at_scale [--data BIG] [--baseline SMALL] [--steps 40] [--eval-users 2000]
(defaults: the folder ``prepare_scale --keep-last`` leaves, and a baseline built here)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, RankMemory, record

REPO = Path(__file__).resolve().parent.parent


def run(data: Path, out: Path, steps: int, eval_users: int, port: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
           "--use_deepspeed", "--zero_stage", "3", "--main_process_port", str(port), "-m", "crossrec_dist", "pretrain",
           "--data", str(data), "--out", str(out), "--preset", "tiny", "--set", "model.loss=sampled",
           "--set", "train.micro_batch_size=32", "--set", f"train.max_steps={steps}",
           "--set", f"train.eval_every={steps}", "--set", f"train.eval_users={eval_users}",
           "--set", "train.log_every=10", "--set", "train.tensorboard=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = out.parent / f"{out.name}.log"
    stamps: dict = {}
    t0 = time.perf_counter()
    with RankMemory() as sampler, open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        while proc.poll() is None:
            time.sleep(0.5)
            text = log.read_text(errors="replace")
            if "first_step" not in stamps and re.search(r"^step \d+/\d+ ", text, re.M):
                stamps["first_step"] = round(time.perf_counter() - t0, 1)
            if "last_step" not in stamps and re.search(rf"^step {steps}/\d+ ", text, re.M):
                stamps["last_step"] = round(time.perf_counter() - t0, 1)
        proc.wait()
    stamps["done"] = round(time.perf_counter() - t0, 1)
    text = log.read_text(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"training on {data} failed:\n{text[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    return {"command": " ".join(cmd), "seconds": stamps, "ranks": sampler.ranks(),
            "eval_users": metrics.get("eval_users"), "test": metrics.get("test"),
            "log_tail": text.strip().splitlines()[-6:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(OUT / "prepare_scale" / "duckdb"), help="the big prepared folder")
    ap.add_argument("--baseline", default=None, help="the first 200,000 users of the same log, prepared "
                    "(default: synthesised and prepared here with prepare_scale's options)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-users", type=int, default=2000)
    ap.add_argument("--port", type=int, default=29765)
    a = ap.parse_args()
    root = OUT / "train_at_scale"
    root.mkdir(parents=True, exist_ok=True)
    if a.baseline is None:
        a.baseline = root / "baseline_data"
        if not (a.baseline / "stats.json").is_file():
            py = [sys.executable, "-m", "crossrec_dist"]
            subprocess.run([*py, "data", "synth", "--out", str(root / "baseline_raw"), "--users", "200000", "--items",
                            "1000000", "--domains", "4", "--mean-length", "100", "--seed", "0"], check=True)
            subprocess.run([*py, "prepare", "--input", str(root / "baseline_raw" / "interactions.parquet"), "--format",
                            "parquet", "--domain-col", "domain", "--out", str(a.baseline), "--force"], check=True)
    result = {"data": {}, "runs": {}}
    for name, data in (("baseline", Path(a.baseline)), ("big", Path(a.data))):
        stats = json.loads((data / "stats.json").read_text())
        result["data"][name] = {k: stats[k] for k in ("interactions", "users", "items", "sequences")}
        result["runs"][name] = run(data, root / name, a.steps, a.eval_users, a.port)
        print(name, json.dumps(result["runs"][name], indent=1), flush=True)
    base = [r["RssAnon"] for r in result["runs"]["baseline"]["ranks"]]
    big = [r["RssAnon"] for r in result["runs"]["big"]["ranks"]]
    result["rss_anon_above_baseline_mib"] = [round(b - s, 1) for b, s in zip(sorted(big), sorted(base))]
    record("train_at_scale", result)


if __name__ == "__main__":
    main()
