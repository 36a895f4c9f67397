"""Per-rank memory with and without ``zero3_init`` (the model built partitioned by deepspeed.zero.Init).

Two `accelerate launch --num_processes 2 --use_deepspeed --zero_stage 3 --zero3_init_flag X` runs of
the same model (ML-100K, a 270M-parameter decoder: hidden 1024, 16 layers, MLP 4096), two updates,
trained on region 0 only so that validation stays short. Each rank's rank report gives its RSS
(current and peak so far) after the model is built, after accelerate/DeepSpeed prepared it, and after
training. Without zero.Init every rank first builds the whole fp32 model (4 bytes x N) and only then
hands DeepSpeed its partition; with it, a rank never holds more than its 1/world share of any
parameter outside a gather.

usage: python -m benchmarks.zero3_init_memory [--hidden 1024] [--layers 12] [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ml100k, record

POINTS = ("model_built", "engine_prepared", "trained")


def one_run(data: str, init: bool, a, out: Path) -> list[dict]:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--use_deepspeed",
           "--zero_stage", "3", "--zero3_init_flag", str(init).lower(), "--main_process_port", str(a.port),
           "-m", "crossrec_dist", "pretrain", "--data", data, "--out", str(out), "--preset", "tiny", "--domains", "0",
           "--set", f"model.hidden_size={a.hidden}", "--set", f"model.num_layers={a.layers}",
           "--set", f"model.num_heads={a.hidden // 64}", "--set", f"model.intermediate_size={4 * a.hidden}",
           "--set", f"train.max_steps={a.steps}",
           "--set", "train.micro_batch_size=4", "--set", "train.eval_batch_size=64", "--set", "train.rank_report=true",
           "--set", "train.tensorboard=false", "--set", "train.log_every=1"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    if a.mmap_threshold:
        # glibc keeps freed heap memory in the process (RSS never drops) once its dynamic mmap
        # threshold has grown; a fixed threshold makes every large tensor an mmap that is returned
        # when freed, so RSS shows what is live. Both variants run with the same setting.
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    subprocess.run(cmd, check=True, env=env)
    return [json.loads((out / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--port", type=int, default=29633)
    ap.add_argument("--mmap-threshold", type=int, default=0, help="bytes; 0 = glibc's default (dynamic)")
    a = ap.parse_args()
    data = ml100k()
    rows, params = [], None
    for rep in range(a.repeats):
        for init in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                ranks = one_run(data, init, a, Path(tmp) / "run")
                params = params or json.loads((Path(tmp) / "run" / "metrics.json").read_text())["params"]["total"]
            for r in ranks:
                rows.append({"zero3_init": init, "rank": r["rank"], "repeat": rep,
                             **{f"{p}_{k}": r["memory"][p][k] for p in POINTS for k in ("rss_mib", "peak_rss_mib")}})
    summary = {}
    for init in (False, True):
        sel = [r for r in rows if r["zero3_init"] == init]
        summary[str(init).lower()] = {k: statistics.median(r[k] for r in sel) for k in sel[0]
                                      if k.endswith("_mib")}
    record(f"zero3_init_memory{'_mmap' if a.mmap_threshold else ''}", {
        "command": f"python -m benchmarks.zero3_init_memory --hidden {a.hidden} --layers {a.layers} "
                   f"--steps {a.steps} --repeats {a.repeats} --mmap-threshold {a.mmap_threshold}",
        "malloc_mmap_threshold": a.mmap_threshold or "glibc default (dynamic)",
        "params": params, "fp32_model_mib": round(params * 4 / 2**20, 1), "world": 2, "zero_stage": 3,
        "median_per_rank_by_zero3_init": summary, "runs": rows})
    for init, s in summary.items():
        print(f"zero3_init={init}: " + ", ".join(f"{p} peak {s[p + '_peak_rss_mib']:.0f} MiB" for p in POINTS))


if __name__ == "__main__":
    main()
