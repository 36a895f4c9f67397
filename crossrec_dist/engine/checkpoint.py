"""Atomic, resumable checkpoints around ``accelerator.save_state``.

A checkpoint is written to ``step_N.tmp`` and renamed to ``step_N`` only when every rank finished
writing, then ``latest`` is replaced atomically: a crash mid-save never leaves a ``latest`` that
points at a half-written folder. ``trainer_state.json`` carries what accelerate does not: step,
epoch, position in the epoch, best metric, patience counter.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from . import distributed as dist_info

STATE = "trainer_state.json"
DS_TAG = "pytorch_model"   # the folder accelerate.save_state gives the DeepSpeed engine's shards


def latest(root: Path) -> Path | None:
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / STATE).is_file() else None


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        return latest(root)
    path = Path(resume)
    if not (path / STATE).is_file():
        from ..errors import InputError
        raise InputError(f"not a checkpoint (no {STATE})", path=str(path), field="--resume")
    return path


def save(accelerator, root: Path, state: dict, keep: int, per_rank=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:08d}"
    tmp, final = root / (name + ".tmp"), root / name
    if dist_info.is_main() and tmp.exists():
        shutil.rmtree(tmp)
    dist_info.barrier()
    accelerator.save_state(str(tmp))   # every rank writes its own shard files
    if per_rank is not None:
        per_rank(tmp)                  # e.g. this rank's RNG state
    dist_info.barrier()
    if dist_info.is_main():
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr = root / "latest.tmp"
        ptr.write_text(name)
        os.replace(ptr, root / "latest")
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist_info.barrier()
    return final


def load(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return read_state(path)


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def consolidated_weights(path: Path) -> dict:
    """The full fp32 weights of a checkpoint, whatever number of processes wrote it.

    This is what a resume on a *different* number of processes starts from: DeepSpeed's optimizer
    shards are laid out per rank and cannot be re-split, the weights can (DeepSpeed's own
    zero_to_fp32 merges the ZeRO-1/2/3 fp32 master shards).
    """
    from ..errors import InputError

    ds_dir = path / DS_TAG
    if ds_dir.is_dir():
        if any(ds_dir.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
            return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
        raise InputError("a DeepSpeed checkpoint without ZeRO optimizer shards (stage 0) cannot be resumed on "
                         "another number of processes; resume it on the world size that wrote it", path=str(ds_dir))
    weights = path / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file
        return load_file(str(weights))
    raise InputError("checkpoint holds neither DeepSpeed shards nor model.safetensors", path=str(path))
