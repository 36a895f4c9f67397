"""Pretrained model quality on MovieLens-100K (all users, leave-one-out, full ranking) vs baselines.

Runs ``crossrec pretrain --preset small`` (SASRec-size: 2 layers, hidden 64) with the preset's
defaults for several seeds, plus the popularity baseline, and sets them beside RecBole 1.2.1's
SASRec measured on this machine (shared/anchors/recbole.md: test NDCG@10 0.0629, HR@10 0.1421).
Time to quality: every run also records test NDCG@10 at each validation (``train.track_test``; model
selection still uses valid only), and the wall-clock seconds of training until test NDCG@10 first
reaches RecBole's best are reported beside RecBole's 3,578 s.
usage: python -m benchmarks.pretrain_ml100k [--seeds 0 1 2] [--preset small] [--set KEY=VALUE ...]
(``--set``: extra overrides of every pretraining run, e.g. the quick tier's ``train.epochs=15``.)
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from benchmarks.common import OUT, crossrec, ml100k, record

RECBOLE_SASREC = {"ndcg@10": 0.0629, "hr@10": 0.1421, "mrr@10": 0.0395, "seconds_to_best": 3578}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="an extra override of every pretraining run (repeatable)")
    a = ap.parse_args()
    data = ml100k(domain_rule=None)
    pop_file = OUT / "ml100k_popularity.json"
    crossrec("evaluate", "--model", "popularity", "--data", data, "--out", pop_file)
    pop = json.loads(pop_file.read_text())["test"]
    runs = []
    for seed in a.seeds:
        out = OUT / f"pretrain_{a.preset}_seed{seed}"
        t0 = time.perf_counter()
        crossrec("pretrain", "--preset", a.preset, "--data", data, "--out", out, "--set", f"train.seed={seed}",
                 "--set", "train.tensorboard=false", "--set", "train.log_every=100", "--set", "train.track_test=true",
                 *(x for kv in a.sets for x in ("--set", kv)))
        wall = time.perf_counter() - t0
        m = json.loads((out / "metrics.json").read_text())
        curve = [h for h in m["history"] if "test_ndcg@10" in h]
        reached = next((h for h in curve if h["test_ndcg@10"] >= RECBOLE_SASREC["ndcg@10"]), None)
        runs.append({"seconds_to_recbole_quality": reached and reached["seconds"],
                     "step_to_recbole_quality": reached and reached["step"],"seed": seed, "test": {k: m["test"][k] for k in ("ndcg@10", "hr@10", "mrr@10")},
                     "steps": m["train"]["steps"], "best_step": m["train"]["best_step"],
                     "train_seconds": m["train"]["seconds"], "wall_seconds": round(wall, 1),
                     "samples_per_second": m["train"]["samples_per_second"], "params": m["params"]["total"]})
    med = {k: statistics.median(r["test"][k] for r in runs) for k in ("ndcg@10", "hr@10", "mrr@10")}
    record(f"pretrain_ml100k_{a.preset}", {
        "command": f"python -m benchmarks.pretrain_ml100k --preset {a.preset} --seeds {' '.join(map(str, a.seeds))}"
                   + "".join(f" --set {kv}" for kv in a.sets),
        "protocol": "leave-one-out by time, full ranking over 1,682 items, history excluded, ties against target",
        "median_test": med,
        "median_seconds_to_recbole_quality": statistics.median(
            r["seconds_to_recbole_quality"] if r["seconds_to_recbole_quality"] is not None else float("inf")
            for r in runs),
        "median_wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
        "runs": runs, "popularity_test": {k: pop[k] for k in ("ndcg@10", "hr@10", "mrr@10")},
        "recbole_sasrec_test": RECBOLE_SASREC,
    })


if __name__ == "__main__":
    main()
