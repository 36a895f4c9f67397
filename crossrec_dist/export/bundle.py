"""``crossrec export``: a deployable folder: the base, the per-region adapters with their manifest,
and optionally merged per-region models (adapter folded into a copy of the base, in one process on
consolidated weights: merging into ZeRO-3 shards fails on size-0 tensors)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError
from ..models.extend import extend_items
from ..models.model import CrossRecModel
from ..paths import inside
from .adapters import apply_adapter
from .loading import adapter_items, load_model
from .manifest import read_manifest
from .onnx import export_onnx, onnx_parity
from .vocab import POPULARITY, UNTRAINED, VOCAB


def export_bundle(base: str, adapters: str | None, out: str, merge: bool = False, onnx: bool = False,
                  log=print) -> Path:
    """``adapters`` may be None: then the bundle is the base (e.g. a distilled student) alone."""
    out_dir, base_dir = Path(out), Path(base)
    ad_root = Path(adapters) if adapters else None
    manifest = read_manifest(ad_root) if ad_root else {"domains": {}}
    if merge and ad_root is None:
        raise InputError("--merge needs --adapters", field="--merge")
    load_model(base_dir)  # fail early on a bad base
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = ("config.json", "model.safetensors", "model.safetensors.index.json", VOCAB, UNTRAINED, POPULARITY)
    (out_dir / "base").mkdir(exist_ok=True)
    for f in base_dir.iterdir():
        if f.name in keep or (f.suffix == ".safetensors"):
            shutil.copy2(f, out_dir / "base" / f.name)
    if ad_root is not None:
        dest = out_dir / "adapters"
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ad_root, dest, ignore=shutil.ignore_patterns("best", "checkpoints", "logs", "*.tmp"))
    if merge:
        for domain, entry in manifest["domains"].items():
            if entry["kind"] != "adapter":
                continue
            folder = inside(ad_root, entry["path"])
            base_model = CrossRecModel.from_pretrained(base_dir, use_safetensors=True)
            if adapter_items(folder):           # trained on the base's table grown to the region's items
                extend_items(base_model, adapter_items(folder))
            merged = apply_adapter(base_model, base_dir, folder).merge_and_unload()
            target = inside(out_dir / "merged", domain)
            merged.save_pretrained(target, safe_serialization=True)
            vocab = folder / VOCAB if adapter_items(folder) else base_dir / VOCAB
            if vocab.is_file():
                shutil.copy2(vocab, target / VOCAB)
            if (folder / POPULARITY).is_file():      # the region's answer to a user with no known events
                shutil.copy2(folder / POPULARITY, target / POPULARITY)
            log(f"merged {domain} -> {target}")
    if onnx:
        targets = [out_dir / "base"] + sorted((out_dir / "merged").glob("*")) if merge else [out_dir / "base"]
        for model_dir in targets:
            f = export_onnx(model_dir, model_dir / "model.onnx")
            diff = onnx_parity(model_dir, f)
            if diff > 1e-3:
                raise RuntimeError(f"ONNX scores differ from PyTorch by {diff:.2e} for {model_dir}")
            log(f"onnx {f} (max |diff| vs PyTorch {diff:.1e})")
    log(f"exported {len(manifest['domains'])} domain(s) -> {out_dir}")
    return out_dir
