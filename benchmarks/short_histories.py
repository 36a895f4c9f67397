"""New users: from how many known events does the model beat the region's popularity list?

``Recommender`` ranks a user with at least ``min_known`` known events by the model and a user with fewer
by the region's popularity list (``popularity.json``). This measures where that threshold belongs. Each
test user's history is cut to its last n events (n = 0, 1, 2, 3, 5, 10, and all), as a new user's would
be, and their test item is ranked -- over every item, the history's items excluded, as served -- by each
model given (the base as it is, a region's adapter) and by the popularity list of the region's training
data. NDCG@10 per user, paired differences model - popularity (95% bootstrap over users).

    python -m benchmarks.short_histories --base runs/ml_cross_platform/pretrain \\
        --adapter runs/readapt/fresh.seed0 --data runs/readapt/p2 --domain ml100k
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import record
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.evaluation.bootstrap import bootstrap_mean, ndcg_at, paired_difference
from crossrec_dist.evaluation.evaluator import history_mask_index
from crossrec_dist.evaluation.metrics import target_ranks
from crossrec_dist.export.loading import load_model


@torch.no_grad()
def ranks(score_fn, data: PreparedData, ev, n: int | None, max_len: int, batch: int = 256) -> np.ndarray:
    """0-based rank of each test target among all items (ties counted against it, as every evaluation
    here does), after the last ``n`` events (None: all); the items given are not ranked."""
    out = []
    for lo in range(0, len(ev.targets), batch):
        seq, end, tgt = ev.seq_index[lo:lo + batch], ev.hist_end[lo:lo + batch], ev.targets[lo:lo + batch]
        x = torch.from_numpy(data.left_padded(seq, end, max_len))
        if n is not None:
            x[:, :max_len - n] = 0
        s = score_fn(x).float()
        if n is None:                          # the whole history, not only the model's last max_len
            r, c = history_mask_index(data, seq, end)
            s[torch.from_numpy(r), torch.from_numpy(c)] = -torch.inf
        else:
            s.scatter_(1, x, -torch.inf)       # the history's items are not recommended back
        s[:, 0] = -torch.inf
        out.append(target_ranks(s, torch.from_numpy(tgt)).numpy())
    return np.concatenate(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--adapter", type=Path, action="append", default=[], help="a region's adapter (repeatable)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--domain", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[0, 1, 2, 3, 5, 10])
    a = ap.parse_args(argv)
    data = PreparedData(a.data)
    ev = data.eval_set("test", [a.domain])
    counts = torch.from_numpy(data.item_counts([a.domain])).float()
    models = {"zero-shot": load_model(a.base), **{f"adapter {p.name}": load_model(a.base, p) for p in a.adapter}}
    max_len = next(iter(models.values())).config.max_len
    scorers = {"popularity": lambda x: counts.expand(len(x), -1).clone()}
    for name, model in models.items():
        code = model.config.domain_names.index(a.domain) if a.domain in model.config.domain_names else 0
        scorers[name] = (lambda m, c: lambda x: m(input_ids=x, domain_ids=torch.full((len(x),), c),
                                                  return_scores=True))(model, code)
    rows = {}
    for n in [*a.lengths, None]:
        ndcg = {name: ndcg_at(ranks(fn, data, ev, n, max_len)) for name, fn in scorers.items()}
        row = {name: bootstrap_mean(v).text() for name, v in ndcg.items()}
        for name in models:
            row[f"{name} - popularity"] = paired_difference(ndcg[name], ndcg["popularity"]).diff_text()
        rows["all" if n is None else str(n)] = row
        print(("all" if n is None else n), row, flush=True)
    record("short_histories", {"command": "python -m benchmarks.short_histories " + " ".join(argv or sys.argv[1:]),
                               "domain": a.domain, "test_users": int(len(ev.targets)), "rows": rows})


if __name__ == "__main__":
    main()
