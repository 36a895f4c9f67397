"""Batched full-ranking evaluation of any scorer over a prepared dataset, per domain.

A *scorer* maps a batch of left-padded histories to scores over the whole vocabulary:
``scorer(histories: LongTensor[B, L], domains: LongTensor[B]) -> Tensor[B, num_items + 1]``
(column 0 is padding and never ranked). Items already in the user's history are excluded by
default, as RecBole does for full ranking, so figures are comparable with its protocol. With a
``catalogue`` only the items of the evaluated domains are ranked (cross-platform targets: the
target platform's catalogue, as cross-domain benchmarks rank the target domain's items).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..data.prepared import EvalSet, PreparedData
from ..progress import track
from .metrics import DEFAULT_KS, metrics_from_ranks, target_ranks

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EvalOptions:
    split: str = "test"
    domains: list[str] | None = None
    ks: tuple[int, ...] = DEFAULT_KS
    batch_size: int = 1024
    max_len: int = 50
    exclude_history: bool = True
    # Bool mask over item indices (PreparedData.catalogue): rank only these items (None: every item).
    catalogue: np.ndarray | None = None
    # A seeded sample of this many users (sequences) is ranked; 0: every user (sample_users).
    users: int = 0
    seed: int = 0


# Scores held at once by one forward pass: users per pass are capped so that (users x (items + 1)) stays
# under this many float32 values (256 MiB). At 3,706 items a pass takes up to ~18,000 users (batch_size
# decides); at a million, 67 -- full ranking over 1M+ items then needs more passes, not more memory.
SCORE_BUDGET = 1 << 26


def score_batch_size(batch_size: int, num_items: int) -> int:
    """Users per forward pass: ``batch_size``, fewer where the catalogue would not fit SCORE_BUDGET."""
    return max(1, min(batch_size, SCORE_BUDGET // (num_items + 1)))


def sample_users(ev: EvalSet, users: int, seed: int) -> EvalSet:
    """The examples of ``users`` sequences drawn without replacement with ``seed`` (all when ``users`` is
    0 or at least as many as there are). Drawn from the sorted sequence ids, so every rank, every
    validation of a run and its final test draw the same users wherever their eval sets hold the same."""
    present = np.unique(ev.seq_index)
    if users <= 0 or users >= len(present):
        return ev
    chosen = np.random.default_rng(seed).choice(present, size=users, replace=False)
    return ev.only(np.sort(chosen))


def left_padded(data: PreparedData, seq: np.ndarray, end: np.ndarray, max_len: int) -> np.ndarray:
    """The last ``max_len`` items before ``end`` of each sequence, right-aligned, 0-padded."""
    return data.left_padded(seq, end, max_len)


def history_mask_index(data: PreparedData, seq: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every item in each full history (not only the last ``max_len``)."""
    rows = np.repeat(np.arange(len(seq)), end)
    within = np.arange(end.sum()) - np.repeat(np.r_[0, np.cumsum(end)[:-1]], end)
    return rows, data.items[data.offsets[seq][rows] + within].astype(np.int64)


def model_scorer(model) -> Scorer:
    """Scorer over a (possibly PEFT- or DeepSpeed-wrapped) model: a plain forward call with
    return_scores. It also has ``last_k(windows, domains, k)``: scores (B, k, N+1) after each of the
    last k positions of each window, so a user's k consecutive validation targets cost one forward
    pass, not k (``rank_eval_set``)."""
    def score(hist: torch.Tensor, doms: torch.Tensor) -> torch.Tensor:
        return model(input_ids=hist, domain_ids=doms, return_scores=True)

    def last_k(windows: torch.Tensor, doms: torch.Tensor, k: int) -> torch.Tensor:
        return model(input_ids=windows, domain_ids=doms, return_scores=True, score_last=k)

    score.last_k = last_k
    return score


