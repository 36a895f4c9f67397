"""Distilled students in a bundle: ``students/<region>/`` with ``model.onnx`` run by ONNX Runtime.

``student.json`` is the student's contract, written by ``crossrec export --student`` and read here:

- ``region``: the one region it serves (its teacher's); a server refuses it for any other.
- ONNX inputs: ``input_ids`` int64 (batch, ``max_len``): item ids = positions in ``items.json`` + 1,
  left-padded with 0 to ``max_len``, oldest first; ``domain_ids`` int64 (batch,): ``domain_id``
  (present only when the model has domain embeddings). Output ``scores`` float32 (batch, items + 1):
  column 0 is the padding id.
- ``default``: true when the region is answered by its student unless a request asks otherwise.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..export.loading import check_model_weights
from ..export.onnx import export_onnx, onnx_feed, onnx_parity, require_onnx
from ..export.vocab import VOCAB, read_vocab
from ..jsonfile import read_json
from ..models.loading import load_model_config
from ..paths import inside
from .shared_adapters import weights_version

STUDENTS = "students"
CONTRACT = "student.json"


@dataclass
class Student:
    region: str
    folder: Path
    vocab: list[str] | None
    version: str
    domain_id: int
    default: bool
    session: object

    def scores(self, ids: np.ndarray, doms: np.ndarray) -> np.ndarray:
        return self.session.run(["scores"], onnx_feed(self.session, ids, doms))[0]


def student_region(student_dir: str | Path) -> str:
    """The region a distilled student serves: its metrics.json (``crossrec distill --domain``)."""
    path = Path(student_dir) / "metrics.json"
    if not path.is_file():
        raise InputError("not a student written by 'crossrec distill' (no metrics.json naming its region)",
                         path=str(student_dir), field="--student")
    record = read_json(path)
    if record.get("stage") != "distill" or not record.get("domain"):
        raise InputError("not a distilled student (metrics.json is not from 'crossrec distill')", path=str(path),
                         field="--student")
    return str(record["domain"])


def write_student(student_dir: str | Path, out_root: Path, default: bool, log=print) -> Path:
    """Copy a distilled student into ``out_root/<region>/`` with its ONNX graph (parity-checked) and
    contract."""
    student_dir = Path(student_dir)
    check_model_weights(student_dir)
    region = student_region(student_dir)
    config = load_model_config(student_dir)
    target = inside(out_root, region)
    if target.exists():
        raise InputError(f"two students for region {region!r}", path=str(student_dir), field="--student")
    target.mkdir(parents=True)
    for f in student_dir.iterdir():
        if f.name in ("config.json", VOCAB, "metrics.json") or f.suffix == ".safetensors":
            shutil.copy2(f, target / f.name)
    onnx_file = export_onnx(target, target / "model.onnx")
    diff = onnx_parity(target, onnx_file)
    if diff > 1e-3:
        raise RuntimeError(f"ONNX scores of the student for {region!r} differ from PyTorch by {diff:.2e}")
    domains = list(config.domain_names or [])
    contract = {
        "region": region, "default": bool(default), "max_len": config.max_len, "num_items": config.num_items,
        "domain_id": domains.index(region) if region in domains else 0,
        "inputs": {"input_ids": "int64 (batch, max_len): item id = position in items.json + 1, left-padded with 0",
                   "domain_ids": "int64 (batch,): domain_id (absent when the graph has no domain input)"},
        "outputs": {"scores": "float32 (batch, num_items + 1); column 0 is padding"},
    }
    (target / CONTRACT).write_text(json.dumps(contract, indent=2))
    log(f"student for {region} -> {target} (ONNX, max |diff| vs PyTorch {diff:.1e})")
    return target


def read_students(root: str | Path | None) -> list[Student]:
    """Every student under ``root`` (none when ``root`` is None), each with an ONNX Runtime session."""
    if root is None:
        return []
    folders = sorted(p for p in Path(root).iterdir() if (p / CONTRACT).is_file())
    if not folders:
        return []
    require_onnx("students/ (serving a bundle's students)")
    ort = importlib.import_module("onnxruntime")
    out = []
    for folder in folders:
        contract = read_json(folder / CONTRACT)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("CROSSREC_ORT_THREADS", "0"))  # 0: ONNX Runtime's choice
        session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        out.append(Student(str(contract["region"]), folder, read_vocab(folder),
                           weights_version(folder, files=("model.onnx",)), int(contract.get("domain_id", 0)),
                           bool(contract.get("default", False)), session))
    return out
