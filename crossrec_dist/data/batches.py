"""Training batches of next-item windows, sharded by the real rank, resumable by position.

Each sequence's training part is cut into windows of ``max_len + 1`` items, newest first, so every
interaction is a label exactly once per epoch (loss at every position, not one sample per prefix).
Batch order depends only on (seed, epoch): a resumed run skips the batches it already did, and
every rank takes its own slice of each global batch, so 1 and N processes see the same global batches.
A folder prepared with ``--shards`` is the exception (on purpose): there each rank draws only windows of
its own shards, which keeps its reads to its shards' rows, and the global batches depend on the world size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..engine.task import MicroBatch
from ..errors import InputError
from .prepared import PreparedData


@dataclass
class Windows:
    seq: np.ndarray     # sequence index
    end: np.ndarray     # window covers items[end - max_len - 1 : end] of that sequence


def make_windows(seq_idx: np.ndarray, usable_len: np.ndarray, max_len: int, stride: int = 0) -> Windows:
    """Windows ending at n, n - stride, n - 2*stride, ... (stride defaults to max_len) while >= 2 items."""
    stride = stride or max_len
    n_win = np.maximum(1, 1 + (usable_len - 2) // stride)
    seq = np.repeat(seq_idx, n_win)
    k = np.arange(n_win.sum()) - np.repeat(np.r_[0, np.cumsum(n_win)[:-1]], n_win)
    end = np.repeat(usable_len, n_win) - k * stride
    keep = end >= 2
    return Windows(seq[keep], end[keep])


def window_tensors(data: PreparedData, seq: np.ndarray, end: np.ndarray, max_len: int,
                   domain_of_seq: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Left-padded inputs/labels for windows; label 0 = no loss."""
    items = data.left_padded(seq, end, max_len + 1)
    doms = (domain_of_seq if domain_of_seq is not None else data.seq_domain)[seq]
    return {"input_ids": torch.from_numpy(items[:, :-1].copy()),
            "labels": torch.from_numpy(items[:, 1:].copy()),
            "domain_ids": torch.from_numpy(doms.astype(np.int64))}


class SequenceBatches:
    """Per-rank micro-batches of one epoch: global batch = micro_batch * world, same count on all ranks.
    Each micro-batch's weight is its number of next-item targets (labels > 0), so the engine can
    average the loss over every target of an optimizer update exactly."""

    def __init__(self, data: PreparedData, windows: Windows, max_len: int, micro_batch: int, seed: int,
                 domain_of_seq: np.ndarray | None = None):
        self.data, self.windows, self.max_len = data, windows, max_len
        self.micro_batch, self.seed, self.domain_of_seq = micro_batch, seed, domain_of_seq

    def _owner(self, world: int) -> np.ndarray | None:
        """With a sharded folder (``prepare --shards N``) and several ranks: the rank that draws each
        window, the owner of its sequence's shard (shard % world), so a rank reads only its shards' rows.
        None: windows are dealt from one global permutation (every rank reads anywhere)."""
        shard = getattr(self.data, "seq_shard", None)
        if shard is None or world == 1:
            return None
        owner = (shard[self.windows.seq] % world).astype(np.int64)
        counts = np.bincount(owner, minlength=world)
        if counts.min() < self.micro_batch:
            raise InputError(f"rank {int(counts.argmin())} of {world} owns {int(counts.min())} training window(s) of "
                             f"this {self.data.shards}-shard dataset, fewer than a micro-batch of {self.micro_batch}: "
                             "prepare it with fewer --shards (or none) for this run", path=str(self.data.path))
        return owner

    def num_batches(self, world: int) -> int:
        owner = self._owner(world)
        if owner is not None:      # every rank the same count: the smallest share decides
            return max(1, int(np.bincount(owner, minlength=world).min()) // self.micro_batch)
        return max(1, len(self.windows.seq) // (self.micro_batch * world))

    def epoch(self, epoch: int, rank: int, world: int, skip: int = 0):
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.windows.seq))
        owner = self._owner(world)
        if owner is not None:
            order = order[owner[order] == rank]       # this rank's windows, in the epoch's order
        g = self.micro_batch * (world if owner is None else 1)
        for b in range(skip, self.num_batches(world)):
            chunk = order[b * g:(b + 1) * g]
            mine = chunk[rank::world] if owner is None else chunk
            inputs = window_tensors(self.data, self.windows.seq[mine], self.windows.end[mine], self.max_len,
                                    self.domain_of_seq)
            yield MicroBatch(inputs=inputs, weight=int((inputs["labels"] > 0).sum()), samples=len(mine),
                             sample_ids=torch.from_numpy(mine.astype(np.int64)))
