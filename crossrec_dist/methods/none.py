"""``none``: zero-shot -- the base evaluated on the target as it is (no training, no seed)."""
from __future__ import annotations

from .base import Method


class ZeroShot(Method):
    name = "none"
    summary = "zero-shot: evaluate the base as it is"
    output = "none"
    trains = False
    seeded = False
    role = "zero-shot"
