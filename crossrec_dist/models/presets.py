"""Named model sizes, as data. Counts are for the model body plus the preset's item catalogue.

Read by config checks and ``crossrec --help``'s light layer: the model configuration class (transformers,
0.9 s to import on the 2-core CI machine) is imported inside :func:`preset_config`, the one function
that builds it.
"""
from __future__ import annotations

from ..errors import InputError

PRESETS: dict[str, dict] = {
    # tests and CPU smoke runs: < 1M parameters
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_len=50),
    # SASRec-size (2 layers, hidden 64): the MovieLens benchmark model
    "small": dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256, max_len=50),
    # ~10x small at the same sequence length: a CPU-trainable teacher for `small` students (distillation)
    "medium": dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=1024, max_len=50),
    "base": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, max_len=200),
    # TinyLlama-like body with full multi-head attention: >= 1.0B parameters before the item table
    "1b": dict(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5632, max_len=512,
               embedding_dropout=0.0, attention_dropout=0.0),
    # OpenLLaMA-3B body
    "3b": dict(hidden_size=3200, num_layers=26, num_heads=32, intermediate_size=8640, max_len=512,
               embedding_dropout=0.0, attention_dropout=0.0),
}

# Catalogue size assumed when a preset is sized without data (``crossrec presets``).
DEFAULT_CATALOGUE = 100_000


def preset_config(name: str, **overrides):
    from .config import CrossRecConfig   # transformers: see the module docstring

    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}", field="--preset")
    return CrossRecConfig(**{"num_items": DEFAULT_CATALOGUE, **PRESETS[name], **overrides})

# Every option of CrossRecConfig, as data: configs are checked against it without importing
# transformers (tests/test_model.py keeps it equal to CrossRecConfig's signature).
MODEL_OPTIONS = ("num_items", "num_domains", "use_domain_embedding", "hidden_size", "num_layers", "num_heads",
                 "num_kv_heads", "intermediate_size", "max_len", "embedding_dropout", "attention_dropout",
                 "rms_norm_eps", "rope_theta", "initializer_range", "loss", "num_negatives", "domain_names",
                 "pretrain_domains", "item_bias")
