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


def left_padded(data: PreparedData, seq: np.ndarray, end: np.ndarray, max_len: int) -> np.ndarray:
    """The last ``max_len`` items before ``end`` of each sequence, right-aligned, 0-padded."""
    return data.left_padded(seq, end, max_len)


def history_mask_index(data: PreparedData, seq: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, item) pairs of every item in each full history (not only the last ``max_len``)."""
    rows = np.repeat(np.arange(len(seq)), end)
    within = np.arange(end.sum()) - np.repeat(np.r_[0, np.cumsum(end)[:-1]], end)
    return rows, data.items[data.offsets[seq][rows] + within].astype(np.int64)


def model_scorer(model) -> Scorer:
    """Scorer over a (possibly DeepSpeed-wrapped) model: a plain forward call with return_scores."""
    def score(hist: torch.Tensor, doms: torch.Tensor) -> torch.Tensor:
        return model(input_ids=hist, domain_ids=doms, return_scores=True)
    return score


def rank_eval_set(data: PreparedData, ev: EvalSet, scorer: Scorer, opts: EvalOptions,
                  device: torch.device | str = "cpu", show_progress: bool = True) -> torch.Tensor:
    """0-based target ranks for every example of ``ev``, in order."""
    from ..progress import track
    ranks = []
    hidden = None if opts.catalogue is None else torch.from_numpy(~opts.catalogue).to(device)  # items never ranked
    starts = range(0, len(ev.targets), opts.batch_size)
    for lo in track(starts, len(starts), f"evaluate {opts.split}", enabled=show_progress):
        sl = slice(lo, lo + opts.batch_size)
        seq, end = ev.seq_index[sl], ev.hist_end[sl]
        hist = torch.from_numpy(left_padded(data, seq, end, opts.max_len)).to(device)
        doms = torch.from_numpy(ev.domains[sl]).to(device)
        with torch.no_grad():
            scores = scorer(hist, doms).float()
        scores[:, 0] = -math.inf
        if hidden is not None:
            scores[:, hidden] = -math.inf
        if opts.exclude_history:
            r, c = history_mask_index(data, seq, end)
            scores[torch.from_numpy(r).to(device), torch.from_numpy(c).to(device)] = -math.inf
        ranks.append(target_ranks(scores, torch.from_numpy(ev.targets[sl]).to(device)).cpu())
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def evaluate(data: PreparedData, scorer: Scorer, opts: EvalOptions, device="cpu") -> dict:
    """Overall metrics of ``opts.split`` plus a ``per_domain`` breakdown when several domains are in it."""
    ev = data.eval_set(opts.split, opts.domains)
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
