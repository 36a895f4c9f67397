"""Fill a DeepSpeed JSON's ``"auto"`` values from the run's own numbers.

Accelerate would fill them from its own world size, which is wrong on CPU (PITFALLS.md #9), and
DeepSpeed refuses ``train_batch_size != micro * accum * world``; so we fill them with the real world.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import InputError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"


def resolve_path(name: str | None) -> Path | None:
    """A DeepSpeed config: an explicit path, a name in ds_configs/ (``zero2``), or the launcher's."""
    name = name or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not name or name in ("none", "off"):
        return None
    p = Path(name)
    for cand in (p, REPO_CONFIGS / name, REPO_CONFIGS / f"{name}.json"):
        if cand.is_file():
            return cand
    raise InputError("DeepSpeed config not found", path=name, field="train.deepspeed")


def _auto(d: dict, key: str, value) -> None:
    if d.get(key, "auto") == "auto":
        d[key] = value


def fill(path: Path, *, micro_batch: int, grad_accum: int, world: int, max_grad_norm: float,
         precision: str, hidden_size: int) -> dict:
    try:
        cfg = json.loads(Path(path).read_text())
    except ValueError as e:
        raise InputError(f"invalid JSON: {e}", path=str(path)) from None
    _auto(cfg, "train_micro_batch_size_per_gpu", micro_batch)
    _auto(cfg, "gradient_accumulation_steps", grad_accum)
    _auto(cfg, "train_batch_size", micro_batch * grad_accum * world)
    _auto(cfg, "gradient_clipping", max_grad_norm)
    for key, on in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        cfg.setdefault(key, {})
        _auto(cfg[key], "enabled", on)
    z = cfg.setdefault("zero_optimization", {})
    h2 = hidden_size * hidden_size
    _auto(z, "reduce_bucket_size", h2)
    _auto(z, "stage3_prefetch_bucket_size", int(0.9 * h2))
    _auto(z, "stage3_param_persistence_threshold", 10 * hidden_size)
    want = micro_batch * grad_accum * world
    if cfg["train_batch_size"] != want:
        raise InputError(f"train_batch_size {cfg['train_batch_size']} != micro {micro_batch} x accum "
                         f"{grad_accum} x world {world}; use \"auto\"", path=str(path), field="train_batch_size")
    return cfg


def zero_stage(cfg: dict | None) -> int:
    return int((cfg or {}).get("zero_optimization", {}).get("stage", 0))
