"""crossrec_dist: pretrain, adapt per region, and distil transformer sequential recommenders."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "CrossRecConfig": ("crossrec_dist.models.config", "CrossRecConfig"),
    "CrossRecModel": ("crossrec_dist.models.model", "CrossRecModel"),
    "Recommender": ("crossrec_dist.export.serving", "Recommender"),
}


def __getattr__(name):  # torch/transformers load only when a model class is asked for
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(name)


__all__ = list(_LAZY)
