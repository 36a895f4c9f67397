"""Memory of streaming a big Parquet log: the reader ``crossrec prepare`` uses (``pre_buffer=False``)
against pyarrow's default (``pre_buffer=True``), which keeps every row group it has read until the file
is closed (apache/arrow#39808) -- what took a 1e9-row prepare to 10.4 GiB.

Writes ``crossrec data synth --users N --items 1000000 --mean-length 100`` (1e8 rows by default), then
reads it once per reader, each in its own process, sampling the process's RssAnon after every batch:
seconds, RssAnon at the end and at its peak, and Arrow's allocated bytes at the end. The log is
deleted afterwards.

usage: python -m benchmarks.parquet_read_memory [--users 1000000] [--keep-log]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import OUT, record


def rss_anon_mib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("RssAnon"))


def read_once(path: Path, reader: str) -> dict:
    """One pass over ``path`` (run in a fresh process, so the two readers do not share an allocator)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from crossrec_dist.data.readers import _stream_parquet
    t0, rows, peak, start = time.perf_counter(), 0, 0, rss_anon_mib()
    if reader == "crossrec":
        batches = (t.table for t in _stream_parquet(path, 64 << 20))
    else:       # pyarrow's defaults, the batch size crossrec's reader picks for 64 MiB pieces
        f = pq.ParquetFile(path)
        batches = f.iter_batches(batch_size=2_000_000)
    for batch in batches:
        rows += batch.num_rows
        del batch
        peak = max(peak, rss_anon_mib())
    return {"reader": reader, "rows": rows, "seconds": round(time.perf_counter() - t0, 1),
            "rss_anon_start_mib": start, "rss_anon_peak_mib": peak, "rss_anon_end_mib": rss_anon_mib(),
            "arrow_allocated_end_mib": pa.total_allocated_bytes() >> 20}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=1_000_000, help="x ~100 interactions each")
    ap.add_argument("--root", default=str(OUT / "parquet_read_memory"))
    ap.add_argument("--keep-log", action="store_true")
    ap.add_argument("--read-once", nargs=2, metavar=("PATH", "READER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.read_once:
        print(json.dumps(read_once(Path(a.read_once[0]), a.read_once[1])))
        return
    root = Path(a.root)
    log = root / "raw" / "interactions.parquet"
    if not log.is_file():
        subprocess.run([sys.executable, "-m", "crossrec_dist", "data", "synth", "--out", str(root / "raw"),
                        "--users", str(a.users), "--items", "1000000", "--domains", "4", "--mean-length", "100",
                        "--seed", "0"], check=True)
    runs = []
    for reader in ("crossrec", "pyarrow-default"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.parquet_read_memory", "--read-once", str(log),
                              reader], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    size = log.stat().st_size
    if not a.keep_log:
        shutil.rmtree(root, ignore_errors=True)
    record("parquet_read_memory", {"users": a.users, "parquet_gib": round(size / 2**30, 2), "runs": runs})


if __name__ == "__main__":
    main()
