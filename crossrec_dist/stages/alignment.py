"""Feature-distribution alignment between the source and the target while adapting (``align``).

The sequence representation is the final hidden state at a window's last position (what scores the
next item). Within each micro-batch, the source rows (``source_replay``) and the target rows are two
samples of it; the loss adds ``align_weight`` times a distance between their distributions, so the
adapted model keeps the target's representations where the base learned to rank them:

* ``coral``: the squared Frobenius distance of the two covariance matrices over 4 d^2 (Sun & Saenko,
  Deep CORAL, 2016) -- second-order statistics;
* ``mmd``: the squared maximum mean discrepancy with a sum of Gaussian kernels at bandwidths around
  the median pairwise distance (Long et al., DAN, 2015) -- every moment, for a fixed kernel.
"""
from __future__ import annotations

import torch

ALIGNMENTS = ("none", "coral", "mmd")


def coral(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = a.shape[1]
    return (_cov(a) - _cov(b)).pow(2).sum() / (4 * d * d)


def mmd(a: torch.Tensor, b: torch.Tensor, scales=(0.25, 0.5, 1.0, 2.0, 4.0)) -> torch.Tensor:
    x = torch.cat([a, b])
    dist = torch.cdist(x, x).pow(2)
    base = dist.detach()[dist.detach() > 0].median() if (dist.detach() > 0).any() else dist.new_tensor(1.0)
    k = sum(torch.exp(-dist / (base * s)) for s in scales)
    n = a.shape[0]
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def distance(kind: str, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return {"coral": coral, "mmd": mmd}[kind](source.float(), target.float())


def last_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """(B, H): each left-padded window's representation, its last position."""
    return hidden[:, -1, :]


def _cov(x: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(dim=0, keepdim=True)
    return x.T @ x / max(x.shape[0] - 1, 1)
