"""Shared set-up for benchmarks: the prepared MovieLens-100K they all use, and result recording."""
from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def crossrec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "crossrec_dist", *map(str, args)], check=True)


def ml100k(domain_rule: str | None = "user.zip_code:prefix1") -> Path:
    raw, prep = OUT / "ml100k_raw", OUT / ("ml100k_regions" if domain_rule else "ml100k")
    if not (raw / "fetch.json").is_file():
        crossrec("data", "fetch", "movielens-100k", "--out", raw)
    if not (prep / "stats.json").is_file():
        crossrec("prepare", "--input", raw, "--format", "auto", "--out", prep,
                 *(["--domain-from", domain_rule] if domain_rule else []))
    return prep


def machine() -> str:
    import os
    import torch
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def record(name: str, result: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **result}
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return path
