"""``crossrec data synth``: synthetic logs with planted cross-domain structure.

Items fall into clusters. Users walk between clusters by a Markov chain: a transition matrix shared
by all domains, mixed with a domain-specific one (``--shift``), so a model pretrained on some domains
carries real, measurable knowledge to the others, and how much depends on ``--shift``. Within a
cluster, items follow a Zipf popularity; a fraction of each domain's items is private to it (items a
target domain has and the sources never saw). Vectorised over users: one numpy step per position.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from ..paths import check_output_dir


@dataclass
class SynthOptions:
    users: int = 2000
    items: int = 1000
    domains: int = 3
    clusters: int = 20
    mean_length: float = 30.0
    min_length: int = 5
    shift: float = 0.3              # 0 = all domains share one chain, 1 = unrelated chains
    private_items: float = 0.1      # share of items private to each domain
    popularity_skew: float = 2.0    # item rank within a cluster ~ size * U**skew (1 = uniform)
    stickiness: float = 0.5         # chance to stay in the current cluster
    seed: int = 0


def _chain(rng, c: int, stickiness: float) -> np.ndarray:
    t = rng.dirichlet(np.full(c, 0.3), size=c)
    t = (1 - stickiness) * t + stickiness * np.eye(c)
    return t / t.sum(1, keepdims=True)


# Users per generated chunk: a log of any size is written in pieces of at most this many users, so
# memory stays bounded (1e8 interactions from 2e6 users would otherwise need a ~3 GB dense walk).
CHUNK_USERS = 200_000


def synthesize_chunks(opts: SynthOptions, chunk_users: int | None = None):
    """The log as Arrow tables of at most ``chunk_users`` users each, in user order. Chunk 0 draws
    from the seed's generator right after the chains (a log of one chunk is what it always was);
    chunk k > 0 from its own generator ``(seed, k)``, so every chunk is reproducible on its own."""
    chunk_users = chunk_users or CHUNK_USERS
    rng = np.random.default_rng(opts.seed)
    c, d = opts.clusters, opts.domains
    shared = _chain(rng, c, opts.stickiness)
    chains = [(1 - opts.shift) * shared + opts.shift * _chain(rng, c, opts.stickiness) for _ in range(d)]
    cum = np.stack([np.cumsum(t, 1) for t in chains])           # (D, C, C)

    n_private = int(opts.items * opts.private_items) if d > 1 else 0
    n_shared = opts.items - n_private * d
    if n_shared < c:
        raise InputError(f"{n_shared} shared items cannot fill {c} clusters; raise --items or lower --clusters "
                         f"or --private-items", field="--items")
    # Shared items split into clusters; each domain's private items too (ids after the shared ones).
    shared_bounds = np.linspace(0, n_shared, c + 1).astype(np.int64)
    priv_bounds = np.linspace(0, n_private, c + 1).astype(np.int64)
    names = pa.array([f"d{i}" for i in range(d)])
    for k, first in enumerate(range(0, opts.users, chunk_users)):
        users = min(chunk_users, opts.users - first)
        r = rng if k == 0 else np.random.default_rng([opts.seed, k])
        lengths = np.clip(r.geometric(1.0 / opts.mean_length, users), opts.min_length, int(8 * opts.mean_length))
        user_dom = r.integers(0, d, users)
        state = r.integers(0, c, users)
        max_len = int(lengths.max())
        items = np.zeros((users, max_len), dtype=np.int32)
        for step in range(max_len):
            u = r.random(users)
            state = np.minimum((cum[user_dom, state] < u[:, None]).sum(1), c - 1)
            private = r.random(users) < (opts.private_items * d if n_private else 0)
            lo = np.where(private, n_shared + user_dom * n_private + priv_bounds[state], shared_bounds[state])
            hi = np.where(private, n_shared + user_dom * n_private + priv_bounds[state + 1], shared_bounds[state + 1])
            size = np.maximum(hi - lo, 1)
            rank = np.floor(size * r.random(users) ** opts.popularity_skew).astype(np.int64)
            items[:, step] = lo + np.minimum(rank, size - 1)
        mask = np.arange(max_len)[None, :] < lengths[:, None]
        local = np.repeat(np.arange(users), lengths)
        base_time = 1_600_000_000 + r.integers(0, 10_000_000, users)
        ts = base_time[local] + np.arange(mask.sum()) - np.repeat(np.r_[0, np.cumsum(lengths)[:-1]], lengths)
        yield pa.table({
            "user_id": pa.array(first + local, pa.int64()),
            "item_id": pa.array(items[mask], pa.int64()),
            "timestamp": pa.array(ts * 60, pa.int64()),
            "domain": names.take(pa.array(user_dom[local])),
        })


def synthesize(opts: SynthOptions) -> pa.Table:
    """The whole log as one table (small logs: tests, the recipes)."""
    return pa.concat_tables(list(synthesize_chunks(opts)))


def write_synth(out: str | Path, opts: SynthOptions, log=print) -> Path:
    """Streams the log to ``interactions.parquet`` one chunk of users at a time (one row group each),
    through a temporary name: a run stopped midway leaves no half-written file behind."""
    out = check_output_dir(out)
    path = out / "interactions.parquet"
    tmp = out / "interactions.parquet.tmp"
    rows = 0
    writer = None
    try:
        for table in synthesize_chunks(opts):
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            rows += table.num_rows
        writer.close()
        writer = None
        tmp.replace(path)
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    log(f"wrote {rows:,} interactions of {opts.users:,} users, {opts.items:,} items, "
        f"{opts.domains} domain(s) -> {path}")
    return path
