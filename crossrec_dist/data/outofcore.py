"""``crossrec prepare`` for logs bigger than memory: the same dataset, built on DuckDB.

The in-memory path (``prepare.py``) holds every interaction as numpy arrays at once, ~120 B each at its
peak: 1e8 interactions need 12.5 GiB. This path keeps memory bounded by the size of one piece, not the
log, in three stages:

1. **Read in pieces** (``readers.ChunkedLog``): each input is parsed in blocks of ``block_size`` bytes
   through the very same row rules (ids, times, bad rows named by file:line) and domain rules, and each
   piece is spilled to a Parquet file: (row in file order, source, user, item, time, domain).
2. **Relational work on DuckDB** (out-of-core hash aggregates, joins and sorts that spill to
   ``temp_directory`` under ``memory_limit``): exact duplicates, first-seen user and item order, the
   k-core filter, the item vocabulary, per-sequence lengths and split points, the sharing counts.
3. **Stream the result out** in (sequence, time, file order) order: ``arrays/items.npy`` is written
   through a memory map and the ``sequences`` dataset batch by batch with ``datasets``' ``ArrowWriter``.

The output equals the in-memory path's, field by field (tests/test_prepare_out_of_core.py): the same
vocabulary in first-seen order, chronological sequences whose equal times keep file order, the same
splits and stats.json. Only per-sequence arrays (one entry per user and domain) are held in numpy.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_writer import ArrowWriter

from ..errors import InputError
from .domains import assign_domains
from .prepared import ARRAYS, item_dtype, write_arrays
from .readers import ChunkedLog
from .sources import SOURCE_RULE, check_domain_names, report_rules
from .times import TimeRule
from .vocabulary import vocab_hash

ENGINES = ("auto", "memory", "duckdb")
# "auto" takes the out-of-core path from this much input (bytes on disk; compressed inputs count 4x):
# below it the in-memory path is faster and its peak (~120 B per interaction) is far from any limit.
AUTO_BYTES = 1 << 30


@dataclass
class EngineSettings:
    """How a prepare runs (not what it produces: these never change the dataset)."""
    engine: str = "auto"                 # auto | memory | duckdb
    memory_limit: str = "3GB"            # DuckDB's limit; the process adds ~0.5-1 GB of Python, Arrow and one piece
    work_dir: str | None = None          # spill files and DuckDB's temp files (default: next to --out)
    threads: int | None = None           # DuckDB threads (default: the usable cores)
    block_size: int = 64 << 20           # bytes of input per piece

    def check(self) -> "EngineSettings":
        if self.engine not in ENGINES:
            raise InputError(f"must be one of {', '.join(ENGINES)}, not {self.engine!r}", field="--engine")
        if self.block_size < 1 << 16:
            raise InputError(f"must be at least 65536 bytes, got {self.block_size}", field="--block-size")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"must be >= 1, got {self.threads}", field="--threads")
        return self


def choose_engine(settings: EngineSettings, paths: list[str]) -> str:
    if settings.engine != "auto":
        return settings.engine
    size = 0
    for p in map(Path, paths):
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p] if p.is_file() else []
        size += sum(f.stat().st_size * (4 if f.name.lower().endswith(".gz") else 1) for f in files)
    return "duckdb" if size >= AUTO_BYTES else "memory"


@dataclass
class Built:
    """What ``prepare.py`` turns into meta.json and the folder: the counts, and ``write(folder)``."""
    stats: dict
    split_info: dict
    num_items: int
    domains: list[str]
    vocab_hash: str
    rows_read: int
    write: Callable[[Path], None]
    close: Callable[[], None]


def _table(con, sql: str) -> pa.Table:
    """A query's result as an Arrow table (DuckDB 2 renamed ``fetch_arrow_table``)."""
    rel = con.sql(sql)
    return rel.to_arrow_table() if hasattr(rel, "to_arrow_table") else rel.fetch_arrow_table()


def _batches(con, sql: str, rows: int):
    """A query's result as a stream of Arrow record batches, never all of it at once."""
    rel = con.sql(sql)
    return rel.to_arrow_reader(rows) if hasattr(rel, "to_arrow_reader") else rel.fetch_arrow_reader(rows)


