"""The losses and gradient norms of the updates since the last log line, kept on the device.

The training loop never waits for the device to hand a number to the host on a normal update; this
window is read (one all-reduce, one copy) at the logging interval and before anything is validated,
saved or checkpointed, which is also where a non-finite loss is caught.
"""
from __future__ import annotations

import time

import torch


class LossWindow:
    """Per-update losses and grad norms since the last log, kept on the device until needed."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.steps: list[int] = []
        self._losses: list[torch.Tensor] = []
        self._norms: list = []
        self._synced = None
        self.samples, self.t0 = 0, time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, norm, samples: int) -> None:
        self.steps.append(step)
        self._losses.append(loss)
        self._norms.append(norm)
        self.samples += samples
        self._synced = None

    def values(self, world: int) -> tuple[list[float], list[float]]:
        if self._synced is None:
            losses = torch.stack(self._losses) if self._losses else torch.zeros(0, device=self.device)
            if world > 1:
                torch.distributed.all_reduce(losses)
                losses = losses / world
            norms = [float(n) for n in self._norms if n is not None]
            self._synced = (losses.cpu().tolist(), norms)
        return self._synced
