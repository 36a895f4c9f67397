"""``manifest.json`` of an adapters folder: one entry per domain (method, parameters, metrics, base)."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..methods import get_method
from ..paths import safe_name
from .fingerprint import base_fingerprint

MANIFEST = "manifest.json"


def update_manifest(root: str | Path, base_dir: str | Path, domain: str, record: dict) -> dict:
    root = Path(root)
    path = root / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {
        "base": str(Path(base_dir).resolve()), "base_fingerprint": base_fingerprint(base_dir), "domains": {}}
    manifest["domains"][domain] = {
        "path": safe_name(domain), "method": record["method"],
        "kind": get_method(record["method"]).output,     # adapter | model | none
        "params": record["params"], "valid": record["valid"], "test": record["test"],
        "new_items": record.get("new_items", 0),
    }
    tmp = path.with_suffix(".tmp")
    root.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
    return manifest


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise InputError(f"no {MANIFEST}: not an adapters folder written by 'crossrec finetune --domains'",
                         path=str(root))
    return json.loads(path.read_text())
