"""``full``: every weight of the base trains (the reference adapters are measured against)."""
from __future__ import annotations

from typing import ClassVar

from .base import Method


class Full(Method):
    name = "full"
    summary = "fine-tune every weight of the base"
    role = "full"
    default_lr: ClassVar[float] = 5e-4
