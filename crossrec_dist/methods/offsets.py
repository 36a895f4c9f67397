"""``offsets``: only the base's per-item score offsets (``item_bias``) train -- a learned popularity prior
for the region, the cheapest adaptation there is (N + 1 numbers, the body and the item table untouched).
Where the target differs from the sources mainly in *which* items are popular (a new market's
bestsellers), this is the baseline every richer method has to beat; it needs a base pretrained with
``model.item_bias: true``."""
from __future__ import annotations

from typing import ClassVar

from ..errors import InputError
from .base import Method


class Offsets(Method):
    name = "offsets"
    summary = "train only the per-item score offsets (a learned popularity prior; needs item_bias)"
    default_lr: ClassVar[float] = 1e-2

    def adapt(self, task, base, engine):
        if base.item_bias is None:
            raise InputError("the base has no per-item offsets to re-estimate (pretrained without "
                             "model.item_bias): choose another method, or pretrain with --set model.item_bias=true",
                             path=task.base_dir, field="--method")
        for name, p in base.named_parameters():
            p.requires_grad = name.startswith("item_bias")
        return base
