"""Feature-distribution alignment between the source and the target while adapting (``align``).

The sequence representation is the final hidden state at a window's last position (what scores the
next item). Within each micro-batch, the source rows (``source_replay``) and the target rows are two
samples of it; the loss adds ``align_weight`` times a distance between their distributions, so the
adapted model keeps the target's representations where the base learned to rank them:

* ``coral``: the squared Frobenius distance of the two covariance matrices over 4 d^2 (Sun & Saenko,
  Deep CORAL, 2016) -- second-order statistics;
* ``mmd``: the squared maximum mean discrepancy with a sum of Gaussian kernels at bandwidths around
  the median pairwise distance (Long et al., DAN, 2015) -- every moment, for a fixed kernel;
* ``adversarial``: a domain discriminator (a two-layer MLP on the representation) learns to tell the
  target's rows from the source's, through a gradient-reversal layer (Ganin & Lempitsky, DANN, 2015):
  the discriminator descends its cross-entropy while the model below the reversal ascends it, so the
  representation drops whatever tells the domains apart -- what a learned classifier can see, not one
  fixed statistic. The discriminator is part of the trained model (the optimizer, DeepSpeed and a
  checkpoint's resume see it) but not of what is saved: it is of no use once adapted.
"""
from __future__ import annotations

import torch

DISCRIMINATOR = "domain_discriminator"     # the discriminator's module name on the trained model


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


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the gradient times -scale backward (DANN's gradient-reversal layer)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.scale * grad, None


class DomainDiscriminator(torch.nn.Module):
    """P(row is the target's | representation), one logit: hidden -> hidden -> ReLU -> 1."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden_size, hidden_size), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden_size, 1))

    def forward(self, rep: torch.Tensor) -> torch.Tensor:
        return self.net(rep).squeeze(-1)


def adversarial(discriminator: DomainDiscriminator, rep: torch.Tensor, is_target: torch.Tensor,
                scale: float) -> torch.Tensor:
    """The discriminator's cross-entropy on the reversed representation, each domain weighted half (a
    batch holds source_replay source rows per target row): minimising it trains the discriminator at
    full strength, while the model below receives ``-scale`` times its gradient (DANN's lambda), pushed to
    fool it."""
    logits = discriminator(_ReverseGradient.apply(rep, scale))
    labels = is_target.to(logits.dtype)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    return 0.5 * (loss[is_target].mean() + loss[~is_target].mean())
