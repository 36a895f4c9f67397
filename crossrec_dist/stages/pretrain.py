"""Pretrain: next-item prediction at every position, over the source domains' sequences."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import load_config
from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..engine.config import TrainConfig
from ..engine.trainer import Engine
from ..errors import InputError
from ..evaluation.record import metrics_record, write_metrics
from ..models.config import CrossRecConfig
from ..models.model import CrossRecModel
from ..models.presets import PRESETS
from ..export.vocab import write_vocab
from .common import (evaluate_model, on_main, param_counts, resolve_domains, seed_everything,
                     training_batches, validate_in_training)


@dataclass
class PretrainConfig:
    preset: str = "small"
    model: dict = field(default_factory=dict)     # CrossRecConfig overrides (hidden_size, loss, ...)
    train: TrainConfig = field(default_factory=TrainConfig)
    domains: list[str] | None = None              # source domains; None = all


class PretrainTask:
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, data: PreparedData):
        self.cfg, self.data = cfg, data
        self.domains = resolve_domains(cfg.domains)
        data.domain_codes(self.domains)
        if cfg.preset not in PRESETS:
            raise InputError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}", field="preset")
        known = set(CrossRecConfig().to_dict())
        bad = sorted(set(cfg.model) - known)
        if bad:
            raise InputError(f"unknown model option(s) {bad}", field=f"model.{bad[0]}")
        self.model_config = CrossRecConfig(**{**PRESETS[cfg.preset], **cfg.model, "num_items": data.num_items,
                                              "num_domains": len(data.domain_names),
                                              "domain_names": data.domain_names,
                                              "pretrain_domains": self.domains or data.domain_names})
        self.max_len = self.model_config.max_len
        seed_everything(cfg.train.seed)
        self.model = CrossRecModel(self.model_config)
        from ..engine.flops import flops_per_token
        body = sum(p.numel() for p in self.model.backbone.parameters())
        cands = self.model_config.num_negatives if self.model_config.loss == "sampled" else None
        self.flops_per_token = flops_per_token(self.model_config, body, cands)

    def batches(self):
        t = self.cfg.train
        return training_batches(self.data, self.domains, self.max_len, t.micro_batch_size, t.seed, t.window_stride)

    def loss(self, model, batch):
        return model(**batch).loss

    def validate(self, engine):
        return validate_in_training(engine, engine.model, self.data, self.domains, self.max_len)

    def save(self, engine, state_dict, out_dir: Path) -> None:
        if engine.is_main:
            engine.unwrapped(engine.model).save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
            write_vocab(self.data, out_dir)


def run_pretrain(cfg: PretrainConfig, data_dir: str, out: str, log=print) -> dict:
    data = PreparedData(data_dir)
    task = PretrainTask(cfg, data)
    engine = Engine(cfg.train, out, hidden_size=task.model_config.hidden_size, log=log)
    params = param_counts(task.model)
    engine.log(f"model: preset {cfg.preset}, {params['total']:,} parameters, {data.num_items:,} items, "
               f"domains {task.domains or 'all'}")
    result = engine.fit(task)

    def final_eval():
        model = CrossRecModel.from_pretrained(out)  # the consolidated best model, in one process
        t0 = time.perf_counter()
        ev = evaluate_model(model, data, task.domains, task.max_len, cfg.train.eval_batch_size)
        record = metrics_record(
            stage="pretrain", domain=None, method="pretrain", params=params,
            valid=ev["valid"]["overall"], test=ev["test"]["overall"], per_domain=ev["test"]["per_domain"],
            train=result.train_record(), in_training_valid=result.best_valid.get("overall", {}),
            history=result.history, preset=cfg.preset, domains=task.domains,
            config={"model": task.model_config.to_diff_dict(), "train": asdict(cfg.train)},
            world_size=dist_info.world_size(), zero_stage=engine.zero_stage if engine.ds_config else None,
            eval_seconds=round(time.perf_counter() - t0, 3))
        write_metrics(out, record)
        t = record["test"]
        log(f"pretrain done: test ndcg@10={t['ndcg@10']:.4f} hr@10={t['hr@10']:.4f} "
            f"({result.steps} steps, {result.train_record()['samples_per_second']} samples/s) -> {out}")
        return record

    return on_main(final_eval)


def load_pretrain_config(path: str | None, preset: str | None, overrides: list[str], domains: str | None):
    base = {}
    if preset:
        base["preset"] = preset
    cfg = load_config(PretrainConfig, path, overrides, base=base)
    if preset:
        cfg.preset = preset  # the command line wins over the file
    if domains:
        cfg.domains = resolve_domains(domains)
    return cfg
