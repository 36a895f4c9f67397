"""Where a pretraining step's time goes: batch building, attention, the loss over all items, backward,
optimizer, and the full-ranking validation pass, measured with ``torch.profiler`` on MovieLens-100K.

The step is the bare loop of ``engine_overhead`` (the engine adds < 1 % on top, RESULTS §4.1), split
into labelled phases with ``record_function``; the backbone's attention is the time of the
``LlamaAttention`` modules (hooks open a labelled range around each). One validation pass over the
source regions is timed the same way. Prints and records phase shares and the top operators.
usage: python -m benchmarks.profile_pretrain [--preset small] [--steps 40] [--warmup 5]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.common import ml100k, record
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.models.losses import full_softmax
from crossrec_dist.evaluation.evaluator import EvalOptions, evaluate
from crossrec_dist.evaluation.evaluator import model_scorer
from crossrec_dist.stages.common import evaluate_model
from crossrec_dist.stages.pretrain import PretrainConfig, PretrainTask
from crossrec_dist.stages.train_config import RecommenderTrainConfig as TrainConfig

PHASES = ("batch", "forward.backbone", "forward.attention", "forward.loss", "backward", "optimizer")


def label_attention(model) -> None:
    """Open a profiler range around every attention module, so its share of the forward is visible."""
    for mod in model.modules():
        if type(mod).__name__.endswith("Attention"):
            def pre(m, args, kwargs):
                m._range = record_function("forward.attention")
                m._range.__enter__()

            def post(m, args, kwargs, out):
                m._range.__exit__(None, None, None)
            mod.register_forward_pre_hook(pre, with_kwargs=True)
            mod.register_forward_hook(post, with_kwargs=True)


def endless(batches):
    epoch = 0
    while True:
        yield from batches.epoch(epoch, 0, 1)
        epoch += 1


def train_steps(task: PretrainTask, steps: int) -> int:
    model = task.model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98))
    stream = endless(task.batches())
    n = 0
    for _ in range(steps):
        with record_function("batch"):
            batch = next(stream).inputs
        with record_function("forward.backbone"):
            hidden = model.encode(batch["input_ids"], batch["domain_ids"])
        with record_function("forward.loss"):
            mask = batch["labels"] > 0
            loss = full_softmax(hidden[mask], model.item_weight(), batch["labels"][mask])
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        n += batch["input_ids"].shape[0]
    return n


def phase_totals(prof) -> dict[str, float]:
    """Wall ms per labelled range; attention is nested in forward.backbone, so it is part of that
    figure and also reported on its own."""
    out = {p: 0.0 for p in PHASES}
    for evt in prof.key_averages():
        if evt.key in out:
            out[evt.key] += evt.cpu_time_total / 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    a = ap.parse_args()
    data = PreparedData(ml100k())
    task = PretrainTask(PretrainConfig(preset=a.preset, train=TrainConfig(micro_batch_size=128)), data)
    task.model = task.new_model()
    label_attention(task.model)
    train_steps(task, a.warmup)

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        samples = train_steps(task, a.steps)
    train_wall = (time.perf_counter() - t0) * 1000
    phases = phase_totals(prof)
    ops = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1), "calls": e.count}
           for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
           if not e.key.startswith(("forward.", "batch", "backward", "optimizer", "ProfilerStep"))][:12]

    evaluate_model(task.model, data, task.domains, task.max_len)   # warm
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as eprof:
        evaluate_model(task.model, data, task.domains, task.max_len)
    eval_wall = (time.perf_counter() - t0) * 1000
    eval_ops = [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1)}
                for e in sorted(eprof.key_averages(), key=lambda e: -e.self_cpu_time_total)][:8]

    # in-training validation: the valid split once per epoch, as the engine runs it by default
    valid_opts = EvalOptions(split="valid", domains=task.domains, max_len=task.max_len)
    t0 = time.perf_counter()
    evaluate(data, model_scorer(task.model.eval()), valid_opts)
    valid_ms = (time.perf_counter() - t0) * 1000
    epoch_train_ms = task.batches().num_batches(1) * train_wall / a.steps

    per_step = {k: round(v / a.steps, 2) for k, v in phases.items()}
    share = {k: round(100 * v / train_wall, 1) for k, v in phases.items()}
    users = len(data.eval_set("valid", task.domains).targets) + len(data.eval_set("test", task.domains).targets)
    record(f"profile_pretrain_{a.preset}", {
        "command": f"python -m benchmarks.profile_pretrain --preset {a.preset} --steps {a.steps}",
        "steps": a.steps, "micro_batch": 128, "seq_len": task.max_len, "samples_per_second_profiled":
        round(samples / train_wall * 1000, 1), "step_ms": round(train_wall / a.steps, 2),
        "phase_ms_per_step": per_step, "phase_percent_of_step": share, "top_ops_training": ops,
        "eval_valid_and_test_ms": round(eval_wall, 1), "eval_users": users, "top_ops_eval": eval_ops,
        "valid_pass_ms": round(valid_ms, 1), "train_ms_per_epoch": round(epoch_train_ms, 1),
        "validation_percent_of_pretraining": round(100 * valid_ms / (valid_ms + epoch_train_ms), 1)})


if __name__ == "__main__":
    main()
