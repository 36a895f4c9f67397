"""Step records of an experiment folder: what a step ran with, hashed, and what changed since.

A record is ``OUT/steps/.../<step>.json``: the step's settings (its command's arguments, with paths
inside OUT written relative to it as ``<out>/...``, its launch config, and the full config YAML it
read, as a dict), the hashes of the steps it reads from, and the hash of both together. A step's
hash therefore changes when any step upstream of it changes.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

VERSION = 2          # part of every hash; a folder with records of another format is refused as a whole
_UNSET = object()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, doc) -> None:
    write_atomic(path, json.dumps(doc, indent=2) + "\n")


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or unreadable (then it is not trusted)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plain(doc):
    """``doc`` as JSON gives it back (tuples -> lists, keys -> str), so a record compares equal to itself."""
    return json.loads(json.dumps(doc, default=str))


def digest(settings: dict, upstream: dict[str, str]) -> str:
    doc = {"version": VERSION, "settings": settings, "upstream": upstream}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def flatten(settings: dict) -> dict:
    """Dotted keys -> values: ``pretrain.train.lr``; command-line options keep their flag (``--domains``)."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = value

    for key, value in settings.items():
        if key == "options" and isinstance(value, dict):
            flat.update(value)
        else:
            walk(key, value)
    return flat


def _show(value) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


def differences(record: dict, settings: dict, upstream: dict[str, str]) -> list[str]:
    """What differs between a step's record and its settings now, one ``key: old -> new`` per line."""
    old, new = flatten(record.get("settings") or {}), flatten(settings)
    lines = [f"{k}: {_show(old.get(k, _UNSET))} -> {_show(new.get(k, _UNSET))}"
             for k in [*new, *(k for k in old if k not in new)] if old.get(k, _UNSET) != new.get(k, _UNSET)]
    was = record.get("upstream") or {}
    lines += [f"upstream step '{dep}' changed" for dep, h in upstream.items() if was.get(dep) != h]
    lines += [f"no longer reads from step '{dep}'" for dep in was if dep not in upstream]
    return lines or ["its recorded hash differs from its settings' hash"]
