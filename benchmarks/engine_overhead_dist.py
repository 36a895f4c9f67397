"""Engine vs a bare DeepSpeed loop on 2 processes (ZeRO-2 or ZeRO-3): same model, batches, optimizer.

The bare loop is what a user would write by hand: ``deepspeed.initialize`` on the same model with
the same filled config, ``engine.backward`` / ``engine.step``, the same rank-sharded batches and the
same LambdaLR. The shared engine adds accelerate, logging, checkpoint hooks and preemption checks.
Use ``--repeats 1`` and repeat the launch: a ``deepspeed.initialize`` after the engine's in the same
process fails in DeepSpeed's cached process groups (deepspeed 0.19.8), so the bare loop always runs
first and pays the process's one-time costs (which favours the engine, most visibly under ZeRO-3).

usage (2 CPU processes):
  DS_ACCELERATOR=cpu accelerate launch --config_file launch/cpu_zero3_2proc.yaml --main_process_port 29620 \\
      -m benchmarks.engine_overhead_dist --zero 3 --steps 30 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from benchmarks.common import ml100k, record
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.engine import deepspeed_config as dscfg
from crossrec_dist.engine import distributed as dist_info
from crossrec_dist.engine.schedule import lr_lambda
from crossrec_dist.engine.trainer import Engine
from crossrec_dist.stages.pretrain import PretrainConfig, PretrainTask
from crossrec_dist.stages.train_config import RecommenderTrainConfig as TrainConfig


def bare_deepspeed_loop(task: PretrainTask, cfg: TrainConfig, ds_path, steps: int) -> float:
    import deepspeed
    rank, world = dist_info.rank(), dist_info.world_size()
    ds_config = dscfg.resolve(cfg, world=world, hidden_size=task.model_config.hidden_size).ds_config
    model = task.model = task.new_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr or 1e-3,
                            betas=(0.9, cfg.adam_beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, 0, cfg.schedule, cfg.min_lr_ratio))
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    if ds_config["zero_optimization"]["stage"] == 3:
        for p in model.tied_parameters():
            deepspeed.zero.register_external_parameter(model, p)
    engine.train()
    batches = task.batches()
    n, done, epoch = 0, 0, 0
    dist_info.barrier()
    t0 = time.perf_counter()
    while done < steps:
        for mb in batches.epoch(epoch, rank, world):
            batch = mb.inputs
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            sched.step()
            n += batch["input_ids"].shape[0] * world
            done += 1
            if done >= steps:
                break
        epoch += 1
    dist_info.barrier()
    return n / (time.perf_counter() - t0)


def engine_loop(task: PretrainTask, cfg: TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as out:
        out = dist_info.broadcast_object(out if dist_info.is_main() else None)
        engine = Engine(cfg, out, hidden_size=task.model_config.hidden_size, log=lambda *_: None)
        engine.build_model(task)
        result = engine.fit(task)
        dist_info.barrier()
    return result.train_record()["samples_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--zero", type=int, choices=[1, 2, 3], default=3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=64)
    a = ap.parse_args()
    import deepspeed
    deepspeed.init_distributed()   # the process group first: rank 0 prepares the data, the others wait
    data = PreparedData(ml100k()) if dist_info.is_main() else None
    dist_info.barrier()
    data = data or PreparedData(ml100k())
    ds_path = dscfg.resolve_path(f"zero{a.zero}")
    cfg = TrainConfig(max_steps=a.steps, epochs=1000, eval_every=10**9, patience=0, tensorboard=False,
                      log_every=10**9, warmup_ratio=0.0, micro_batch_size=a.micro_batch, deepspeed=str(ds_path))
    bare, eng, ratios = [], [], []
    for _ in range(a.repeats):
        b = bare_deepspeed_loop(PretrainTask(PretrainConfig(preset=a.preset, train=cfg), data), cfg, ds_path, a.steps)
        e = engine_loop(PretrainTask(PretrainConfig(preset=a.preset, train=cfg), data), cfg)
        bare.append(b)
        eng.append(e)
        ratios.append(e / b)
    if dist_info.is_main():
        record(f"engine_overhead_zero{a.zero}_{dist_info.world_size()}proc", {
            "command": f"accelerate launch --config_file launch/cpu_zero3_2proc.yaml -m benchmarks.engine_overhead_dist "
                       f"--preset {a.preset} --zero {a.zero} --steps {a.steps} --repeats {a.repeats}",
            "world": dist_info.world_size(), "zero": a.zero, "preset": a.preset, "micro_batch_per_rank": a.micro_batch,
            "bare_samples_per_second": statistics.median(bare), "engine_samples_per_second": statistics.median(eng),
            "engine_over_bare_median_ratio": statistics.median(ratios), "ratios": ratios, "bare": bare, "engine": eng})


if __name__ == "__main__":
    main()
