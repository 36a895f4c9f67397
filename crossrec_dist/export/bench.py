"""Serving cost on this machine's CPU: one-request latency (p50/p99) and batch throughput.

A request is one left-padded 50-item history scored against the whole catalogue. The teacher
(base + adapter, merged as it would be served) and the student are measured in the same process,
alternately, so their ratio is not skewed by machine load drifting between them: once in PyTorch
(eager, what ``Recommender`` runs) and, with ``onnx=True``, once as exported ONNX graphs in ONNX
Runtime (what a deployment would run), each runtime's ratio measured within itself.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .loading import load_model
from .onnx import export_model_onnx, onnx_feed, require_onnx


def _serving_model(model_dir, adapter=None, allow_unverified_adapter: bool = False):
    model = load_model(model_dir, adapter, allow_unverified_adapter)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval()


def _latencies(model, ids: torch.Tensor, reps: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for i in range(reps):
            x = ids[i % len(ids)][None]
            t0 = time.perf_counter()
            model(input_ids=x, domain_ids=torch.zeros(1, dtype=torch.long), return_scores=True)
            out.append((time.perf_counter() - t0) * 1000)
    return out


def _throughput(model, ids: torch.Tensor, batch: int, reps: int) -> float:
    x = ids[:batch]
    d = torch.zeros(len(x), dtype=torch.long)
    with torch.inference_mode():
        model(input_ids=x, domain_ids=d, return_scores=True)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(input_ids=x, domain_ids=d, return_scores=True)
    return reps * len(x) / (time.perf_counter() - t0)


class _OrtScorer:
    """An ONNX Runtime session behind the same call as the PyTorch model (for the timers above)."""

    def __init__(self, model, workdir: Path, name: str):
        import onnxruntime as ort   # the optional [onnx] extra: only with --onnx
        path = export_model_onnx(model, workdir / f"{name}.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self._feed = onnx_feed

    def __call__(self, input_ids, domain_ids, return_scores=True):
        return self.sess.run(["scores"], self._feed(self.sess, input_ids.numpy(), domain_ids.numpy()))[0]


def _compare(models: dict, ids: torch.Tensor, requests: int, batch: int) -> dict:
    for m in models.values():
        _latencies(m, ids, 10)  # warm-up
    lat = {name: [] for name in models}
    for _ in range(4):  # alternate in blocks so drift hits both
        for name, m in models.items():
            lat[name] += _latencies(m, ids, requests // 4)
    res = {}
    for name, m in models.items():
        v = lat[name]
        res[name] = {"p50_ms": statistics.median(v), "p99_ms": float(np.percentile(v, 99)),
                     "batch_users_per_second": _throughput(m, ids, batch, 5)}
    res["speedup_p50"] = res["teacher"]["p50_ms"] / res["student"]["p50_ms"]
    res["speedup_throughput"] = res["student"]["batch_users_per_second"] / res["teacher"]["batch_users_per_second"]
    return res


def bench_serving(student_dir, teacher_dir, adapter=None, history: int = 50, requests: int = 200, *,
                  allow_unverified_adapter: bool = False,
                  batch: int = 256, seed: int = 0, onnx: bool = False) -> dict:
    if onnx:
        require_onnx()             # before any model is loaded: a clear error, not an import traceback
    student, teacher = _serving_model(student_dir), _serving_model(teacher_dir, adapter, allow_unverified_adapter)
    n_items, max_len = student.config.num_items, student.config.max_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(max(batch, 64), max_len, dtype=torch.long)
    h = min(history, max_len)
    ids[:, -h:] = torch.randint(1, n_items + 1, (len(ids), h), generator=g)
    res = _compare({"teacher": teacher, "student": student}, ids, requests, batch)
    for name, m in (("teacher", teacher), ("student", student)):
        res[name]["params"] = sum(p.numel() for p in m.parameters())
    if onnx:
        with tempfile.TemporaryDirectory() as tmp:
            scorers = {name: _OrtScorer(m, Path(tmp), name) for name, m in (("teacher", teacher), ("student", student))}
            res["onnxruntime"] = _compare(scorers, ids, requests, batch)
    res.update(history=h, requests=requests, batch=batch, threads=torch.get_num_threads())
    return res


def write_bench(out: str | Path, res: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=2))
