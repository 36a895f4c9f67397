"""Load a model DIR with an optional PEFT adapter DIR (fingerprint-checked) for serving and evaluation."""
from __future__ import annotations

from pathlib import Path

from ..models.loading import load_base_model
from .adapters import attach_adapter, check_base


def load_model(model_dir: str | Path, adapter: str | Path | None = None, allow_unverified_adapter: bool = False):
    """A plain-process model (safetensors weights only), with the adapter applied when given."""
    if adapter:
        check_base(model_dir, adapter, allow_unverified_adapter)   # before the base is loaded
    model = load_base_model(model_dir)
    if adapter:
        model = attach_adapter(model, adapter)      # checked against the base above
    return model.eval()
