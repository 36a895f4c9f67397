"""ONNX export of a model DIR (students, merged regional models) and a parity check with ONNX Runtime.

The graph takes left-padded histories of a fixed length (the model's ``max_len``) and a domain id
per row, and returns scores over every item; batch size is dynamic.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .loading import load_model


# What ``export --onnx`` imports: torch's exporter needs onnx, the parity check onnxruntime. onnxscript,
# also in the extra, serves only torch's dynamo exporter, which export_model_onnx does not use.
ONNX_PACKAGES = ("onnx", "onnxruntime")


def require_onnx(flag: str = "--onnx") -> None:
    """Refuse before anything is written when the optional [onnx] extra does not import.

    Without it torch fails deep inside its exporter (or onnx_parity at its import) after the bundle
    was half written. A real import, not only find_spec: a package present but broken (a wheel for
    another Python, a missing shared library) must be refused here too."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except (ImportError, OSError) as e:
            missing.append(f"{name} ({e})")
    if missing:
        raise InputError(f"ONNX export needs the optional [onnx] extra, and {'; '.join(missing)} cannot be "
                         f"imported: pip install 'crossrec-dist[onnx]' (or leave out {flag})", field=flag)


class _ScoreGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, domain_ids):
        return self.model(input_ids=input_ids, domain_ids=domain_ids, return_scores=True)


def example_inputs(num_items: int, max_len: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, num_items + 1, (batch, max_len), generator=g)
    ids[0, : max_len // 2] = 0   # one left-padded row
    return ids, torch.zeros(batch, dtype=torch.long)


def export_onnx(model_dir: str | Path, out_file: str | Path) -> Path:
    return export_model_onnx(load_model(model_dir), out_file)


def export_model_onnx(model, out_file: str | Path) -> Path:
    """``model``: a plain CrossRecModel (e.g. a base with its region adapter merged in)."""
    require_onnx()
    model.config._attn_implementation = "eager"
    model.backbone.config._attn_implementation = "eager"
    graph = _ScoreGraph(model).eval()
    ids, doms = example_inputs(model.config.num_items, model.config.max_len)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(graph, (ids, doms), str(out_file), input_names=["input_ids", "domain_ids"],
                          output_names=["scores"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch"}, "domain_ids": {0: "batch"}, "scores": {0: "batch"}})
    return out_file


def onnx_parity(model_dir: str | Path, onnx_file: str | Path, batch: int = 8) -> float:
    """Max |score difference| between ONNX Runtime and PyTorch on random left-padded histories."""
    require_onnx()
    import onnxruntime as ort   # the optional [onnx] extra, not installed by default

    if not Path(onnx_file).is_file():
        raise InputError("no such ONNX file", path=str(onnx_file))
    model = load_model(model_dir)
    ids, doms = example_inputs(model.config.num_items, model.config.max_len, batch=batch, seed=1)
    with torch.no_grad():
        ref = model(input_ids=ids, domain_ids=doms, return_scores=True).numpy()
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = sess.run(["scores"], onnx_feed(sess, ids.numpy(), doms.numpy()))[0]
    return float(np.abs(got - ref).max())


def onnx_feed(sess, ids: np.ndarray, doms: np.ndarray) -> dict:
    """Inputs the graph kept (a model without domain embeddings has no domain_ids input)."""
    names = {i.name for i in sess.get_inputs()}
    return {k: v for k, v in (("input_ids", ids), ("domain_ids", doms)) if k in names}
