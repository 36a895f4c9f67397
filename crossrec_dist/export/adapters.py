"""Adapters: attach a saved PEFT adapter to its base, refusing a base with another fingerprint."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..jsonfile import read_json
from .fingerprint import FILE, base_fingerprint


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


def apply_adapter(model, model_dir: str | Path, adapter_dir: str | Path, name: str = "default",
                  allow_unverified: bool = False):
    from peft import PeftModel
    check_base(model_dir, adapter_dir, allow_unverified)
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
