"""Recall@10 and latency of the FAISS item index (``crossrec serve --index faiss``) against exact top-k,
at a million items.

The index (``crossrec_dist/serving/ann.py``) is IVF-Flat over ``[W | b]`` -- the item table with each
item's offset as one more column -- searched with ``[h, 1]``, so its inner products are the model's
scores. Exact top-k is the engine's default: ``h @ W.T + b`` and ``torch.topk`` over every item.

Tables (``--items`` x ``--dim``, float32; 1,000,000 x 256 is the ``medium`` body's width):

- ``clustered``: items around 2,000 centres (what trained item tables look like: genres, co-purchase
  groups), offsets = log popularity of a Zipf law (what ``item_bias`` learns), queries near a centre.
- ``isotropic``: Gaussian items and queries, Gaussian offsets: no structure for the cells to follow,
  the hard case for IVF.
- ``--model DIR``: a crossrec model folder's real item table and offsets, queries = its final hidden
  states for random histories (e.g. ``benchmarks.large_catalogue``'s 5M-item base).

Per table: build time, index bytes, then for each ``nprobe``: recall@10 (the share of the exact top 10
found, histories' items excluded as the server does) and latency per batch of 1 and of 32 queries
(median of ``--repeats``), beside the exact matmul + top-k's.

    DS_ACCELERATOR=cpu python -m benchmarks.ann_recall                 # ~6 min on 2 cores
    DS_ACCELERATOR=cpu python -m benchmarks.ann_recall --items 20000 --queries 200   # quick
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from benchmarks.common import machine_info, record
from crossrec_dist.serving.ann import AnnConfig, ItemIndex, recall_at_k


def clustered(n: int, dim: int, queries: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    centres = rng.normal(size=(2000, dim)).astype(np.float32)
    table = np.empty((n + 1, dim), dtype=np.float32)
    for start in range(0, n + 1, 200_000):                       # in slices: ~0.2 GB at a time
        stop = min(n + 1, start + 200_000)
        table[start:stop] = centres[rng.integers(0, len(centres), stop - start)] + \
            0.5 * rng.normal(size=(stop - start, dim)).astype(np.float32)
    table /= np.sqrt(dim)
    ranks = rng.permutation(n + 1) + 1
    bias = (-1.1 * np.log(ranks)).astype(np.float32)             # log of a Zipf popularity
    bias -= bias.mean()
    hidden = (centres[rng.integers(0, len(centres), queries)] +
              0.7 * rng.normal(size=(queries, dim)).astype(np.float32)) / np.sqrt(dim) * 4
    return table, bias, hidden.astype(np.float32)


def isotropic(n: int, dim: int, queries: int, rng):
    table = np.empty((n + 1, dim), dtype=np.float32)
    for start in range(0, n + 1, 200_000):
        stop = min(n + 1, start + 200_000)
        table[start:stop] = rng.normal(size=(stop - start, dim)).astype(np.float32) / np.sqrt(dim)
    return table, rng.normal(size=n + 1).astype(np.float32), rng.normal(size=(queries, dim)).astype(np.float32)


def from_model(folder: str, queries: int, rng):
    from crossrec_dist.models.loading import load_base_model
    model = load_base_model(folder).eval()
    n = model.config.num_items
    ids = torch.from_numpy(rng.integers(1, n + 1, size=(queries, model.config.max_len)))
    ids[:, :model.config.max_len // 2] = 0
    with torch.inference_mode():
        hidden = torch.cat([model.encode(ids[i:i + 64])[:, -1] for i in range(0, queries, 64)])
        bias = model.output_bias()
        return (model.item_weight().float().numpy(), None if bias is None else bias.float().numpy(),
                hidden.float().numpy())


def exact_top(table_t: torch.Tensor, bias_t, hidden: np.ndarray, k: int, exclude) -> np.ndarray:
    with torch.inference_mode():
        scores = torch.from_numpy(hidden) @ table_t.t()
        if bias_t is not None:
            scores += bias_t
        scores[:, 0] = -torch.inf
        for row, seen in enumerate(exclude):
            scores[row, seen] = -torch.inf
        return torch.topk(scores, k, dim=1).indices.numpy()


def timed(fn, repeats: int) -> float:
    fn()                                                         # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run_table(name: str, table, bias, hidden, args) -> dict:
    n = len(table) - 1
    rng = np.random.default_rng(1)
    exclude = [sorted(rng.choice(np.arange(1, n + 1), size=int(rng.integers(10, 51)), replace=False).tolist())
               for _ in range(len(hidden))]
    table_t = torch.from_numpy(table)
    bias_t = None if bias is None else torch.from_numpy(bias)
    truth = np.concatenate([exact_top(table_t, bias_t, hidden[i:i + 64], 10, exclude[i:i + 64])
                            for i in range(0, len(hidden), 64)])
    out = {"items": n, "dim": table.shape[1], "queries": len(hidden),
           "exact_ms": {"batch1": timed(lambda: exact_top(table_t, bias_t, hidden[:1], 10, exclude[:1]), args.repeats),
                        "batch32": timed(lambda: exact_top(table_t, bias_t, hidden[:32], 10, exclude[:32]),
                                         args.repeats)}}
    start = time.perf_counter()
    index = ItemIndex(table, bias, AnnConfig(exact_below=0, nlist=args.nlist, nprobe=args.nprobe[0]))
    out["build_s"] = round(time.perf_counter() - start, 1)
    out["index"] = index.kind
    # vectors (H + 2 float32 columns: the offset and the equal-norm one), an 8-byte id per list entry and
    # 8 bytes of direct map per item (to rescore hits)
    out["index_bytes"] = int(index.index.ntotal * (index.index.d * 4 + 16))
    out["nprobe"] = {}
    for nprobe in args.nprobe:
        index.index.nprobe = nprobe
        found = np.concatenate([index.search(hidden[i:i + 64], 10, exclude[i:i + 64])[1]
                                for i in range(0, len(hidden), 64)])
        out["nprobe"][str(nprobe)] = {
            "recall_at_10": round(recall_at_k(found, truth), 4),
            "ms_batch1": timed(lambda: index.search(hidden[:1], 10, exclude[:1]), args.repeats),
            "ms_batch32": timed(lambda: index.search(hidden[:32], 10, exclude[:32]), args.repeats)}
        print(name, nprobe, out["nprobe"][str(nprobe)], "exact", out["exact_ms"], flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default: the server's, sqrt(items))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--tables", nargs="+", default=["clustered", "isotropic"], choices=["clustered", "isotropic"])
    p.add_argument("--model", default=None, help="also a crossrec model folder's own item table")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    results = {}
    for name in args.tables:
        table, bias, hidden = (clustered if name == "clustered" else isotropic)(args.items, args.dim, args.queries, rng)
        results[name] = run_table(name, table, bias, hidden, args)
        del table, bias, hidden
    if args.model:
        results["model"] = {"folder": args.model, **run_table("model", *from_model(args.model, args.queries, rng), args)}
    record("ann_recall", {"machine_info": machine_info(), "args": vars(args), "tables": results})


if __name__ == "__main__":
    main()
