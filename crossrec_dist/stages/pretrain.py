"""Pretrain: next-item prediction at every position, over the source domains' sequences."""
from __future__ import annotations

import time
from dataclasses import asdict

from ..config import load_config
from ..data.prepared import PreparedData
from ..engine import distributed as dist_info
from ..errors import InputError
from ..evaluation.record import metrics_record
from ..export.vocab import popularity_record, write_popularity, write_untrained_items, write_vocab
from ..models.config import CrossRecConfig
from ..models.flops import flops_per_token
from ..models.model import CrossRecModel
from ..models.presets import PRESETS
from ..models.sizing import param_counts
from .common import RecommenderTask, eval_users_record, evaluate_model, resolve_domains, run_stage, seed_everything
from .configs import PretrainConfig, check_pretrain_config, check_preset


def model_config(preset: str, overrides: dict, **fixed) -> CrossRecConfig:
    """Preset <- overrides <- fixed (data-derived) values; a bad value names its model.* key."""
    check_preset(preset, overrides)
    try:
        return CrossRecConfig(**{**PRESETS[preset], **overrides, **fixed})
    except (TypeError, ValueError) as e:
        raise InputError(f"bad model option: {e}", field="model") from None


class PretrainTask(RecommenderTask):
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, data: PreparedData):
        self.cfg, self.train, self.data = cfg, cfg.train, data
        self.domains = resolve_domains(cfg.domains)
        data.domain_codes(self.domains)
        self.model_config = model_config(cfg.preset, cfg.model, num_items=data.num_items,
                                         num_domains=len(data.domain_names), domain_names=data.domain_names,
                                         pretrain_domains=self.domains or data.domain_names)
        self.max_len, self.hidden_size = self.model_config.max_len, self.model_config.hidden_size

    def train_domains(self):
        return self.domains

    def new_model(self) -> CrossRecModel:
        """A freshly initialised model of this task (plain; the engine may build it partitioned)."""
        seed_everything(self.train.seed)
        return CrossRecModel(self.model_config)

    def build_model(self, engine):
        model = engine.construct(self.new_model)
        self.params = param_counts(model)
        body = param_counts(model.backbone)["total"]
        cands = self.model_config.num_negatives if self.model_config.loss == "sampled" else None
        self.flops_per_token = flops_per_token(self.model_config, body, cands)
        return model

    def describe(self) -> str:
        return (f"model: preset {self.cfg.preset}, {self.params['total']:,} parameters, {self.data.num_items:,} items, "
                f"domains {self.domains or 'all'}")

    def save(self, engine, state_dict, out_dir) -> None:
        if engine.is_main:
            engine.unwrapped(engine.model).save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
            write_vocab(self.data, out_dir)
            write_untrained_items(self.data, self.domains, out_dir)
            if getattr(self, "popularity", None) is None:     # counted once, written beside every kept step
                self.popularity = popularity_record(self.data, self.domains)
            write_popularity(self.popularity, out_dir)

    def final_record(self, engine, result) -> dict:
        model = CrossRecModel.from_pretrained(engine.out_dir)  # the consolidated best model, in one process
        t0 = time.perf_counter()
        ev = evaluate_model(model, self.data, self.domains, self.max_len, self.train.eval_batch_size,
                            device=engine.device, users=self.train.eval_users, seed=self.train.seed)
        return metrics_record(
            stage="pretrain", domain=None, method="pretrain", params=self.params,
            valid=ev["valid"]["overall"], test=ev["test"]["overall"], per_domain=ev["test"]["per_domain"],
            train=result.train_record(), in_training_valid=result.best_valid.get("overall", {}),
            history=result.history, preset=self.cfg.preset, domains=self.domains,
            config={"model": self.model_config.to_diff_dict(), "train": asdict(self.train)},
            world_size=dist_info.world_size(), zero_stage=engine.zero_stage if engine.ds_config else None,
            zero3_init=engine.settings.zero3_init, grad_accum=engine.settings.grad_accum,
            eval_seconds=round(time.perf_counter() - t0, 3), test_ranks=ev["test"]["examples"],
            **eval_users_record(self.train, ev, self.data, self.domains))


def run_pretrain(cfg: PretrainConfig, data_dir: str, out: str, log=print) -> dict:
    return run_stage(PretrainTask(cfg, PreparedData(data_dir)), out, log=log)


def load_pretrain_config(path: str | None, preset: str | None, overrides: list[str], domains: str | None):
    base = {"preset": preset} if preset else {}
    cfg = load_config(PretrainConfig, path, overrides, base=base)
    if preset:
        cfg.preset = preset  # the command line wins over the file
    if domains:
        cfg.domains = resolve_domains(domains)
    check_pretrain_config(cfg)
    return cfg
