"""Is a change in a base model's quality more than run-to-run noise? Test NDCG@10 of several bases
on the same users, each with a 95% bootstrap interval over users, and paired differences.

Used to check that an engine change which alters the random streams (weight init, accumulation
arithmetic) moves results no more than a change of seed does.
usage: python -m benchmarks.base_seed_noise --data DIR --domains 0 3 8 --bases NAME=DIR [NAME=DIR ...]
       [--reference NAME] [--resamples 2000]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from benchmarks.common import record
from crossrec_dist.data.prepared import PreparedData
from crossrec_dist.evaluation.evaluator import EvalOptions, model_scorer, rank_eval_set
from crossrec_dist.models.loading import load_base_model


def per_user_ndcg10(model, data: PreparedData, domains: list[str] | None) -> np.ndarray:
    ev = data.eval_set("test", domains)
    ranks = rank_eval_set(data, ev, model_scorer(model), EvalOptions(split="test", domains=domains,
                                                                   max_len=model.config.max_len), show_progress=False)
    r = ranks.numpy()
    return np.where(r < 10, 1.0 / np.log2(r + 2.0), 0.0)


def interval(values: np.ndarray, rng: np.random.Generator, resamples: int) -> tuple[float, float]:
    idx = rng.integers(0, len(values), (resamples, len(values)))
    means = values[idx].mean(1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--domains", nargs="*", default=None, help="one group of users per name; 'all' = every user")
    ap.add_argument("--bases", nargs="+", required=True, help="NAME=MODEL_DIR")
    ap.add_argument("--reference", default=None, help="NAME the paired differences are taken against")
    ap.add_argument("--resamples", type=int, default=2000)
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    data = PreparedData(a.data)
    bases = dict(b.split("=", 1) for b in a.bases)
    ref = a.reference or next(iter(bases))
    groups = {d: (None if d == "all" else [d]) for d in (a.domains or ["all"])}
    rng = np.random.default_rng(0)
    scores = {name: {g: per_user_ndcg10(load_base_model(path), data, doms) for g, doms in groups.items()}
              for name, path in bases.items()}
    rows = []
    for g in groups:
        for name in bases:
            v = scores[name][g]
            lo, hi = interval(v, rng, a.resamples)
            d = v - scores[ref][g]
            dlo, dhi = interval(d, rng, a.resamples)
            rows.append({"users": g, "n": int(len(v)), "base": name, "ndcg@10": float(v.mean()), "ci95": [lo, hi],
                         f"minus_{ref}": float(d.mean()), "diff_ci95": [dlo, dhi]})
            print(f"{g:>6} n={len(v):4d} {name:>10}: {v.mean():.4f} [{lo:.4f}, {hi:.4f}]  "
                  f"- {ref}: {d.mean():+.4f} [{dlo:+.4f}, {dhi:+.4f}]")
    record("base_seed_noise", {"command": "python -m benchmarks.base_seed_noise " + " ".join(
        [f"--data {a.data}", "--domains " + " ".join(groups), "--bases " + " ".join(a.bases), f"--reference {ref}"]),
        "rows": rows})


if __name__ == "__main__":
    main()
