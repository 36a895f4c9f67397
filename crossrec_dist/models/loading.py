"""Load a model DIR for inference or fine-tuning, with errors that name the folder and file."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` holds a crossrec ``config.json`` and safetensors weights."""
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise InputError("not a model folder (no config.json)", path=str(model_dir))
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise InputError(f"config.json is not valid JSON: {e}", path=str(cfg)) from None
    if model_type != "crossrec":
        raise InputError("config.json is not a crossrec model", path=str(cfg), field="model_type")
    if not any(model_dir.glob("*.safetensors")):
        raise InputError("no *.safetensors weights", path=str(model_dir))
    return model_dir


def load_model_config(model_dir: str | Path):
    from .config import CrossRecConfig
    return CrossRecConfig.from_pretrained(check_model_dir(model_dir))


def load_base_model(model_dir: str | Path):
    """A plain-process model, safetensors weights only, in eval mode."""
    from .model import CrossRecModel
    return CrossRecModel.from_pretrained(check_model_dir(model_dir), use_safetensors=True).eval()