def one(con, sql: str) -> tuple:
    """The one row of a query (fetched to its end: DuckDB 2 refuses new work on a half-read result)."""
    return con.sql(sql).fetchall()[0]


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _connect(work: Path, settings: EngineSettings) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(work / "prepare.duckdb"))
    threads = settings.threads or max(1, len(os.sched_getaffinity(0)))
    try:
        con.execute(f"SET memory_limit = {_sql_str(settings.memory_limit)}")
    except duckdb.Error as e:
        con.close()
        raise InputError(f"not a memory size DuckDB reads (e.g. 3GB, 500MB): {e}", field="--memory-limit") from None
    con.execute(f"SET temp_directory = {_sql_str(str(work / 'duckdb-temp'))}")
    con.execute(f"SET threads = {int(threads)}")
    con.execute("SET preserve_insertion_order = false")     # every result that needs an order says ORDER BY
    return con


def build(sources, opts, settings: EngineSettings, out: Path, log=print) -> Built:
    """Read ``sources`` (``sources.Source``) by ``opts`` (``prepare.PrepareOptions``, already checked)."""
    base = Path(settings.work_dir) if settings.work_dir else out.parent
    try:
        base.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.prepare-", dir=base))
    except OSError as e:
        raise InputError(f"cannot create the work folder: {e.strerror or e}", path=str(base), field="--work-dir") from None
    con = None

    def close():
        if con is not None:
            con.close()
        shutil.rmtree(work, ignore_errors=True)
    try:
        spilled = _spill(sources, opts, settings, work / "rows", log)
        con = _connect(work, settings)
        return _relational(con, spilled, sources, opts, work, log, close)
    except BaseException:
        close()
        raise


@dataclass
class _Spilled:
    rows: int
    per_source: list[ChunkedLog]
    rows_per_source: list[int]
    dom_names: list[str]
    has_dcol: bool
    seconds: float


def _spill(sources, opts, settings: EngineSettings, folder: Path, log) -> _Spilled:
    """Stage 1: every input in pieces through the row and domain rules, into Parquet files."""
    several = len(sources) > 1
    if several and (opts.user_attrs or opts.item_attrs):
        raise InputError("--user-attrs / --item-attrs name one file, but there are several inputs; keep each "
                         "input's attribute files next to it (recbole / movielens folders find them)",
                         field="--user-attrs" if opts.user_attrs else "--item-attrs")
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    row, names_seen, per_source, rows_per_source = 0, set(), [], []
    has_dcol = bool(opts.columns.domain)
    keep_line = opts.duplicates == "error"
    for k, src in enumerate(sources):
        chunked = ChunkedLog(src.path, src.format, opts.columns, on_bad_rows=opts.on_bad_rows,
                             user_attrs=opts.user_attrs, item_attrs=opts.item_attrs,
                             time_rule=TimeRule(opts.timezone, opts.time_unit), block_size=settings.block_size)
        first_row = row
        for piece, raw in enumerate(chunked):
            t = raw.interactions
            n = t.num_rows
            if n == 0:
                continue
            if opts.domain_from == SOURCE_RULE:
                code, names = np.zeros(n, dtype=np.int32), [src.name]
            else:
                code, names = assign_domains(raw, opts.domain_from, other=opts.other_domain,
                                             user_key=opts.columns.user, item_key=opts.columns.item)
                if several:
                    names = [f"{src.name}:{v}" for v in names]
            check_domain_names(raw, code, names, opts)
            names_seen.update(names)
            user = pc.cast(t["user"], pa.string())
            if several:
                user = pc.binary_join_element_wise(src.name, user, ":")
            columns = {"row": pa.array(np.arange(row, row + n, dtype=np.int64)),
                       "src": pa.array(np.full(n, k, dtype=np.int32)),
                       "user": user, "item": pc.cast(t["item"], pa.string()), "ts": t["timestamp"],
                       "dom": pa.array(names, pa.string()).take(pa.array(code))}
            if has_dcol:
                columns["dcol"] = pc.cast(t["domain"], pa.string())
            if keep_line:      # the parsed row within its file, to name lines of duplicates
                columns["prow"] = pa.array(raw.source.row_offset + raw.kept_rows.astype(np.int64))
            pq.write_table(pa.table(columns), folder / f"{k:05d}-{piece:07d}.parquet", compression="zstd")
            row += n
        rows_per_source.append(row - first_row)
        per_source.append(chunked)
        report_rules(chunked.path, chunked.skipped, chunked.notes, opts, log)
    seconds = time.perf_counter() - t0
    log(f"read {row:,} rows in {seconds:.1f}s ({row / max(seconds, 1e-9):,.0f} rows/s)")
    return _Spilled(row, per_source, rows_per_source, sorted(names_seen), has_dcol, seconds)


