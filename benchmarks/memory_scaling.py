"""Per-rank model-state memory under DeepSpeed ZeRO-0/1/2/3 with 1 and 2 CPU processes, measured.

For every (stage, world) the parent runs
  accelerate launch --config_file launch/cpu_zero3_2proc.yaml --num_processes W
      --main_process_port P --deepspeed_config_file ds_configs/zeroS.json -m benchmarks.memory_scaling --worker ...
and each rank trains the real ``CrossRecModel`` with the real ``Engine`` (PretrainTask on a prepared
synthetic log; in-training validation and saving stubbed out) for ``--steps`` optimizer updates of
``--grad-accum`` micro-batches each. In the last update every rank takes a census of the tensors it
holds at three points:
  before step   the task's ``after_backward`` hook (the engine calls it after ``model.backward`` of the
                last micro-batch and before ``model.step``): that update's gradients are live and the
                Adam moments of the earlier updates exist
  between micro-batches   before the forward of the 2nd micro-batch (the 1st one's gradients are held
                while accumulating: where ZeRO-1 keeps full gradients and ZeRO-2 only its partition)
  in step       when DeepSpeed calls the inner torch ``AdamW.step`` (fp32 gradient partitions attached)
and "peak" is the largest of the three. A census counts bytes of *distinct storages* (a flat buffer
that several parameters view is counted once, and a storage is counted under the first category
that reaches it, in this order):

  params        ``p.ds_tensor`` (ZeRO-3 partition) and ``p.data`` of every model parameter (ZeRO-3:
                non-empty only for persistent small parameters; ZeRO-1/2: views into DeepSpeed's flat
                buffer, whose whole storage is counted)
  grads         ``p.grad`` of every model parameter, plus tensors reachable from the ZeRO optimizer's
                attributes whose attribute path contains "grad" (averaged_gradients,
                grads_in_partition, grad_partitions_flat_buffer, ...), plus the ``.grad`` of any tensor
                reachable from them or held by the inner optimizer (fp32 gradient partitions in step)
  fp32 master   parameters of the inner torch optimizer that are not model storages, and ZeRO optimizer
                attributes whose path contains "fp32" (the fp32 partition DeepSpeed keeps for ZeRO-1/2/3:
                single_partition_of_fp32_groups, fp32_partitioned_groups_flat; for ZeRO-0 the inner
                optimizer's params *are* the model's, so nothing is added)
  Adam state    the inner optimizer's ``state`` tensors (exp_avg, exp_avg_sq, step)
  other         every other tensor reachable from the ZeRO optimizer's attributes (bucket buffers, ...)

Beside it: the toolkit's estimate (``crossrec_dist.models.sizing.model_state_bytes``), and DeepSpeed's
own estimators (``estimate_zero2_model_states_mem_needs`` for stage 2, ``estimate_zero3_...`` for
stage 3, both without offload, i.e. what the ``*_all_live`` helpers print; DeepSpeed has none for
stages 0 and 1). Both estimators assume 16-bit mixed precision; on CPU the engine trains in fp32
unless ``--precision bf16``. RSS is reported as context only (it includes ~0.5-1 GB of libraries).

usage: DS_ACCELERATOR=cpu python -m benchmarks.memory_scaling [--preset base] [--items 50000]
       [--stages 0 1 2 3] [--worlds 1 2] [--steps 3] [--grad-accum 2] [--precision no|bf16] [--port 29600]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import OUT, record

REPO = Path(__file__).resolve().parents[1]
CATS = ("params", "grads", "fp32_master", "adam_state", "other")


# ---------------------------------------------------------------------------------------------
# worker (one rank, inside accelerate launch)
# ---------------------------------------------------------------------------------------------
class Census:
    def __init__(self):
        self.seen: dict[int, str] = {}
        self.bytes = defaultdict(int)
        self.detail: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.storages: list[tuple[str, str, int]] = []

    def add(self, cat: str, t, name: str) -> None:
        import torch
        if not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        ptr, nb = st.data_ptr(), st.nbytes()
        if nb == 0 or ptr in self.seen:
            return
        self.seen[ptr] = cat
        self.bytes[cat] += nb
        self.detail[cat][name] += nb
        if nb >= 1 << 20:
            self.storages.append((cat, name, nb))


def _walk(obj, path: str, depth: int, visited: set):
    """(path, tensor) for tensors reachable from ``obj`` through attributes, lists, tuples and dicts."""
    import torch
    if isinstance(obj, torch.Tensor):
        yield path, obj
        return
    if depth <= 0 or id(obj) in visited:
        return
    if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer, str, bytes, int, float, bool, type(None))):
        return
    visited.add(id(obj))
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", depth - 1, visited)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]", depth - 1, visited)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
        for k, v in vars(obj).items():
            yield from _walk(v, f"{path}.{k}", depth - 1, visited)


def _generic(path: str) -> str:
    """Attribute path without list indices/dict keys, so per-group buffers add up under one name."""
    import re
    return re.sub(r"\[[^\]]*\]", "[]", path)


def census(ds_engine) -> dict:
    import torch
    module = ds_engine.module
    opt = ds_engine.optimizer
    inner = opt.optimizer if isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer) else opt
    c = Census()
    for name, p in module.named_parameters():
        c.add("params", getattr(p, "ds_tensor", None), "ds_tensor (partition)")
        c.add("params", p.data, "param.data")
    for name, p in module.named_parameters():
        c.add("grads", p.grad, "param.grad")
    buffers = list(_walk(opt, type(opt).__name__, 6, set())) if opt is not inner else []
    for path, t in buffers:
        if "grad" in path.lower():
            c.add("grads", t, _generic(path))
        c.add("grads", t.grad, _generic(path) + ".grad")   # e.g. the fp32 partition's grad during step
    for g in inner.param_groups:
        for p in g["params"]:
            c.add("grads", p.grad, "inner optimizer param.grad")
            c.add("fp32_master", p, "inner optimizer param")
    for path, t in buffers:   # ZeRO-3 empties the inner param groups between steps; its flat fp32 copy stays
        if "fp32" in path.lower():
            c.add("fp32_master", t, _generic(path))
    for st in inner.state.values():
        for k, v in st.items():
            c.add("adam_state", v, k)
    for path, t in buffers:
        c.add("other", t, _generic(path))
    full = sum(int(getattr(p, "ds_numel", p.numel())) for p in module.parameters())
    return {"bytes": {k: c.bytes.get(k, 0) for k in CATS}, "total": sum(c.bytes.values()),
            "detail": {k: dict(v) for k, v in c.detail.items()}, "params_full": full,
            "storages_over_1mib": sorted(c.storages, key=lambda x: -x[2]),
            "optimizer": f"{type(opt).__module__}.{type(opt).__name__}",
            "inner_optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
            "param_dtypes": sorted({str(p.dtype) for p in module.parameters()})}


def worker(a) -> None:
    import psutil
    import torch
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.engine import distributed as dist_info
    from crossrec_dist.stages.train_config import RecommenderTrainConfig as TrainConfig
    from crossrec_dist.engine.trainer import Engine
    from crossrec_dist.stages.pretrain import PretrainConfig, PretrainTask

    out = Path(a.out)
    snaps = {}

    def snapshot(model, key):
        snap = census(model)
        snap["rss_bytes"] = psutil.Process().memory_info().rss
        snap["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        snaps[key] = snap

    calls = [0]

    class MeasuredPretrain(PretrainTask):
        def loss(self, model, batch):
            calls[0] += 1
            # second micro-batch of the last update: the first one's gradients are held, accumulating
            if a.grad_accum > 1 and calls[0] == (a.steps - 1) * a.grad_accum + 2:
                snapshot(model, "mid_accumulation")
            return super().loss(model, batch)

        def after_backward(self, model, step):
            if step + 1 == a.steps:   # the last update: its grads are live, earlier steps made Adam state
                snapshot(model, "after_backward_last_step")
                # and once more inside the inner torch optimizer's step of this update, where DeepSpeed
                # has handed it the (fp32) gradient partitions
                opt = model.optimizer
                inner = opt.optimizer if isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer) else opt
                orig = inner.step

                def step_and_measure(*args, **kwargs):
                    inner.step = orig
                    snapshot(model, "in_optimizer_step")
                    return orig(*args, **kwargs)
                inner.step = step_and_measure

        def validate(self, engine):  # memory of model states only: no full-ranking evaluation
            from crossrec_dist.engine.task import Validation
            return Validation(metrics={"ndcg@10": 0.0, "hr@10": 0.0}, details={"overall": {}, "per_domain": {}})

        def save(self, engine, state_dict, out_dir):   # no weights written; the engine renames the folder
            Path(out_dir).mkdir(parents=True, exist_ok=True)

    train = TrainConfig(max_steps=a.steps, epochs=10**6, micro_batch_size=a.micro_batch, deepspeed=a.ds_config,
                        grad_accum=a.grad_accum,
                        mixed_precision=a.precision, eval_every=10**9, patience=0, tensorboard=False,
                        log_every=10**9, warmup_ratio=0.0, seed=0)
    cfg = PretrainConfig(preset=a.preset, model={"max_len": a.max_len}, train=train)
    task = MeasuredPretrain(cfg, PreparedData(a.data))
    engine = Engine(train, out / "run", hidden_size=task.model_config.hidden_size, log=lambda *_: None)
    t0 = time.perf_counter()
    engine.build_model(task)
    res = engine.fit(task)
    snap = snaps.get("after_backward_last_step")
    if snap is None:
        raise RuntimeError("after_backward hook never ran at the last step")
    rank = dist_info.rank()
    rec = {"rank": rank, "world": dist_info.world_size(), "zero_stage": engine.zero_stage,
           "precision": engine.precision, "steps": res.steps, "fit_seconds": round(time.perf_counter() - t0, 1),
           "num_items": task.model_config.num_items, "grad_accum": a.grad_accum, **snap,
           "mid_accumulation": snaps.get("mid_accumulation"), "in_optimizer_step": snaps.get("in_optimizer_step")}
    (out / f"rank{rank}.json").write_text(json.dumps(rec, indent=2))


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def estimates(preset: str, num_items: int, max_len: int, stage: int, world: int, mixed: bool) -> dict:
    import torch
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.models.presets import preset_config
    from crossrec_dist.models.sizing import count_parameters, model_state_bytes
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = preset_config(preset, num_items=num_items, max_len=max_len)
    n = count_parameters(config)
    with torch.device("meta"):
        model = CrossRecModel(config)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    ds = None
    if stage == 2:
        ds = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=world, num_nodes=1, cpu_offload=False)[1]
    elif stage == 3:
        ds = estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=world, num_nodes=1, cpu_offload=False,
                                                   cpu_offload_params=False, zero_init=False)[1]
    return {"params": n, "largest_layer_params": largest,
            "toolkit_bytes": model_state_bytes(n, stage, world, mixed=mixed), "deepspeed_bytes": ds}


def ds_all_live_text(preset: str, num_items: int, max_len: int, worlds) -> dict:
    """What DeepSpeed's ``*_all_live`` helpers print for the real model (stages 2 and 3)."""
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.models.presets import preset_config
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live

    model = CrossRecModel(preset_config(preset, num_items=num_items, max_len=max_len))
    text = {}
    for w in worlds:
        for name, fn in (("zero2", estimate_zero2_model_states_mem_needs_all_live),
                         ("zero3", estimate_zero3_model_states_mem_needs_all_live)):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                fn(model, num_gpus_per_node=w, num_nodes=1)
            text[f"{name}_world{w}"] = buf.getvalue()
    return text


