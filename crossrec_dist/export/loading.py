"""Load a model DIR with an optional PEFT adapter DIR (fingerprint-checked) for serving and evaluation."""
from __future__ import annotations

from pathlib import Path


def load_model(model_dir: str | Path, adapter: str | Path | None = None):
    """A plain-process model (safetensors weights only), with the adapter applied when given."""
    from ..models.loading import load_base_model
    model = load_base_model(model_dir)
    if adapter:
        from .adapters import apply_adapter
        model = apply_adapter(model, model_dir, adapter)
    return model.eval()
