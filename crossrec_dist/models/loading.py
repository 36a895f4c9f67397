"""Load a model DIR (and optionally a PEFT adapter DIR) for inference, with clear errors."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


def load_model(model_dir: str | Path, adapter: str | Path | None = None):
    """A plain-process model (safetensors weights only), with the adapter applied when given."""
    from .model import CrossRecModel

    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise InputError("not a model folder (no config.json)", path=str(model_dir))
    if json.loads(cfg.read_text()).get("model_type") != "crossrec":
        raise InputError("config.json is not a crossrec model", path=str(cfg), field="model_type")
    if not any(model_dir.glob("*.safetensors")):
        raise InputError("no *.safetensors weights", path=str(model_dir))
    model = CrossRecModel.from_pretrained(model_dir, use_safetensors=True)
    if adapter:
        from ..export.adapters import apply_adapter
        model = apply_adapter(model, model_dir, adapter)
    return model.eval()


def load_scorer(model_dir, adapter=None, max_len: int | None = None):
    from ..stages.common import model_scorer, param_counts

    model = load_model(model_dir, adapter)
    base_cfg = model.config if hasattr(model, "config") else model.base_model.config
    return model_scorer(model), param_counts(model), max_len or base_cfg.max_len
