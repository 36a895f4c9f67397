"""metrics.json: the one record every stage writes (layout fixed by SPEC.md)."""
from __future__ import annotations

import json
from pathlib import Path

HEADLINE = ("ndcg@10", "hr@10", "mrr@10")


def _headline(m: dict | None) -> dict:
    m = m or {}
    return {k: float(m.get(k, 0.0)) for k in HEADLINE} | {k: v for k, v in m.items() if k not in HEADLINE}


def metrics_record(*, stage: str, domain: str | None, method: str, params: dict, valid: dict | None,
                   test: dict | None, per_domain: dict | None = None, train: dict | None = None,
                   **extra) -> dict:
    record = {
        "stage": stage, "domain": domain, "method": method,
        "params": {"total": int(params.get("total", 0)), "trainable": int(params.get("trainable", 0))},
        "valid": _headline(valid), "test": _headline(test),
        "train": {"steps": 0, "seconds": 0.0, "samples_per_second": 0.0} | (train or {}),
    }
    if per_domain:
        record["per_domain"] = {k: _headline(v) for k, v in per_domain.items()}
    if extra.get("test_ranks") is not None:     # per-user ranks: arrays from the evaluator, JSON lists here
        extra["test_ranks"] = {k: [int(x) for x in v] for k, v in extra["test_ranks"].items()}
    record.update(extra)
    return record


def catalogue_record(catalogue, data) -> dict:
    """``{"catalogue": {"kind": "all" | "target", "items": N}}`` for metrics.json (``catalogue``: a boolean
    mask over items, or None when all of ``data``'s items were ranked; ``target``: only the evaluated
    domains' own items were, whichever command asked for it)."""
    n = data.num_items if catalogue is None else int(catalogue.sum())
    return {"catalogue": {"kind": "all" if catalogue is None else "target", "items": n}}


def write_metrics(out_dir: str | Path, record: dict, name: str = "metrics.json") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path
