"""The GPU measurements, as one command that fits in ~8 minutes on one H100/H200.

Every part is the pipeline a user runs (``python -m crossrec_dist pretrain`` in its own process, the
serving engine in this one), on one GPU, bf16 (accelerate's autocast, fp32 master weights):

1. ``1b``: the ``1b`` preset (hidden 2048, 24 layers, 1.2B parameters with 3,706 items, windows of 512)
   trained for ``--steps-1b`` updates of ``--micro-1b`` sequences on a synthetic log of 1,000 users with
   600 events on average (``crossrec data synth``: long histories, though ~1/3 of the window positions are
   still padding, and a final evaluation of 1,000 users rather than ML-1M's 6,040 at 512 positions each);
   tokens/s and MFU are the engine's own log records after the first (warm-up) window, median over the rest.
   FLOPs per token (``crossrec_dist/models/flops.py``, PaLM appendix B):
   ``6 * N_body + 6 * H * V + 12 * L * H * S`` (N_body: transformer parameters without the item table,
   H hidden, V items + 1, L layers, S window length); MFU = tokens/s x FLOPs/token / peak, peak = the
   GPU's dense bf16 tensor-core rate (``crossrec_dist/engine/flops.py``: 989 TFLOP/s for H100 and H200).
   Windows are counted at their full length S, padding included (the engine's convention: it computes
   over them), so tokens/s and MFU count the work done; ~66% of those positions carry a label here.
2. ``small`` and ``medium`` on ML-1M: one epoch each with the main job's settings (micro-batch 32, as
   ``launch/recipes/ml_cross_platform.yaml``); training seconds (validation excluded) and the final
   full-ranking evaluation's seconds, from the run's metrics.json.
3. Serving: the ``medium`` model of part 2 loaded by ``ServingEngine`` on the GPU (what ``crossrec serve``
   runs per micro-batch, without HTTP): p50/p99 ms for one request at a time and per batch of 32, random
   histories of 10-50 items, k = 10.

Each part runs under its own time limit and its failure is recorded, not fatal, so one command returns
every figure it could take. ``--dry-run`` runs the same parts on the CPU at toy sizes (the ``tiny`` preset,
a few updates, a synthetic log) so that the suite keeps working where no GPU is (tests/test_benchmark_tools.py).

    python -m benchmarks.gpu_suite                   # on the GPU machine; ML-1M fetched and prepared first
    python -m benchmarks.gpu_suite --data PREPARED_ML1M --json $OUT/gpu_suite.json   # a machine with no network
    DS_ACCELERATOR=cpu python -m benchmarks.gpu_suite --dry-run                          # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, crossrec, machine_info, record

REPO = Path(__file__).resolve().parent.parent


def pretrain(data: Path, out: Path, preset: str, sets: dict, timeout: float, log: Path) -> dict:
    """``crossrec pretrain`` in its own process; its metrics.json plus the wall seconds, or the failure."""
    cmd = [sys.executable, "-m", "crossrec_dist", "pretrain", "--preset", preset, "--data", str(data),
           "--out", str(out), "--force", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]]
    start = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "log_tail": _tail(log)}
    wall = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "wall_seconds": wall, "log_tail": _tail(log)}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_seconds": wall, "metrics": metrics, "command": " ".join(cmd[1:])}


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def throughput(metrics: dict) -> dict:
    """Median tokens/s, samples/s and MFU of the engine's train records after the first window."""
    recs = [h for h in metrics.get("history", []) if h.get("kind") == "train"]
    steady = recs[1:] or recs
    out = {"updates": metrics["train"]["steps"], "windows_logged": len(recs), "parameters": metrics.get("params")}
    for key in ("tokens_per_second", "samples_per_second", "mfu"):
        values = [r[key] for r in steady if key in r]
        out[key] = statistics.median(values) if values else None
    out["windows"] = [{k: r.get(k) for k in ("step", "loss", "tokens_per_second", "mfu")} for r in recs]
    return out


def epoch(metrics: dict) -> dict:
    t = metrics["train"]
    return {"updates": t["steps"], "train_seconds": round(t["seconds"] - t["eval_seconds"], 2),
            "validation_seconds": t["eval_seconds"], "final_eval_seconds": metrics.get("eval_seconds"),
            "test": metrics.get("test")}


def serving(model_dir: Path, device: str, requests: int, batches: int) -> dict:
    import torch

    from crossrec_dist.serving.engine import Query, ServingEngine
    engine = ServingEngine(model_dir, device=device)
    region = next(iter(engine.regions))
    route = engine.region(region).default
    rng = random.Random(0)

    def query() -> Query:
        return Query(route, [rng.randint(1, engine.num_items) for _ in range(rng.randint(10, 50))], 10)

    def timed(n: int, size: int) -> list[float]:
        times = []
        for i in range(n + 5):
            qs = [query() for _ in range(size)]
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            engine.answer(qs)                 # top k back on the host: the answer is complete
            if i >= 5:                        # 5 warm-up calls
                times.append((time.perf_counter() - start) * 1000)
        return times

    one, many = timed(requests, 1), timed(batches, 32)
    q = statistics.quantiles
    return {"region": region, "device": device,
            "batch1_ms": {"p50": statistics.median(one), "p99": q(one, n=100)[98], "n": len(one)},
            "batch32_ms": {"p50": statistics.median(many), "p99": q(many, n=100)[98], "n": len(many),
                           "per_request_p50": statistics.median(many) / 32}}


