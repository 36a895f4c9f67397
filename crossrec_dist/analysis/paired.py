"""Two groups of finished runs compared on the same test users: seed-averaged NDCG@10 of each group
with a bootstrap interval over users, and the paired interval of the difference (A - B).

A group of several folders (fine-tuning seeds) is averaged per user first, as the study reports do.
Command line: ``python -m benchmarks.paired_runs --a RUN [RUN ...] --b RUN [RUN ...]``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crossrec_dist.errors import InputError
from crossrec_dist.evaluation.bootstrap import aligned, bootstrap_mean, paired_difference


def compare(a: list[Path], b: list[Path]) -> str:
    """One line: users, each group's seed-averaged NDCG@10 [95%], and A - B paired [95%]."""
    records = {}
    for d in [*a, *b]:
        path = Path(d) / "metrics.json"
        if not path.exists():
            raise InputError("not found (a finished fine-tuning run's folder?)", path=str(path))
        records[str(d)] = json.loads(path.read_text())
    per_user = aligned(records)
    if per_user is None or any(str(d) not in per_user[1] for d in [*a, *b]):
        raise InputError("every run needs test_ranks in its metrics.json")
    seqs, ndcg = per_user
    mean_a = np.mean([ndcg[str(d)] for d in a], axis=0)
    mean_b = np.mean([ndcg[str(d)] for d in b], axis=0)
    return (f"{len(seqs)} users; A {bootstrap_mean(mean_a).text()} ({len(a)} run(s)); "
            f"B {bootstrap_mean(mean_b).text()} ({len(b)} run(s)); A - B {paired_difference(mean_a, mean_b).diff_text()}")
