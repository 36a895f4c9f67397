"""A base model's fingerprint: SHA-256 over its weight files, so an adapter never meets a foreign base."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import InputError

FILE = "crossrec_adapter.json"


def base_fingerprint(model_dir: str | Path) -> str:
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputError("no *.safetensors weights to fingerprint", path=str(model_dir))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()
