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
from .evaluator import EvalOptions, rank_eval_set, summarize_ranks


def sharded_evaluate(data: PreparedData, ev: EvalSet, scorer, opts: EvalOptions, device) -> dict:
    world, rank = dist_info.world_size(), dist_info.rank()
    idx = np.arange(len(ev.targets))
    mine = idx[rank::world]
    n_batches = int(np.ceil(len(idx[0::world]) / opts.batch_size)) if len(idx) else 0
    shard = EvalSet(ev.seq_index[mine], ev.hist_end[mine], ev.targets[mine], ev.domains[mine])
    ranks = rank_eval_set(data, shard, scorer, opts, device, show_progress=rank == 0)
    done = int(np.ceil(len(mine) / opts.batch_size))
    for _ in range(done, n_batches):  # keep collective forward passes in step across ranks
        scorer(torch.zeros(1, opts.max_len, dtype=torch.long, device=device),
               torch.zeros(1, dtype=torch.long, device=device))
    parts = dist_info.all_gather_tensor(ranks.to(device))
    order = np.concatenate([idx[r::world] for r in range(world)])
    all_ranks = torch.empty(len(idx), dtype=torch.long)
    all_ranks[torch.from_numpy(order)] = torch.cat([p.cpu() for p in parts]).long()
    return summarize_ranks(data, ev, all_ranks, opts.ks)
