"""Learning-rate schedules: linear warmup, then cosine / linear decay to ``min_lr_ratio`` or constant."""
from __future__ import annotations

import math

from ..errors import InputError


def lr_lambda(total_steps: int, warmup_steps: int, kind: str, min_ratio: float):
    if kind not in ("cosine", "linear", "constant"):
        raise InputError(f"unknown schedule {kind!r}; use cosine, linear or constant", field="train.schedule")

    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * decay

    return f
