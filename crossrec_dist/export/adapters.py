"""Adapters: attach a saved PEFT adapter to its base, refusing a base with another fingerprint.

An AdaLoRA adapter with ``adalora.table_r`` is two PEFT adapters in one folder, PEFT's own layout for
several adapters: AdaLoRA on the linear layers at the top (adapter ``default``) and a LoRA adapter on
the item table, with the per-item offsets, in ``item_table/``. PEFT's AdaLoRA has no embedding layer and
a ``PeftModel`` holds one adapter type, so the two load together as a ``PeftMixedModel``
(``apply_adapter`` below; docs/studies.md shows it in plain peft).
"""
from __future__ import annotations

from pathlib import Path

from peft import PeftMixedModel, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ..errors import InputError
from ..jsonfile import read_json
from .fingerprint import FILE, base_fingerprint


ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"


def pickle_refusal(kind: str, file: str) -> str:
    """One wording for every pickled-weights refusal (adapters here, model folders in loading.py)."""
    return (f"{kind} weights are a pickle ({file}); crossrec loads only safetensors: "
            f"re-save with save_pretrained(..., safe_serialization=True)")


def check_adapter_weights(adapter_dir: str | Path, field: str | None = None) -> None:
    """The adapter's weights are safetensors, in each of its PEFT folders (a mixed adapter has two).

    PEFT falls back to ``adapter_model.bin`` by itself and unpickles it with torch.load: loading a
    pickle runs whatever code it holds, so a folder with only the pickle is refused, naming it, before
    PEFT is asked to load anything."""
    adapter_dir = Path(adapter_dir)
    for folder in (adapter_dir, adapter_dir / TABLE_ADAPTER) if is_mixed(adapter_dir) else (adapter_dir,):
        if (folder / ADAPTER_WEIGHTS).is_file():
            continue
        if (folder / ADAPTER_PICKLE).is_file():
            raise InputError(pickle_refusal("adapter", ADAPTER_PICKLE), path=str(folder), field=field)
        raise InputError(f"not an adapter folder (no {ADAPTER_WEIGHTS})", path=str(folder), field=field)


def adapter_info(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError("not a PEFT adapter folder (no adapter_config.json)", path=str(adapter_dir))
    info = adapter_dir / FILE
    return read_json(info) if info.is_file() else {}


def check_base(model_dir: str | Path, adapter_dir: str | Path, allow_unverified: bool = False) -> None:
    """The adapter was trained on this base (weights fingerprint). An adapter without a fingerprint
    (made outside crossrec, or its crossrec_adapter.json lost) is refused unless the caller says
    explicitly to apply it unverified: on a foreign base it would score without a word of warning."""
    want = adapter_info(adapter_dir).get("base_fingerprint")
    check_adapter_weights(adapter_dir)       # every loader checks the base first: one place for all
    if want is None:
        if allow_unverified:
            return
        raise InputError(f"adapter has no {FILE} recording the base it was trained on, so it cannot be checked "
                         f"against {model_dir}; pass --allow-unverified-adapter to apply it anyway",
                         path=str(Path(adapter_dir) / FILE))
    have = base_fingerprint(model_dir)
    if have != want:
        raise InputError(f"adapter was trained on base {want[:19]}..., but {model_dir} is {have[:19]}...; "
                         f"apply it to the base it was trained on", path=str(Path(adapter_dir) / FILE),
                         field="base_fingerprint")


TABLE_ADAPTER = "item_table"


def is_mixed(adapter_dir: str | Path) -> bool:
    """Is this folder AdaLoRA on the linears plus LoRA on the item table (two adapters, one folder)?"""
    return (Path(adapter_dir) / TABLE_ADAPTER / "adapter_config.json").is_file()


def apply_adapter(model, model_dir: str | Path, adapter_dir: str | Path, name: str = "default",
                  allow_unverified: bool = False):
    check_base(model_dir, adapter_dir, allow_unverified)
    return attach_adapter(model, adapter_dir, name)


def attach_adapter(model, adapter_dir: str | Path, name: str = "default"):
    """The adapter on ``model``, for a caller that has already run ``check_base`` (it hashes the
    base's weights: once per load is enough)."""
    check_adapter_weights(adapter_dir)       # cheap (a stat per folder); PEFT would unpickle a .bin
    if not is_mixed(adapter_dir):
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
    model = PeftMixedModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
    model.load_adapter(str(Path(adapter_dir) / TABLE_ADAPTER), adapter_name=TABLE_ADAPTER)
    model.set_adapter([name, TABLE_ADAPTER])
    return model


def save_mixed_adapter(model, state_dict: dict, out_dir: Path) -> None:
    """Write a mixed model's two adapters as PEFT writes one each (``PeftMixedModel`` has no
    ``save_pretrained`` in peft 0.21): config JSON plus safetensors, the table's in ``item_table/``.
    The AdaLoRA part keeps its trained size (init_r, the pruned singular values zero, so it computes
    what the allocation chose) and no ``rank_pattern``: with one, PEFT would shrink the modules on
    load, which a mixed model cannot do. The chosen ranks go to crossrec_adapter.json instead."""
    for name, folder in (("default", out_dir), (TABLE_ADAPTER, out_dir / TABLE_ADAPTER)):
        config = model.peft_config[name]
        pattern, inference = getattr(config, "rank_pattern", None), config.inference_mode
        try:
            if config.peft_type == "ADALORA":
                config.rank_pattern = None
            weights = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=name)
            folder.mkdir(parents=True, exist_ok=True)
            config.inference_mode = True
            config.save_pretrained(str(folder))
        finally:
            config.rank_pattern, config.inference_mode = pattern, inference
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
