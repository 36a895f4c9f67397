"""Load a model DIR with an optional PEFT adapter DIR (fingerprint-checked) for serving and evaluation."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from ..models.extend import extend_items
from ..models.loading import load_base_model
from .adapters import attach_adapter, check_base, pickle_refusal
from .fingerprint import FILE

# transformers' pickled checkpoints: one file, or shards listed by an index.
MODEL_PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def adapter_items(adapter_dir) -> int | None:
    """The item count an adapter was trained with when it extends its base's vocabulary (None: the base's)."""
    path = Path(adapter_dir) / FILE
    return json.loads(path.read_text()).get("num_items") if path.is_file() else None


def check_model_weights(model_dir: str | Path) -> None:
    """A model folder whose weights exist only as a pickle is refused by name, with how to convert it.

    load_base_model would refuse it too (use_safetensors=True), but only as "no *.safetensors weights",
    which reads like a broken copy rather than a format crossrec will not unpickle."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or any(model_dir.glob("*.safetensors")):
        return
    pickled = next((name for name in MODEL_PICKLES if (model_dir / name).is_file()), None)
    if pickled is not None:
        raise InputError(pickle_refusal("model", pickled), path=str(model_dir))


def load_model(model_dir: str | Path, adapter: str | Path | None = None, allow_unverified_adapter: bool = False):
    """A plain-process model (safetensors weights only), with the adapter applied when given."""
    check_model_weights(model_dir)
    if adapter:
        check_base(model_dir, adapter, allow_unverified_adapter)   # before the base is loaded
    model = load_base_model(model_dir)
    if adapter:
        items = adapter_items(adapter)
        if items:       # trained on the base's item table grown to its region's vocabulary (--vocab-from)
            extend_items(model, items)
        model = attach_adapter(model, adapter)      # checked against the base above
    return model.eval()
