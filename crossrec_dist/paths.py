"""Folder names derived from data (domain names, method names), and writes that stay inside their folder.

Domain and item names are data: a log may call a region ``../x``, ``/etc`` or ``a/b``. Whenever such
a name becomes part of a path it goes through :func:`safe_name` (a readable slug, plus a short hash
of the original when anything had to change, so two different names never share a folder) and the
result is checked with :func:`inside` (resolved, it must stay under the output folder).
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

from .errors import InputError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A single path component for ``name``: letters, digits, ``._-`` only, never ``.``/``..``/hidden.

    Names that are already safe are kept as they are (``0``, ``lora``, ``north-east``); any other
    name becomes its slug plus ``-`` and 8 hex digits of its SHA-256, so the mapping is one-to-one
    in practice and stable across runs.
    """
    name = str(name)
    slug = _UNSAFE.sub("_", name).strip("._") or "_"
    if slug == name and len(name) <= 100:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug[:80]}-{digest}"


def inside(root: str | Path, *parts: str) -> Path:
    """``root / safe_name(part) / ...``, proved to resolve inside ``root``."""
    root = Path(root)
    path = root.joinpath(*(safe_name(p) for p in parts))
    base = root.resolve()
    if not path.resolve().is_relative_to(base):   # unreachable with safe names; kept as the proof
        raise InputError(f"refusing to write outside {root}", path=str(path))
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output folder we can create or reuse: not an existing file, not under a file, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError("output path exists and is not a folder", path=str(path), field=flag)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"{parent} is a file, not a folder", path=str(path), field=flag)
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        # One probe per process: every rank of every node checks the same shared folder at once, and
        # with one name a rank unlinked the probe another had just written (ENOENT on two nodes).
        probe = path / f".crossrec_write_probe.{socket.gethostname()}.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise InputError(f"cannot write here: {e.strerror or e}", path=str(path), field=flag) from None
    return path
