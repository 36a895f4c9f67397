"""Data that scales: a synthetic log of ~100M interactions, prepared, then trained on by 2 processes.

1. ``crossrec data synth`` (streamed, one row group per 200,000 users) and ``crossrec prepare``, each
   under ``/usr/bin/time -v``: wall time and peak RSS.
2. ``accelerate launch --num_processes 2 ... crossrec pretrain --preset tiny`` on it, stopped by USR1
   after ``--steps`` logged updates (the full validation of millions of users is not the point here),
   while every rank's memory is sampled from /proc every 0.2 s: RssAnon (private memory: what the
   rank's own copies of the data cost) and RssFile (file pages mapped: shared with the other rank
   through the page cache). Three runs:

   * ``mapped``: the prepared folder as ``prepare`` writes it (``arrays/`` memory-mapped, int32 ids);
   * ``arrow``: the same folder without ``arrays/`` (a symlinked copy), read the way every folder
     was read before: every column copied into each rank's memory from Arrow, int64;
   * ``small``: the same command on the log's first row group (~1M interactions, the same ~100k-item
     catalogue, so the same model and the same softmax): what a rank costs without the data. What a
     run costs above it is what its data costs.

usage: python -m benchmarks.data_scale [--users 2000000] [--mean-length 50] [--steps 20] [--skip-build]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, RankMemory, record

REPO = Path(__file__).resolve().parent.parent
ROOT = OUT / "data_scale"


def timed(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mib": round(peak / 1024, 1), "log": proc.stdout.strip().splitlines()[-1:]}


def size_mib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1)


def train(data: Path, out: Path, steps: int, port: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
           "--use_deepspeed", "--zero_stage", "3", "--main_process_port", str(port), "-m", "crossrec_dist", "pretrain",
           "--data", str(data), "--out", str(out), "--preset", "tiny", "--set", "train.micro_batch_size=32",
           "--set", "train.log_every=1", "--set", "train.tensorboard=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    with RankMemory() as sampler, open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        first = sent = None
        while proc.poll() is None:
            time.sleep(0.5)
            text = log.read_text(errors="replace")
            if first is None and re.search(r"^step 1/\d+ ", text, re.M):
                first = time.perf_counter() - t0
            if sent is None and re.search(rf"^step {steps}/\d+ ", text, re.M):
                sampler.signal(signal.SIGUSR1)
                sent = time.perf_counter() - t0
        proc.wait()
    text = log.read_text(errors="replace")
    if not re.search(r"preempted by signal at step \d+", text):
        sys.exit(f"training on {data} did not reach step {steps}:\n{text[-3000:]}")
    return {"command": " ".join(cmd), "ranks": sampler.ranks(), "seconds_to_first_step": round(first, 1),
            "seconds_to_stop": round(sent, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=2_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--mean-length", type=float, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-build", action="store_true", help="reuse the synthesised and prepared folders")
    ap.add_argument("--port", type=int, default=29745)
    ap.add_argument("--root", default=str(ROOT), help="where the raw log, prepared folders and runs go")
    a = ap.parse_args()
    root = Path(a.root)
    py = [sys.executable, "-m", "crossrec_dist"]
    raw, prep, small = root / "raw", root / "prepared", root / "small"
    result: dict = {}
    if not a.skip_build:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        result["synth"] = timed([*py, "data", "synth", "--out", str(raw), "--users", str(a.users), "--items", str(a.items),
                                 "--domains", "4", "--mean-length", str(a.mean_length), "--seed", "0"])
        result["prepare"] = timed([*py, "prepare", "--input", str(raw / "interactions.parquet"), "--format", "parquet",
                                   "--out", str(prep), "--domain-col", "domain"])
        # The baseline: the log's first row group (~1M interactions, ~20k users) with the same catalogue,
        # so the model, its softmax over ~100k items and everything else but the data are the same.
        import pyarrow.parquet as pq
        (root / "raw_small").mkdir()
        pq.write_table(pq.ParquetFile(raw / "interactions.parquet").read_row_group(0),
                       root / "raw_small" / "interactions.parquet")
        subprocess.run([*py, "prepare", "--input", str(root / "raw_small" / "interactions.parquet"), "--format",
                        "parquet", "--out", str(small), "--domain-col", "domain"], check=True)
    stats = json.loads((prep / "stats.json").read_text())
    result["dataset"] = {"interactions": stats["interactions"], "users": stats["users"], "items": stats["items"],
                         "raw_parquet_mib": size_mib(raw), "prepared_mib": size_mib(prep),
                         "sequences_arrow_mib": size_mib(prep / "sequences"), "arrays_mib": size_mib(prep / "arrays")}
    # The same folder without arrays/: read the way every folder was read before them.
    arrow = root / "prepared_arrow_only"
    shutil.rmtree(arrow, ignore_errors=True)
    arrow.mkdir()
    for entry in prep.iterdir():
        if entry.name != "arrays":
            (arrow / entry.name).symlink_to(entry)
    runs = root / "runs"
    runs.mkdir(exist_ok=True)
    result["train"] = {}
    for name, data in (("small", small), ("mapped", prep), ("arrow", arrow)):
        result["train"][name] = train(data, runs / name, a.steps, a.port)
        print(name, json.dumps(result["train"][name]["ranks"]), flush=True)
    base = sum(r["RssAnon"] for r in result["train"]["small"]["ranks"]) / 2     # the two ranks' mean
    disk = result["dataset"]["prepared_mib"]
    for name in ("mapped", "arrow"):
        r = result["train"][name]["ranks"]
        extra = [round(x["RssAnon"] - base, 1) for x in r]
        result["train"][name]["rss_anon_above_small_mib"] = extra
        result["train"][name]["share_of_prepared_on_disk"] = [round(e / disk, 4) for e in extra]
    record("data_scale", result)


if __name__ == "__main__":
    main()
