"""Intervals a reader can trust: percentile bootstrap over test users, and paired differences.

A target region here has 50-1,500 test users with one test item each; a difference of 0.005 NDCG@10
is often noise. Every method is evaluated on the *same* users, so two methods are compared by the
bootstrap of the per-user difference (paired): it is much tighter than comparing two separate
intervals, and an interval that contains 0 means "no significant difference" at that level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000


def ndcg_at(ranks, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of 0-based target ranks (one relevant item: 1/log2(rank + 2) inside the top k)."""
    r = np.asarray(ranks, dtype=np.float64)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def diff_text(self, digits: int = 4) -> str:
        """``+0.0123 [+0.0040, +0.0210]``, with the verdict when the interval holds 0."""
        s = f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return s if self.excludes_zero else s + " n.s."


def bootstrap_mean(values, resamples: int = RESAMPLES, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of ``values`` with a percentile bootstrap interval (users resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):       # bounded memory for large user sets
        stop = min(resamples, start + 256)
        idx = rng.integers(0, v.size, size=(stop - start, v.size))
        means[start:stop] = v[idx].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(v.mean()), float(low), float(high), int(v.size))


def paired_difference(a, b, **kw) -> Interval:
    """Bootstrap interval of mean(a - b) over the same users (a and b aligned user by user)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same users ({a.shape} vs {b.shape})")
    return bootstrap_mean(a - b, **kw)


def per_user_ndcg(seq_index, ranks, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(users, NDCG@k per user): a user with several targets (validation's last K items) counts once,
    with the mean over their targets -- the unit a bootstrap resamples is the user, not the target."""
    seqs = np.asarray(seq_index, dtype=np.int64)
    values = ndcg_at(ranks, k)
    users, inverse = np.unique(seqs, return_inverse=True)
    return users, np.bincount(inverse, weights=values, minlength=len(users)) / np.bincount(inverse, minlength=len(users))


def paired_on_users(users_a, values_a, users_b, values_b, **kw) -> Interval:
    """Paired difference mean(a - b) over the users both sides have (sorted user ids on each side)."""
    common, ia, ib = np.intersect1d(users_a, users_b, assume_unique=True, return_indices=True)
    return paired_difference(np.asarray(values_a)[ia], np.asarray(values_b)[ib], **kw)


def interval_record(iv: Interval, digits: int = 6) -> dict:
    """An interval as metrics.json holds it, with its verdict: better | worse | no significant difference."""
    if iv.n == 0:
        return {"diff": None, "low": None, "high": None, "users": 0, "verdict": "no users in common"}
    verdict = "better" if iv.low > 0 else "worse" if iv.high < 0 else "no significant difference"
    return {"diff": round(iv.mean, digits), "low": round(iv.low, digits), "high": round(iv.high, digits),
            "users": iv.n, "verdict": verdict}


def aligned(records: dict[str, dict]) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
    """Per-user NDCG@10 of each record's ``test_ranks``, aligned on the sequences all of them share."""
    per = {}
    for name, rec in records.items():
        tr = (rec or {}).get("test_ranks")
        if tr:
            per[name] = dict(zip(tr["seq_index"], tr["rank"]))
    if not per:
        return None
    common = sorted(set.intersection(*(set(p) for p in per.values())))
    seqs = np.array(common, dtype=np.int64)
    return seqs, {name: ndcg_at([p[s] for s in common]) for name, p in per.items()}
