"""Adapt a pretrained base to one target domain: one task for every method.

The methods (``lora``, ``adalora``, ``full``, ``head``, ``l2sp``, ``scratch``, ``none`` = zero-shot, and
whatever else is in ``crossrec_dist/methods/``) each live in their own file there; this module holds
what they share: the target's users and items (the sampled training users, the items new to the
target, the item-table rows adapters train whole), the final evaluation and metrics.json.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import load_config
from ..data.batches import SequenceBatches, make_windows
from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..engine.task import LossTerms
from ..errors import InputError
from ..evaluation.cohorts import cohorts, unseen_items
from ..evaluation.record import metrics_record, write_metrics
from ..export.fingerprint import base_fingerprint
from ..export.vocab import check_vocabulary_starts_with, popularity_record, read_untrained_items, write_popularity
from ..methods import get_method
from ..methods._training import load_base
from ..methods.base import Method
from ..models.loading import load_model_config
from ..models.sizing import param_counts
from .alignment import DISCRIMINATOR, DomainDiscriminator, adversarial, distance, last_hidden
from .common import (RecommenderTask, catalogue_record, eval_users_record, evaluate_model, on_main, run_stage,
                     seed_everything, target_catalogue)
from .configs import FinetuneConfig, check_finetune_config
from .references import paired_vs, reference_evaluations, selection_line, selection_record, verdict_lines


def new_item_indices(data: PreparedData, source_domains, target: str, base_items: int | None = None,
                     untrained: list[int] | None = None) -> list[int]:
    """Items in the target's training part that no source domain's training part contains (counted in
    ``data`` when it holds the sources, else the base's ``untrained`` record; items past the base's
    ``base_items``, from ``prepare --vocab-from``, are new whatever the sources held)."""
    unseen = unseen_items(data, source_domains, base_items, untrained)
    tgt = data.item_counts([target])
    return np.flatnonzero((tgt > 0) & unseen).tolist()


def trainable_rows(cfg, data: PreparedData, domain: str, new_items: list[int],
                   users: np.ndarray | None = None) -> list[int]:
    """Item-table rows a PEFT adapter trains whole (PEFT trainable tokens): the items new to the target
    (``train_new_items``) and its ``train_top_items`` most frequent training items. A low-rank update
    of the table spreads its few directions over every item; these rows give the items that most of
    the target's interactions fall on a full-rank update, at 64 numbers each (hidden 64). Counted on
    the training part of ``users``' sequences (all of the domain's when None): a subsampled run
    learns nothing from users it does not train on. None under LoRA on the table, which already gives
    every item, new ones included, its own trainable column (PEFT cannot wrap that table twice)."""
    if not get_method(cfg.method).trains_whole_rows(cfg):
        return []
    rows = set(new_items) if cfg.train_new_items else set()
    if cfg.train_top_items > 0:
        counts = data.item_counts([domain], only=users)
        counts[0] = 0
        order = np.argsort(-counts, kind="stable")
        rows.update(int(i) for i in order[:cfg.train_top_items] if counts[i] > 0)
    return sorted(rows)


def sample_users(data: PreparedData, domain: str, fraction: float, seed: int) -> np.ndarray | None:
    """A seeded sample of ``fraction`` of the domain's sequences (None: all). The same for every
    method at one seed, so methods are compared on the same training users; a larger fraction at the
    same seed contains the smaller one (one permutation, cut at different lengths)."""
    if fraction >= 1:
        return None
    seqs = np.flatnonzero(data.sequence_mask([domain]))
    order = np.random.default_rng(seed).permutation(len(seqs))
    n = max(1, int(round(fraction * len(seqs))))
    return np.sort(seqs[order[:n]])


class FinetuneTask(RecommenderTask):
    """Fine-tuning on one target domain, the same for every method: the method (``crossrec_dist/methods``)
    builds the model and adds its loss terms, hooks and saving; the task holds the data side."""

    def __init__(self, cfg: FinetuneConfig, data: PreparedData, base_dir: str, domain: str):
        self.method: Method = get_method(cfg.method)(cfg)
        self.cfg, self.train, self.data, self.base_dir, self.domain = cfg, cfg.train, data, str(base_dir), domain
        self.name = f"finetune-{cfg.method}-{domain}"
        self.valid_targets = cfg.valid_targets
        self.train_users = sample_users(data, domain, cfg.train_fraction, cfg.train.seed)
        data.domain_codes([domain])
        self.base_config = load_model_config(base_dir)
        # The target's vocabulary is the base's, or the base's followed by items new to it (--vocab-from):
        # the base's item table is then grown to it (models/extend.py) before the method adapts it.
        self.base_items = check_vocabulary_starts_with(base_dir, data, "base model")
        if self.base_config.use_domain_embedding and list(data.domain_names) != list(self.base_config.domain_names):
            # a domain's code is its row of the base's domain table: another list would silently pick another row
            raise InputError(f"the base learned one embedding per domain of {self.base_config.domain_names}, and this "
                             f"dataset's domains are {data.domain_names}: adapt it on data prepared with the base's "
                             f"domains (a base without use_domain_embedding adapts to any)", path=str(data.path),
                             field="--data")
        self.num_items = data.num_items
        self.base_config.num_items = self.num_items         # scratch builds this size
        self.max_len, self.hidden_size = self.base_config.max_len, self.base_config.hidden_size
        self.default_lr = self.method.default_lr
        self.untrained = read_untrained_items(base_dir)
        self.new_items = new_item_indices(data, self.base_config.pretrain_domains, domain, self.base_items,
                                          self.untrained)
        self.token_rows = trainable_rows(cfg, data, domain, self.new_items, self.train_users)
        self.fingerprint = base_fingerprint(base_dir)
        self.catalogue = target_catalogue(cfg, data, domain)
        # Step 0 is the base itself for every method that starts from it: keep it unless beaten.
        self.must_beat_start = cfg.must_beat_base and self.method.starts_from_base
        self.warm_start: dict | None = None     # what init_adapter copied (methods/_warm_start.py)
        self.popularity: dict | None = None     # popularity.json's record, made at the first save
        self.replay = self._replayed_sources()  # source sequences mixed into training (source_replay)
        self.target_code = int(data.domain_codes([domain])[0])
        self.replayed = 0 if self.replay is None else len(self.replay[0])

    def train_domains(self):
        return [self.domain]

    def batches(self):
        """The target's training windows, plus ``source_replay`` source sequences per target sequence
        (a seeded sample of the base's pretraining domains, fixed for the run): replaying the source
        while adapting limits forgetting what the base knew."""
        if self.replay is None:
            return super().batches()
        t = self.train
        seq, usable = self._target_sequences()
        return SequenceBatches(self.data, make_windows(np.r_[seq, self.replay[0]], np.r_[usable, self.replay[1]],
                                                       self.max_len, t.window_stride),
                               self.max_len, t.micro_batch_size, t.seed)

    def _target_sequences(self):
        seq, usable = self.data.train_sequences([self.domain], holdout=self.valid_targets - 1)
        if self.train_users is not None:
            keep = np.isin(seq, self.train_users)
            seq, usable = seq[keep], usable[keep]
        return seq, usable

    def _replayed_sources(self):
        """(sequences, usable lengths) of the source sample ``source_replay`` mixes in (None: none)."""
        if self.cfg.source_replay <= 0:
            return None
        sources = [d for d in self.base_config.pretrain_domains if d in self.data.domain_names]
        if not sources:
            raise InputError(f"source_replay needs the base's pretraining domains {self.base_config.pretrain_domains} "
                             f"in the dataset, which holds {self.data.domain_names}", path=str(self.data.path),
                             field="source_replay")
        src, src_usable = self.data.train_sequences(sources)
        n = min(len(src), int(round(self.cfg.source_replay * len(self._target_sequences()[0]))))
        pick = np.sort(np.random.default_rng(self.train.seed).choice(len(src), size=n, replace=False))
        return src[pick], src_usable[pick]

    def build_model(self, engine):
        self.method.refuse(precision=engine.precision, zero_stage=engine.zero_stage if engine.ds_config else None)
        if self.cfg.init_adapter and engine.ds_config and engine.zero_stage == 3:
            raise InputError("init_adapter copies weights into the adapter as it is built, which ZeRO-3 partitions: "
                             "warm-start under ZeRO-2 or one process", field="init_adapter")
        seed_everything(self.train.seed)
        model = self.method.build(self, engine)
        self.params = param_counts(model)      # the adapted model's: the discriminator is not saved
        self.discriminator = None
        if self.cfg.align == "adversarial":
            # a submodule of the trained model, so the optimizer (and DeepSpeed, and a resume) see it
            self.discriminator = DomainDiscriminator(self.hidden_size)
            model.add_module(DISCRIMINATOR, self.discriminator)
        return model

    def describe(self) -> str:
        users = "" if self.train_users is None else \
            f"; trains and validates on {len(self.train_users)} sampled user(s) (train_fraction {self.cfg.train_fraction})"
        if self.cfg.source_replay > 0:
            users += f"; {self.replayed:,} source sequences replayed beside the target's (source_replay {self.cfg.source_replay})"
        if self.discriminator is not None:
            users += (f"; a domain discriminator ({sum(p.numel() for p in self.discriminator.parameters()):,} "
                      f"parameters, not saved) through gradient reversal, weight {self.cfg.align_weight}")
        return (f"finetune {self.cfg.method} on {self.domain}: {self.params['trainable']:,} of "
                f"{self.params['total']:,} parameters trainable, {len(self.new_items)} item(s) new to the target"
                + users)

    def loss(self, model, inputs) -> LossTerms:
        out = model(**inputs)
        mean = out.loss
        if self.cfg.align != "none":
            rep = last_hidden(out.hidden_states)
            target = inputs["domain_ids"] == self.target_code
            if 2 <= int(target.sum()) <= len(target) - 2:     # both samples in this micro-batch
                w = self.cfg.align_weight
                mean = mean + (adversarial(self.discriminator, rep, target, w) if self.discriminator is not None
                               else w * distance(self.cfg.align, rep[~target], rep[target]))
        return LossTerms(mean, self.method.penalty(model))

    def after_backward(self, model, step: int) -> None:
        self.method.after_backward(model, step)

    def after_step(self, model, step: int, grad_scale: float = 1.0) -> None:
        self.method.after_step(model, step, grad_scale)

    def checkpoint_state(self, model) -> dict:
        return {**self.method.checkpoint_state(model), **super().checkpoint_state(model)}

    def restore_checkpoint_state(self, model, state: dict) -> None:
        super().restore_checkpoint_state(model, state)
        self.method.restore_checkpoint_state(model, state)

    def save(self, engine, state_dict, out_dir: Path) -> None:
        if not engine.is_main:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:     # the domain discriminator trains beside the model and is not kept
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(DISCRIMINATOR + ".")}
        self.method.save(self, engine, engine.unwrapped(engine.model), state_dict, out_dir)
        if self.popularity is None:       # counted once per run, written beside every kept step
            self.popularity = popularity_record(self.data, [self.domain], only=self.train_users)
        write_popularity(self.popularity, out_dir)        # for users with no known events

    def final_record(self, engine, result) -> dict:
        model = self.method.load(engine.out_dir, self.base_dir)
        ev = evaluate_model(model, self.data, [self.domain], self.max_len, self.train.eval_batch_size,
                            catalogue=self.catalogue, device=engine.device, users=self.train.eval_users,
                            seed=self.train.seed)
        extra = {**self.method.record(self, model, engine.out_dir), **catalogue_record(self.catalogue, self.data)}
        refs = reference_evaluations(self.base_dir, self.data, self.domain, self.train.eval_batch_size,
                                     self.catalogue, self.train_users, device=engine.device,
                                     eval_users=self.train.eval_users, seed=self.train.seed)
        vs = paired_vs(ev, refs)
        selection = selection_record(result, self.must_beat_start)
        if self.cfg.source_replay > 0:
            extra["source_replay"] = {"ratio": self.cfg.source_replay, "sequences": self.replayed}
        if self.cfg.align != "none":
            extra["align"] = {"kind": self.cfg.align, "weight": self.cfg.align_weight}
        if self.cfg.init_adapter:
            selection["start"] = "init_adapter"
            if selection.get("kept") == "base":
                selection["kept"] = "init_adapter"
            extra.update(init_adapter=str(Path(self.cfg.init_adapter).resolve()), warm_start=self.warm_start)
        for line in filter(None, [selection_line(self.cfg.method, self.domain, selection, self.method.output),
                                  *verdict_lines(self.cfg.method, self.domain, vs)]):
            engine.log(line)
        return metrics_record(
            stage="finetune", domain=self.domain, method=self.cfg.method, params=self.params,
            valid=ev["valid"]["overall"], test=ev["test"]["overall"], train=result.train_record(),
            in_training_valid=result.best_valid.get("overall", {}), history=result.history,
            new_items=len(self.new_items), trainable_rows=len(self.token_rows),
            base=str(Path(self.base_dir).resolve()), lr=engine.lr,
            base_fingerprint=self.fingerprint, config=_jsonable(asdict(self.cfg)),
            world_size=dist_info.world_size(), zero_stage=engine.zero_stage if engine.ds_config else None,
            grad_accum=engine.settings.grad_accum, test_ranks=ev["test"]["examples"],
            train_users=None if self.train_users is None else len(self.train_users), vs=vs, selection=selection,
            **eval_users_record(self.train, ev, self.data, [self.domain]),
            cohorts=cohorts(self.data, ev["test"]["examples"],
                            unseen_items(self.data, self.base_config.pretrain_domains, self.base_items,
                                         self.untrained)),
            **extra)


def run_finetune(cfg: FinetuneConfig, base_dir: str, data_dir: str, domain: str, out: str, log=print) -> dict:
    data = data_dir if isinstance(data_dir, PreparedData) else PreparedData(data_dir)
    base_items = check_vocabulary_starts_with(base_dir, data, "base model")
    method = get_method(cfg.method)
    if not method.trains:
        return on_main(_reference_run, cfg, base_dir, data, domain, Path(out), log, base_items)
    for precision in (cfg.train.mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION")):
        method.refuse(precision=precision)    # before the engine: accelerate would set fp16 up first
    return run_stage(FinetuneTask(cfg, data, base_dir, domain), out, log=log)


def _reference_run(cfg, base_dir, data, domain, out, log, base_items: int):
    """A method that trains nothing is one of the references (zero-shot: the base as it is; popularity:
    the region's own counts): evaluated as such, and compared with the other references."""
    method = get_method(cfg.method)
    t0 = time.perf_counter()
    users = sample_users(data, domain, cfg.train_fraction, cfg.train.seed)
    catalogue = target_catalogue(cfg, data, domain)
    refs = reference_evaluations(base_dir, data, domain, cfg.train.eval_batch_size, catalogue, users,
                                 eval_users=cfg.train.eval_users, seed=cfg.train.seed)
    ev = refs.pop(method.role)
    vs = paired_vs(ev, refs)
    params = param_counts(load_base(base_dir, data.num_items)) if method.role == "zero-shot" else {"total": 0}
    record = metrics_record(stage="finetune", domain=domain, method=cfg.method, params={**params, "trainable": 0},
                            valid=ev["valid"]["overall"], test=ev["test"]["overall"],
                            train={"steps": 0, "seconds": round(time.perf_counter() - t0, 3), "samples_per_second": 0.0},
                            base=str(Path(base_dir).resolve()), base_fingerprint=base_fingerprint(base_dir),
                            test_ranks=ev["test"]["examples"], vs=vs,
                            cohorts=cohorts(data, ev["test"]["examples"], unseen_items(
                                data, _base_domains(base_dir), base_items,
                                read_untrained_items(base_dir))),
                            train_users=None if users is None else len(users), **catalogue_record(catalogue, data),
                            **eval_users_record(cfg.train, ev, data, [domain]))
    write_metrics(out, record)
    for line in verdict_lines(cfg.method, domain, vs):
        log(line)
    log(f"{cfg.method} {domain}: test ndcg@10={record['test']['ndcg@10']:.4f} -> {out}")
    return record


def _base_domains(base_dir) -> list[str]:
    return list(load_model_config(base_dir).pretrain_domains)


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def load_finetune_config(path, method, overrides):
    cfg = load_config(FinetuneConfig, path, overrides)
    if method:
        cfg.method = method
    check_finetune_config(cfg)
    return cfg
