"""The heavy half of the methods: loading and saving models and PEFT adapters (torch, peft, the model).

Imported by the method classes on first use, so that reading the registry stays free of torch.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model

from ..export.adapters import TABLE_ADAPTER, apply_adapter, save_mixed_adapter
from ..export.fingerprint import FILE as ADAPTER_INFO
from ..export.loading import adapter_items
from ..export.vocab import write_vocab
from ..models.extend import extend_items
from ..models.model import CrossRecModel

__all__ = ["AdaLoraConfig", "LoraConfig", "get_peft_model", "TABLE_ADAPTER", "ADAPTER_INFO",
           "load_base", "fresh_model", "save_whole_model", "load_whole_model", "save_adapter", "load_adapter",
           "peft_base_context", "orthogonality", "write_vocab", "adapter_items"]


def load_base(base_dir: str, num_items: int | None = None) -> CrossRecModel:
    """The base; with ``num_items`` above its own, its item table grown to the target's vocabulary
    (``prepare --vocab-from``: the target's items the base never saw follow the base's)."""
    return extend_items(CrossRecModel.from_pretrained(base_dir, use_safetensors=True), num_items) \
        if num_items else CrossRecModel.from_pretrained(base_dir, use_safetensors=True)


def fresh_model(config) -> CrossRecModel:
    return CrossRecModel(config)


def save_whole_model(task, model, state_dict, out_dir: Path) -> None:
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    write_vocab(task.data, out_dir)


def load_whole_model(out_dir: Path) -> CrossRecModel:
    return CrossRecModel.from_pretrained(out_dir, use_safetensors=True)


def save_adapter(model, state_dict, out_dir: Path, info: dict, mixed: bool) -> None:
    """A PEFT adapter folder (two adapters for a mixed model) plus crossrec_adapter.json (``info``)."""
    if mixed:
        save_mixed_adapter(model, state_dict, out_dir)
    else:
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    (out_dir / ADAPTER_INFO).write_text(json.dumps(info, indent=2))


def load_adapter(out_dir: Path, base_dir: str):
    return apply_adapter(load_base(base_dir, adapter_items(out_dir)), base_dir, out_dir)


def peft_base_context(engine, whole_rows: bool):
    """PEFT copies new-item rows out of a ZeRO-3 partitioned table with a CUDA-only gather (peft
    0.21: "right now, only CUDA is implemented"); without CUDA the base is loaded whole and
    DeepSpeed partitions it when the engine is prepared."""
    if whole_rows and engine.settings.zero3_init and not torch.cuda.is_available():
        engine.log("zero3_init: the base is loaded whole (PEFT's trainable-token rows need CUDA to be "
                   "built on partitioned weights); DeepSpeed partitions it when training starts")
        return engine.unpartitioned()
    return contextlib.nullcontext()


def orthogonality(model, weight: float):
    """AdaLoRA's orthogonality regulariser (it lives in PeftModel's forward for causal LMs only):
    ``weight`` x the mean over adapter matrices of ||P P^T - I||_F (A) / ||P^T P - I||_F (B)."""
    if weight <= 0:
        return 0.0
    reg, n = 0.0, 0
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and p.requires_grad and p.numel():
            para = p @ p.T if "lora_A" in name else p.T @ p
            eye = torch.eye(*para.shape, device=p.device, dtype=p.dtype)
            reg = reg + torch.norm(para - eye, p="fro")
            n += 1
    return weight * reg / max(n, 1)
