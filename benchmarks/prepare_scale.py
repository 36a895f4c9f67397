"""``crossrec prepare`` at 1e7 .. 2.5e8 interactions: the in-memory path against the out-of-core one.

For each size: ``crossrec data synth --users N/100 --items 1000000 --mean-length 100`` (the issue's
250M log at 2.5e8), then ``crossrec prepare --engine duckdb`` and, where it fits in this machine's
memory (~120 B per interaction at its peak), ``--engine memory``, each under ``/usr/bin/time -v``:
wall time, rows/s, peak RSS (prepare is one process: DuckDB runs in it as threads, so its peak RSS
is the whole process tree's) and the peak disk in use above the start (sampled every 2 s). Where both ran, their outputs are compared array by array, plus
stats.json and the vocabulary hash. Every folder is deleted after its size is measured.

usage: python -m benchmarks.prepare_scale [--sizes 1e7 1e8 2.5e8] [--memory-up-to 1e8] [--memory-limit 3GB] [--parts N]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import OUT, record

REPO = Path(__file__).resolve().parent.parent
ROOT = OUT / "prepare_scale"


class DiskPeak:
    """Peak bytes in use on ``root``'s filesystem above what was in use at the start, sampled every
    ``interval`` s in a thread (the work folder's database, parts and DuckDB spill are what fill a disk:
    at 1e9 interactions they did)."""

    def __init__(self, root: Path, interval: float = 2.0):
        import threading
        self.root, self.interval = root, interval
        self.start = shutil.disk_usage(root).used
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, shutil.disk_usage(self.root).used)

    def __enter__(self) -> "DiskPeak":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, shutil.disk_usage(self.root).used)

    @property
    def gib(self) -> float:
        return round((self.peak - self.start) / 2**30, 2)


def timed(cmd: list[str], disk_root: Path) -> dict:
    t0 = time.perf_counter()
    with DiskPeak(disk_root) as disk:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - t0
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    out = {"command": " ".join(cmd), "seconds": round(seconds, 1), "returncode": proc.returncode,
           "peak_rss_gib": round(int(peak.group(1)) / 2**20, 2) if peak else None,
           "peak_disk_gib_above_start": disk.gib,
           "log": [ln for ln in proc.stdout.strip().splitlines() if "rows/s" in ln or "prepared" in ln][-3:]}
    if proc.returncode != 0:
        out["error"] = (proc.stdout[-1500:] + proc.stderr[-1500:]).strip()
    return out


def size_gib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30, 2)


def same_output(a: Path, b: Path) -> dict:
    """Arrays (every interaction, in order), stats.json and the vocabulary hash of two prepared folders."""
    arrays = {}
    for f in sorted((a / "arrays").iterdir()):
        x, y = np.load(f, mmap_mode="r"), np.load(b / "arrays" / f.name, mmap_mode="r")
        arrays[f.name] = bool(x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y))
    meta = [json.loads((p / "meta.json").read_text()) for p in (a, b)]
    stats = [json.loads((p / "stats.json").read_text()) for p in (a, b)]
    return {"arrays": arrays, "stats_json": stats[0] == stats[1],
            "vocab_hash": meta[0]["vocab_hash"] == meta[1]["vocab_hash"],
            "all_equal": all(arrays.values()) and stats[0] == stats[1] and meta[0]["vocab_hash"] == meta[1]["vocab_hash"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e7, 1e8, 2.5e8])
    ap.add_argument("--mean-length", type=float, default=100)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--memory-up-to", type=float, default=1e8,
                    help="run the in-memory path up to this many interactions (~120 B each at its peak)")
    ap.add_argument("--memory-limit", default="3GB", help="--memory-limit of the duckdb engine")
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--keep-last", action="store_true",
                    help="keep the largest size's out-of-core output (ROOT/duckdb) for training runs on it")
    ap.add_argument("--parts", type=int, default=1,
                    help="--parts of the duckdb engine (one process: each part sorts only its users' rows)")
    a = ap.parse_args()
    parts = ["--parts", str(a.parts)] if a.parts > 1 else []
    root = Path(a.root)
    py = [sys.executable, "-m", "crossrec_dist"]
    results = []
    for n in a.sizes:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        users = int(n / a.mean_length)
        raw = root / "raw"
        entry: dict = {"target_interactions": int(n), "users": users, "items": a.items}
        entry["synth"] = timed([*py, "data", "synth", "--out", str(raw), "--users", str(users), "--items",
                                str(a.items), "--domains", "4", "--mean-length", str(a.mean_length), "--seed", "0"],
                               root)
        entry["raw_parquet_gib"] = size_gib(raw)
        common = ["prepare", "--input", str(raw / "interactions.parquet"), "--format", "parquet", "--domain-col",
                  "domain"]
        entry["duckdb"] = timed([*py, *common, "--out", str(root / "duckdb"), "--engine", "duckdb",
                                 "--memory-limit", a.memory_limit, "--work-dir", str(root / "work"), *parts],
                                root)
        if entry["duckdb"]["returncode"] == 0:
            stats = json.loads((root / "duckdb" / "stats.json").read_text())
            meta = json.loads((root / "duckdb" / "meta.json").read_text())
            entry["interactions"] = stats["interactions"]
            entry["duckdb"]["rows_per_second"] = meta["rows_per_second"]
            entry["prepared_gib"] = size_gib(root / "duckdb")
        if n <= a.memory_up_to:
            entry["memory"] = timed([*py, *common, "--out", str(root / "memory"), "--engine", "memory"], root)
            if entry["memory"]["returncode"] == 0:
                entry["memory"]["rows_per_second"] = json.loads((root / "memory" / "meta.json").read_text())[
                    "rows_per_second"]
                if entry["duckdb"]["returncode"] == 0:
                    entry["equal"] = same_output(root / "memory", root / "duckdb")
        else:
            entry["memory"] = {"skipped": f"~120 B per interaction at its peak: ~{n * 120 / 2**30:.0f} GiB, "
                                          "more than this 24 GiB machine"}
        print(json.dumps(entry, indent=1), flush=True)
        results.append(entry)
        if a.keep_last and n == a.sizes[-1]:
            shutil.rmtree(root / "memory", ignore_errors=True)
            shutil.rmtree(raw, ignore_errors=True)
        else:
            shutil.rmtree(root, ignore_errors=True)
    record("prepare_scale", {"sizes": results, "memory_limit": a.memory_limit, "parts": a.parts})


if __name__ == "__main__":
    main()