def _relational(con, sp: _Spilled, sources, opts, work: Path, log, close) -> Built:
    """Stage 2: the dataset's relations on DuckDB; returns the counts and the stage-3 writer."""
    t0 = time.perf_counter()
    q = con.sql     # runs a statement now; a query returns a relation to fetch (to its end)
    q(f"CREATE VIEW raw AS SELECT * FROM read_parquet({_sql_str(str(work / 'rows' / '*.parquet'))})")
    keys = "src, user, item, ts, dom" + (", dcol" if sp.has_dcol else "")
    dup_per_source = [0] * len(sources)
    if opts.duplicates == "keep":
        q("CREATE VIEW rows AS SELECT row, src, user, item, ts, dom FROM raw")
    else:
        if opts.duplicates == "error":
            _refuse_duplicates(con, sp, keys, sources)
        # One row per distinct (source, user, item, time, domain[, domain column]): the first in file order.
        q(f"CREATE TABLE rows AS SELECT min(row) AS row, src, user, item, ts, dom FROM raw GROUP BY {keys}")
        kept = dict(q("SELECT src, count(*) FROM rows GROUP BY src").fetchall())
        dup_per_source = [sp.rows_per_source[k] - int(kept.get(k, 0)) for k in range(len(sources))]
    n_read = int(one(con, "SELECT count(*) FROM rows")[0])
    for k, n in enumerate(dup_per_source):
        sp.per_source[k].notes["duplicate_rows"] = n
        if n:
            verb = "dropped" if opts.duplicates == "drop" else "kept"
            log(f"{verb} {n} exact duplicate row(s) of {sp.per_source[k].path} (--duplicates {opts.duplicates})")
    if opts.duplicates == "keep":
        # Counted as the in-memory path counts them (per source), though they stay.
        counted = q(f"SELECT src, sum(c - 1) FROM (SELECT {keys}, count(*) AS c FROM raw GROUP BY {keys}) "
                    "GROUP BY src").fetchall()
        for k, n in counted:
            sp.per_source[k].notes["duplicate_rows"] = int(n)
            if n:
                log(f"kept {int(n)} exact duplicate row(s) of {sp.per_source[k].path} (--duplicates keep)")

    # First-seen order of users and items over every row read (before any filter), as dictionary
    # encoding numbers them; sequences are ordered by (user, domain) in that order.
    q("CREATE TABLE u AS SELECT user, (row_number() OVER (ORDER BY first) - 1)::BIGINT AS ucode "
      "FROM (SELECT user, min(row) AS first FROM rows GROUP BY user)")
    q("CREATE TABLE i AS SELECT item, (row_number() OVER (ORDER BY first) - 1)::BIGINT AS icode "
      "FROM (SELECT item, min(row) AS first FROM rows GROUP BY item)")
    dom_names, n_dom = sp.dom_names, len(sp.dom_names)
    con.register("dom_table", pa.table({"dom": pa.array(dom_names, pa.string()),
                                        "dcode": pa.array(np.arange(n_dom, dtype=np.int32))}))
    q("CREATE TABLE d AS SELECT * FROM dom_table")
    con.unregister("dom_table")
    wanted = ["TRUE"]
    if opts.domains:
        unknown = [x for x in opts.domains if x not in dom_names]
        if unknown:
            raise InputError(f"domain(s) {unknown} have no interactions; present: {dom_names}", field="--domains")
        wanted.append(f"d.dcode IN ({', '.join(str(dom_names.index(x)) for x in opts.domains)})")
    if opts.until is not None:
        wanted.append(f"r.ts <= {float(opts.until)!r}")
    q(f"CREATE TABLE e AS SELECT r.row, u.ucode * {n_dom} + d.dcode AS seq, i.icode, r.ts, d.dcode, r.src, "
      f"({' AND '.join(wanted)}) AS wanted FROM rows r JOIN u USING (user) JOIN i USING (item) JOIN d USING (dom)")
    q(f"DROP {'VIEW' if opts.duplicates == 'keep' else 'TABLE'} rows")
    if opts.min_user_interactions > 1 or opts.min_item_interactions > 1:
        _kcore(con, opts.min_user_interactions, opts.min_item_interactions)
        q("CREATE VIEW f AS SELECT e.* FROM e SEMI JOIN k USING (row) WHERE wanted")
    else:
        q("CREATE VIEW f AS SELECT * FROM e WHERE wanted")
    n_kept = int(one(con, "SELECT count(*) FROM f")[0])
    if n_kept == 0:
        if opts.until is not None and not one(con, f"SELECT count(*) FROM e WHERE ts <= {float(opts.until)!r}")[0]:
            first = float(one(con, "SELECT min(ts) FROM e")[0])
            raise InputError(f"no interaction is at or before {opts.until:g} (the log starts at {first:g})",
                             field="--until")
        raise InputError("no interactions left after filtering (check --min-user/--min-item and --domains)",
                         field="--min-user" if opts.min_user_interactions > 1 else "--min-item")

    # The vocabulary: items that survived, in first-seen order (or after a base's items, vocab_from).
    used = _table(con, "SELECT icode, item FROM (SELECT DISTINCT icode FROM f) JOIN i USING (icode) ORDER BY icode")
    used_icode = used["icode"].to_numpy()
    used_ids = pc.cast(used["item"], pa.string()).combine_chunks()
    if opts.vocab_from is None:
        index = np.arange(1, len(used_icode) + 1, dtype=np.int64)
        vocab_ids = used_ids
        extension = None
    else:
        used_list = used_ids.to_pylist()
        known = {item_id: k + 1 for k, item_id in enumerate(opts.vocab_from)}
        new_ids = [x for x in used_list if x not in known]
        known.update({item_id: len(opts.vocab_from) + 1 + k for k, item_id in enumerate(new_ids)})
        index = np.array([known[x] for x in used_list], dtype=np.int64)
        vocab_ids = pa.array(list(opts.vocab_from) + new_ids, pa.string())
        extension = {"base_items": len(opts.vocab_from), "new_items": len(new_ids),
                     "base_items_in_log": len(used_list) - len(new_ids)}
    del used
    con.register("vocab_table", pa.table({"icode": used_icode, "idx": index.astype(np.int32)}))
    q("CREATE TABLE v AS SELECT * FROM vocab_table")
    con.unregister("vocab_table")
    vocab = pa.table({"item_id": vocab_ids})
    num_items = vocab.num_rows

    # Split points, per sequence.
    split_info, cuts = {"split": "loo"}, ""
    if opts.split == "temporal":
        t_valid, t_test = _temporal_cuts(con, opts, n_kept)
        split_info = {"split": "temporal", "valid_time": t_valid, "test_time": t_test}
        cuts = f", count(*) FILTER (WHERE ts < {t_valid!r}) AS te, count(*) FILTER (WHERE ts < {t_test!r}) AS ve"
    elif opts.split != "loo":
        raise InputError(f"unknown split {opts.split!r}; use 'loo' or 'temporal'", field="--split")
    seqs = _table(con, f"SELECT s.*, u.user FROM (SELECT seq, count(*) AS len{cuts} FROM f GROUP BY seq) s "
                    f"JOIN u ON u.ucode = s.seq // {n_dom} ORDER BY s.seq")
    lengths = seqs["len"].to_numpy().astype(np.int64)
    seq_key = seqs["seq"].to_numpy()
    seq_dom = (seq_key % n_dom).astype(np.int64)
    if opts.split == "loo":
        evaluable = lengths >= 3
        train_end = np.where(evaluable, lengths - 2, lengths).astype(np.int32)
        valid_end = np.where(evaluable, lengths - 1, lengths).astype(np.int32)
    else:
        train_end, valid_end = seqs["te"].to_numpy().astype(np.int32), seqs["ve"].to_numpy().astype(np.int32)
        _check_temporal(lengths, train_end, valid_end, split_info)
    user_ids = pc.cast(seqs["user"], pa.string()).combine_chunks()
    del seqs
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)

    present = sorted(set(np.unique(seq_dom).tolist()))
    dom_shared, dom_total = _sharing(con, "dcode", n_dom)
    dom_users = np.bincount(seq_dom, minlength=n_dom)
    dom_inter = np.bincount(seq_dom, weights=lengths, minlength=n_dom).astype(np.int64)
    per_source = sp.per_source
    stats = {
        "users": int(len(np.unique(seq_key // n_dom))),
        "items": int(len(used_icode)),
        "interactions": n_kept,
        "sequences": int(len(lengths)),
        "domains": {dom_names[x]: {"users": int(dom_users[x]), "interactions": int(dom_inter[x]),
                                   "items": int(dom_total[x]), "shared_items": int(dom_shared[x]),
                                   "private_items": int(dom_total[x] - dom_shared[x])} for x in present},
        "evaluable_sequences": int((valid_end > train_end).sum()),
        "skipped_bad_rows": int(sum(c.skipped for c in per_source)),
        "filtered_out_interactions": int(n_read - n_kept),
        "input_rules": {"stripped_whitespace_ids": sum(int(c.notes.get("stripped_whitespace_ids", 0)) for c in per_source),
                        "duplicate_rows": sum(int(c.notes.get("duplicate_rows", 0)) for c in per_source),
                        "duplicates": opts.duplicates},
    }
    if extension is not None:
        stats["vocab_from"] = extension
    if len(sources) > 1:
        src_shared, src_total = _sharing(con, "src", len(sources))
        inter = dict(q("SELECT src, count(*) FROM f GROUP BY src").fetchall())
        stats["sources"] = {s.name: {"input": s.path, "format": s.format, "interactions": int(inter.get(k, 0)),
                                     "items": int(src_total[k]), "shared_items": int(src_shared[k]),
                                     "private_items": int(src_total[k] - src_shared[k])} for k, s in enumerate(sources)}
    log(f"relations in {time.perf_counter() - t0:.1f}s (DuckDB)")
    code = np.full(n_dom, -1, dtype=np.int64)
    code[present] = np.arange(len(present))
    dom_arr = pa.array(dom_names, pa.string()).take(pa.array(seq_dom))

    def write(folder: Path) -> None:
        t1 = time.perf_counter()
        _write_sequences(con, folder, work, offsets, user_ids, dom_arr, train_end, valid_end, num_items)
        datasets.Dataset(vocab).save_to_disk(str(folder / "items"))
        write_arrays(folder / ARRAYS, offsets, None, train_end, valid_end, code[seq_dom], num_items)
        log(f"wrote the sequences in {time.perf_counter() - t1:.1f}s")

    return Built(stats=stats, split_info=split_info, num_items=int(num_items), domains=[dom_names[x] for x in present],
                 vocab_hash=vocab_hash(vocab["item_id"].to_pylist()), rows_read=sp.rows, write=write, close=close)


def _refuse_duplicates(con, sp: _Spilled, keys: str, sources) -> None:
    """``--duplicates error``: the first repeated row in file order, named by file:line with the line it repeats."""
    q = con.sql     # runs a statement now; a query returns a relation to fetch (to its end)
    on = " AND ".join(f"r.{c} IS NOT DISTINCT FROM g.{c}" for c in keys.split(", "))
    q(f"CREATE TEMP TABLE dup_groups AS SELECT {keys}, min(row) AS first, count(*) AS c FROM raw GROUP BY {keys} "
      "HAVING count(*) > 1")
    hit = q(f"SELECT r.src, r.prow, g.first FROM raw r JOIN dup_groups g ON {on} WHERE r.row > g.first "
            "ORDER BY r.row LIMIT 1").fetchall()
    if not hit:
        return
    k, prow, first = (int(x) for x in hit[0])
    first_prow = int(one(con, f"SELECT prow FROM raw WHERE row = {first}")[0])
    n = int(one(con, f"SELECT sum(c - 1) FROM dup_groups WHERE src = {k}")[0])
    chunked = sp.per_source[k]
    raise InputError(f"{n} exact duplicate row(s); this one repeats {chunked.path}:{chunked.line(first_prow)} "
                     "(choose --duplicates drop or keep)", path=str(chunked.path), line=chunked.line(prow),
                     field="--duplicates")


def _kcore(con, min_u: int, min_i: int) -> None:
    """Repeated item / user-sequence minimum counts until nothing changes, over every row (the domain
    and time filters apply after it, as in the in-memory path). Leaves the surviving rows in ``k``."""
    q = con.sql     # runs a statement now; a query returns a relation to fetch (to its end)
    q("CREATE TABLE k AS SELECT row, seq, icode FROM e")
    before = int(one(con, "SELECT count(*) FROM k")[0])
    while True:
        if min_i > 1:
            q("CREATE OR REPLACE TABLE k AS SELECT * FROM k WHERE icode IN "
              f"(SELECT icode FROM k GROUP BY icode HAVING count(*) >= {int(min_i)})")
        if min_u > 1:
            q("CREATE OR REPLACE TABLE k AS SELECT * FROM k WHERE seq IN "
              f"(SELECT seq FROM k GROUP BY seq HAVING count(*) >= {int(min_u)})")
        after = int(one(con, "SELECT count(*) FROM k")[0])
        if after == before:
            return
        before = after


def _temporal_cuts(con, opts, n: int) -> tuple[float, float]:
    """The valid and test times, as ``np.quantile`` (linear) over the kept times computes them."""
    lo, hi = (float(x) for x in one(con, "SELECT min(ts), max(ts) FROM f"))

    def cut(v, flag):
        if not math.isfinite(v) or v < 0:
            raise InputError(f"must be a quantile in [0, 1] or a time inside the data ({lo:g}..{hi:g}), got {v}",
                             field=flag)
        if v <= 1:
            virtual = np.float64(v) * (n - 1)
            j = int(np.floor(virtual))
            pair = [float(x[0]) for x in con.sql(f"SELECT ts FROM f ORDER BY ts LIMIT 2 OFFSET {j}").fetchall()]
            pair = pair + pair[-1:] if len(pair) == 1 else pair
            # np.quantile of two values at the same fractional position is the same interpolation.
            return float(np.quantile(np.array(pair), float(virtual - j)))
        if v <= lo:
            raise InputError(f"time {v:g} is before every interaction (the data spans {lo:g}..{hi:g})", field=flag)
        if v > hi:
            raise InputError(f"time {v:g} is after every interaction (the data spans {lo:g}..{hi:g})", field=flag)
        return float(v)
    t_valid, t_test = cut(opts.temporal_valid, "--temporal-valid"), cut(opts.temporal_test, "--temporal-test")
    if t_test < t_valid:
        raise InputError("temporal test cut is before the valid cut", field="--temporal-test")
    return t_valid, t_test


def _check_temporal(lengths, train_end, valid_end, info) -> None:
    t_valid, t_test = info["valid_time"], info["test_time"]
    if not ((valid_end > train_end) & (train_end >= 1)).any():
        raise InputError(f"no user has history before {t_valid:g} and an interaction between the cuts: "
                         "no validation targets", field="--temporal-valid")
    if not ((lengths > valid_end) & (valid_end >= 1)).any():
        raise InputError(f"no user has history before {t_test:g} and an interaction after it: no test targets",
                         field="--temporal-test")


def _sharing(con, group: str, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group: distinct items also in another group (shared), and all its distinct items."""
    rows = con.sql(f"WITH p AS (SELECT DISTINCT icode, {group} AS g FROM f), "
                       "c AS (SELECT icode, count(*) AS n FROM p GROUP BY icode) "
                       "SELECT g, count(*), count(*) FILTER (WHERE n > 1) FROM p JOIN c USING (icode) GROUP BY g"
                       ).fetchall()
    shared, total = np.zeros(n_groups, dtype=np.int64), np.zeros(n_groups, dtype=np.int64)
    for g, t, s in rows:
        total[g], shared[g] = t, s
    return shared, total


# Sequences per ``sequences`` record batch written (the in-memory path's Arrow table is one batch; the
# dataset's rows and columns are the same either way).
_ROWS_PER_WRITE = 50_000


def _write_sequences(con, folder: Path, work: Path, offsets, user_ids, dom_arr, train_end, valid_end,
                     num_items: int) -> None:
    """Stage 3: every kept interaction once, in (sequence, time, file order) order, into
    ``arrays/items.npy`` (a memory map) and the ``sequences`` dataset (batches of whole sequences)."""
    total = int(offsets[-1])
    (folder / ARRAYS).mkdir(parents=True, exist_ok=True)
    items_out = np.lib.format.open_memmap(folder / ARRAYS / "items.npy", mode="w+", dtype=item_dtype(num_items),
                                          shape=(total,))
    schema = pa.schema([("user_id", pa.string()), ("domain", pa.string()), ("item_ids", pa.list_(pa.int32())),
                        ("timestamps", pa.list_(pa.float64())), ("train_end", pa.int32()), ("valid_end", pa.int32())])
    staged = work / "sequences.arrow"
    writer = ArrowWriter(schema=schema, path=str(staged))
    reader = _batches(con, "SELECT v.idx, f.ts FROM f JOIN v USING (icode) ORDER BY f.seq, f.ts, f.row", 1 << 20)
    buf_items, buf_ts = [], []
    done_rows, next_seq, n_seq = 0, 0, len(offsets) - 1      # rows written to the dataset; first sequence not written
    pos = 0
    for batch in reader:
        idx = batch.column(0).to_numpy()
        items_out[pos:pos + len(idx)] = idx
        pos += len(idx)
        buf_items.append(idx.astype(np.int32, copy=False))
        buf_ts.append(batch.column(1).to_numpy())
        # Whole sequences now buffered: those ending at or before ``pos``.
        last = int(np.searchsorted(offsets, pos, side="right")) - 1
        while next_seq < last:
            stop = min(last, next_seq + _ROWS_PER_WRITE)
            next_seq, done_rows, buf_items, buf_ts = _emit(writer, offsets, next_seq, stop, done_rows, buf_items,
                                                           buf_ts, user_ids, dom_arr, train_end, valid_end)
    while next_seq < n_seq:
        stop = min(n_seq, next_seq + _ROWS_PER_WRITE)
        next_seq, done_rows, buf_items, buf_ts = _emit(writer, offsets, next_seq, stop, done_rows, buf_items,
                                                       buf_ts, user_ids, dom_arr, train_end, valid_end)
    if pos != total:
        raise RuntimeError(f"out-of-core prepare streamed {pos} interactions, expected {total}")
    writer.finalize()
    writer.close()
    items_out.flush()
    del items_out
    staged_ds = datasets.Dataset.from_file(str(staged))
    staged_ds.save_to_disk(str(folder / "sequences"))
    del staged_ds
    staged.unlink()


def _emit(writer, offsets, lo: int, hi: int, done_rows: int, buf_items, buf_ts, user_ids, dom_arr, train_end,
          valid_end):
    """Write sequences ``lo..hi-1`` (all buffered) and keep what follows them in the buffer."""
    items = np.concatenate(buf_items) if len(buf_items) != 1 else buf_items[0]
    ts = np.concatenate(buf_ts) if len(buf_ts) != 1 else buf_ts[0]
    n = int(offsets[hi] - done_rows)
    local = pa.array((offsets[lo:hi + 1] - done_rows).astype(np.int32))
    writer.write_table(pa.table({
        "user_id": user_ids.slice(lo, hi - lo), "domain": dom_arr.slice(lo, hi - lo),
        "item_ids": pa.ListArray.from_arrays(local, pa.array(items[:n], pa.int32())),
        "timestamps": pa.ListArray.from_arrays(local, pa.array(ts[:n], pa.float64())),
        "train_end": pa.array(train_end[lo:hi], pa.int32()), "valid_end": pa.array(valid_end[lo:hi], pa.int32()),
    }))
    return hi, int(offsets[hi]), [items[n:]], [ts[n:]]

