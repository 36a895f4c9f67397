"""``scratch``: the base's architecture with fresh weights, trained on the target alone (what transfer
must beat)."""
from __future__ import annotations
# heavy imports inside functions (torch, peft, the model via ._training): the registry is read by --help
# and recipe checks, which must not pay import torch (2.6 s) and peft (5.9 s) on the 2-core CI machine

from .base import Method


class Scratch(Method):
    name = "scratch"
    summary = "same architecture, random initialisation, target data only"
    role = "target-only"
    starts_from_base = False

    def build(self, task, engine):
        from ._training import fresh_model
        return engine.construct(lambda: fresh_model(task.base_config))
