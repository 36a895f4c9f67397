"""Data and evaluation throughput.

1. Prepare a ~10M-interaction synthetic log (Parquet -> HF datasets): seconds, rows/s, peak RSS of
   the `crossrec prepare` process.
2. Full-ranking evaluation speed (batched, no Python loop per user): 6,040 users x 3,700 items
   (MovieLens-1M scale) and a 100k-item catalogue, with a dot-product scorer so that the figure is
   the ranking machinery's cost (masking history, ranks with ties against the target, metrics).
usage: python -m benchmarks.data_eval_throughput [--users 350000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import OUT, record


def prepare_big(users: int) -> dict:
    raw, prep = OUT / "synth10m_raw", OUT / "synth10m"
    if not (raw / "interactions.parquet").is_file():
        subprocess.run([sys.executable, "-m", "crossrec_dist", "data", "synth", "--out", raw, "--users", str(users),
                        "--items", "200000", "--domains", "5", "--mean-length", "30"], check=True)
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run([sys.executable, "-m", "crossrec_dist", "prepare", "--input", raw / "interactions.parquet",
                    "--format", "parquet", "--domain-col", "domain", "--out", prep], check=True)
    secs = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    import json
    stats = json.loads((prep / "stats.json").read_text())
    return {"interactions": stats["interactions"], "users": stats["users"], "items": stats["items"],
            "seconds": round(secs, 2), "rows_per_second": round(stats["interactions"] / secs),
            "peak_rss_mb_max_child": round(max(peak, before) / 1024)}


def eval_speed(users: int, items: int, repeats: int) -> dict:
    from crossrec_dist.data.prepared import PreparedData

    raw, prep = OUT / f"eval_{users}x{items}_raw", OUT / f"eval_{users}x{items}"
    if not (prep / "stats.json").is_file():
        subprocess.run([sys.executable, "-m", "crossrec_dist", "data", "synth", "--out", raw, "--users", str(users),
                        "--items", str(items), "--domains", "1", "--mean-length", "40", "--private-items", "0"],
                       check=True)
        subprocess.run([sys.executable, "-m", "crossrec_dist", "prepare", "--input", raw / "interactions.parquet",
                        "--format", "parquet", "--out", prep], check=True)
    from crossrec_dist.evaluation.evaluator import EvalOptions, evaluate
    data = PreparedData(prep)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(data.num_items + 1, 64, generator=g)

    def scorer(hist, doms):
        return emb[hist[:, -1]] @ emb.t()

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = evaluate(data, scorer, EvalOptions(split="test", batch_size=1024))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"users": res["overall"]["users"], "items": data.num_items, "median_seconds": round(med, 3),
            "users_per_second": round(res["overall"]["users"] / med), "runs_seconds": [round(t, 3) for t in times]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=350_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    record("data_eval_throughput", {
        "command": "python -m benchmarks.data_eval_throughput",
        "eval_6040x3700": eval_speed(6040, 3700, a.repeats),
        "eval_100k_items": eval_speed(20000, 100_000, a.repeats),
        "prepare_10m": prepare_big(a.users),
    })


if __name__ == "__main__":
    main()
