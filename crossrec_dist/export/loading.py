"""Load a model DIR with an optional PEFT adapter DIR (fingerprint-checked) for serving and evaluation."""
from __future__ import annotations

import json
from pathlib import Path

from ..models.extend import extend_items
from ..models.loading import load_base_model
from .adapters import attach_adapter, check_base
from .fingerprint import FILE


def adapter_items(adapter_dir) -> int | None:
    """The item count an adapter was trained with when it extends its base's vocabulary (None: the base's)."""
    path = Path(adapter_dir) / FILE
    return json.loads(path.read_text()).get("num_items") if path.is_file() else None


def load_model(model_dir: str | Path, adapter: str | Path | None = None, allow_unverified_adapter: bool = False):
    """A plain-process model (safetensors weights only), with the adapter applied when given."""
    if adapter:
        check_base(model_dir, adapter, allow_unverified_adapter)   # before the base is loaded
    model = load_base_model(model_dir)
    if adapter:
        items = adapter_items(adapter)
        if items:       # trained on the base's item table grown to its region's vocabulary (--vocab-from)
            extend_items(model, items)
        model = attach_adapter(model, adapter)      # checked against the base above
    return model.eval()
