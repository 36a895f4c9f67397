"""Parameter counts on the meta device and per-rank memory of model states under each ZeRO stage.

Model-state bytes per parameter (ZeRO paper, Adam): fp32 training keeps weights 4 + grads 4 +
Adam moments 8 = 16; bf16 mixed precision keeps bf16 weights 2 + grads 2 + fp32 master and moments
12 = 16. Stage 1 partitions the optimizer part, stage 2 also the gradients, stage 3 also the weights.
Activations come on top and depend on batch and sequence length.
"""
from __future__ import annotations

import torch

from ..errors import InputError
from .model import CrossRecModel
from .presets import DEFAULT_CATALOGUE, PRESETS, preset_config


def param_counts(model) -> dict:
    """``{"total", "trainable"}`` parameter counts (ZeRO-3 partitioned parameters count in full)."""
    def n(p):
        return int(getattr(p, "ds_numel", p.numel()))
    return {"total": sum(n(p) for p in model.parameters()),
            "trainable": sum(n(p) for p in model.parameters() if p.requires_grad)}


def count_parameters(config) -> int:
    with torch.device("meta"):
        model = CrossRecModel(config)
    return sum(p.numel() for p in model.parameters())


def model_state_bytes(n: int, stage: int, world: int, mixed: bool = True) -> float:
    w, g, o = (2, 2, 12) if mixed else (4, 4, 8)
    if stage == 0:
        return n * (w + g + o)
    if stage == 1:
        return n * (w + g) + n * o / world
    if stage == 2:
        return n * w + n * (g + o) / world
    return n * (w + g + o) / world


def describe_presets(names=None, num_items: int | None = None, world_sizes=(1, 2, 8)) -> str:
    names = names or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise InputError(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}", field="name")
    items = num_items or DEFAULT_CATALOGUE
    lines = [f"model states per rank (GiB, bf16 mixed precision + Adam), catalogue {items:,} items"]
    header = f"{'preset':<6} {'params':>15} " + " ".join(f"{f'z{s}/w{w}':>9}" for w in world_sizes for s in range(4))
    lines.append(header)
    for name in names:
        n = count_parameters(preset_config(name, num_items=items))
        cells = " ".join(f"{model_state_bytes(n, s, w) / 2**30:9.2f}" for w in world_sizes for s in range(4))
        lines.append(f"{name:<6} {n:>15,} {cells}")
    return "\n".join(lines)
