"""Re-adapting a region as its data grows: period 2 warm-started from period 1's adapter
(``finetune --init-adapter``) vs adapted from the base again vs the stale period-1 adapter.

A target's log (the main job's ML-100K, from ``crossrec data fetch movielens-100k-titles``) is cut in
time: period 1 = every interaction up to the ``--cut`` quantile of its timestamps, period 2 = all of it.
Each period is prepared against the base's vocabulary (``prepare --vocab-from BASE --until T``). Per
seed: LoRA with ``crossrec finetune``'s defaults on period 1 (A1); then on period 2: A1 as it is
(stale, ``crossrec evaluate``), LoRA from the base (fresh), and LoRA from A1 (warm). Paired per-user
differences on period 2's test users (95% bootstrap), for all of them and for those whose test item
falls in period 2 (events the stale adapter never saw); zero-shot and the base for reference.

    python -m benchmarks.readaptation --base runs/ml_cross_platform/pretrain \\
        --raw runs/ml_cross_platform/raw/ml100k --seeds 0 1 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import crossrec_logged as crossrec, record
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.evaluation.bootstrap import bootstrap_mean, paired_on_users, per_user_ndcg

QUIET = ["--set", "train.tensorboard=false", "--set", "train.log_every=1000"]
DOMAIN = "ml100k"


def per_user(metrics: Path) -> tuple[np.ndarray, np.ndarray]:
    ranks = json.loads(metrics.read_text())["test_ranks"]
    return per_user_ndcg(ranks["seq_index"], ranks["rank"])


def seed_mean(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    parts = [dict(zip(*per_user(f))) for f in files]
    users = np.array(sorted(set.intersection(*(set(p) for p in parts))), dtype=np.int64)
    return users, np.mean([[p[u] for u in users] for p in parts], axis=0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--raw", type=Path, required=True, help="the target's fetched log (crossrec data fetch)")
    ap.add_argument("--cut", type=float, default=0.5, help="period 1 ends at this quantile of the log's timestamps")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/readaptation"))
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    inter = next(a.raw.glob("*.inter"))
    ts = np.loadtxt(inter, delimiter="\t", skiprows=1, usecols=3)
    t1 = float(np.quantile(ts, a.cut))
    for period, until in (("p1", t1), ("p2", None)):
        if not (out / period / "stats.json").is_file():
            crossrec(["prepare", "--input", a.raw, "--format", "auto", "--source-name", DOMAIN, "--domain-from", "source",
                      "--vocab-from", a.base, "--out", out / period, *(["--until", until] if until else [])],
                     out / f"prepare_{period}.log", threads)

    def finetune(name: str, period: str, seed: int, extra=()) -> Path:
        dest = out / f"{name}.seed{seed}"
        if not (dest / "metrics.json").is_file():
            crossrec(["finetune", "--base", a.base, "--data", out / period, "--domain", DOMAIN, "--method", "lora",
                      "--out", dest, "--set", f"train.seed={seed}", *QUIET, *extra], out / f"{dest.name}.log", threads)
        return dest / "metrics.json"

    def period_one_then_two(seed: int) -> None:
        a1 = finetune("a1", "p1", seed).parent
        stale = out / f"stale.seed{seed}.json"
        if not stale.is_file():
            crossrec(["evaluate", "--model", a.base, "--adapter", a1, "--data", out / "p2", "--domain", DOMAIN,
                      "--out", stale], out / f"stale.seed{seed}.log", threads)
        finetune("warm", "p2", seed, ["--init-adapter", a1])

    with ThreadPoolExecutor(a.jobs) as pool:        # fresh runs beside the period-1 -> period-2 chains
        jobs = [pool.submit(period_one_then_two, s) for s in a.seeds]
        jobs += [pool.submit(finetune, "fresh", "p2", s) for s in a.seeds]
        for j in jobs:
            j.result()
    zero = out / "zero_shot.json"
    if not zero.is_file():
        crossrec(["evaluate", "--model", a.base, "--data", out / "p2", "--domain", DOMAIN, "--out", zero],
                 out / "zero_shot.log", threads)

    groups = {"stale": seed_mean([out / f"stale.seed{s}.json" for s in a.seeds]),
              "fresh": seed_mean([out / f"fresh.seed{s}" / "metrics.json" for s in a.seeds]),
              "warm": seed_mean([out / f"warm.seed{s}" / "metrics.json" for s in a.seeds]),
              "zero-shot": per_user(zero)}
    recent = _recent_users(out / "p2", t1)
    rows = {}
    for name, (users, mean) in groups.items():
        row = {"all": bootstrap_mean(mean).text(), "recent": bootstrap_mean(mean[np.isin(users, recent)]).text()}
        for other, (u2, m2) in groups.items():
            if other != name:
                row[f"vs {other}"] = paired_on_users(users, mean, u2, m2).diff_text()
                keep, keep2 = np.isin(users, recent), np.isin(u2, recent)
                row[f"vs {other} (recent)"] = paired_on_users(users[keep], mean[keep], u2[keep2], m2[keep2]).diff_text()
        rows[name] = row
    steps = {name: [json.loads((out / f"{name}.seed{s}" / "metrics.json").read_text())["train"]["best_step"]
                    for s in a.seeds] for name in ("a1", "fresh", "warm")}
    record("readaptation", {"command": "python -m benchmarks.readaptation " + " ".join(argv or sys.argv[1:]),
                            "cut_time": t1, "cut_quantile": a.cut, "seeds": a.seeds,
                            "test_users": int(len(groups["zero-shot"][0])), "recent_users": int(len(recent)),
                            "kept_steps": steps, "rows": rows})


def _recent_users(data_dir: Path, t1: float) -> np.ndarray:
    """Sequences whose test item happened after the period-1 cut."""
    import datasets
    seqs = datasets.load_from_disk(str(data_dir / "sequences"))
    data = PreparedData(data_dir)
    test_pos = np.asarray(data.valid_end)
    times = seqs["timestamps"]
    return np.array([i for i, (t, p) in enumerate(zip(times, test_pos)) if p < len(t) and t[p] > t1], dtype=np.int64)


if __name__ == "__main__":
    main()
