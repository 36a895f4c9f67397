"""Load test of ``crossrec serve`` with a real HTTP client on loopback (127.0.0.1), bounded.

A bundle like a deployment's: a ``medium``-body base (hidden 256, 2 layers, as ``make demo``; ``--preset``
another) over an
ML-100K-size catalogue (1,682 items, synthetic log with 17 domains: the base pretrained on d0, one LoRA
adapter per region d1..d16, fine-tuned briefly -- serving cost does not depend on how well they rank) and
a student distilled for d1 (hidden 64, 1 layer) exported to ONNX. The server runs as its own process
(``crossrec serve``); the client is one asyncio process with ``aiohttp`` keeping ``concurrency`` requests in
flight, for a fixed number of requests per cell. Each request: a random region among the first R, a
history of 10-50 random known items, k = 10. (The client was ``httpx`` until it was measured: ~4 ms of CPU
per request, 40% of these 2 cores and a ceiling of ~240 req/s on any machine; ``aiohttp`` takes ~0.25 ms.)

Measured: throughput and p50/p99 latency at concurrency 1, 8, 32 for 1, 4 and 16 regions, for mixed-region
micro-batching (``--batching mixed``) and one request at a time switching the active adapter
(``--batching switch``); the in-process ``Recommender`` (no HTTP) at concurrency 1; the teacher (d1's
adapter) vs its ONNX student at concurrency 8; the memory of the 16 regions served on one base vs one
merged model per region (resident set of a process that loads each); and, with ``--soak-seconds``, a soak
at concurrency 8 over 16 regions counting every non-200.

    python -m benchmarks.serve_load                      # ~10 min on 2 cores (setup ~5 min, once)
    python -m benchmarks.serve_load --soak-seconds 600   # + the 10-minute soak
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from benchmarks.common import OUT, crossrec, machine_info, record

REGIONS = [f"d{i}" for i in range(1, 17)]
TRAIN = ["--set", "train.tensorboard=false", "--set", "train.log_every=50"]


def build_bundle(work: Path, preset: str) -> Path:
    bundle = work / "bundle"
    if (bundle / "adapters" / "manifest.json").is_file():
        return bundle
    raw, data, base = work / "raw", work / "data", work / "base"
    crossrec("data", "synth", "--out", raw, "--users", "3400", "--items", "1682", "--domains", "17",
             "--mean-length", "20", "--private-items", "0.02", "--seed", "0")
    crossrec("prepare", "--input", raw / "interactions.parquet", "--format", "parquet", "--out", data,
             "--domain-col", "domain", "--force")
    crossrec("pretrain", "--preset", preset, "--data", data, "--out", base, "--domains", "d0", "--force",
             "--set", "train.max_steps=60", "--set", "train.eval_every=60", *TRAIN)
    crossrec("finetune", "--base", base, "--data", data, "--domains", ",".join(REGIONS), "--method", "lora",
             "--out", work / "adapters", "--force", "--set", "train.max_steps=8", "--set", "train.eval_every=8",
             "--set", "train.validate_at_start=false", "--set", "must_beat_base=false", *TRAIN)
    crossrec("distill", "--teacher", base, "--adapter", work / "adapters" / "d1", "--data", data, "--domain", "d1",
             "--out", work / "student", "--force", "--preset", "tiny", "--set", "model.hidden_size=64",
             "--set", "model.num_heads=2", "--set", "model.intermediate_size=128", "--set", "model.num_layers=1",
             "--set", "train.max_steps=30", "--set", "train.eval_every=30", *TRAIN)
    crossrec("export", "--base", base, "--adapters", work / "adapters", "--out", bundle, "--student",
             work / "student")
    return bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``crossrec serve`` in its own process on a free loopback port."""

    def __init__(self, bundle: Path, batching: str, log: Path, max_batch: int = 32, max_wait_ms: float = 2.0,
                 threads: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crossrec_dist", "serve", "--bundle", str(bundle), "--host", "127.0.0.1",
             "--port", str(self.port), "--batching", batching, "--max-batch", str(max_batch),
             "--max-wait-ms", str(max_wait_ms), *(["--threads", str(threads)] if threads else [])],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"crossrec serve exited: see {log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("crossrec serve did not become ready")
            time.sleep(0.3)

    def rss_mib(self) -> float:
        return _rss_mib(self.proc.pid)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def requests_for(vocab: list[str], regions: list[str], n: int, seed: int, model: str | None = None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = {"region": rng.choice(regions), "history": rng.sample(vocab, rng.randint(10, 50)), "k": 10}
        if model:
            body["model"] = model
        out.append(body)
    return out


async def _drive(url: str, bodies: list[dict], concurrency: int) -> dict:
    latencies, statuses = [], {}
    queue = list(reversed(bodies))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def worker():
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                async with client.post("/v1/recommend", json=body) as r:
                    await r.read()                       # the whole answer, as a caller would take it
                    status = r.status
                latencies.append((time.perf_counter() - t0) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"requests": len(bodies), "throughput_rps": len(bodies) / wall, "p50_ms": statistics.median(latencies),
            "p99_ms": float(np.percentile(latencies, 99)), "errors": sum(v for k, v in statuses.items() if k != 200),
            "statuses": statuses}


def drive(url: str, bodies: list[dict], concurrency: int, warmup: int = 30) -> dict:
    asyncio.run(_drive(url, bodies[:warmup], concurrency))
    return asyncio.run(_drive(url, bodies, concurrency))


def soak(url: str, vocab: list[str], seconds: float, concurrency: int = 8) -> dict:
    """Requests for 16 regions at ``concurrency`` for ``seconds``, in rounds of 400: every non-200 counted."""
    end, rounds, total, errors, p99s = time.monotonic() + seconds, 0, 0, 0, []
    while time.monotonic() < end:
        res = asyncio.run(_drive(url, requests_for(vocab, REGIONS, 400, 1000 + rounds), concurrency))
        rounds, total, errors = rounds + 1, total + res["requests"], errors + res["errors"]
        p99s.append(res["p99_ms"])
    return {"seconds": seconds, "requests": total, "errors": errors, "p99_ms_median_of_rounds": statistics.median(p99s),
            "p99_ms_worst_round": max(p99s)}


def in_process(bundle: Path, vocab: list[str], regions: list[str], n: int) -> dict:
    """The in-process ``Recommender`` (no HTTP), one request after another, in a fresh process."""
    code = f"""
import json, random, statistics, time
import numpy as np
from crossrec_dist.export.serving import Recommender
rec = Recommender({str(bundle / 'base')!r}, {str(bundle / 'adapters')!r})
rng = random.Random(7); vocab = rec.vocab; regions = {regions!r}
bodies = [(rng.choice(regions), rng.sample(vocab, rng.randint(10, 50))) for _ in range({n} + 30)]
for r, h in bodies[:30]: rec.recommendation(h, r, 10)
lat = []
t0 = time.perf_counter()
for r, h in bodies[30:]:
    t = time.perf_counter(); rec.recommendation(h, r, 10); lat.append((time.perf_counter() - t) * 1000)
wall = time.perf_counter() - t0
print(json.dumps({{"requests": {n}, "throughput_rps": {n} / wall, "p50_ms": statistics.median(lat),
                  "p99_ms": float(np.percentile(lat, 99))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(bundle: Path) -> dict:
    """Resident memory (MiB) of a process holding the 16 regions: on one shared base, and as 16 merged models."""
    shared = """
from crossrec_dist.serving.engine import engine_from_bundle
engine = engine_from_bundle({bundle!r})
"""
    merged = """
import json
from crossrec_dist.export.loading import load_model
models = [load_model({base!r}, {adapters!r} + '/' + r).merge_and_unload() for r in {regions!r}]
"""
    out = {}
    for name, code in (("shared_base_16_regions", shared), ("merged_model_per_region_16", merged)):
        body = code.format(bundle=str(bundle), base=str(bundle / "base"), adapters=str(bundle / "adapters"),
                           regions=REGIONS) + """
for line in open('/proc/self/status'):
    if line.startswith('VmRSS:'):
        print(int(line.split()[1]) / 1024)
"""
        res = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, check=True)
        out[name] = float(res.stdout.strip().splitlines()[-1])
    baseline = "import torch, peft, transformers, crossrec_dist.serving.engine\n" + \
               "for line in open('/proc/self/status'):\n    if line.startswith('VmRSS:'): print(int(line.split()[1]) / 1024)\n"
    res = subprocess.run([sys.executable, "-c", baseline], capture_output=True, text=True, check=True)
    out["libraries_only"] = float(res.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="medium", help="the base's body (default medium, as make demo's)")
    p.add_argument("--work", default=None, help="default benchmarks/out/serve_load/PRESET")
    p.add_argument("--requests", type=int, default=400, help="timed requests per cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--regions", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--soak-seconds", type=float, default=0)
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: crossrec serve's)")
    a = p.parse_args(argv)
    work = Path(a.work or OUT / "serve_load" / a.preset)
    work.mkdir(parents=True, exist_ok=True)
    bundle = build_bundle(work, a.preset)
    vocab = json.loads((bundle / "base" / "items.json").read_text())
    result = {"machine_info": machine_info(), "preset": a.preset, "requests_per_cell": a.requests, "cells": [], "bundle": str(bundle),
              "threads": os.cpu_count(), "server_threads": a.threads or "crossrec serve's default"}
    for batching in ("mixed", "switch"):
        server = Server(bundle, batching, work / f"server_{batching}.log", threads=a.threads)
        try:
            for n_regions in a.regions:
                for conc in a.concurrency:
                    bodies = requests_for(vocab, REGIONS[:n_regions], a.requests, seed=n_regions * 100 + conc)
                    res = drive(server.url, bodies, conc)
                    result["cells"].append({"server": batching, "regions": n_regions, "concurrency": conc, **res})
                    print(f"{batching:6s} regions={n_regions:2d} c={conc:2d}: {res['throughput_rps']:7.1f} req/s "
                          f"p50 {res['p50_ms']:6.1f} ms p99 {res['p99_ms']:6.1f} ms errors {res['errors']}", flush=True)
            if batching == "mixed":
                for model in (None, "student"):
                    bodies = requests_for(vocab, ["d1"], a.requests, seed=5, model=model)
                    res = drive(server.url, bodies, 8)
                    result.setdefault("teacher_vs_student", {})["student" if model else "teacher"] = res
                    print(f"d1 {model or 'teacher'} c=8: {res['throughput_rps']:.1f} req/s p50 {res['p50_ms']:.1f} "
                          f"ms p99 {res['p99_ms']:.1f} ms", flush=True)
                result["server_rss_mib_after_load"] = server.rss_mib()
                if a.soak_seconds > 0:
                    result["soak"] = soak(server.url, vocab, a.soak_seconds)
                    print(f"soak: {result['soak']}", flush=True)
        finally:
            server.close()
    result["in_process_recommender"] = {str(r): in_process(bundle, vocab, REGIONS[:r], a.requests)
                                        for r in a.regions}
    result["memory_mib"] = memory(bundle)
    cells = {(c["server"], c["regions"], c["concurrency"]): c for c in result["cells"]}
    if ("mixed", 16, 32) in cells and ("switch", 16, 32) in cells:
        result["mixed_over_switch_16_regions_c32"] = (cells[("mixed", 16, 32)]["throughput_rps"] /
                                                      cells[("switch", 16, 32)]["throughput_rps"])
    record(f"serve_load_{a.preset}", result)
    print(table(result))


def table(result: dict) -> str:
    rows = ["| regions | concurrency | mixed req/s | mixed p50 / p99 ms | switch req/s | switch p50 / p99 ms | mixed / switch |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    cells = {(c["server"], c["regions"], c["concurrency"]): c for c in result["cells"]}
    for (server, r, c), m in cells.items():
        if server != "mixed" or ("switch", r, c) not in cells:
            continue
        s = cells[("switch", r, c)]
        rows.append(f"| {r} | {c} | {m['throughput_rps']:.0f} | {m['p50_ms']:.1f} / {m['p99_ms']:.1f} | "
                    f"{s['throughput_rps']:.0f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | "
                    f"{m['throughput_rps'] / s['throughput_rps']:.2f}x |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
