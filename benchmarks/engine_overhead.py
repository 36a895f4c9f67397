"""Engine vs a bare PyTorch loop: same model, same batches, same optimizer and schedule, 1 process.

Both run ``--steps`` optimizer updates on the ``--preset`` model over MovieLens-100K windows; the
engine's validation is disabled so only the training step is compared. Repeats alternate the two
and the medians are reported, with the ratio measured run by run.
usage: python -m benchmarks.engine_overhead [--presets tiny small] [--steps 60] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.common import ml100k, record
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.engine.schedule import lr_lambda
from crossrec_dist.engine.trainer import Engine
from crossrec_dist.stages.pretrain import PretrainConfig, PretrainTask
from crossrec_dist.stages.train_config import RecommenderTrainConfig as TrainConfig


def bare_loop(task: PretrainTask, cfg: TrainConfig, steps: int) -> float:
    model = task.model = task.new_model()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr or 1e-3, betas=(0.9, cfg.adam_beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, 0, cfg.schedule, cfg.min_lr_ratio))
    batches = task.batches()
    n, t0, done = 0, time.perf_counter(), 0
    epoch = 0
    while done < steps:
        for mb in batches.epoch(epoch, 0, 1):
            batch = mb.inputs
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            n += batch["input_ids"].shape[0]
            done += 1
            if done >= steps:
                break
        epoch += 1
    return n / (time.perf_counter() - t0)


def engine_loop(task: PretrainTask, cfg: TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as out:
        engine = Engine(cfg, out, hidden_size=task.model_config.hidden_size, log=lambda *_: None)
        engine.build_model(task)
        result = engine.fit(task)
    return result.train_record()["samples_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="*", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    data = PreparedData(ml100k())
    results = {}
    for preset in a.presets:
        cfg = TrainConfig(max_steps=a.steps, epochs=1000, eval_every=10**9, patience=0, tensorboard=False,
                          log_every=10**9, warmup_ratio=0.0)
        bare, eng, ratios = [], [], []
        for _ in range(a.repeats):
            task = PretrainTask(PretrainConfig(preset=preset, train=cfg), data)
            b = bare_loop(task, cfg, a.steps)
            task = PretrainTask(PretrainConfig(preset=preset, train=cfg), data)
            e = engine_loop(task, cfg)
            bare.append(b)
            eng.append(e)
            ratios.append(e / b)
        results[preset] = {"bare_samples_per_second": statistics.median(bare),
                           "engine_samples_per_second": statistics.median(eng),
                           "engine_over_bare_median_ratio": statistics.median(ratios),
                           "ratios": ratios, "steps": a.steps, "micro_batch": cfg.micro_batch_size,
                           "seq_len": task.max_len}
    record("engine_overhead", {"command": "python -m benchmarks.engine_overhead", "results": results})


if __name__ == "__main__":
    main()
