"""Popularity baseline: score every item by its interaction count in the training parts."""
from __future__ import annotations

import torch

from ..data.prepared import PreparedData


def popularity_scorer(data: PreparedData, domains=None, only=None):
    """Scores = training interactions per item in ``domains`` (of the sequences in ``only``, if given)."""
    counts = torch.from_numpy(data.item_counts(domains, only=only)).float()

    def score(histories: torch.Tensor, _domains: torch.Tensor) -> torch.Tensor:
        return counts.to(histories.device).expand(histories.shape[0], -1).clone()

    return score