def ml1m() -> Path:
    """MovieLens-1M with titles as item ids (the main job's source platform), prepared as one domain."""
    raw, prep = OUT / "ml1m_titles_raw", OUT / "ml1m_titles"
    if not (raw / "fetch.json").is_file():
        crossrec("data", "fetch", "movielens-1m-titles", "--out", raw)
    if not (prep / "stats.json").is_file():
        crossrec("prepare", "--input", raw, "--format", "auto", "--out", prep)
    return prep


def synthetic(work: Path, name: str, users: int, items: int, mean_length: int) -> Path:
    raw, data = work / f"{name}_raw", work / name
    if not (data / "stats.json").is_file():
        crossrec("data", "synth", "--out", raw, "--users", users, "--items", items, "--domains", "1",
                 "--mean-length", mean_length)
        crossrec("prepare", "--input", raw / "interactions.parquet", "--format", "parquet", "--out", data,
                 "--domain-col", "domain", "--force")
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="a prepared ML-1M (default: fetched and prepared into benchmarks/out/; "
                   "--dry-run makes a synthetic log)")
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks that the suite runs")
    p.add_argument("--steps-1b", type=int, default=40)
    p.add_argument("--micro-1b", type=int, default=16)
    p.add_argument("--json", type=Path, help="also write the record here (e.g. $OUT on the device machine)")
    p.add_argument("--keep", action="store_true", help="keep the model folders (the 1b one is ~5 GB)")
    a = p.parse_args()
    work = OUT / ("gpu_suite_dry" if a.dry_run else "gpu_suite")
    work.mkdir(parents=True, exist_ok=True)
    import torch
    cuda = torch.cuda.is_available() and not a.dry_run
    if not a.dry_run and not cuda:
        sys.exit("gpu_suite: no GPU here (torch.cuda.is_available() is False); --dry-run checks it on a CPU")
    data = synthetic(work, "data", 300, 200, 30) if a.dry_run else (a.data or ml1m())
    if data is None or not (Path(data) / "meta.json").is_file():
        sys.exit(f"gpu_suite: --data must be a prepared dataset (crossrec prepare), got {data}")
    common = {"train.tensorboard": "false", "train.patience": 0,
              "train.mixed_precision": "no" if a.dry_run else "bf16"}
    big = "tiny" if a.dry_run else "1b"
    result: dict = {"dry_run": a.dry_run, "data": str(data), "machine_info": machine_info(),
                    "gpu_name": torch.cuda.get_device_name(0) if cuda else None, "parts": {}}

    def save() -> None:
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result, indent=2, default=str))

    def part(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            result["parts"][name] = fn()
        except Exception as e:                        # a part's failure is a result too; the rest still run
            result["parts"][name] = {"error": f"{type(e).__name__}: {e}"}
        result["parts"][name]["part_seconds"] = round(time.perf_counter() - start, 1)
        print(f"gpu_suite: {name}: {json.dumps(result['parts'][name], default=str)[:600]}", flush=True)
        save()

    def run_1b() -> dict:
        steps = 3 if a.dry_run else a.steps_1b
        long = data if a.dry_run else synthetic(work, "long_histories", 1000, 3706, 600)
        res = pretrain(long, work / "1b", big, {**common, "train.max_steps": steps, "train.epochs": 1,
                                                 "train.micro_batch_size": 4 if a.dry_run else a.micro_1b,
                                                 "train.log_every": 1 if a.dry_run else 5,
                                                 "train.eval_batch_size": 128, "train.warmup_steps": 0},
                       timeout=300, log=work / "1b.log")
        if "metrics" in res:
            res.update(throughput(res.pop("metrics")))
        if not a.keep:
            shutil.rmtree(work / "1b", ignore_errors=True)
        return {"preset": big, **res}

    def run_epoch(preset: str) -> dict:
        sets = {**common, "train.epochs": 1, "train.micro_batch_size": 32, "train.log_every": 200}
        if a.dry_run:
            sets.update({"train.max_steps": 3, "model.hidden_size": 64 if preset == "medium" else 32})
        res = pretrain(data, work / preset, "tiny" if a.dry_run else preset, sets, timeout=150,
                       log=work / f"{preset}.log")
        if "metrics" in res:
            res.update(epoch(res.pop("metrics")))
        return {"preset": preset, **res}

    part("1b_throughput", run_1b)
    part("ml1m_epoch_small", lambda: run_epoch("small"))
    part("ml1m_epoch_medium", lambda: run_epoch("medium"))
    part("serving", lambda: serving(work / "medium", "cuda" if cuda else "cpu",
                                    requests=20 if a.dry_run else 300, batches=5 if a.dry_run else 100))
    record("gpu_suite", result)
    save()
    failed = [name for name, r in result["parts"].items() if "error" in r]
    if failed:
        print(f"gpu_suite: failed parts: {failed}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
