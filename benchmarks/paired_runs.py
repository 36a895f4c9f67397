"""Two groups of finished runs compared on the same test users: seed-averaged NDCG@10 of each group
with a bootstrap interval over users, and the paired interval of the difference (A - B).

The study reports (`crossrec experiment`, benchmarks.transfer_probes) compare each method with
zero-shot, scratch and full; this answers "A vs B" for any two methods, e.g. AdaLoRA vs LoRA:

    python -m benchmarks.paired_runs --a runs/ml_cross_platform/targets/ml100k/adalora \
        --b runs/ml_cross_platform/targets/ml100k/lora

A group of several folders (fine-tuning seeds) is averaged per user first, as the reports do.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from crossrec_dist.evaluation.bootstrap import aligned, bootstrap_mean, paired_difference


def compare(a: list[Path], b: list[Path]) -> str:
    """One line: users, each group's seed-averaged NDCG@10 [95%], and A - B paired [95%]."""
    records = {}
    for d in [*a, *b]:
        path = d / "metrics.json"
        if not path.exists():
            sys.exit(f"{path}: not found (a finished fine-tuning run's folder?)")
        records[str(d)] = json.loads(path.read_text())
    per_user = aligned(records)
    if per_user is None or any(str(d) not in per_user[1] for d in [*a, *b]):
        sys.exit("every run needs test_ranks in its metrics.json")
    seqs, ndcg = per_user
    mean_a = np.mean([ndcg[str(d)] for d in a], axis=0)
    mean_b = np.mean([ndcg[str(d)] for d in b], axis=0)
    return (f"{len(seqs)} users; A {bootstrap_mean(mean_a).text()} ({len(a)} run(s)); "
            f"B {bootstrap_mean(mean_b).text()} ({len(b)} run(s)); A - B {paired_difference(mean_a, mean_b).diff_text()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=Path, nargs="+", required=True, help="run folders of A (several: seeds, averaged per user)")
    ap.add_argument("--b", type=Path, nargs="+", required=True, help="run folders of B")
    args = ap.parse_args()
    print(compare(args.a, args.b))


if __name__ == "__main__":
    main()
