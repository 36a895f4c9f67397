"""``crossrec prepare``: raw log -> per-(user, domain) chronological sequences in HF ``datasets``.

Written once, read by every stage (the generative-recommenders way). All heavy steps are numpy /
Arrow vectorised: ids are dictionary-encoded, sequences are one stable ``lexsort`` away, the
k-core filter is repeated ``bincount``s, and the Arrow list column is built from offsets.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from ..paths import check_output_dir
from ..progress import Phases
from . import outofcore
from .outofcore import EngineSettings, choose_engine, part_of_users
from .prepared import ARRAYS, SEQ_SHARD, SHARDS, item_dtype, shard_file, write_arrays
from .readers import DUPLICATES, Columns
from .sources import item_sharing, make_sources, read_sources
from .times import TimeRule, time_option
from .vocabulary import vocab_hash

FORMAT_VERSION = 1


@dataclass
class PrepareOptions:
    format: str | list[str] = "recbole"           # one format, or one per input
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
    duplicates: str = "drop"                   # exact repeats of a (user, item, time[, domain]) row
    user_attrs: str | None = None
    item_attrs: str | None = None
    # A base model's item vocabulary (its items.json, raw ids in index order): its items keep their
    # indices 1..N, whether this log holds them or not, and the log's other items follow from N + 1 in
    # first-seen order. A region that arrives after pretraining is prepared this way.
    vocab_from: list[str] | None = None
    # Keep only interactions at or before this time (the log's own unit, e.g. epoch seconds): a region's
    # data as it stood at the end of a period, for re-adaptation studies (finetune --init-adapter).
    until: float | str | None = None
    # How times are read (data/times.py): the zone of naive date-times and dates, and the unit of epoch numbers.
    timezone: str = "UTC"
    time_unit: str = "s"
    # N > 0: the item ids are written as N user-hash shards (arrays/shards/, CRC-32 of the user id
    # modulo N), so that each training or evaluation rank reads only its own shards' rows (prepared.py,
    # ShardedItems). Everything else, the sequences dataset included, is the same as without.
    shards: int = 0


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
        lo, hi = float(ts.min()), float(ts.max())

        def cut(v, flag):
            if not math.isfinite(v) or v < 0:
                raise InputError(f"must be a quantile in [0, 1] or a time inside the data ({lo:g}..{hi:g}), "
                                 f"got {v}", field=flag)
            if v <= 1:
                return float(np.quantile(ts, v))
            if v <= lo:
                raise InputError(f"time {v:g} is before every interaction (the data spans {lo:g}..{hi:g})", field=flag)
            if v > hi:
                raise InputError(f"time {v:g} is after every interaction (the data spans {lo:g}..{hi:g})", field=flag)
            return float(v)
        t_valid, t_test = cut(opts.temporal_valid, "--temporal-valid"), cut(opts.temporal_test, "--temporal-test")
        if t_test < t_valid:
            raise InputError("temporal test cut is before the valid cut", field="--temporal-test")
        n = len(lengths)
        train_end = np.bincount(seq_of_row, weights=ts < t_valid, minlength=n).astype(np.int32)
        valid_end = np.bincount(seq_of_row, weights=ts < t_test, minlength=n).astype(np.int32)
        if not ((valid_end > train_end) & (train_end >= 1)).any():
            raise InputError(f"no user has history before {t_valid:g} and an interaction between the cuts: "
                             "no validation targets", field="--temporal-valid")
        if not ((lengths > valid_end) & (valid_end >= 1)).any():
            raise InputError(f"no user has history before {t_test:g} and an interaction after it: no test targets",
                             field="--temporal-test")
        return train_end, valid_end, {"split": "temporal", "valid_time": t_valid, "test_time": t_test}
    raise InputError(f"unknown split {opts.split!r}; use 'loo' or 'temporal'", field="--split")


def prepare(input_path: str | Path | list, out: str | Path, opts: PrepareOptions, log=print,
            source_names: list[str] | None = None, force: bool = False,
            engine: EngineSettings | None = None) -> dict:
    """``input_path``: one input, or a list of inputs (one prepared dataset from several sources;
    ``opts.format`` then is one format for all or a list, one per input; see ``data/sources.py``).
    ``engine``: in memory (numpy, fastest below ~1e8 rows) or out of core on DuckDB (bounded memory,
    ``data/outofcore.py``); ``auto`` picks by the inputs' size. Both write the same dataset.

    A prepare that fails leaves no trace: an ``--out`` it had to create is removed again, so the
    next step never finds an empty folder that looks like a result."""
    created = not Path(out).exists()
    try:
        return _prepare(input_path, out, opts, log, source_names, force, (engine or EngineSettings()).check())
    except BaseException:
        if created and Path(out).is_dir() and not any(Path(out).iterdir()):
            Path(out).rmdir()
        raise


def _prepare(input_path, out, opts: PrepareOptions, log, source_names, force: bool, settings: EngineSettings) -> dict:
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    inputs = [str(i) for i in input_path] if isinstance(input_path, (list, tuple)) else [str(input_path)]
    formats = list(opts.format) if isinstance(opts.format, (list, tuple)) else [opts.format]
    sources = make_sources(inputs, formats, source_names)
    opts = check_prepare_options(opts)
    out = _check_out(Path(out), force)
    if choose_engine(settings, inputs) == "duckdb":
        return _prepare_out_of_core(sources, inputs, opts, out, log, settings, t0)
    phases = Phases(["read", "domains", "sequences", "write"], "prepare")
    combined = read_sources(sources, opts, log)
    phases.done("read")
    phases.done("domains")
    dom_code, dom_names = combined.dom_code, combined.dom_names
    # Memory at 1e8 rows: every per-row array is 0.4-0.8 GB, so the text ids are dropped once encoded,
    # codes stay 32-bit, and intermediates are deleted as soon as they are used (peak RSS per phase is
    # in the progress lines).
    user_enc = pc.dictionary_encode(combined.user)
    item_enc = pc.dictionary_encode(combined.item)
    combined.user = combined.item = None
    user_dict, item_dict = user_enc.dictionary, item_enc.dictionary
    user = user_enc.indices.to_numpy(zero_copy_only=False)
    item = item_enc.indices.to_numpy(zero_copy_only=False)
    del user_enc, item_enc
    ts = combined.timestamp
    n_dom = len(dom_names)

    if opts.domains:
        unknown = [d for d in opts.domains if d not in dom_names]
        if unknown:
            raise InputError(f"domain(s) {unknown} have no interactions; present: {dom_names}", field="--domains")
        wanted = np.isin(dom_code, [dom_names.index(d) for d in opts.domains])
    else:
        wanted = np.ones(len(user), dtype=bool)
    if opts.until is not None:
        wanted &= np.asarray(ts) <= opts.until

    seq_key = user.astype(np.int64) * n_dom + dom_code
    if opts.min_user_interactions > 1 or opts.min_item_interactions > 1:
        _, seq_id = np.unique(seq_key, return_inverse=True)
        keep = wanted & _kcore(seq_id, item, seq_id.max() + 1, len(item_dict),
                               opts.min_user_interactions, opts.min_item_interactions)
        del seq_id
    else:
        keep = wanted
    if not keep.any():
        if opts.until is not None and not (np.asarray(ts) <= opts.until).any():
            raise InputError(f"no interaction is at or before {opts.until:g} (the log starts at {float(np.min(ts)):g})",
                             field="--until")
        raise InputError("no interactions left after filtering (check --min-user/--min-item and --domains)",
                         field="--min-user" if opts.min_user_interactions > 1 else "--min-item")
    n_read = len(user)
    # Chronological order per sequence; equal timestamps keep file order (rows are in file order):
    # a stable sort by time, then a stable sort by sequence (one key array alive at a time).
    rows = np.flatnonzero(keep) if not keep.all() else None
    del keep, wanted
    by_time = np.argsort(ts if rows is None else ts[rows], kind="stable")
    if rows is not None:
        by_time = rows[by_time]
    del rows
    key_sorted = seq_key[by_time]
    del seq_key
    by_seq = np.argsort(key_sorted, kind="stable")
    order = by_time[by_seq]
    key_sorted = key_sorted[by_seq]
    del by_time, by_seq
    starts = np.flatnonzero(np.r_[True, key_sorted[1:] != key_sorted[:-1]])
    del key_sorted
    lengths = np.diff(np.r_[starts, len(order)])
    seq_of_row = np.repeat(np.arange(len(starts)), lengths) if opts.split == "temporal" else None

    # One item vocabulary for all domains; 0 is padding, items are 1..N in first-seen file order.
    item_of_row = item[order]
    del item
    used = np.zeros(len(item_dict), dtype=bool)
    used[item_of_row] = True
    used_items = np.flatnonzero(used)
    del used
    remap = np.zeros(len(item_dict), dtype=np.int32)
    if opts.vocab_from is None:
        remap[used_items] = np.arange(1, len(used_items) + 1, dtype=np.int32)
        vocab_ids = pc.cast(item_dict, pa.string()).take(pa.array(used_items))
        extension = None
    else:
        used_ids = pc.cast(item_dict, pa.string()).take(pa.array(used_items)).to_pylist()
        known = {item_id: k + 1 for k, item_id in enumerate(opts.vocab_from)}
        new_ids = [i for i in used_ids if i not in known]
        known.update({item_id: len(opts.vocab_from) + 1 + k for k, item_id in enumerate(new_ids)})
        remap[used_items] = np.array([known[i] for i in used_ids], dtype=np.int32)
        vocab_ids = pa.array(list(opts.vocab_from) + new_ids, pa.string())
        extension = {"base_items": len(opts.vocab_from), "new_items": len(new_ids),
                     "base_items_in_log": len(used_ids) - len(new_ids)}
    items_sorted = remap[item_of_row]
    del item_of_row, remap
    seq_user = user[order[starts]]
    del user
    seq_dom = dom_code[order[starts]]
    ts_sorted = ts[order]
    del ts

    train_end, valid_end, split_info = _split_points(lengths, seq_of_row, ts_sorted, opts)
    del seq_of_row
    offsets = np.r_[0, np.cumsum(lengths)]                 # int64: arrays/; the Arrow list column takes int32
    user_ids = pc.cast(user_dict, pa.string()).take(pa.array(seq_user))
    dom_arr = pa.array(dom_names, pa.string()).take(pa.array(seq_dom))
    table = pa.table({
        "user_id": user_ids,
        "domain": dom_arr,
        "item_ids": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(items_sorted, pa.int32())),
        "timestamps": pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(ts_sorted, pa.float64())),
        "train_end": pa.array(train_end, pa.int32()),
        "valid_end": pa.array(valid_end, pa.int32()),
    })
    del ts_sorted
    vocab = pa.table({"item_id": vocab_ids})
    num_items = vocab.num_rows
    phases.done("sequences")

    item_ids = vocab["item_id"].to_pylist()
    present = sorted(set(seq_dom.tolist()))
    dom_of_row = dom_code[order]
    dom_shared, dom_private = item_sharing(items_sorted, dom_of_row, n_dom)
    del dom_of_row
    dom_users = np.bincount(seq_dom, minlength=n_dom)
    dom_inter = np.bincount(seq_dom, weights=lengths, minlength=n_dom).astype(np.int64)
    stats = {
        "users": int(len(np.unique(seq_user))),
        "items": int(len(used_items)),
        "interactions": int(len(order)),
        "sequences": int(len(starts)),
        "domains": {dom_names[d]: {"users": int(dom_users[d]), "interactions": int(dom_inter[d]),
                                   "items": int(dom_shared[d] + dom_private[d]), "shared_items": int(dom_shared[d]),
                                   "private_items": int(dom_private[d])} for d in present},
        "evaluable_sequences": int((valid_end > train_end).sum()),
        "skipped_bad_rows": int(combined.skipped),
        "filtered_out_interactions": int(n_read - len(order)),
        "input_rules": {"stripped_whitespace_ids": combined.note("stripped_whitespace_ids"),
                        "duplicate_rows": combined.note("duplicate_rows"), "duplicates": opts.duplicates},
    }
    if extension is not None:
        stats["vocab_from"] = extension
    if len(sources) > 1:
        src_of_row = combined.source_code[order]
        src_shared, src_private = item_sharing(items_sorted, src_of_row, len(sources))
        stats["sources"] = {s.name: {"input": s.path, "format": s.format,
                                     "interactions": int((src_of_row == k).sum()),
                                     "items": int(src_shared[k] + src_private[k]), "shared_items": int(src_shared[k]),
                                     "private_items": int(src_private[k])} for k, s in enumerate(sources)}
    meta = {
        "format_version": FORMAT_VERSION, "input": inputs[0] if len(inputs) == 1 else inputs,
        "sources": [asdict(s) for s in sources], "options": _options_record(opts),
        "domains": [dom_names[d] for d in present], "num_items": int(num_items),
        "vocab_hash": vocab_hash(item_ids), **split_info,
        "seconds": round(time.perf_counter() - t0, 3), "engine": "memory",
        "rows_per_second": round(n_read / max(time.perf_counter() - t0, 1e-9)),
    }

    def write(folder: Path) -> None:
        datasets.Dataset(table).save_to_disk(str(folder / "sequences"))
        datasets.Dataset(vocab).save_to_disk(str(folder / "items"))
        # Domain codes as PreparedData numbers them: positions in meta["domains"] (present domains only).
        code = np.full(n_dom, -1, dtype=np.int64)
        code[present] = np.arange(len(present))
        write_arrays(folder / ARRAYS, offsets, None if opts.shards else items_sorted, train_end, valid_end,
                     code[seq_dom], num_items)
        if opts.shards:
            seq_shard = part_of_users(user_ids, opts.shards)
            row_shard = np.repeat(seq_shard, lengths)
            np.save(folder / ARRAYS / f"{SEQ_SHARD}.npy", seq_shard, allow_pickle=False)
            (folder / ARRAYS / SHARDS).mkdir()
            for k in range(opts.shards):
                np.save(shard_file(folder / ARRAYS, k, opts.shards),
                        items_sorted[row_shard == k].astype(item_dtype(num_items)), allow_pickle=False)
        (folder / "stats.json").write_text(json.dumps(stats, indent=2, allow_nan=False))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=False))
    write_atomically(out, write)
    phases.done("write")
    phases.close()
    log(f"prepared {stats['interactions']:,} interactions, {stats['users']:,} users, {stats['items']:,} items, "
        f"{len(present)} domain(s) in {meta['seconds']:.1f}s -> {out}")
    if extension is not None:
        log(f"vocabulary from the base: its {extension['base_items']:,} items keep their indices "
            f"({extension['base_items_in_log']:,} of them in this log), {extension['new_items']:,} item(s) new "
            f"to the base appended after them")
    return stats


def _prepare_out_of_core(sources, inputs, opts: PrepareOptions, out: Path, log, settings: EngineSettings,
                         t0: float) -> dict:
    """The same dataset through ``data/outofcore.py`` (DuckDB; memory bounded by one piece of input),
    in one process (``step="all"``) or as one of its steps (``plan``, ``part``, ``finish``)."""
    if opts.shards:
        if settings.parts not in (1, opts.shards):
            raise InputError(f"--shards {opts.shards} writes one shard per part: give --parts {opts.shards} or "
                             "leave --parts out", field="--parts")
        settings = replace(settings, parts=opts.shards)
    fingerprint = _fingerprint(sources, opts, settings.parts)
    if settings.step == "all":
        base = Path(settings.work_dir) if settings.work_dir else out.parent
        try:
            base.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=base))
        except OSError as e:
            raise InputError(f"cannot create the work folder: {e.strerror or e}", path=str(base),
                             field="--work-dir") from None
        try:
            with outofcore.disk_full(work, out):
                record = outofcore.plan(sources, opts, settings, work, settings.parts, fingerprint, log)
                for part in range(settings.parts):
                    outofcore.run_part(work, part, settings, record, log)
                (work / outofcore.DB).unlink()      # the finish reads only the parts: free its ~30 GB at 1e9
                return _finish(work, record, sources, inputs, opts, out, log, t0)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    work = Path(settings.work_dir)
    with outofcore.disk_full(work, out):
        return _prepare_step(work, sources, inputs, opts, out, log, settings, t0, fingerprint)


def _prepare_step(work: Path, sources, inputs, opts: PrepareOptions, out: Path, log, settings: EngineSettings,
                  t0: float, fingerprint: str) -> dict:
    """One of the steps ``plan``, ``part``, ``finish`` (a job array's task)."""
    if settings.step == "plan":
        record = outofcore.plan(sources, opts, settings, work, settings.parts, fingerprint, log)
        log(f"planned {record['stats']['interactions']:,} interactions in {record['parts']} part(s) in "
            f"{record['plan_seconds']:.1f}s -> {work}; next: --step part --part I for I in 0..{record['parts'] - 1}, "
            "then --step finish")
        return record["stats"]
    record = outofcore.read_plan(work, fingerprint)
    if settings.step == "part":
        outofcore.run_part(work, settings.part, settings, record, log)
        return record["stats"]
    stats = _finish(work, record, sources, inputs, opts, out, log, t0, stepped=True)
    shutil.rmtree(work, ignore_errors=True)
    return stats


def _fingerprint(sources, opts: PrepareOptions, parts: int) -> str:
    """What every step of one out-of-core prepare must agree on: inputs, options, partitions."""
    text = json.dumps({"sources": [asdict(s) for s in sources], "options": _options_record(opts), "parts": parts},
                      sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _finish(work: Path, record: dict, sources, inputs, opts: PrepareOptions, out: Path, log, t0: float,
            stepped: bool = False) -> dict:
    stats = record["stats"]
    meta = {
        "format_version": FORMAT_VERSION, "input": inputs[0] if len(inputs) == 1 else inputs,
        "sources": [asdict(s) for s in sources], "options": _options_record(opts),
        "domains": record["domains"], "num_items": record["num_items"],
        "vocab_hash": record["vocab_hash"], **record["split_info"],
    }

    def write(folder: Path) -> None:
        outofcore.finish(work, folder, record, log)
        # One process: this run's time; steps: the plan's, the slowest part's and the finish's (the
        # critical path when the parts run side by side).
        seconds = time.perf_counter() - t0
        if stepped:
            seconds += record["plan_seconds"] + max(outofcore.part_seconds(work, record["parts"]))
        meta.update({"seconds": round(seconds, 3), "engine": "duckdb", "parts": record["parts"],
                     "rows_per_second": round(record["rows_read"] / max(seconds, 1e-9))})
        (folder / "stats.json").write_text(json.dumps(stats, indent=2, allow_nan=False))
        (folder / "meta.json").write_text(json.dumps(meta, indent=2, allow_nan=False))
    write_atomically(out, write)
    log(f"prepared {stats['interactions']:,} interactions, {stats['users']:,} users, {stats['items']:,} items, "
        f"{len(record['domains'])} domain(s) in {meta['seconds']:.1f}s ({meta['rows_per_second']:,} rows/s read, "
        f"out of core, {record['parts']} part(s)) -> {out}")
    if "vocab_from" in stats:
        extension = stats["vocab_from"]
        log(f"vocabulary from the base: its {extension['base_items']:,} items keep their indices "
            f"({extension['base_items_in_log']:,} of them in this log), {extension['new_items']:,} item(s) new "
            f"to the base appended after them")
    return stats


def check_prepare_options(opts: PrepareOptions) -> PrepareOptions:
    """Every option's range, before the input is read; times given as text (``--until 2025-06-30``)
    become epoch seconds by the log's time rule. Returns the options with those times resolved."""
    rule = TimeRule(opts.timezone, opts.time_unit).check()
    opts = replace(opts, until=time_option(opts.until, rule, "--until"),
                   temporal_valid=time_option(opts.temporal_valid, rule, "--temporal-valid", quantile_ok=True),
                   temporal_test=time_option(opts.temporal_test, rule, "--temporal-test", quantile_ok=True))
    if opts.shards < 0:
        raise InputError(f"must be >= 0 (0: no shards), got {opts.shards}", field="--shards")
    if opts.min_user_interactions < 0:
        raise InputError(f"must be >= 0, got {opts.min_user_interactions}", field="--min-user")
    if opts.min_item_interactions < 0:
        raise InputError(f"must be >= 0, got {opts.min_item_interactions}", field="--min-item")
    if not opts.other_domain.strip():
        raise InputError("the bucket for values a rule cannot place needs a name; it is empty", field="--other-domain")
    if opts.duplicates not in DUPLICATES:
        raise InputError(f"must be one of {', '.join(DUPLICATES)}", field="--duplicates")
    for flag, v in (("--temporal-valid", opts.temporal_valid), ("--temporal-test", opts.temporal_test)):
        if not math.isfinite(v) or v < 0:
            raise InputError(f"must be a quantile in [0, 1] or a time inside the data, got {v}", field=flag)
    return opts


def _check_out(out: Path, force: bool) -> Path:
    """``--out`` may be new or empty; an earlier prepared dataset is replaced only with ``--force`` (and
    then atomically, see ``write_atomically``), so a second run never silently replaces the data that
    models were trained on; anything else is refused, so a mistyped path never replaces a folder of
    the user's."""
    if out.is_dir() and any(out.iterdir()) and not (out / "meta.json").is_file():
        raise InputError("output folder is not empty and is not a prepared dataset; choose a new folder",
                         path=str(out), field="--out")
    if (out / "meta.json").is_file() and not force:
        raise InputError("already holds a prepared dataset; add --force to replace it, or give another --out",
                         path=str(out), field="--out")
    return check_output_dir(out)


def write_atomically(out: Path, write) -> None:
    """``write(folder)`` into a temporary sibling of ``out``, then swap it in: a prepare that dies
    leaves either the previous dataset or none, never a mix that the next step would accept."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise InputError(f"cannot write the prepared dataset: {e.strerror or e}", path=str(out), field="--out") from None
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _jsonable(d):
    return json.loads(json.dumps(d, default=str))


def _options_record(opts) -> dict:
    """The options as meta.json keeps them; the base's vocabulary (``vocab_from``, every item id) as its
    size and hash: the ids themselves are the first items of items/, and a 1M-item base would add its
    whole vocabulary to meta.json."""
    record = _jsonable(asdict(opts))
    if opts.vocab_from is not None:
        record["vocab_from"] = {"items": len(opts.vocab_from), "vocab_hash": vocab_hash(list(opts.vocab_from))}
    return record