def example_groups(ev: EvalSet, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(first example, length) of each run of consecutive examples of one sequence whose histories
    grow by one item (a user's K validation targets: ``eval_set(targets_per_user=K)`` orders them so),
    runs longer than ``limit`` cut into pieces of at most ``limit``."""
    n = len(ev.targets)
    new = np.ones(n, dtype=bool)
    new[1:] = (ev.seq_index[1:] != ev.seq_index[:-1]) | (ev.hist_end[1:] != ev.hist_end[:-1] + 1)
    run_start = np.maximum.accumulate(np.where(new, np.arange(n), 0)) if n else np.zeros(0, dtype=np.int64)
    new |= (np.arange(n) - run_start) % max(limit, 1) == 0
    starts = np.flatnonzero(new)
    return starts, np.diff(np.r_[starts, n]).astype(np.int64)


def eval_batches(ev: EvalSet, batch_size: int, grouped: bool, max_len: int) -> list[tuple[int, np.ndarray]]:
    """The forward passes that rank ``ev``: (k, example indices), ``batch_size`` examples at most.
    k = 1: one history per row. Grouped (a scorer with ``last_k``): each run of a user's k > 1
    consecutive targets is one row of one pass, k examples from one window, so validating on the
    last 3 items of every user costs one pass per user instead of three. A run is cut into pieces of
    at most max_len targets (a window holds no more positions)."""
    n = len(ev.targets)
    if not grouped:
        return [(1, np.arange(lo, min(lo + batch_size, n))) for lo in range(0, n, batch_size)]
    starts, lengths = example_groups(ev, max_len)
    out = []
    for k in np.unique(lengths):
        first = starts[lengths == k]
        per = max(1, batch_size // int(k))
        for lo in range(0, len(first), per):
            rows = first[lo:lo + per]
            out.append((int(k), (rows[:, None] + np.arange(k)[None, :]).ravel()))
    return out


def rank_eval_set(data: PreparedData, ev: EvalSet, scorer: Scorer, opts: EvalOptions,
                  device: torch.device | str = "cpu", show_progress: bool = True) -> torch.Tensor:
    """0-based target ranks for every example of ``ev``, in order.

    A scorer with ``last_k`` ranks a user's k consecutive targets (``eval_set(targets_per_user=k)``)
    from one window: the last ``max_len`` items before the latest target, each earlier target scored
    at its own position in it. That is exactly one pass per history while the user's history fits in
    ``max_len``; beyond it, the earlier targets see up to k - 1 fewer items than a pass of their own
    would give them (48 or 49 instead of 50 at k = 3), as positions inside a training window do.
    Histories are excluded per target as always. k = 1 (every test set) is one pass per history."""
    ranks = torch.zeros(len(ev.targets), dtype=torch.long)
    hidden = None if opts.catalogue is None else torch.from_numpy(~opts.catalogue).to(device)  # items never ranked
    batches = eval_batches(ev, score_batch_size(opts.batch_size, data.num_items),
                           getattr(scorer, "last_k", None) is not None, opts.max_len)
    for k, ex in track(batches, len(batches), f"evaluate {opts.split}", enabled=show_progress):
        seq, end = ev.seq_index[ex], ev.hist_end[ex]
        with torch.no_grad():
            if k == 1:
                hist = torch.from_numpy(left_padded(data, seq, end, opts.max_len)).to(device)
                scores = scorer(hist, torch.from_numpy(ev.domains[ex]).to(device)).float()
            else:
                last = ex[k - 1::k]          # each row's window ends with its latest target's history
                windows = torch.from_numpy(left_padded(data, ev.seq_index[last], ev.hist_end[last],
                                                       opts.max_len)).to(device)
                scores = scorer.last_k(windows, torch.from_numpy(ev.domains[last]).to(device), k).float()
                scores = scores.reshape(len(ex), -1)
        scores[:, 0] = -math.inf
        if hidden is not None:
            scores[:, hidden] = -math.inf
        if opts.exclude_history:
            r, c = history_mask_index(data, seq, end)
            scores[torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)] = -math.inf
        ranks[torch.from_numpy(ex)] = target_ranks(scores, torch.from_numpy(ev.targets[ex]).to(device)).cpu()
    return ranks


def evaluate(data: PreparedData, scorer: Scorer, opts: EvalOptions, device="cpu") -> dict:
    """Overall metrics of ``opts.split`` plus a ``per_domain`` breakdown when several domains are in it."""
    ev = sample_users(data.eval_set(opts.split, opts.domains), opts.users, opts.seed)
    return summarize_ranks(data, ev, rank_eval_set(data, ev, scorer, opts, device), opts.ks)


def summarize_ranks(data: PreparedData, ev: EvalSet, ranks: torch.Tensor, ks) -> dict:
    """Overall metrics of every user's target rank, plus per domain when ``ev`` spans several."""
    overall = metrics_from_ranks(ranks, ks)
    overall["users"] = int(len(ranks))
    per_domain = {}
    codes = np.unique(ev.domains)
    if len(codes) > 1:
        for code in codes:
            sel = torch.from_numpy(ev.domains == code)
            m = metrics_from_ranks(ranks[sel], ks)
            m["users"] = int(sel.sum())
            per_domain[data.domain_names[code]] = m
    # Per-user ranks (by sequence index): what bootstrap intervals and paired differences between
    # methods evaluated on the same users are computed from (evaluation/bootstrap.py).
    # Arrays here (validation runs this every evaluation); metrics_record turns them into JSON lists once.
    examples = {"seq_index": np.asarray(ev.seq_index), "rank": ranks.numpy()}
    return {"overall": overall, "per_domain": per_domain, "examples": examples}
