"""``l2sp``: full fine-tuning plus ``weight * ||theta - theta_source||^2`` (L2-SP: keep near the base)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .base import Method, need


@dataclass
class L2spOptions:
    weight: float = 0.01          # lambda of the penalty, per optimizer update


class L2sp(Method):
    name = "l2sp"
    summary = "full fine-tuning with an L2 pull towards the base's weights"
    options = L2spOptions
    default_lr: ClassVar[float] = 5e-4
    refuses_zero3 = "l2sp's penalty needs whole parameters; use ZeRO-0/1/2 for l2sp"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.anchor = None

    @classmethod
    def check_options(cls, cfg, prefix: str = "") -> None:
        w = cfg.l2sp.weight
        need(math.isfinite(w) and w >= 0, prefix + "l2sp.weight", f"must be >= 0, got {w}")

    def build(self, task, engine):
        model = super().build(task, engine)
        self.anchor = [p.detach().clone() for p in model.parameters()]
        return model

    def penalty(self, model):
        return self.cfg.l2sp.weight * sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), self.anchor))
