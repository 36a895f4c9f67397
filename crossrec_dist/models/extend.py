"""A base model's item table grown to a larger vocabulary that starts with the base's own: the rows of
a region's items the base never saw (``crossrec prepare --vocab-from BASE``).

The new rows start as the mean of the base's item rows (and the mean per-item offset): before any
adaptation a new item scores like an average known item, neither first nor last. The rule is
deterministic, so an adapter that trains on an extended base and the same base extended again at load
time start from identical weights (LoRA on the table stores only its change to them).
"""
from __future__ import annotations

import torch
from torch import nn


def extend_items(model, num_items: int):
    """Grow ``model``'s item table (and its per-item offsets) in place to ``num_items`` + 1 rows."""
    old = model.config.num_items
    if num_items == old:
        return model
    if num_items < old:
        raise ValueError(f"cannot shrink the item table from {old} to {num_items} items")
    emb = model.item_embeddings
    with torch.no_grad():
        mean = emb.weight[1:].mean(dim=0, keepdim=True)
        grown = nn.Embedding(num_items + 1, emb.embedding_dim, padding_idx=0, dtype=emb.weight.dtype)
        grown.weight[:old + 1] = emb.weight
        grown.weight[old + 1:] = mean
        model.item_embeddings = grown
        if model.item_bias is not None:
            bias = model.item_bias.weight
            model.item_bias.weight = nn.Parameter(torch.cat([bias, bias[1:].mean().expand(num_items - old)]))
    model.config.num_items = num_items
    return model
