"""New users and new items: test NDCG@10 of the users with short histories and of the test items the
base never saw, with bootstrap intervals over users -- the part of a small region where transfer is
supposed to pay, and where an average over all users hides it.

Computed from a record's per-user test ranks (``test_ranks``), so any finished run can be broken down
afterwards, the same way for every method.
"""
from __future__ import annotations

import numpy as np

from ..data.prepared import PreparedData
from .bootstrap import bootstrap_mean, ndcg_at

# (name, fewest, most) known events before the test item: the history the model sees for that user.
HISTORY_BUCKETS = (("history<=5", 0, 5), ("history6-20", 6, 20), ("history>20", 21, None))


def unseen_items(data: PreparedData, base_domains, base_items: int | None = None,
                 untrained: list[int] | None = None) -> np.ndarray:
    """Boolean mask over item indices: items no training part of the base's domains holds -- counted in
    ``data`` when it holds those domains, else the base's own record (``untrained``: its
    untrained_items.json) -- and every item past the base's ``base_items`` (a vocabulary extended by
    ``prepare --vocab-from``)."""
    present = [d for d in base_domains if d in data.domain_names]
    seen = data.item_counts(present) > 0 if present else np.ones(data.num_items + 1, dtype=bool)
    if not present and untrained:
        seen[np.asarray(untrained, dtype=np.int64)] = False
    if base_items is not None:
        seen[base_items + 1:] = False
    seen[0] = True
    return ~seen


def cohorts(data: PreparedData, test_ranks: dict, unseen: np.ndarray | None) -> dict:
    """``{cohort: {"users", "ndcg@10", "low", "high"}}`` for each history bucket and, given the mask of
    items the base never saw, ``new_items`` (the test users whose test item is one of them)."""
    seqs = np.asarray(test_ranks["seq_index"], dtype=np.int64)
    values = ndcg_at(test_ranks["rank"])
    known = np.asarray(data.valid_end)[seqs]          # the history before the test item
    groups = {name: (known >= lo) & (known <= (hi if hi is not None else np.inf))
              for name, lo, hi in HISTORY_BUCKETS}
    if unseen is not None:
        targets = np.asarray(data.items)[np.asarray(data.offsets)[seqs] + known]
        groups["new_items"] = unseen[targets]
    out = {}
    for name, sel in groups.items():
        iv = bootstrap_mean(values[sel])
        out[name] = {"users": iv.n} if iv.n == 0 else \
            {"users": iv.n, "ndcg@10": round(iv.mean, 6), "low": round(iv.low, 6), "high": round(iv.high, 6)}
    return out
