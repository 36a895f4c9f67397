"""Stopping cleanly when the cluster or the user asks: SIGUSR1/SIGTERM (Slurm's --signal, scancel,
preemption) and SIGINT (Ctrl-C) all checkpoint at the next update and say how to resume.

Ctrl-C used to end a run at once (KeyboardInterrupt), losing every update since the last periodic
checkpoint, while SIGTERM saved one: the same intent, two outcomes. Now the first Ctrl-C is a
preemption; a second one, for a user who really wants out now, interrupts at once as before."""
from __future__ import annotations

import signal
import threading

from ..errors import RunStopped
from . import distributed as dist_info


class Preempted(RunStopped):
    """Training stopped on SIGUSR1/SIGTERM/SIGINT after writing a resumable checkpoint."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's --signal, scancel, a dying node's agent) or SIGINT (Ctrl-C).
    Ranks agree once per update, in one all-reduce, on whether any got the signal and whether the
    time budget is spent, so they checkpoint or stop at the same step."""

    SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")

    def __init__(self):
        self.flag, self.interrupted, self._old = False, False, {}
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._set)

    def _set(self, signum, frame):
        if signum == signal.SIGINT:
            if self.interrupted:       # the second Ctrl-C: stop now, without a checkpoint
                raise KeyboardInterrupt
            self.interrupted = True
            print("\nCtrl-C: saving a checkpoint at the end of this update (Ctrl-C again to stop at once, "
                  "without one)", flush=True)
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
