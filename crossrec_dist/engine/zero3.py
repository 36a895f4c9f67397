"""ZeRO-3 helpers: parameters that are partitioned across ranks, gathered only where needed.

Everything here is a no-op for parameters DeepSpeed has not partitioned, so callers need not ask.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import deepspeed
import torch
from transformers import PreTrainedModel

from ..errors import InputError
from . import distributed as dist_info


def load_full_weights(model, weights: dict, source: Path) -> None:
    """Load a full state dict into ``model``, one parameter at a time when it is ZeRO-3 partitioned."""
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    own = {k: tensors[k] for k in model.state_dict()}     # the persistent ones, as a checkpoint holds them
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    if missing or unexpected:
        raise InputError(f"checkpoint weights do not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}", path=str(source), field="--resume")
    for name, tensor in own.items():
        if name not in weights:
            continue
        with gathered([tensor], modifier_rank=0), torch.no_grad():
            if tensor.numel():
                tensor.copy_(weights[name].to(tensor.dtype))


def gathered(params, modifier_rank=None):
    if any(hasattr(p, "ds_id") for p in params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
    return contextlib.nullcontext()


def initialize_partitioned(model) -> None:
    """Run each transformers model's own weight init on its partitioned parameters.

    Under ``zero.Init`` a module's parameters are partitioned as soon as the module is built, so a
    ``PreTrainedModel``'s ``post_init`` initialises empty shards. Gather one module's parameters at
    a time, let rank 0 initialise them, and scatter back: the model never exists whole anywhere.
    """
    owners = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
    seen: set[int] = set()
    for owner in owners:
        for module in owner.modules():
            params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
            if not params:
                continue
            seen.update(id(p) for p in params)
            with gathered(params, modifier_rank=0), torch.no_grad():
                if dist_info.is_main():
                    owner._init_weights(module)


def partition_report(model) -> dict:
    """Per parameter: elements this rank stores, elements it holds materialised now, full size."""
    out = {}
    for name, p in model.named_parameters():
        if hasattr(p, "ds_tensor"):
            out[name] = {"local": int(p.ds_tensor.numel()), "materialized": int(p.data.numel()), "full": int(p.ds_numel)}
        else:
            out[name] = {"local": int(p.numel()), "materialized": int(p.numel()), "full": int(p.numel())}
    return out


def held_outside_gather(model) -> dict:
    """Elements of ZeRO-3 partitioned parameters this rank holds materialised right now: 0 between
    gathers unless one leaked, besides DeepSpeed's persistent parameters (those below
    stage3_param_persistence_threshold stay whole by design), counted apart."""
    held = persistent = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            if getattr(p, "ds_persist", False):
                persistent += int(p.data.numel())
            else:
                held += int(p.data.numel())
    return {"partitioned": held, "persistent": persistent}


def register_tied_parameters(model) -> None:
    """Parameters a module uses outside its own forward (tied output tables) must be registered
    with ZeRO-3, or they are not gathered when used."""
    for module in model.modules():
        tied = getattr(module, "tied_parameters", None)
        if callable(tied):
            for p in tied():
                deepspeed.zero.register_external_parameter(module, p)
