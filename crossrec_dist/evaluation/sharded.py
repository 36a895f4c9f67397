"""Full-ranking validation inside a (possibly sharded) training run.

Every rank ranks its own slice of the users and runs the same number of forward passes (ZeRO-3
gathers parameters inside forward, so a rank that stopped early would hang the others); the ranks
are then gathered and the metrics computed once, identically on every rank.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.prepared import EvalSet, PreparedData
from ..engine import distributed as dist_info
from .evaluator import EvalOptions, eval_batches, rank_eval_set, score_batch_size, summarize_ranks


def sharded_evaluate(data: PreparedData, ev: EvalSet, scorer, opts: EvalOptions, device) -> dict:
    world, rank = dist_info.world_size(), dist_info.rank()
    grouped = getattr(scorer, "last_k", None) is not None
    # Users, not examples, are dealt out (a user's validation targets share one forward pass): the
    # j-th user in order goes to rank j % world.
    users = np.unique(ev.seq_index, return_inverse=True)[1] if len(ev.targets) else np.zeros(0, dtype=np.int64)
    owner = users % world
    if getattr(data, "seq_shard", None) is not None:
        # A sharded folder: a user goes to the rank that owns its shard (as in training), whose
        # histories are then read from that rank's own shard files only.
        owner = data.seq_shard[ev.seq_index] % world
    shards = [np.flatnonzero(owner == r) for r in range(world)]
    per_pass = score_batch_size(opts.batch_size, data.num_items)      # as rank_eval_set batches them
    passes = [len(eval_batches(_subset(ev, s), per_pass, grouped, opts.max_len)) for s in shards]
    mine = shards[rank]
    ranks = rank_eval_set(data, _subset(ev, mine), scorer, opts, device, show_progress=rank == 0)
    for _ in range(passes[rank], max(passes, default=0)):  # keep collective forward passes in step across ranks
        scorer(torch.zeros(1, opts.max_len, dtype=torch.long, device=device),
               torch.zeros(1, dtype=torch.long, device=device))
    parts = dist_info.all_gather_tensor(ranks.to(device))
    order = np.concatenate(shards) if shards else np.zeros(0, dtype=np.int64)
    all_ranks = torch.empty(len(ev.targets), dtype=torch.long)
    all_ranks[torch.from_numpy(order)] = torch.cat([p.cpu() for p in parts]).long()
    return summarize_ranks(data, ev, all_ranks, opts.ks)


def _subset(ev: EvalSet, idx: np.ndarray) -> EvalSet:
    return EvalSet(ev.seq_index[idx], ev.hist_end[idx], ev.targets[idx], ev.domains[idx])
