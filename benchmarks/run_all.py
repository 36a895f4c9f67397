"""Run every benchmark behind benchmarks/RESULTS.md, one after another (never two at once: on a small
machine concurrent runs time each other). Each writes benchmarks/out/<name>.json.
usage: python -m benchmarks.run_all [--only NAME ...] [--list]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
PY = [sys.executable, "-m"]
ACCELERATE_2PROC = [str(BIN / "accelerate"), "launch", "--config_file", "launch/cpu_zero3_2proc.yaml",
                    "--main_process_port", "29620", "-m"]

# name -> command, in RESULTS.md order; rough wall time on 2 cores in the comment
BENCHMARKS: dict[str, list[str]] = {
    "pretrain_ml100k": PY + ["benchmarks.pretrain_ml100k", "--preset", "small", "--seeds", "0", "1", "2"],  # 10 min
    "engine_overhead": PY + ["benchmarks.engine_overhead", "--repeats", "3", "--steps", "40"],            # 3 min
    "data_eval_throughput": PY + ["benchmarks.data_eval_throughput"],                                     # 3 min
    "distill_ml100k": [str(BIN / "crossrec"), "experiment", "--config", "launch/recipes/ml100k_distill.yaml",
                       "--out", "benchmarks/out/ml100k_distill"],                                         # 23 min
    "distill_seeds": PY + ["benchmarks.distill_seeds", "--run", "benchmarks/out/ml100k_distill"],        # 20 min
    "memory_scaling": PY + ["benchmarks.memory_scaling"],                                                 # 10 min
    "large_catalogue": PY + ["benchmarks.large_catalogue"],                                               # 25 min
    # one launch per measurement (see engine_overhead_dist's docstring); RESULTS §8 quotes 3 launches each
    "engine_overhead_zero2": ACCELERATE_2PROC + ["benchmarks.engine_overhead_dist", "--zero", "2"],       # 30 s
    "engine_overhead_zero3": ACCELERATE_2PROC + ["benchmarks.engine_overhead_dist", "--zero", "3"],       # 30 s
    "profile_pretrain": PY + ["benchmarks.profile_pretrain", "--preset", "small"],                       # 1 min
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=None)
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    a = ap.parse_args()
    names = a.only or list(BENCHMARKS)
    env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    for name in names:
        print(f"[{name}] {' '.join(BENCHMARKS[name])}", flush=True)
        if a.list:
            continue
        t0 = time.perf_counter()
        proc = subprocess.run(BENCHMARKS[name], env=env, cwd=Path(__file__).resolve().parents[1])
        print(f"[{name}] exit {proc.returncode} after {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode != 0:
            sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
