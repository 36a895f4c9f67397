"""``crossrec prepare``: raw log -> per-(user, domain) chronological sequences in HF ``datasets``.

Written once, read by every stage (the generative-recommenders way). All heavy steps are numpy /
Arrow vectorised: ids are dictionary-encoded, sequences are one stable ``lexsort`` away, the
k-core filter is repeated ``bincount``s, and the Arrow list column is built from offsets.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .domains import assign_domains
from .readers import Columns, read_log

FORMAT_VERSION = 1


@dataclass
class PrepareOptions:
    format: str = "recbole"
    columns: Columns = field(default_factory=Columns)
    domain_from: str | None = None
    other_domain: str = "other"
    domains: list[str] | None = None          # keep only these domains (after assignment)
    min_user_interactions: int = 0            # per (user, domain) sequence
    min_item_interactions: int = 0
    split: str = "loo"                         # loo | temporal
    temporal_valid: float = 0.8               # temporal: quantile (<= 1) or absolute time of the valid cut
    temporal_test: float = 0.9
    on_bad_rows: str = "error"
    user_attrs: str | None = None
    item_attrs: str | None = None


def _kcore(seq: np.ndarray, item: np.ndarray, n_seq: int, n_item: int, min_u: int, min_i: int) -> np.ndarray:
    """Mask of interactions that survive repeated user/item minimum-count filtering."""
    keep = np.ones(len(seq), dtype=bool)
    if min_u <= 1 and min_i <= 1:
        return keep
    while True:
        before = keep.sum()
        if min_i > 1:
            cnt = np.bincount(item[keep], minlength=n_item)
            keep &= cnt[item] >= min_i
        if min_u > 1:
            cnt = np.bincount(seq[keep], minlength=n_seq)
            keep &= cnt[seq] >= min_u
        if keep.sum() == before:
            return keep


def _split_points(lengths: np.ndarray, seq_of_row: np.ndarray, ts: np.ndarray, opts: PrepareOptions):
    """Per sequence: ``train_end`` and ``valid_end`` positions (valid target = items[train_end])."""
    if opts.split == "loo":
        evaluable = lengths >= 3
        train_end = np.where(evaluable, lengths - 2, lengths)
        valid_end = np.where(evaluable, lengths - 1, lengths)
        return train_end.astype(np.int32), valid_end.astype(np.int32), {"split": "loo"}
    if opts.split == "temporal":
        def cut(v):
            return float(np.quantile(ts, v)) if 0 <= v <= 1 else float(v)
        t_valid, t_test = cut(opts.temporal_valid), cut(opts.temporal_test)
        if t_test < t_valid:
            raise InputError("temporal test cut is before the valid cut", field="--temporal-test")
        n = len(lengths)
        train_end = np.bincount(seq_of_row, weights=ts < t_valid, minlength=n).astype(np.int32)
        valid_end = np.bincount(seq_of_row, weights=ts < t_test, minlength=n).astype(np.int32)
        return train_end, valid_end, {"split": "temporal", "valid_time": t_valid, "test_time": t_test}
    raise InputError(f"unknown split {opts.split!r}; use 'loo' or 'temporal'", field="--split")


def prepare(input_path: str | Path, out: str | Path, opts: PrepareOptions, log=print) -> dict:
    import datasets  # heavy import, only when preparing
    datasets.disable_progress_bars()

    from ..progress import Phases
    t0 = time.perf_counter()
    phases = Phases(["read", "domains", "sequences", "write"], "prepare")
    raw = read_log(input_path, opts.format, opts.columns, on_bad_rows=opts.on_bad_rows,
                   user_attrs=opts.user_attrs, item_attrs=opts.item_attrs)
    if raw.skipped:
        log(f"skipped {raw.skipped} bad row(s) of {raw.source.path} (--on-bad-rows skip)")
    phases.done("read")
    dom_code, dom_names = assign_domains(raw, opts.domain_from, other=opts.other_domain,
                                         user_key=opts.columns.user, item_key=opts.columns.item)
    phases.done("domains")
    t = raw.interactions
    user_enc = pc.dictionary_encode(t["user"]).combine_chunks()
    item_enc = pc.dictionary_encode(t["item"]).combine_chunks()
    user = user_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    item = item_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    ts = t["timestamp"].to_numpy()
    n_dom = len(dom_names)

    if opts.domains:
        unknown = [d for d in opts.domains if d not in dom_names]
        if unknown:
            raise InputError(f"domain(s) {unknown} have no interactions; present: {dom_names}", field="--domains")
        wanted = np.isin(dom_code, [dom_names.index(d) for d in opts.domains])
    else:
        wanted = np.ones(len(user), dtype=bool)

    seq_key = user * n_dom + dom_code
    _, seq_id = np.unique(seq_key, return_inverse=True)
    keep = wanted & _kcore(seq_id, item, seq_id.max() + 1, len(item_enc.dictionary),
                           opts.min_user_interactions, opts.min_item_interactions)
    if not keep.any():
        raise InputError("no interactions left after filtering (check --min-user/--min-item and --domains)")
    rows = np.flatnonzero(keep)
    # Chronological order per sequence; equal timestamps keep file order (rows are in file order).
    order = rows[np.lexsort((rows, ts[rows], seq_key[rows]))]
    key_sorted = seq_key[order]
    starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
    lengths = np.diff(np.r_[starts, len(order)])
    seq_of_row = np.repeat(np.arange(len(starts)), lengths)

    # One item vocabulary for all domains; 0 is padding, items are 1..N in first-seen file order.
    used_items = np.unique(item[order])
    remap = np.zeros(len(item_enc.dictionary), dtype=np.int32)
    remap[used_items] = np.arange(1, len(used_items) + 1, dtype=np.int32)
    items_sorted = remap[item[order]]
    seq_user = user[order[starts]]
    seq_dom = dom_code[order[starts]]

    train_end, valid_end, split_info = _split_points(lengths, seq_of_row, ts[order], opts)
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    user_ids = pc.cast(user_enc.dictionary, pa.string()).take(pa.array(seq_user))
    dom_arr = pa.array(dom_names, pa.string()).take(pa.array(seq_dom))
    table = pa.table({
        "user_id": user_ids,
        "domain": dom_arr,
        "item_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(items_sorted, pa.int32())),
        "timestamps": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ts[order], pa.float64())),
        "train_end": pa.array(train_end, pa.int32()),
        "valid_end": pa.array(valid_end, pa.int32()),
    })
    vocab = pa.table({"item_id": pc.cast(item_enc.dictionary, pa.string()).take(pa.array(used_items))})
    phases.done("sequences")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datasets.Dataset(table).save_to_disk(str(out / "sequences"))
    datasets.Dataset(vocab).save_to_disk(str(out / "items"))

    present = sorted(set(seq_dom.tolist()))
    dom_users = np.bincount(seq_dom, minlength=n_dom)
    dom_inter = np.bincount(seq_dom, weights=lengths, minlength=n_dom).astype(np.int64)
    stats = {
        "users": int(len(np.unique(seq_user))),
        "items": int(len(used_items)),
        "interactions": int(len(order)),
        "sequences": int(len(starts)),
        "domains": {dom_names[d]: {"users": int(dom_users[d]), "interactions": int(dom_inter[d])} for d in present},
        "evaluable_sequences": int((valid_end > train_end).sum()),
        "skipped_bad_rows": int(raw.skipped),
        "filtered_out_interactions": int(len(user) - keep.sum()),
    }
    meta = {
        "format_version": FORMAT_VERSION, "input": str(input_path), "options": _jsonable(asdict(opts)),
        "domains": [dom_names[d] for d in present], "num_items": int(len(used_items)), **split_info,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    phases.done("write")
    phases.close()
    log(f"prepared {stats['interactions']:,} interactions, {stats['users']:,} users, {stats['items']:,} items, "
        f"{len(present)} domain(s) in {meta['seconds']:.1f}s -> {out}")
    return stats


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))
