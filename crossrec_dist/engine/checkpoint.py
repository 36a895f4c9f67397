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
    return json.loads((path / STATE).read_text())
