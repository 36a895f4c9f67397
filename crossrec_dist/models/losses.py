"""Next-item losses over tied item embeddings.

``full_softmax``: exact cross-entropy over the whole catalogue, computed in token chunks under
activation checkpointing so only one chunk's logits live at a time (catalogues up to ~1M items).
``sampled_softmax``: candidates = the batch's own targets (in-batch negatives) plus uniform random
items; logits are corrected by log of each candidate's expected count (logQ), which keeps the
estimator consistent for 10M+ item catalogues where full logits never fit.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    logits = h @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits[:, 0] = -math.inf  # padding is never a valid next item
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def full_softmax(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 chunk_tokens: int = 4096, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Mean CE of ``targets`` (T,) given ``hidden`` (T, H), item table ``weight`` (N+1, H) and an
    optional per-item score offset ``bias`` (N+1,)."""
    if hidden.shape[0] <= chunk_tokens:
        return _chunk_ce(hidden, weight, targets, bias) / max(hidden.shape[0], 1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for lo in range(0, hidden.shape[0], chunk_tokens):
        sl = slice(lo, lo + chunk_tokens)
        total = total + checkpoint(_chunk_ce, hidden[sl], weight, targets[sl], bias, use_reentrant=False)
    return total / hidden.shape[0]


def sampled_softmax(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_negatives: int,
                    generator: torch.Generator | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax with in-batch + uniform negatives and logQ correction."""
    n_items = weight.shape[0] - 1
    rand = torch.randint(1, n_items + 1, (num_negatives,), device=targets.device, generator=generator)
    cand, inverse = torch.unique(torch.cat([targets, rand]), return_inverse=True)
    label = inverse[: targets.shape[0]]
    in_batch = torch.bincount(label, minlength=cand.shape[0]).float()
    expected = in_batch + num_negatives / n_items        # expected occurrences among the candidates
    logits = hidden @ weight[cand].t() - torch.log(expected)[None, :]
    if bias is not None:
        logits = logits + bias[cand][None, :]
    return F.cross_entropy(logits.float(), label)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float, temperature: float) -> torch.Tensor:
    """alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T), rows = tokens.

    Logits are over the same candidate columns for both models; columns masked with -inf (padding)
    are excluded from both distributions. With alpha = 1 this is plain next-item training.
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    if alpha >= 1.0:
        return ce
    t = temperature
    s_log = F.log_softmax(student_logits.float() / t, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / t, dim=-1)
    valid = torch.isfinite(t_log) & torch.isfinite(s_log)
    kl = torch.where(valid, t_log.exp() * (t_log - s_log), torch.zeros_like(s_log)).sum(-1).mean()
    return alpha * ce + (1 - alpha) * t * t * kl
