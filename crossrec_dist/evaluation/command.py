"""``crossrec evaluate``: valid and test metrics of a model (or the popularity baseline) as metrics.json."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..data.prepared import PreparedData
from ..errors import InputError
from ..models.extend import extend_items
from ..paths import check_output_dir
from .evaluator import EvalOptions, evaluate, model_scorer
from .popularity import popularity_scorer
from .record import catalogue_record, metrics_record


def _split_hint(prepared: PreparedData) -> str:
    """Why a user can lack a test target under this folder's split, so the message says what to change."""
    if (prepared.meta.get("options") or {}).get("split", "loo") == "temporal":
        return "a user needs history before the test cut and an event after it (prepare --temporal-test)"
    return "a user needs at least 3 events to have one under the leave-one-out split"


def require_test_targets(prepared: PreparedData, domains: list[str] | None) -> None:
    """Refuse a domain with no test target before any model is loaded.

    Metrics over 0 users are written as 0.0 (metrics_from_ranks of nothing): a report that looks like
    a model scoring nothing rather than a domain that could not be evaluated. Training-time validation
    keeps calling ``evaluate`` directly and is not affected; only a final report for a domain the user
    chose refuses."""
    for name in domains or [None]:
        chosen = None if name is None else [name]
        if len(prepared.eval_set("test", chosen).targets):
            continue
        users = int(prepared.sequence_mask(chosen).sum())
        what = f"domain {name!r}" if name is not None else "any domain"
        raise InputError(f"no user of {what} has a test target ({users:,} user(s); {_split_hint(prepared)}): "
                         f"there is nothing to evaluate", path=str(prepared.path), field="--domain")


def run_evaluate(*, model: str, adapter: str | None, data: str, domain: str | None, out: str,
                 batch_size: int = 1024, max_len: int | None = None, allow_unverified_adapter: bool = False,
                 catalogue: str = "all", log=print) -> dict:
    if batch_size < 1:
        raise InputError(f"must be >= 1, got {batch_size}", field="--batch-size")
    if max_len is not None and max_len < 1:
        raise InputError(f"must be >= 1, got {max_len}", field="--max-len")
    path = Path(out)
    if path.suffix != ".json":
        path = path / "metrics.json"
    check_output_dir(path.parent)
    if path.is_dir():
        raise InputError("is a folder; name the metrics JSON file to write", path=str(path), field="--out")
    prepared = PreparedData(data)
    domains = None if domain in (None, "all") else [d for d in domain.split(",") if d]
    prepared.domain_codes(domains)  # validate names early
    require_test_targets(prepared, domains)
    if catalogue not in ("all", "domain"):
        raise InputError(f"unknown catalogue {catalogue!r}; choose all or domain", field="--catalogue")
    items = prepared.catalogue(domains) if catalogue == "domain" else None
    t0 = time.perf_counter()
    if model == "popularity":
        if adapter:
            raise InputError("the popularity baseline takes no adapter", field="--adapter")
        scorer, params, method, L = popularity_scorer(prepared, domains), {"total": 0, "trainable": 0}, "popularity", max_len or 50
    else:
        # Only a model pays for the model code (transformers' Llama, peft: 2.1 s of CPU to import on
        # the 2-core CI machine, on top of 1.6 s for this module); the popularity baseline skips it.
        from ..export.loading import adapter_items, check_model_weights, load_model
        from ..export.vocab import check_vocabulary_starts_with
        from ..models.sizing import param_counts
        # An adapter that extends its base's vocabulary (prepare --vocab-from) carries the region's items.json
        # The dataset's vocabulary is the model's (an adapter's own items.json when it extends its base's), or
        # starts with it (prepare --vocab-from): items new to the model are then scored as average ones.
        check_model_weights(model)      # a pickled model named as such, before the vocabulary checks read it
        known = check_vocabulary_starts_with(adapter, prepared, "adapter", is_model=False) \
            if adapter and adapter_items(adapter) else check_vocabulary_starts_with(model, prepared, "model")
        loaded = load_model(model, adapter, allow_unverified_adapter)
        if known < prepared.num_items:
            if adapter:
                loaded = loaded.merge_and_unload()
            extend_items(loaded, prepared.num_items)
        scorer, params, method = model_scorer(loaded), param_counts(loaded), "adapter" if adapter else "model"
        L = max_len or (loaded.config if hasattr(loaded, "config") else loaded.base_model.config).max_len
    results = {}
    for split in ("valid", "test"):
        results[split] = evaluate(prepared, scorer, EvalOptions(split=split, domains=domains,
                                                                batch_size=batch_size, max_len=L, catalogue=items))
    record = metrics_record(stage="evaluate", domain=domain if domains and len(domains) == 1 else None,
                            method=method, params=params, valid=results["valid"]["overall"],
                            test=results["test"]["overall"], per_domain=results["test"]["per_domain"],
                            eval_seconds=round(time.perf_counter() - t0, 3), model=model, adapter=adapter,
                            test_ranks=results["test"]["examples"],
                            **catalogue_record(items, prepared))
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    t = record["test"]
    log(f"{method}: test ndcg@10={t['ndcg@10']:.4f} hr@10={t['hr@10']:.4f} mrr@10={t['mrr@10']:.4f} "
        f"({results['test']['overall']['users']} users) -> {path}")
    return record
