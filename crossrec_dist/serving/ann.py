"""Approximate top-k over large catalogues: a FAISS index over the item table, offsets folded in.

A region's score for item i after history h is ``h . w_i + b_i`` (the tied item table plus the item's
offset) = ``[h, 1] . [w_i, b_i]``: one inner product. So a FAISS inner-product index over the (N, H+1)
matrix ``[W | b]`` answers a region's top k from its final hidden state, offsets included, without the
(B, N) score matrix -- what costs at a million items (a 256-wide body: 1 GFLOP and 4 MB of scores per
request, exact).

The index is IVF-Flat (``faiss.IndexIVFFlat``): k-means puts the vectors in ``nlist`` cells, a query
scans the ``nprobe`` cells nearest to it, and ``nprobe`` trades recall for time (``benchmarks/ann_recall.py``
measures recall@10 against exact top-k). Catalogues under ``exact_below`` items get ``IndexFlatIP``
instead -- exact, the same answers as the matmul -- so the option is safe to leave on.

Cells are built in L2, after the standard reduction of maximum inner product to nearest neighbour
(Bachrach et al., 2014): each vector gets one more column ``sqrt(M^2 - |x|^2)`` (M: the largest norm), the
query a 0 there, so every indexed vector has norm M and ``|q - x|^2 = |q|^2 + M^2 - 2 q.x`` -- the nearest
is the best-scoring. An inner-product IVF straight on ``[W | b]`` assigns items to the centroid of largest
inner product, which piles them into a few long-norm cells: on 20,000 Gaussian items at ``nprobe=8`` it
found 0.4% of the exact top 10, the L2 reduction 90% (``ann_recall --items 20000``, isotropic). The candidates'
scores are then recomputed from the stored vectors, so a hit's score is the model's, not a distance.

Row 0 (padding) is not indexed; index ids are item indices (1-based). Items the history holds are left out
by asking for more than k and dropping them (a per-query id filter in FAISS would cost a selector
object per row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

from ..errors import InputError


@dataclass
class AnnConfig:
    """How ``crossrec serve --index faiss`` builds an index (one per distinct output side)."""
    nprobe: int = 32              # cells scanned per query
    nlist: int | None = None      # cells; None: sqrt(N) (1,000 at a million: k-means in ~10 s on 2 cores)
    exact_below: int = 100_000    # smaller catalogues: exact IndexFlatIP
    train_points: int = 64        # k-means sample: this many points per cell (FAISS warns under 39)
    seed: int = 0

    def __post_init__(self):
        if self.nprobe < 1:
            raise InputError(f"must be >= 1, got {self.nprobe}", field="--faiss-nprobe")
        if self.nlist is not None and self.nlist < 1:
            raise InputError(f"must be >= 1, got {self.nlist}", field="--faiss-nlist")


class ItemIndex:
    """Top-k items by ``hidden . w_i + b_i`` for a batch of hidden states; see the module docstring."""

    def __init__(self, table: np.ndarray, bias: np.ndarray | None, config: AnnConfig | None = None):
        self.config = config or AnnConfig()
        vectors = _augmented(table, bias)[1:]             # (N, H+1), row 0 (padding) left out
        n, dim = vectors.shape
        self.size = n
        if n < self.config.exact_below:
            self.kind = "exact"
            self.index = faiss.IndexFlatIP(dim)
        else:
            nlist = self.config.nlist or max(1, int(math.sqrt(n)))
            nlist = min(nlist, n)
            self.kind = f"ivf-flat(nlist={nlist}, nprobe={min(self.config.nprobe, nlist)})"
            vectors = _equal_norms(vectors)
            quantizer = faiss.IndexFlatL2(dim + 1)
            self.index = faiss.IndexIVFFlat(quantizer, dim + 1, nlist, faiss.METRIC_L2)
            sample = min(n, nlist * self.config.train_points)
            rng = np.random.default_rng(self.config.seed)
            picked = vectors if sample == n else vectors[np.sort(rng.choice(n, sample, replace=False))]
            self.index.train(picked)
            self.index.nprobe = min(self.config.nprobe, nlist)
            self.index.make_direct_map()                   # reconstruct() of hits, to score them exactly
        self.index.add(vectors)                            # FAISS ids 0..N-1 = item indices 1..N

    def search(self, hidden: np.ndarray, k: int, exclude: list[list[int]] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item indices), each (B, k) best first; a row with fewer than k items left after the
        exclusions is padded with -inf and 0."""
        hidden = np.ascontiguousarray(hidden, dtype=np.float32)
        queries = np.concatenate([hidden, np.ones((len(hidden), 1), dtype=np.float32)], axis=1)
        exclude = exclude or [[] for _ in range(len(hidden))]
        fetch = min(self.size, k + max((len(set(e)) for e in exclude), default=0))
        if self.kind == "exact":
            scores, ids = self.index.search(queries, fetch)
        else:
            scores, ids = self._search_cells(queries, fetch)
        ids = np.where(ids >= 0, ids + 1, -1)
        out_s = np.full((len(hidden), k), -np.inf, dtype=np.float32)
        out_i = np.zeros((len(hidden), k), dtype=np.int64)
        for row, seen in enumerate(exclude):
            drop = set(seen)
            keep = [(s, i) for s, i in zip(scores[row], ids[row]) if i > 0 and int(i) not in drop][:k]
            if keep:
                out_s[row, :len(keep)] = [s for s, _ in keep]
                out_i[row, :len(keep)] = [i for _, i in keep]
        return out_s, out_i

    def _search_cells(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """Nearest in the equal-norm space, then each hit's inner product with the query recomputed from its
        stored vector and the row re-sorted by it; ids -1 (fewer than ``fetch`` in the probed cells) last."""
        padded = np.concatenate([queries, np.zeros((len(queries), 1), dtype=np.float32)], axis=1)
        _, ids = self.index.search(padded, fetch)
        found = ids >= 0
        stored = self.index.reconstruct_batch(np.where(found, ids, 0).ravel()).reshape(*ids.shape, -1)
        scores = np.einsum("bkd,bd->bk", stored[..., :-1], queries)
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def _equal_norms(vectors: np.ndarray) -> np.ndarray:
    """``[x, sqrt(M^2 - |x|^2)]``: every row of norm M, so L2 nearest = largest inner product."""
    norms = np.einsum("nd,nd->n", vectors, vectors)
    extra = np.sqrt(np.maximum(norms.max() - norms, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([vectors, extra[:, None]], axis=1))


def _augmented(table: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    table = np.asarray(table, dtype=np.float32)
    column = np.zeros((len(table), 1), dtype=np.float32) if bias is None else \
        np.asarray(bias, dtype=np.float32).reshape(-1, 1)
    return np.ascontiguousarray(np.concatenate([table, column], axis=1))


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |found_row & exact_row| / |exact_row| (item indices; 0 = no item)."""
    hits, total = 0, 0
    for f, e in zip(found, exact):
        truth = {int(i) for i in e if i > 0}
        hits += len(truth & {int(i) for i in f if i > 0})
        total += len(truth)
    return hits / max(total, 1)


def set_threads(n: int) -> None:
    """FAISS's OpenMP threads (its default: every core), as many as the server gives torch."""
    faiss.omp_set_num_threads(n)


def index_factory(config: AnnConfig):
    """What ``ServingEngine(item_index=...)`` takes: (table, bias) -> an ``ItemIndex``."""
    return lambda table, bias: ItemIndex(table, bias, config)