def launch(stage: int, world: int, port: int, a, data: Path, out: Path) -> None:
    accelerate = Path(sys.executable).parent / "accelerate"
    ds = REPO / "ds_configs" / f"zero{stage}.json"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "launch" / "cpu_zero3_2proc.yaml"),
           "--num_processes", str(world), "--main_process_port", str(port), "--deepspeed_config_file", str(ds),
           "-m", "benchmarks.memory_scaling", "--worker", "--data", str(data), "--out", str(out),
           "--preset", a.preset, "--max-len", str(a.max_len), "--micro-batch", str(a.micro_batch),
           "--steps", str(a.steps), "--precision", a.precision, "--ds-config", str(ds),
           "--grad-accum", str(a.grad_accum)]
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*.json"):
        f.unlink()
    with open(out / "launch.log", "w") as log:
        p = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=1200,
                           env={**os.environ, "DS_ACCELERATOR": "cpu",
                                "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world))})
    if p.returncode != 0:
        raise RuntimeError(f"stage {stage} world {world} failed ({p.returncode}); see {out / 'launch.log'}:\n"
                           + (out / "launch.log").read_text()[-3000:])


def mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--ds-config", default=None)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--grad-accum", type=int, default=2,
                    help="micro-batches per update; >1 shows ZeRO-1 (full grads between micro-steps) vs ZeRO-2")
    ap.add_argument("--precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--stages", type=int, nargs="*", default=[0, 1, 2, 3])
    ap.add_argument("--worlds", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--port", type=int, default=29600)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from benchmarks.large_catalogue import prepared_catalogue
    t_start = time.perf_counter()
    data = prepared_catalogue(a.items, users=max(2000, a.items // 10), mean_length=30.0, eval_users=50,
                              tag=f"memscale_{a.items}")
    mixed = a.precision != "no"
    root = OUT / f"memory_scaling_{a.preset}_{a.precision}"
    rows = []
    port = a.port
    for world in a.worlds:
        for stage in a.stages:
            out = root / f"z{stage}_w{world}"
            print(f"[memory_scaling] ZeRO-{stage}, {world} process(es) ...", flush=True)
            t0 = time.perf_counter()
            launch(stage, world, port, a, data, out)
            port += 1
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
            est = estimates(a.preset, ranks[0]["num_items"], a.max_len, stage, world, mixed)
            rows.append({"stage": stage, "world": world, "seconds": round(time.perf_counter() - t0, 1),
                         "ranks": ranks, **est})
    for r in rows:   # per-rank peak of the two census points
        for x in r["ranks"]:
            x["peak_total"] = max(x["total"], *((x.get(k) or {}).get("total", 0)
                                                for k in ("mid_accumulation", "in_optimizer_step")))
    base = {r["world"]: r["ranks"][0]["peak_total"] for r in rows if r["stage"] == 0}
    for r in rows:
        r["peak_over_zero0"] = r["ranks"][0]["peak_total"] / base[r["world"]] if r["world"] in base else None
        r["peak_over_toolkit"] = r["ranks"][0]["peak_total"] / r["toolkit_bytes"]
        r["peak_bytes_per_param"] = max(x["peak_total"] for x in r["ranks"]) / r["params"]
    n_items = rows[0]["ranks"][0]["num_items"]
    result = {
        "command": "DS_ACCELERATOR=cpu python -m benchmarks.memory_scaling " + " ".join(sys.argv[1:]),
        "preset": a.preset, "num_items": n_items, "max_len": a.max_len, "micro_batch": a.micro_batch,
        "steps": a.steps, "grad_accum": a.grad_accum, "precision": a.precision, "params": rows[0]["params"],
        "largest_layer_params": rows[0]["largest_layer_params"],
        "counted": "distinct tensor storages held by each rank after backward of the last step, before its "
                   "optimizer step; see the module docstring",
        "seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
        "deepspeed_all_live_printout": ds_all_live_text(a.preset, n_items, a.max_len, a.worlds),
    }
    path = record(f"memory_scaling_{a.preset}_{a.precision}", result)
    print()
    print(markdown(result))
    print(f"\nraw: {path}")


def markdown(r: dict) -> str:
    prec = "fp32" if r["precision"] == "no" else r["precision"] + " mixed precision"
    lines = [f"Model: `{r['preset']}` preset, max_len {r['max_len']}, {r['num_items']:,} items -> "
             f"{r['params']:,} parameters (item table {r['largest_layer_params']:,}); {prec}, AdamW, "
             f"grad_accum {r['grad_accum']}. MiB per rank: rank 0 (rank 1 in brackets). Columns params..total: "
             f"after backward of the last micro-batch, before the optimizer step; 'between micro-batches': "
             f"before the forward of the last update's 2nd micro-batch (gradients accumulating); 'in step': "
             f"when DeepSpeed calls the inner torch AdamW.step of the last update. Peak = max of the three.", "",
             "| ZeRO | procs | params | grads | fp32 master | Adam m+v | other | total before step "
             "| grads between micro-batches | total between micro-batches | grads in step | total in step "
             "| **peak** | peak B/param "
             "| peak vs ZeRO-0 | toolkit sizing.py | DeepSpeed estimator | RSS rank 0 |",
             "|" + " --- |" * 18]
    for row in r["rows"]:
        r0 = row["ranks"][0]
        b = r0["bytes"]
        mid = r0.get("mid_accumulation") or {}
        ins = r0.get("in_optimizer_step") or {}
        others = "".join(f" [{mib(x['peak_total'])}]" for x in row["ranks"][1:])
        ratio = "" if row["peak_over_zero0"] is None else f"{row['peak_over_zero0']:.2f}"
        lines.append(
            f"| {row['stage']} | {row['world']} | {mib(b['params'])} | {mib(b['grads'])} | {mib(b['fp32_master'])} | "
            f"{mib(b['adam_state'])} | {mib(b['other'])} | {mib(r0['total'])} | "
            f"{mib(mid.get('bytes', {}).get('grads'))} | {mib(mid.get('total'))} | "
            f"{mib(ins.get('bytes', {}).get('grads'))} | {mib(ins.get('total'))} | **{mib(r0['peak_total'])}**{others} | "
            f"{row['peak_bytes_per_param']:.1f} | {ratio} | {mib(row['toolkit_bytes'])} | {mib(row['deepspeed_bytes'])} | "
            f"{mib(r0['rss_bytes'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
