"""``head``: only the item embedding table (which is also the output side, tied) and the per-item
offsets train; the transformer body stays the base's."""
from __future__ import annotations

from typing import ClassVar

from .base import Method


class Head(Method):
    name = "head"
    summary = "train only the item table (tied output) and per-item offsets"
    default_lr: ClassVar[float] = 2e-3

    def adapt(self, task, base, engine):
        for name, p in base.named_parameters():
            p.requires_grad = name.startswith(("item_embeddings", "item_bias"))
        return base
