"""Validation on several targets per user: one forward pass per history vs one per user.

A fine-tuning run validates every epoch on each user's last ``valid_targets`` items (3 in the main
job). Scored one history at a time that is 3 forward passes of max_len items per user, about as much
compute as the epoch's training forward passes; ``rank_eval_set`` now scores a user's consecutive
targets at their positions in one window (``model_scorer``'s ``last_k``). This times both on a
prepared dataset and a saved base, and says how often the two give the same rank (they differ where a
history is longer than max_len: the earlier targets then see up to K - 1 fewer items).

usage: python -m benchmarks.validation_passes --model runs/ml_cross_platform/pretrain \
           --data runs/ml_cross_platform/data --domain ml100k [--targets 3] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import record
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.evaluation.evaluator import EvalOptions, model_scorer, rank_eval_set
from crossrec_dist.evaluation.metrics import metrics_from_ranks
from crossrec_dist.models.model import CrossRecModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--targets", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    data = PreparedData(a.data)
    model = CrossRecModel.from_pretrained(a.model).eval()
    ev = data.eval_set("valid", [a.domain], targets_per_user=a.targets)
    opts = EvalOptions(split="valid", max_len=model.config.max_len, catalogue=data.catalogue([a.domain]))
    grouped = model_scorer(model)
    scorers = {"one pass per history": lambda h, d: grouped(h, d), "one pass per user": grouped}
    seconds, ranks = {k: [] for k in scorers}, {}
    for _ in range(a.repeats):              # alternated, so drift in the machine hits both alike
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                ranks[name] = rank_eval_set(data, ev, scorer, opts, show_progress=False)
            seconds[name].append(time.perf_counter() - t0)
    per, one = ranks["one pass per history"], ranks["one pass per user"]
    med = {k: round(statistics.median(v), 3) for k, v in seconds.items()}
    record("validation_passes", {
        "command": f"python -m benchmarks.validation_passes --model {a.model} --data {a.data} --domain {a.domain} "
                   f"--targets {a.targets} --repeats {a.repeats}",
        "examples": int(len(ev.targets)), "users": int(len(set(ev.seq_index.tolist()))),
        "parameters": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads(),
        "median_seconds": med, "speedup": round(med["one pass per history"] / med["one pass per user"], 2),
        "ndcg@10": {k: round(metrics_from_ranks(r)["ndcg@10"], 5) for k, r in ranks.items()},
        "same_rank_share": round(float((per == one).float().mean()), 4)})


if __name__ == "__main__":
    main()
