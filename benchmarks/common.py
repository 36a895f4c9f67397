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
        import os
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
        import os
        for pid in self.rank_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
