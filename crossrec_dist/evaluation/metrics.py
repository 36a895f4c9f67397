"""Rank-based metrics. Ties never favour the target: an item scoring equal to it ranks ahead of it."""
from __future__ import annotations

import math

import torch

DEFAULT_KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among all columns of ``scores`` (B, N).

    rank = #(score > target) + #(other items with score == target). NaN scores count as -inf, so a
    model that outputs a constant (or NaN) gets the worst rank, not the best.
    """
    scores = torch.nan_to_num(scores.float(), nan=-math.inf)
    t = scores.gather(1, targets.view(-1, 1))
    return (scores >= t).sum(1) - 1


def metrics_from_ranks(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, float]:
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.double().mean().item() if len(ranks) else 0.0
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(ranks + 2), torch.zeros_like(ranks)).mean().item() if len(ranks) else 0.0
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / (ranks + 1), torch.zeros_like(ranks)).mean().item() if len(ranks) else 0.0
    return out
