"""What every stage shares: the recommender task base, and ``run_stage`` (task -> engine -> metrics.json).

A stage is a :class:`RecommenderTask` subclass that says which model to build, which sequences
it trains on, which users it is validated on and what its metrics.json holds; ``run_stage`` does
the rest the same way for pretraining, fine-tuning and distillation.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..data.batches import SequenceBatches, make_windows
from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..engine.task import LossTerms, Selection, TrainTask, Validation
from ..engine.trainer import Engine
from ..errors import InputError
from ..evaluation.bootstrap import interval_record, paired_on_users, per_user_ndcg
from ..evaluation.evaluator import EvalOptions, evaluate, model_scorer, sample_users
from ..evaluation.record import catalogue_record, write_metrics
from ..evaluation.sharded import sharded_evaluate
from ..models.sizing import param_counts
from .train_config import RecommenderTrainConfig

__all__ = ["RecommenderTask", "run_stage", "evaluate_model", "param_counts", "model_scorer", "on_main",
           "resolve_domains", "seed_everything", "training_batches", "target_catalogue", "catalogue_record"]


class RecommenderTask(TrainTask):
    """A next-item task over a prepared dataset, selected on validation NDCG@10 (full ranking)."""

    selection = Selection("ndcg@10", "max")
    train: RecommenderTrainConfig
    data: PreparedData
    max_len: int
    hidden_size: int

    valid_targets: int = 1      # validation targets per user (the last K before the test item)
    train_users: np.ndarray | None = None   # sequences that train and validate (None: all); test: all
    catalogue: np.ndarray | None = None     # items ranked in validation and test (None: all)
    # Keep a state only if it beats the model as built (the step-0 validation: for fine-tuning, the
    # base) on validation by a paired 95% bootstrap interval over users; otherwise the start stays the
    # kept model. One noisy validation item per user on a region of 100 users moves NDCG@10 by more
    # than most adaptations gain; a higher mean alone is not evidence.
    must_beat_start: bool = False
    start_valid: tuple[np.ndarray, np.ndarray] | None = None   # (users, NDCG@10 per user) at step 0

    @property
    def validates_start(self) -> bool:
        return self.must_beat_start

    def train_domains(self) -> list[str] | None:
        """Domains whose sequences it trains on (None: all)."""
        raise NotImplementedError

    def validation_domains(self) -> list[str] | None:
        """Domains whose validation users pick the checkpoint (None: all)."""
        return self.train_domains()

    @property
    def tokens_per_sample(self) -> int:
        return self.max_len

    def describe(self) -> str:
        """One line for the log before training."""
        return ""

    def decays(self, name: str, param: torch.nn.Parameter) -> bool:
        """Weight decay on weight matrices, but not on embedding tables (items, domains): a row
        is only updated when its item is in the batch, while decay would shrink every row at every
        step, pulling rarely seen items towards zero."""
        return param.ndim >= 2 and "embeddings" not in name

    def batches(self) -> SequenceBatches:
        t = self.train
        return training_batches(self.data, self.train_domains(), self.max_len, t.micro_batch_size, t.seed,
                                t.window_stride, holdout=self.valid_targets - 1, only=self.train_users)

    def loss(self, model, inputs) -> LossTerms:
        return LossTerms(model(**inputs).loss)

    def validate(self, engine: Engine) -> Validation:
        domains = self.validation_domains()
        opts = EvalOptions(split="valid", domains=domains, batch_size=self.train.eval_batch_size, max_len=self.max_len,
                           catalogue=self.catalogue, users=self.train.eval_users, seed=self.train.seed)
        scorer = model_scorer(engine.model)
        with torch.no_grad():
            # the eval_users sample is drawn from every user, as the final evaluation draws it, and only then
            # narrowed to the users trained on: validation ranks a subset of the final evaluation's users
            valid = sample_users(self.data.eval_set("valid", domains, targets_per_user=self.valid_targets),
                                 opts.users, opts.seed)
            if self.train_users is not None:
                valid = valid.only(self.train_users)
            details = sharded_evaluate(self.data, valid, scorer, opts, engine.device)
            tracked = {}
            if self.train.track_test:   # benchmarks' quality-vs-time curves; never used to choose a model
                test_set = sample_users(self.data.eval_set("test", domains), opts.users, opts.seed)
                test = sharded_evaluate(self.data, test_set, scorer, replace(opts, split="test"),
                                        engine.device)["overall"]
                tracked = {"test_ndcg@10": test["ndcg@10"], "test_hr@10": test["hr@10"]}
        examples = details.pop("examples", None)     # per-user ranks: only the final test record keeps them
        overall = details["overall"]
        eligible, note = self._against_start(engine.step, examples, details, tracked)
        return Validation(metrics={"ndcg@10": overall["ndcg@10"], "hr@10": overall["hr@10"]},
                          tracked=tracked, details=details, eligible=eligible, note=note)

    def _against_start(self, step: int, examples, details: dict, tracked: dict) -> tuple[bool, str]:
        """``must_beat_start``: the step-0 validation is the start (remembered, eligible); a later one is
        eligible only when its paired NDCG@10 difference to the start has a 95% interval above 0. The
        same users on every rank and a fixed bootstrap seed: every rank reaches the same verdict."""
        if not self.must_beat_start or examples is None:
            return True, ""
        users, ndcg = per_user_ndcg(examples["seq_index"], examples["rank"])
        if step == 0:
            self.start_valid = (users, ndcg)
            return True, ""
        if self.start_valid is None:
            raise RuntimeError("must_beat_start needs the step-0 validation (TrainTask.validates_start)")
        diff = paired_on_users(users, ndcg, *self.start_valid)
        details["vs_start"] = interval_record(diff)
        tracked["valid_vs_start"] = round(diff.mean, 6)
        tracked["valid_vs_start_low"] = round(diff.low, 6)
        tracked["valid_vs_start_high"] = round(diff.high, 6)
        return diff.low > 0, "" if diff.low > 0 else f"vs the start {diff.diff_text()} over {diff.n} users"

    def checkpoint_state(self, model) -> dict:
        """The start's per-user validation, so that a resumed run keeps judging against it."""
        if self.start_valid is None:
            return {}
        return {"start_valid": {"users": self.start_valid[0].tolist(), "ndcg": self.start_valid[1].tolist()}}

    def restore_checkpoint_state(self, model, state: dict) -> None:
        if "start_valid" in state:
            sv = state["start_valid"]
            self.start_valid = (np.asarray(sv["users"], dtype=np.int64), np.asarray(sv["ndcg"], dtype=np.float64))


