"""The item vocabulary travels with every model: ``items.json`` maps index i+1 -> raw item id."""
from __future__ import annotations

import json
from pathlib import Path

VOCAB = "items.json"


def write_vocab(data, out_dir: str | Path) -> None:
    import datasets
    ids = datasets.load_from_disk(str(Path(data.path) / "items"))["item_id"]
    (Path(out_dir) / VOCAB).write_text(json.dumps(list(ids)))


def read_vocab(model_dir: str | Path) -> list[str] | None:
    path = Path(model_dir) / VOCAB
    return json.loads(path.read_text()) if path.is_file() else None
