"""Shared set-up for benchmarks: the prepared MovieLens-100K they all use, result recording, and the
machine description every dated result carries (benchmarks/README.md).

Every script's raw output goes under ``OUT`` (benchmarks/out/, not committed; ``CROSSREC_BENCH_OUT``
moves it: the quick tier uses benchmarks/out/quick/ so that its small artefacts are never reused by a
full-size run). ``record`` writes ``OUT/<name>.json`` and, when ``CROSSREC_BENCH_RECORDS`` names a file
(``benchmarks.run_all`` sets it), appends the record there too, so the runner can file it as
``benchmarks/results/<name>/<date>-<tier>.json``.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = Path(os.environ["CROSSREC_BENCH_OUT"]).resolve() if os.environ.get("CROSSREC_BENCH_OUT") else BENCH / "out"
RESULTS = BENCH / "results"


def crossrec(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "crossrec_dist", *map(str, args)], check=True)


def crossrec_logged(args: list, log: Path, threads: int) -> None:
    """``crossrec ARGS`` with its output in ``log`` and ``threads`` OpenMP threads (runs side by side)."""
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "crossrec_dist", *map(str, args)], check=True, stdout=f,
                       stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def ml100k(domain_rule: str | None = "user.zip_code:prefix1") -> Path:
    raw, prep = OUT / "ml100k_raw", OUT / ("ml100k_regions" if domain_rule else "ml100k")
    if not (raw / "fetch.json").is_file():
        crossrec("data", "fetch", "movielens-100k", "--out", raw)
    if not (prep / "stats.json").is_file():
        crossrec("prepare", "--input", raw, "--format", "auto", "--out", prep,
                 *(["--domain-from", domain_rule] if domain_rule else []))
    return prep


def machine() -> str:
    import torch
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The CPU features that change what a CPU benchmark measures (bf16, AMX, AVX-512)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))


def machine_info() -> dict:
    """What a dated result needs to be compared with another: CPU, cores, memory, GPU, library versions,
    the load when it started (a shared machine times its neighbours too), the code's commit."""
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    mem = None
    try:
        kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                  if ln.startswith("MemTotal:"))
        mem = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    commit = dirty = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH.parent, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=BENCH.parent,
                                    capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": mem, "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        **{pkg: version(pkg) for pkg in ("deepspeed", "accelerate", "transformers", "peft", "datasets")},
        "git_commit": commit, "git_dirty": dirty,
    }


def record(name: str, result: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), **result}
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    collect = os.environ.get("CROSSREC_BENCH_RECORDS")
    if collect:   # benchmarks.run_all files every record of a script run as one dated result
        with open(collect, "a") as f:
            f.write(json.dumps(result) + "\n")
    return path


class RankMemory:
    """Peak memory of the training ranks of a running ``accelerate launch ... -m crossrec_dist``,
    sampled from /proc in a thread: per rank VmHWM (peak RSS), RssAnon (its own memory) and RssFile
    (mapped file pages, shared with the other ranks through the page cache), MiB. The ranks are the
    python processes running crossrec_dist that are not the accelerate launcher."""

    FIELDS = ("VmHWM", "RssAnon", "RssFile")

    def __init__(self, interval: float = 0.2):
        import threading
        self.interval, self.peaks = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @staticmethod
    def rank_pids() -> list[int]:
        pids = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"crossrec_dist" in cmd and len(cmd) > 1 and b"accelerate" not in cmd[1]:
                pids.append(int(pid))
        return pids

    def _run(self):
        import re
        while not self._stop.is_set():
            for pid in self.rank_pids():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                peak = self.peaks.setdefault(pid, dict.fromkeys(self.FIELDS, 0.0))
                for k in self.FIELDS:
                    m = re.search(rf"{k}:\s+(\d+)", status)
                    if m:
                        peak[k] = max(peak[k], int(m.group(1)) / 1024)
            time.sleep(self.interval)

    def ranks(self) -> list[dict]:
        """The two largest processes' peaks (the ranks; a forked helper is smaller), largest first."""
        ranks = sorted(self.peaks.values(), key=lambda p: -p["VmHWM"])[:2]
        return [{k: round(v, 1) for k, v in r.items()} for r in ranks]

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every rank, never to the launcher (torchrun's agent has no USR1 handler
        and would die of it, taking the ranks with it)."""
        for pid in self.rank_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