def run_stage(task: RecommenderTask, out: str | Path, log=print) -> dict:
    """config -> data -> task (given) -> engine -> model -> fit -> final evaluation -> metrics.json.

    The final record is computed on the main rank from the saved model, reloaded in one plain
    process, and every rank gets it back."""
    engine = Engine(task.train, out, hidden_size=task.hidden_size, log=log)
    engine.build_model(task)
    line = task.describe()
    if line:
        engine.log(line)
    result = engine.fit(task)

    def final():
        record = task.final_record(engine, result)
        write_metrics(out, record)
        t = record["test"]
        log(f"{record['stage']}{'' if record['method'] == record['stage'] else ' ' + record['method']}"
            f"{' ' + record['domain'] if record['domain'] else ''} done: "
            f"test ndcg@10={t['ndcg@10']:.4f} hr@10={t['hr@10']:.4f} (best step {result.best_step} of "
            f"{result.steps}, {record['params']['trainable']:,} trainable parameters) -> {out}")
        return record

    return on_main(final)


def training_batches(data: PreparedData, domains, max_len: int, micro_batch: int, seed: int,
                     stride: int = 0, holdout: int = 0, only: np.ndarray | None = None) -> SequenceBatches:
    seq, usable = data.train_sequences(domains, holdout=holdout)
    if only is not None:
        keep = np.isin(seq, only)
        seq, usable = seq[keep], usable[keep]
    if len(seq) == 0:
        raise InputError(f"no training sequences in domain(s) {domains}", path=str(data.path), field="--domains")
    return SequenceBatches(data, make_windows(seq, usable, max_len, stride), max_len, micro_batch, seed)


def evaluate_model(model, data: PreparedData, domains, max_len: int, batch_size: int = 1024,
                   device="cpu", catalogue: np.ndarray | None = None, users: int = 0, seed: int = 0) -> dict:
    """valid and test metrics of a plain (one-process) model (ranking ``catalogue``'s items only, if given),
    on ``device`` (the stages pass their engine's: a run on a GPU evaluates there, not on the host), over a
    seeded sample of ``users`` users (0: all; ``train.eval_users``). A GPU without room for another copy
    beside the engine's (its model and optimizer are still there) evaluates on the host instead, and says so."""
    def run(on):
        model.to(on).eval()
        scorer = model_scorer(model)
        return {split: evaluate(data, scorer, EvalOptions(split=split, domains=domains, batch_size=batch_size,
                                                          max_len=max_len, catalogue=catalogue, users=users,
                                                          seed=seed), on)
                for split in ("valid", "test")}
    try:
        return run(device)
    except torch.OutOfMemoryError:
        if str(device) == "cpu":
            raise
        torch.cuda.empty_cache()
        print(f"evaluation: out of memory on {device}; evaluating on the CPU instead", flush=True)
        return run("cpu")


def eval_users_record(train, ev: dict, data: PreparedData, domains) -> dict:
    """metrics.json's ``eval_users``: how many users the final valid/test metrics rank, and whether (and
    with which seed) they are a sample (``train.eval_users`` below the number of users there are)."""
    ranked = ev["test"]["overall"]["users"]
    # every user was ranked unless a sample was asked for: only then count how many there are
    population = len(np.unique(data.eval_set("test", domains).seq_index)) if train.eval_users > 0 else ranked
    sampled = 0 < train.eval_users < population
    return {"eval_users": {"sampled": sampled, "requested": train.eval_users or "all",
                           "seed": train.seed if sampled else None, "of": population,
                           "valid": ev["valid"]["overall"]["users"], "test": ranked}}


def target_catalogue(cfg, data: PreparedData, domain: str) -> np.ndarray | None:
    """Items ranked when evaluating on ``domain``: every item (``catalogue: all``), or only those of
    the domain's own log (``target``; a cross-platform base also knows items the target never offers)."""
    return data.catalogue([domain]) if cfg.catalogue == "target" else None


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on the real main rank; everyone gets its result (via broadcast)."""
    out = fn(*args, **kwargs) if dist_info.is_main() else None
    return dist_info.broadcast_object(out)


def resolve_domains(domains) -> list[str] | None:
    """``None``/``all``/``"a,b"``/``[a, b]`` -> a list of names, or None for every domain."""
    if domains is None or domains == "all" or domains == ["all"]:
        return None
    if isinstance(domains, str):
        return [d for d in domains.split(",") if d]
    return list(domains)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
