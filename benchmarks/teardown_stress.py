"""Multi-process exits on a busy machine: the SIGABRT at teardown, reproduced and gone.

On a busy 2-core machine a clean-clone ``make test`` once failed both 2-process ZeRO-3 runs: rank 1
aborted after its work was done with "terminate called without an active exception" (SIGABRT). The
cause: a process that exits with its Gloo process group alive leaves Gloo's worker threads holding
work objects into interpreter finalization (pytorch/pytorch#190489). Destroying the group is not
enough in crossrec (accelerate's end_training does it; DeepSpeed and accelerate globals still hold the
groups): launched ranks now leave with ``os._exit`` once their command is done (``cli.exit_process``).

Two parts, each beside ``--hogs`` busy-looping processes (the load of a shared CI machine):

1. ``gloo``: the mechanism alone. ``torchrun --nproc_per_node 4`` of a script that all-reduces,
   broadcasts an object and exits, ``--repeats`` times each way: a plain exit with the group alive,
   after ``dist.destroy_process_group()``, and through ``cli.exit_process``.
2. ``zero3``: the real thing. ``accelerate launch --num_processes 2 --use_deepspeed --zero_stage 3``
   of ``crossrec pretrain --preset tiny`` (a few steps on a synthetic log), ``--launches`` times.

Each run is counted as ok / failed, and failed runs that printed "terminate called" are counted apart.
usage: python -m benchmarks.teardown_stress [--repeats 15] [--launches 10] [--hogs 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, record

BIN = Path(sys.executable).parent
WORKER = """
import os, torch, torch.distributed as dist
from crossrec_dist.cli import exit_process
dist.init_process_group("gloo")
t = torch.ones(1000) * dist.get_rank()
for _ in range(20):
    dist.all_reduce(t)
box = [{"x": list(range(100))}] if dist.get_rank() == 0 else [None]
dist.broadcast_object_list(box, src=0)
if os.environ.get("EXIT") == "destroy":
    dist.barrier()
    dist.destroy_process_group()
if os.environ.get("EXIT") == "exit_process":
    exit_process(0)
"""


def hogs(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def outcome(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode == 0:
        return "ok"
    return "terminate" if "terminate called" in text else "failed"


def gloo_part(root: Path, repeats: int, port: int) -> dict:
    script = root / "gloo_exit.py"
    script.write_text(WORKER)
    result = {}
    for k, how in enumerate(("plain", "destroy", "exit_process")):
        counts = {"ok": 0, "terminate": 0, "failed": 0}
        for i in range(repeats):
            proc = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "4", "--master_port",
                                   str(port + i + 50 * k), str(script)], capture_output=True, text=True,
                                  timeout=120, env={**os.environ, "EXIT": how})
            counts[outcome(proc)] += 1
        result[how] = counts
        print(f"gloo, {how} exit: {counts}", flush=True)
    return result


def zero3_part(root: Path, launches: int, port: int) -> dict:
    py = [sys.executable, "-m", "crossrec_dist"]
    data = root / "data"
    if not (data / "meta.json").is_file():
        subprocess.run([*py, "data", "synth", "--out", root / "raw", "--users", "300", "--items", "200",
                        "--domains", "2", "--seed", "0"], check=True, capture_output=True)
        subprocess.run([*py, "prepare", "--input", root / "raw" / "interactions.parquet", "--format", "parquet",
                        "--domain-col", "domain", "--out", data], check=True, capture_output=True)
    counts, seconds = {"ok": 0, "terminate": 0, "failed": 0}, []
    for i in range(launches):
        out = root / f"zero3_{i}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.run([str(BIN / "accelerate"), "launch", "--num_processes", "2", "--use_deepspeed",
                               "--zero_stage", "3", "--main_process_port", str(port + i), "-m", "crossrec_dist",
                               "pretrain", "--preset", "tiny", "--data", str(data), "--out", str(out),
                               "--set", "train.max_steps=4", "--set", "train.eval_every=2",
                               "--set", "train.tensorboard=false"],
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DS_ACCELERATOR": "cpu"})
        seconds.append(round(time.perf_counter() - t0, 1))
        counts[outcome(proc)] += 1
        (root / f"zero3_{i}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            print((proc.stdout + proc.stderr)[-2000:], flush=True)
        print(f"zero3 launch {i + 1}/{launches}: {outcome(proc)} in {seconds[-1]} s", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return {"counts": counts, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="gloo exits per variant")
    ap.add_argument("--launches", type=int, default=10, help="ZeRO-3 launches (0 = skip)")
    ap.add_argument("--hogs", type=int, default=3, help="busy-looping processes beside the runs")
    ap.add_argument("--port", type=int, default=29700)
    a = ap.parse_args()
    root = OUT / "teardown_stress"
    root.mkdir(parents=True, exist_ok=True)
    busy = hogs(a.hogs)
    try:
        result = {"hogs": a.hogs, "cores": os.cpu_count(),
                  "gloo": gloo_part(root, a.repeats, a.port) if a.repeats else None,
                  "zero3": zero3_part(root, a.launches, a.port + 200) if a.launches else None}
    finally:
        for p in busy:
            p.kill()
    record("teardown_stress", result)
    bad = (result["zero3"] or {}).get("counts", {}).get("ok", 0) != a.launches if a.launches else False
    bad |= bool(result["gloo"]) and result["gloo"]["exit_process"]["ok"] != a.repeats
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
