"""Load a model DIR for inference or fine-tuning, with errors that name the folder and file."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from ..errors import InputError
from ..jsonfile import read_json
from .config import CrossRecConfig
from .model import CrossRecModel


def check_model_dir(model_dir: str | Path) -> Path:
    """``model_dir`` holds a crossrec ``config.json`` and safetensors weights."""
    model_dir = Path(model_dir)
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        raise InputError("not a model folder (no config.json)", path=str(model_dir))
    model_type = read_json(cfg).get("model_type")
    if model_type != "crossrec":
        raise InputError("config.json is not a crossrec model", path=str(cfg), field="model_type")
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        pickled = next((n for n in ("pytorch_model.bin", "model.bin", "pytorch_model.pt") if (model_dir / n).is_file()), None)
        if pickled:
            raise InputError(f"model weights are a pickle ({pickled}); crossrec loads only safetensors: re-save with "
                             "save_pretrained(..., safe_serialization=True)", path=str(model_dir))
        raise InputError("no *.safetensors weights", path=str(model_dir))
    for f in weights:
        check_safetensors(f)
    return model_dir


def check_safetensors(path: Path) -> None:
    """The file's header parses and its tensors cover the file exactly (a truncated copy fails here,
    naming the file, instead of deep inside from_pretrained). Reads the header only."""
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except Exception as e:   # safetensors raises its own SafetensorError (no public base class)
        raise InputError(f"truncated or not a safetensors file ({e})", path=str(path)) from None


def load_model_config(model_dir: str | Path):
    path = check_model_dir(model_dir)
    try:
        return CrossRecConfig.from_pretrained(path)
    except (TypeError, ValueError) as e:
        raise InputError(f"bad model configuration: {e}", path=str(path / "config.json")) from None


def load_base_model(model_dir: str | Path):
    """A plain-process model, safetensors weights only, in eval mode."""
    config = load_model_config(model_dir)
    try:
        return CrossRecModel.from_pretrained(Path(model_dir), config=config, use_safetensors=True).eval()
    except (RuntimeError, ValueError, KeyError) as e:   # shapes or names that do not fit config.json
        raise InputError(f"weights do not fit config.json: {str(e).splitlines()[0]}", path=str(model_dir)) from None
