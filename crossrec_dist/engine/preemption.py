"""Stopping cleanly when the cluster asks: SIGUSR1/SIGTERM (Slurm's --signal, scancel, preemption)."""
from __future__ import annotations

import signal
import threading

from ..errors import RunStopped
from . import distributed as dist_info


class Preempted(RunStopped):
    """Training stopped on SIGUSR1/SIGTERM after writing a resumable checkpoint."""


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's --signal, scancel, a dying node's agent). Ranks agree once per
    update, in one all-reduce, on whether any got the signal and whether the time budget is spent,
    so they checkpoint or stop at the same step."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self):
        self.flag, self._old = False, {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._set)

    def _set(self, *_):
        self.flag = True

    def agree(self, over_budget: bool) -> tuple[bool, bool]:
        if dist_info.world_size() == 1:
            return self.flag, over_budget
        flags = dist_info.all_reduce_max([float(self.flag), float(over_budget)])
        return flags[0] > 0, flags[1] > 0

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
