"""Pieces every stage shares: sequence batches, in-training validation, final evaluation, records."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..engine.batches import SequenceBatches, make_windows
from ..engine.evaluation import sharded_evaluate
from ..evaluation.evaluator import EvalOptions, evaluate


def training_batches(data: PreparedData, domains, max_len: int, micro_batch: int, seed: int,
                     stride: int = 0) -> SequenceBatches:
    seq, usable = data.train_sequences(domains)
    if len(seq) == 0:
        from ..errors import InputError
        raise InputError(f"no training sequences in domain(s) {domains}", path=str(data.path), field="--domains")
    return SequenceBatches(data, make_windows(seq, usable, max_len, stride), max_len, micro_batch, seed)


def model_scorer(model):
    """Scorer over a (possibly DeepSpeed-wrapped) model: a plain forward call with return_scores."""
    def score(hist: torch.Tensor, doms: torch.Tensor) -> torch.Tensor:
        return model(input_ids=hist, domain_ids=doms, return_scores=True)
    return score


def validate_in_training(engine, model, data: PreparedData, domains, max_len: int) -> dict:
    opts = EvalOptions(split="valid", domains=domains, batch_size=engine.cfg.eval_batch_size, max_len=max_len)
    with torch.no_grad():
        metrics = sharded_evaluate(data, data.eval_set("valid", domains), model_scorer(model), opts, engine.device)
        if engine.cfg.track_test:   # benchmarks' quality-vs-time curves; never used to choose a model
            metrics["test_overall"] = sharded_evaluate(data, data.eval_set("test", domains), model_scorer(model),
                                                       replace(opts, split="test"), engine.device)["overall"]
    return metrics


def evaluate_model(model, data: PreparedData, domains, max_len: int, batch_size: int = 1024,
                   device="cpu") -> dict:
    """valid and test metrics of a plain (one-process) model."""
    model.eval()
    scorer = model_scorer(model)
    return {split: evaluate(data, scorer, EvalOptions(split=split, domains=domains, batch_size=batch_size,
                                                      max_len=max_len), device)
            for split in ("valid", "test")}


def param_counts(model) -> dict:
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on the real main rank; everyone gets its result (via broadcast)."""
    out = fn(*args, **kwargs) if dist_info.is_main() else None
    return dist_info.broadcast_object(out)


def resolve_domains(domains) -> list[str] | None:
    if domains is None or domains == "all" or domains == ["all"]:
        return None
    if isinstance(domains, str):
        return [d for d in domains.split(",") if d]
    return list(domains)


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
