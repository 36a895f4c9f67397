"""Progress you can watch: a live bar on a terminal, plain periodic lines in logs (CI, Slurm).

Only the main rank shows anything. On a terminal, ``tqdm`` draws steps, ETA and the latest figures,
and log messages go above the bar; elsewhere nothing is drawn and callers print their own periodic
lines (the trainer's ``step N/M ... eta`` lines), so log files stay readable.
"""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

try:
    import resource     # Unix only
except ImportError:
    resource = None


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def interactive(stream=None) -> bool:
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """A bar of ``total`` steps from ``initial`` when ``enabled`` and stdout is a terminal."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", enabled: bool = True):
        self.interactive = enabled and interactive()
        self.bar = None
        if self.interactive:
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, **fields) -> None:
        if self.bar is not None:
            self.bar.set_postfix(fields, refresh=False)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def track(iterable, total: int, desc: str, enabled: bool = True, every_seconds: float = 30.0):
    """``iterable`` with progress: a bar on a terminal; otherwise a line at most every
    ``every_seconds`` (so short loops print nothing and long ones show they are alive)."""
    if enabled and interactive():
        yield from tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)
        return
    t0 = last = time.perf_counter()
    for i, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if enabled and now - last >= every_seconds and i < total:
            rate = i / (now - t0)
            print(f"{desc}: {i}/{total} eta {format_seconds((total - i) / rate)}", flush=True)
            last = now


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far, MiB (None where getrusage is missing)."""
    if resource is None:
        return None
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (2**20 if sys.platform == "darwin" else 1024)      # bytes on macOS, KiB on Linux
    except OSError:
        return None


def _peak_rss() -> str:
    """", peak RSS N MiB" for long jobs' phase lines."""
    peak = peak_rss_mib()
    return "" if peak is None else f", peak RSS {peak:,.0f} MiB"


class Phases:
    """Named phases of one job (e.g. prepare: read, domains, sequences, write): a bar of phases on a
    terminal; elsewhere one line per phase that took ``min_seconds`` or more (small jobs stay quiet)."""

    def __init__(self, names: list[str], desc: str, enabled: bool = True, min_seconds: float = 2.0):
        self.names, self.desc, self.min_seconds = names, desc, min_seconds
        self.progress = Progress(len(names), 0, desc, enabled=enabled)
        self.enabled = enabled
        self.t0 = self.t_phase = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.progress.show(phase=name)
        self.progress.advance()
        if self.enabled and not self.progress.interactive and now - self.t_phase >= self.min_seconds:
            print(f"{self.desc}: {name} done in {now - self.t_phase:.1f}s{_peak_rss()}", flush=True)
        self.t_phase = now

    def close(self) -> None:
        self.progress.close()
