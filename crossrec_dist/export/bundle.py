"""``crossrec export``: a deployable folder: the base, the per-region adapters with their manifest,
and optionally merged per-region models (adapter folded into a copy of the base, in one process on
consolidated weights: merging into ZeRO-3 shards fails on size-0 tensors).

The bundle is written into a hidden staging folder inside ``--out`` and moved into place only when
every part (merges, ONNX graphs and their parity checks) is done: an export that fails or is killed
half way leaves the previous bundle, or none, never a bundle that looks complete and is not."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import InputError
from ..models.extend import extend_items
from ..models.model import CrossRecModel
from ..paths import check_output_dir, inside
from .adapters import apply_adapter, check_adapter_weights
from .loading import adapter_items, check_model_weights, load_model
from .manifest import read_manifest
from .onnx import export_onnx, onnx_parity, require_onnx
from .vocab import POPULARITY, UNTRAINED, VOCAB
from ..jsonfile import read_json
from ..serving.students import CONTRACT, STUDENTS, student_region, write_student

# The entries of --out a bundle consists of; an export replaces all of them together (an old merged/
# next to a new base/ would serve stale models), and leaves anything else in --out alone.
BUNDLE_PARTS = ("base", "adapters", "merged", "students")


def export_bundle(base: str, adapters: str | None, out: str, merge: bool = False, onnx: bool = False,
                  log=print, students: list[str] = (), student_default: bool = False) -> Path:
    """``adapters`` may be None: then the bundle is the base (e.g. a distilled student) alone."""
    out_dir, base_dir = Path(out), Path(base)
    ad_root = Path(adapters) if adapters else None
    manifest = read_manifest(ad_root) if ad_root else {"domains": {}}
    if merge and ad_root is None:
        raise InputError("--merge needs --adapters", field="--merge")
    if student_default and not students:
        raise InputError("--student-default needs --student", field="--student-default")
    if onnx or students:
        require_onnx("--student" if students and not onnx else "--onnx")      # before anything is written
    for student in students:
        student_region(student)
    load_model(base_dir)  # fail early on a bad base
    _check_regions(ad_root, manifest)
    created = not out_dir.exists()
    check_output_dir(out_dir)
    stage = out_dir / f".export.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        _write_bundle(stage, out_dir, base_dir, ad_root, manifest, merge, onnx, log)
        for student in students:
            write_student(student, stage / STUDENTS, student_default, log)
        _readable(stage)
        _swap_in(stage, out_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()       # a failed export into a new folder leaves no empty "bundle" behind
    log(f"exported {len(manifest['domains'])} domain(s) -> {out_dir}")
    return out_dir


def _readable(root: Path) -> None:
    """Every file of the bundle readable as the umask allows (safetensors writes its files 0600, so a
    service user other than the one who exported could not load the weights)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _check_regions(ad_root: Path | None, manifest: dict) -> None:
    """Every region's weights are safetensors before the bundle is written: a pickled adapter copied
    into a bundle would fail only when ``recommend`` first loads it."""
    for entry in manifest["domains"].values():
        if entry["kind"] == "adapter":
            check_adapter_weights(inside(ad_root, entry["path"]))
        elif entry["kind"] == "model":
            check_model_weights(inside(ad_root, entry["path"]))


def _write_bundle(stage: Path, out_dir: Path, base_dir: Path, ad_root: Path | None, manifest: dict,
                  merge: bool, onnx: bool, log) -> None:
    """The whole bundle under ``stage``; logs name the paths it will have under ``out_dir``."""
    keep = ("config.json", "model.safetensors", "model.safetensors.index.json", VOCAB, UNTRAINED, POPULARITY)
    (stage / "base").mkdir()
    for f in base_dir.iterdir():
        if f.name in keep or (f.suffix == ".safetensors"):
            shutil.copy2(f, stage / "base" / f.name)
    if (base_dir / "metrics.json").is_file() and read_json(base_dir / "metrics.json").get("stage") == "distill":
        # a student exported as the bundle's base serves its own region only (and says so)
        (stage / "base" / CONTRACT).write_text(json.dumps({"region": student_region(base_dir)}))
    if ad_root is not None:
        shutil.copytree(ad_root, stage / "adapters",
                        ignore=shutil.ignore_patterns("best", "checkpoints", "logs", "*.tmp", ".export.*"))
    if merge:
        for domain, entry in manifest["domains"].items():
            if entry["kind"] != "adapter":
                continue
            folder = inside(ad_root, entry["path"])
            base_model = CrossRecModel.from_pretrained(base_dir, use_safetensors=True)
            if adapter_items(folder):           # trained on the base's table grown to the region's items
                extend_items(base_model, adapter_items(folder))
            merged = apply_adapter(base_model, base_dir, folder).merge_and_unload()
            target = inside(stage / "merged", domain)
            merged.save_pretrained(target, safe_serialization=True)
            vocab = folder / VOCAB if adapter_items(folder) else base_dir / VOCAB
            if vocab.is_file():
                shutil.copy2(vocab, target / VOCAB)
            if (folder / POPULARITY).is_file():      # the region's answer to a user with no known events
                shutil.copy2(folder / POPULARITY, target / POPULARITY)
            log(f"merged {domain} -> {out_dir / target.relative_to(stage)}")
    if onnx:
        targets = [stage / "base"] + sorted((stage / "merged").glob("*")) if merge else [stage / "base"]
        for model_dir in targets:
            f = export_onnx(model_dir, model_dir / "model.onnx")
            diff = onnx_parity(model_dir, f)
            if diff > 1e-3:
                raise RuntimeError(f"ONNX scores differ from PyTorch by {diff:.2e} for "
                                   f"{out_dir / model_dir.relative_to(stage)}")
            log(f"onnx {out_dir / f.relative_to(stage)} (max |diff| vs PyTorch {diff:.1e})")


def _swap_in(stage: Path, out_dir: Path) -> None:
    """Replace the bundle parts of ``out_dir`` by those in ``stage``: renames inside one folder (one
    file system), the old parts kept aside until the new ones are all in, and put back on failure."""
    old = out_dir / f".export.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    moved_aside, moved_in = [], []
    try:
        for part in BUNDLE_PARTS:
            if (out_dir / part).exists() or (out_dir / part).is_symlink():
                os.replace(out_dir / part, old / part)
                moved_aside.append(part)
        for part in BUNDLE_PARTS:
            if (stage / part).exists():
                os.replace(stage / part, out_dir / part)
                moved_in.append(part)
    except OSError as e:
        for part in moved_in:
            os.replace(out_dir / part, stage / part)
        for part in moved_aside:
            os.replace(old / part, out_dir / part)
        shutil.rmtree(old, ignore_errors=True)
        raise InputError(f"cannot move the exported bundle into place: {e.strerror or e}", path=str(out_dir),
                         field="--out") from None
    shutil.rmtree(old, ignore_errors=True)
