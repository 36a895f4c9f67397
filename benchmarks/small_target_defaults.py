"""Small targets with ``crossrec finetune``'s defaults, before and after ``must_beat_base``.

On a finished base and its prepared data (the main job's, ``make demo``: the `medium` ML-1M base and
ML-1M + ML-100K prepared together), fine-tunes the target at each ``--fractions`` share of its training
users and each ``--seeds`` seed with no config beyond logging:

* ``lora``: today's defaults (valid_targets 3, must_beat_base true);
* ``lora-before``: the defaults before (``--set valid_targets=1 --set must_beat_base=false``);
* ``scratch``: the same architecture trained on the target's sampled users alone;
* ``popularity``: the sampled users' own popularity list; and ``none`` (zero-shot) once.

and reports, per fraction and configuration: the median test NDCG@10 over seeds, the seed-averaged
per-user paired difference to zero-shot, popularity and scratch (95% bootstrap over all test users),
how many seeds ended significantly below zero-shot, and the step each seed kept.

    python -m benchmarks.small_target_defaults --base runs/ml_cross_platform/pretrain \
        --data runs/ml_cross_platform/data --target ml100k --fractions 0.05 0.25 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.common import record
from crossrec_dist.evaluation.bootstrap import bootstrap_mean, paired_on_users, per_user_ndcg

CONFIGS = {
    "lora": ["--method", "lora"],
    "lora-before": ["--method", "lora", "--set", "valid_targets=1", "--set", "must_beat_base=false"],
    "scratch": ["--method", "scratch"],
    "popularity": ["--method", "popularity"],
    # the main job's lesson (RESULTS §2.3.6): LoRA on the item table too, at rank 16 there, so that every item,
    # new ones included, gets its own trainable column (--configs lora-table to run it)
    "lora-table": ["--method", "lora", "--set",
                   "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,item_embeddings]",
                   "--set", "lora.rank_pattern={item_embeddings: 16}", "--set", "lora.alpha_pattern={item_embeddings: 32}"],
    # source replay: as many ML-1M sequences as the target has, mixed into LoRA's fine-tuning
    "lora-replay": ["--method", "lora", "--set", "source_replay=1.0"],
    # the domain-alignment options on top of replay (weights from docs/methods.md: MMD 10; adversarial's
    # lambda 0.1), and the learned popularity prior (per-item offsets only)
    "lora-mmd": ["--method", "lora", "--set", "source_replay=1.0", "--set", "align=mmd", "--set", "align_weight=10"],
    "lora-adversarial": ["--method", "lora", "--set", "source_replay=1.0", "--set", "align=adversarial",
                         "--set", "align_weight=0.1"],
    "offsets": ["--method", "offsets"],
}
TRAINED = ("lora", "lora-before", "scratch", "lora-table", "lora-replay", "lora-mmd", "lora-adversarial", "offsets")
QUIET = ["--set", "train.tensorboard=false", "--set", "train.log_every=1000"]


def folder(out: Path, config: str, fraction: float, seed: int) -> Path:
    return out / f"{config}.frac{fraction}.seed{seed}"


def run_one(a, out: Path, config: str, fraction: float, seed: int, threads: int) -> None:
    dest = out / "none" if config == "none" else folder(out, config, fraction, seed)
    if (dest / "metrics.json").is_file():
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    method = ["--method", "none"] if config == "none" else \
        [*CONFIGS[config], "--set", f"train_fraction={fraction}", "--set", f"train.seed={seed}"]
    cmd = [sys.executable, "-m", "crossrec_dist", "finetune", "--base", str(a.base), "--data", str(a.data),
           "--domain", a.target, "--out", str(dest), *method, *QUIET]
    with open(out / f"{dest.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def load(out: Path, config: str, fraction: float, seed: int) -> dict:
    dest = out / "none" if config == "none" else folder(out, config, fraction, seed)
    return json.loads((dest / "metrics.json").read_text())


def users_ndcg(rec: dict) -> dict[int, float]:
    return dict(zip(*per_user_ndcg(rec["test_ranks"]["seq_index"], rec["test_ranks"]["rank"])))


def seed_mean(recs: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    per = [users_ndcg(r) for r in recs]
    users = np.array(sorted(set.intersection(*(set(p) for p in per))), dtype=np.int64)
    return users, np.mean([[p[u] for u in users] for p in per], axis=0)


def summarise(out: Path, fractions, seeds, configs=tuple(CONFIGS)) -> dict:
    rows = {}
    for fraction in fractions:
        recs = {c: [load(out, c, fraction, s) for s in seeds] for c in configs}
        refs = {"zero-shot": seed_mean([load(out, "none", fraction, seeds[0])]),
                "popularity": seed_mean(recs["popularity"]), "scratch": seed_mean(recs["scratch"])}
        for config in [c for c in TRAINED if c in recs]:
            rs = recs[config]
            users, mean = seed_mean(rs)
            row = {"train_users": rs[0].get("train_users"), "median_ndcg@10": float(np.median([r["test"]["ndcg@10"] for r in rs])),
                   "per_seed": [round(r["test"]["ndcg@10"], 4) for r in rs],
                   "seed_averaged": bootstrap_mean(mean).text(),
                   "kept_steps": [r["train"]["best_step"] for r in rs],
                   "below_zero_shot": sum(r["vs"]["zero-shot"]["test"]["verdict"] == "worse" for r in rs)}
            for name, (ref_users, ref_mean) in refs.items():
                if name != config:
                    row[f"vs {name}"] = paired_on_users(users, mean, ref_users, ref_mean).diff_text()
            if config in ("lora-table", "lora-replay", "lora-mmd", "lora-adversarial"):
                row["vs lora"] = paired_on_users(users, mean, *seed_mean(recs["lora"])).diff_text()
            if config in ("lora-mmd", "lora-adversarial") and "lora-replay" in recs:   # what aligning adds to replay
                row["vs lora-replay"] = paired_on_users(users, mean, *seed_mean(recs["lora-replay"])).diff_text()
            if config == "lora" and "lora-before" in recs:
                row["vs lora-before"] = paired_on_users(users, mean, *seed_mean(recs["lora-before"])).diff_text()
            rows[f"{config} @ {fraction}"] = row
        rows[f"popularity @ {fraction}"] = {
            "median_ndcg@10": float(np.median([r["test"]["ndcg@10"] for r in recs["popularity"]])),
            "seed_averaged": bootstrap_mean(refs["popularity"][1]).text(),
            "vs zero-shot": paired_on_users(*refs["popularity"], *refs["zero-shot"]).diff_text()}
    rows["zero-shot"] = {"test_ndcg@10": load(out, "none", 1.0, seeds[0])["test"]["ndcg@10"],
                         "interval": bootstrap_mean(refs["zero-shot"][1]).text()}
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="a pretrained base (make demo: runs/ml_cross_platform/pretrain)")
    ap.add_argument("--data", type=Path, required=True, help="its prepared data (runs/ml_cross_platform/data)")
    ap.add_argument("--target", default="ml100k")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 0.25])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/small_target_defaults"))
    a = ap.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    todo = [("none", 1.0, a.seeds[0])] + [(c, f, s) for f in a.fractions for s in a.seeds for c in a.configs]
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    with ThreadPoolExecutor(a.jobs) as pool:
        list(pool.map(lambda t: run_one(a, out, *t, threads), todo))
    rows = summarise(out, a.fractions, a.seeds, a.configs)
    record("small_target_defaults", {"command": "python -m benchmarks.small_target_defaults " + " ".join(argv or sys.argv[1:]),
                                     "target": a.target, "fractions": a.fractions, "seeds": a.seeds, "rows": rows})


if __name__ == "__main__":
    main()
