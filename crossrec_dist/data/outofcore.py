"""``crossrec prepare`` for logs bigger than memory: the same dataset, built on DuckDB.

The in-memory path (``prepare.py``) holds every interaction as numpy arrays at once, ~120 B each at its
peak: 1e8 interactions need 12.5 GiB. This path keeps memory bounded by DuckDB's ``memory_limit`` and the
size of one piece of input, not by the log, in three steps that can run in one process or across nodes
(``slurm/prepare.sbatch``), sharing one work folder:

1. **plan** (one process):
   a. *read in pieces* (``readers.ChunkedLog``): each input is parsed in blocks of ``block_size`` bytes
      through the very same row rules (ids, times, bad rows named by file:line) and domain rules, and
      each piece is spilled to Parquet: (row in file order, source, user, item, time, domain);
   b. *relations on DuckDB* (out-of-core hash aggregates, joins and sorts that spill to its
      ``temp_directory``): exact duplicates, first-seen user and item order, the k-core filter, the item
      vocabulary, per-sequence lengths and split points, the sharing counts, and each user's partition
      (CRC-32 of the user id modulo ``parts``).
2. **part** (one per partition, side by side on any nodes that share the work folder): the partition's
   interactions sorted by (sequence, time, file order), read from the plan's database read-only.
3. **finish** (one process): the parts scattered into the global order (``arrays/items.npy``, a memory
   map), then the ``sequences`` dataset written batch by batch with ``datasets``' ``ArrowWriter``.

The output equals the in-memory path's, field by field, for any number of parts
(tests/test_prepare_out_of_core.py; across two Slurm nodes: tests/test_slurm.py): the same vocabulary in
first-seen order, chronological sequences whose equal times keep file order, the same splits and
stats.json. Only per-sequence arrays (one entry per user and domain) are ever held in numpy.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
import datasets
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.arrow_writer import ArrowWriter

from ..errors import InputError
from .domains import assign_domains
from .prepared import ARRAYS, SEQ_SHARD, SHARDS, item_dtype, shard_file, write_arrays
from .readers import ChunkedLog
from .sources import SOURCE_RULE, check_domain_names, report_rules
from .times import TimeRule
from .vocabulary import vocab_hash

ENGINES = ("auto", "memory", "duckdb")
STEPS = ("all", "plan", "part", "finish")
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
    # Across processes or nodes (slurm/prepare.sbatch): "plan" reads the inputs into work_dir, "part"
    # (one per user partition, side by side) sorts one partition, "finish" writes the dataset; "all"
    # runs the three in this process. The result is the same for any number of parts.
    step: str = "all"
    parts: int = 1
    part: int | None = None

    def check(self) -> "EngineSettings":
        if self.engine not in ENGINES:
            raise InputError(f"must be one of {', '.join(ENGINES)}, not {self.engine!r}", field="--engine")
        if self.step not in STEPS:
            raise InputError(f"must be one of {', '.join(STEPS)}, not {self.step!r}", field="--step")
        if self.parts < 1:
            raise InputError(f"must be >= 1, got {self.parts}", field="--parts")
        if self.engine == "memory" and self.parts > 1:
            raise InputError("--parts splits the duckdb engine's work; drop --engine memory", field="--parts")
        if self.step != "all":
            if self.engine == "memory":
                raise InputError(f"--step {self.step} is a step of the duckdb engine; drop --engine memory",
                                 field="--step")
            if not self.work_dir:
                raise InputError(f"--step {self.step} needs --work-dir: the folder the steps share", field="--work-dir")
        if (self.step == "part") != (self.part is not None):
            raise InputError("--part I goes with --step part (and only there)", field="--part")
        if self.block_size < 1 << 16:
            raise InputError(f"must be at least 65536 bytes, got {self.block_size}", field="--block-size")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"must be >= 1, got {self.threads}", field="--threads")
        return self


def choose_engine(settings: EngineSettings, paths: list[str]) -> str:
    if settings.step != "all" or settings.parts > 1:
        return "duckdb"
    if settings.engine != "auto":
        return settings.engine
    size = 0
    for p in map(Path, paths):
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p] if p.is_file() else []
        size += sum(f.stat().st_size * (4 if f.name.lower().endswith(".gz") else 1) for f in files)
    return "duckdb" if size >= AUTO_BYTES else "memory"


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


@contextlib.contextmanager
def _out_of_memory(settings: EngineSettings):
    """DuckDB's out-of-memory error as the user's to act on (exit 2), not a traceback."""
    try:
        yield
    except duckdb.OutOfMemoryException as e:
        first = str(e).splitlines()[0]
        raise InputError(f"DuckDB ran out of memory at --memory-limit {settings.memory_limit} ({first}); give it "
                         "more if the machine has it, or fewer --threads (each thread holds its own part of a "
                         "large aggregate)", field="--memory-limit") from None


@contextlib.contextmanager
def disk_full(*folders: Path):
    """A write that failed for lack of disk (an OSError, or DuckDB's IO error) as the user's to act on
    (exit 2, naming the folders and what is free there), not a traceback: numpy's ``tofile`` says only
    "122880 requested and 98304 written", so the free space decides. At 1e9 interactions the work
    folder holds ~30 GB of database, the sorted parts and DuckDB's sort spill at once."""
    try:
        yield
    except (OSError, duckdb.IOException) as e:
        free = {}
        for f in folders:
            probe = next((p for p in (f, *f.parents) if p.exists()), None)
            if probe is not None:
                free[str(f)] = shutil.disk_usage(probe).free
        if not ("No space left" in str(e) or (free and min(free.values()) < 1 << 30)):
            raise
        where = ", ".join(f"{k} ({v / 2**30:.1f} GiB free)" for k, v in free.items())
        raise InputError(f"the disk is full: {where}. Give --work-dir (the database, the parts and DuckDB's "
                         "sort spill: ~50-60 B per interaction at its peak, more with one part) a folder on a "
                         "larger disk, split the sort with --parts N (each part sorts only its users), or run "
                         "the steps as a job array (--step plan|part|finish) with --work-dir on shared storage",
                         field="--work-dir") from None


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _connect(work: Path, settings: EngineSettings, read_only: bool = False,
             temp: Path | None = None) -> duckdb.DuckDBPyConnection:
    try:
        con = duckdb.connect(str(work / DB), read_only=read_only)
    except duckdb.Error as e:
        raise InputError(f"cannot open the plan's database: {e}", path=str(work / DB), field="--work-dir") from None
    threads = settings.threads or max(1, len(os.sched_getaffinity(0)))
    try:
        con.execute(f"SET memory_limit = {_sql_str(settings.memory_limit)}")
    except duckdb.Error as e:
        con.close()
        raise InputError(f"not a memory size DuckDB reads (e.g. 3GB, 500MB): {e}", field="--memory-limit") from None
    con.execute(f"SET temp_directory = {_sql_str(str(temp or work / 'duckdb-temp'))}")
    con.execute(f"SET threads = {int(threads)}")
    con.execute("SET preserve_insertion_order = false")     # every result that needs an order says ORDER BY
    return con


PLAN = "plan.json"
DB = "prepare.duckdb"


def part_of_users(user_ids: pa.Array, parts: int) -> np.ndarray:
    """The user partition of each sequence: CRC-32 of the user id (UTF-8) modulo ``parts``. Every
    sequence of a user (one per domain) lands in the same partition; stable across runs and machines."""
    if parts == 1:
        return np.zeros(len(user_ids), dtype=np.int32)
    return np.fromiter((zlib.crc32(u.encode("utf-8", "surrogatepass")) % parts for u in user_ids.to_pylist()),
                       dtype=np.int32, count=len(user_ids))


def plan(sources, opts, settings: EngineSettings, work: Path, parts: int, fingerprint: str, log=print) -> dict:
    """Step 1 of 3: read every input (stages 1 and 2 above) and leave in ``work`` what the parts and the
    finish need: the DuckDB database (the kept rows, the vocabulary index, each sequence's partition),
    the per-sequence arrays, the vocabulary, the counts (``plan.json``)."""
    t0 = time.perf_counter()
    if (work / PLAN).exists():
        raise InputError("already holds a plan; use a new --work-dir (or remove this one)", path=str(work),
                         field="--work-dir")
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the work folder: {e.strerror or e}", path=str(work), field="--work-dir") from None
    spilled = _spill(sources, opts, settings, work / "rows", log)
    pa.default_memory_pool().release_unused()    # the pieces' buffers: ~1.3 GB kept by the allocator at 1e8 rows
    con = _connect(work, settings)
    try:
        with _out_of_memory(settings):
            record = _relational(con, spilled, sources, opts, work, parts, log)
        con.execute("DROP VIEW raw")
    finally:
        con.close()
    shutil.rmtree(work / "rows", ignore_errors=True)
    record.update({"parts": parts, "shards": opts.shards, "fingerprint": fingerprint, "rows_read": spilled.rows,
                   "plan_seconds": round(time.perf_counter() - t0, 3)})
    (work / PLAN).write_text(json.dumps(record, indent=1, allow_nan=False))
    return record


def read_plan(work: Path, fingerprint: str) -> dict:
    """The plan in ``work``, checked against this command's inputs and options."""
    try:
        record = json.loads((work / PLAN).read_text())
    except (OSError, ValueError):
        raise InputError("holds no plan: run `crossrec prepare --step plan` with this --work-dir first",
                         path=str(work), field="--work-dir") from None
    if record.get("fingerprint") != fingerprint:
        raise InputError("its plan was made from other inputs or options than this command's; give the plan's "
                         "exact arguments to every step", path=str(work), field="--work-dir")
    return record


def _part_files(work: Path, part: int) -> tuple[Path, Path, Path]:
    """A part's item indices (a ``.npy``: with ``--shards`` it becomes the shard's file) and times (raw
    float64), both appended to, never memory-mapped (mapped pages would count in the process's
    memory), and its completion record."""
    stem = work / "parts" / f"part-{part:05d}"
    return stem.with_suffix(".items.npy"), stem.with_suffix(".ts.bin"), stem.with_suffix(".done.json")


def run_part(work: Path, part: int, settings: EngineSettings, record: dict, log=print) -> None:
    """Step 2 (one task of a job array per partition): the partition's interactions in (sequence, time,
    file order) order, as two arrays in ``work/parts/``. Reads the plan's database read-only, so the
    parts run side by side on any nodes that share ``work``."""
    parts = record["parts"]
    if not 0 <= part < parts:
        raise InputError(f"the plan has {parts} part(s): 0..{parts - 1}, not {part}", field="--part")
    t0 = time.perf_counter()
    seq_part = np.load(work / "seq_part.npy")
    lengths = np.diff(np.load(work / "offsets.npy"))
    rows = int(lengths[seq_part == part].sum())
    items_path, ts_path, done = _part_files(work, part)
    items_path.parent.mkdir(exist_ok=True)
    done.unlink(missing_ok=True)
    temp = work / f"duckdb-temp-part-{part}"
    dtype = np.dtype(item_dtype(record["num_items"]))
    con = _connect(work, settings, read_only=True, temp=temp)
    pos = 0
    try:
        where = f"WHERE sq.part = {int(part)}" if parts > 1 else ""
        with open(items_path, "wb") as fi, open(ts_path, "wb") as ft, _out_of_memory(settings):
            np.lib.format.write_array_header_1_0(fi, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": (rows,)})
            for batch in _batches(con, "SELECT v.idx, f.ts FROM f JOIN v USING (icode) JOIN sq USING (seq) "
                                       f"{where} ORDER BY f.seq, f.ts, f.row", 1 << 20):
                batch.column(0).to_numpy().astype(dtype, copy=False).tofile(fi)      # native order, as np.save
                batch.column(1).to_numpy().astype("<f8", copy=False).tofile(ft)
                pos += batch.num_rows
    finally:
        con.close()
        shutil.rmtree(temp, ignore_errors=True)
    if pos != rows:
        raise RuntimeError(f"part {part} streamed {pos} interactions, the plan counted {rows}")
    done.write_text(json.dumps({"part": part, "rows": rows, "seconds": round(time.perf_counter() - t0, 3)}))
    log(f"part {part} of {parts}: {rows:,} interactions in {time.perf_counter() - t0:.1f}s")


def part_seconds(work: Path, parts: int) -> list[float]:
    return [json.loads(_part_files(work, k)[2].read_text())["seconds"] for k in range(parts)]


# Sequences per block of the finish step (and per record batch of the ``sequences`` dataset).
_SEQS_PER_BLOCK = 50_000
# Bytes of Arrow data per file of the ``sequences`` dataset (datasets' own default shard size).
_SHARD_BYTES = 500 << 20
SEQUENCES_SCHEMA = pa.schema([("user_id", pa.string()), ("domain", pa.string()), ("item_ids", pa.list_(pa.int32())),
                              ("timestamps", pa.list_(pa.float64())), ("train_end", pa.int32()),
                              ("valid_end", pa.int32())])


def finish(work: Path, folder: Path, record: dict, log=print) -> None:
    """Step 3: one pass over the sequences in their global order, a block at a time: each part holds
    its share of a block as one contiguous run (a part's sequences keep the global order), so a block is
    a read from each part, written on to ``arrays/items.npy`` and the ``sequences`` dataset. Plain file
    reads and writes: nothing grows with the log but the per-sequence arrays."""
    t0 = time.perf_counter()
    parts = record["parts"]
    missing = [k for k in range(parts) if not _part_files(work, k)[2].is_file()]
    if missing:
        raise InputError(f"part(s) {missing[:10]} of {parts} have not finished (run `--step part --part I` for "
                         "each, e.g. as a job array)", path=str(work), field="--work-dir")
    offsets = np.load(work / "offsets.npy")
    seq_part = np.load(work / "seq_part.npy")
    train_end, valid_end = np.load(work / "train_end.npy"), np.load(work / "valid_end.npy")
    users = pq.read_table(work / "sequences.parquet")
    user_ids, dom_arr = users["user_id"].combine_chunks(), users["domain"].combine_chunks()
    del users
    lengths = np.diff(offsets)
    n_seq, total = len(lengths), int(offsets[-1])
    dtype = np.dtype(item_dtype(record["num_items"]))
    readers = []
    for k in range(parts):
        fi = open(_part_files(work, k)[0], "rb")
        np.lib.format.read_magic(fi)              # written by run_part as format 1.0
        np.lib.format.read_array_header_1_0(fi)
        readers.append((fi, open(_part_files(work, k)[1], "rb")))
    sharded = bool(record.get("shards"))
    (folder / ARRAYS).mkdir(parents=True)
    seq_folder = folder / "sequences"
    seq_folder.mkdir()
    shards: list[Path] = []
    writer, shard_bytes = None, 0
    try:
        # Sharded: the parts' files are the shards, and there is no items.npy of the whole log.
        with open(os.devnull if sharded else folder / ARRAYS / "items.npy", "wb") as items_out:
            if not sharded:
                np.lib.format.write_array_header_1_0(items_out, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                                 "fortran_order": False, "shape": (total,)})
            for lo in range(0, max(n_seq, 1), _SEQS_PER_BLOCK):
                hi = min(n_seq, lo + _SEQS_PER_BLOCK)
                a, b = int(offsets[lo]), int(offsets[hi])
                items, ts = np.empty(b - a, dtype=dtype), np.empty(b - a, dtype=np.float64)
                part_of = seq_part[lo:hi]
                row_part = np.repeat(part_of, lengths[lo:hi])
                for k in np.unique(part_of):
                    mine = row_part == k
                    n = int(mine.sum())
                    fi, ft = readers[k]
                    items[mine] = np.fromfile(fi, dtype=dtype, count=n)
                    ts[mine] = np.fromfile(ft, dtype="<f8", count=n)
                if not sharded:
                    items.tofile(items_out)
                if writer is None:
                    shards.append(seq_folder / f"shard-{len(shards):05d}.arrow")
                    writer = ArrowWriter(schema=SEQUENCES_SCHEMA, path=str(shards[-1]))
                local = pa.array((offsets[lo:hi + 1] - a).astype(np.int32))
                table = pa.table({
                    "user_id": user_ids.slice(lo, hi - lo), "domain": dom_arr.slice(lo, hi - lo),
                    "item_ids": pa.ListArray.from_arrays(local, pa.array(items, pa.int32())),
                    "timestamps": pa.ListArray.from_arrays(local, pa.array(ts, pa.float64())),
                    "train_end": pa.array(train_end[lo:hi], pa.int32()),
                    "valid_end": pa.array(valid_end[lo:hi], pa.int32())}, schema=SEQUENCES_SCHEMA)
                writer.write_table(table)
                shard_bytes += table.nbytes
                if shard_bytes >= _SHARD_BYTES or hi == n_seq:
                    writer.finalize()
                    writer.close()
                    writer, shard_bytes = None, 0
    finally:
        unread = [fi.tell() != os.fstat(fi.fileno()).st_size for fi, _ in readers]
        for fi, ft in readers:
            fi.close()
            ft.close()
        if writer is not None:
            writer.close()
    if any(unread):
        raise RuntimeError("not every row of the parts was placed: the parts do not match the plan")
    _save_layout(seq_folder, shards, fingerprint=f"{record['vocab_hash']}:{n_seq}:{total}")
    if sharded:
        (folder / ARRAYS / SHARDS).mkdir()
        for k in range(parts):
            os.replace(_part_files(work, k)[0], shard_file(folder / ARRAYS, k, parts))
        np.save(folder / ARRAYS / f"{SEQ_SHARD}.npy", seq_part, allow_pickle=False)
    datasets.Dataset(pq.read_table(work / "vocab.parquet")).save_to_disk(str(folder / "items"))
    write_arrays(folder / ARRAYS, offsets, None, train_end, valid_end, np.load(work / "seq_domain.npy"),
                 record["num_items"])
    log(f"wrote the dataset in {time.perf_counter() - t0:.1f}s")


def _save_layout(folder: Path, shards: list[Path], fingerprint: str) -> None:
    """Make ``folder``'s Arrow files (written by ``datasets``' ArrowWriter) a ``save_to_disk`` folder:
    ``datasets`` writes the metadata files itself (from an empty dataset of the same features), and only
    the list of data files is ours. Writing the rows through ``Dataset.save_to_disk`` would read them
    back through a memory map, whose pages count in the process's memory (~12 bytes per interaction)."""
    meta = folder.parent / f".{folder.name}.meta"
    datasets.Dataset(SEQUENCES_SCHEMA.empty_table()).save_to_disk(str(meta))
    os.replace(meta / "dataset_info.json", folder / "dataset_info.json")
    state = json.loads((meta / "state.json").read_text())
    names = [f"data-{k:05d}-of-{len(shards):05d}.arrow" for k in range(len(shards))]
    for shard, name in zip(shards, names):
        os.replace(shard, folder / name)
    state["_data_files"] = [{"filename": name} for name in names]
    state["_fingerprint"] = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    shutil.rmtree(meta)


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


def _relational(con, sp: _Spilled, sources, opts, work: Path, parts: int, log) -> dict:
    """Stage 2: the dataset's relations on DuckDB. Leaves the per-sequence arrays, the vocabulary and
    the sequence -> partition table in ``work``; returns the counts (the plan's record)."""
    t0 = time.perf_counter()
    q = con.sql     # runs a statement now; a query returns a relation to fetch (to its end)
    q(f"CREATE VIEW raw AS SELECT * FROM read_parquet({_sql_str(str(work / 'rows' / '*.parquet'))})")
    # Text ids become integers first: the first-seen order of users and items over every row read (a
    # repeat never comes before the row it repeats, so duplicates do not change it), numbered as
    # dictionary encoding numbers them; sequences are ordered by (user, domain) in that order. Every
    # big operation after this one works on fixed-width keys (a hash aggregate over 2.5e8 rows of text
    # keys ran out of memory at a 3 GB limit; on integers it spills).
    q("CREATE TABLE u AS SELECT user, (row_number() OVER (ORDER BY first) - 1)::BIGINT AS ucode "
      "FROM (SELECT user, min(row) AS first FROM raw GROUP BY user)")
    q("CREATE TABLE i AS SELECT item, (row_number() OVER (ORDER BY first) - 1)::BIGINT AS icode "
      "FROM (SELECT item, min(row) AS first FROM raw GROUP BY item)")
    dom_names, n_dom = sp.dom_names, len(sp.dom_names)
    con.register("dom_table", pa.table({"dom": pa.array(dom_names, pa.string()),
                                        "dcode": pa.array(np.arange(n_dom, dtype=np.int32))}))
    q("CREATE TABLE d AS SELECT * FROM dom_table")
    con.unregister("dom_table")
    dcol, dcol_join = "", ""
    if sp.has_dcol:     # the domain column's own value is part of a duplicate's key (a rule may ignore it)
        q("CREATE TABLE dc AS SELECT dcol, (row_number() OVER (ORDER BY dcol) - 1)::INTEGER AS ccode "
          "FROM (SELECT DISTINCT dcol FROM raw)")
        dcol, dcol_join = ", dc.ccode", " JOIN dc USING (dcol)"
    prow = ", raw.prow" if opts.duplicates == "error" else ""
    q(f"CREATE TABLE coded AS SELECT raw.row, raw.src, u.ucode, i.icode, raw.ts, d.dcode{dcol}{prow} FROM raw "
      f"JOIN u USING (user) JOIN i USING (item) JOIN d USING (dom){dcol_join}")
    keys = "src, ucode, icode, ts, dcode" + (", ccode" if sp.has_dcol else "")
    dup_per_source = [0] * len(sources)
    if opts.duplicates == "keep":
        q("CREATE VIEW rows AS SELECT row, src, ucode, icode, ts, dcode FROM coded")
        # Counted as the in-memory path counts them (per source), though they stay.
        counted = dict(q(f"SELECT src, sum(c - 1) FROM (SELECT {keys}, count(*) AS c FROM coded GROUP BY {keys}) "
                         "GROUP BY src").fetchall())
        dup_per_source = [int(counted.get(k) or 0) for k in range(len(sources))]
    else:
        if opts.duplicates == "error":
            _refuse_duplicates(con, sp, keys)
        # One row per distinct (source, user, item, time, domain[, domain column]): the first in file order.
        q(f"CREATE TABLE rows AS SELECT min(row) AS row, src, ucode, icode, ts, dcode FROM coded GROUP BY {keys}")
        kept = dict(q("SELECT src, count(*) FROM rows GROUP BY src").fetchall())
        dup_per_source = [sp.rows_per_source[k] - int(kept.get(k, 0)) for k in range(len(sources))]
    n_read = int(one(con, "SELECT count(*) FROM rows")[0])
    for k, n in enumerate(dup_per_source):
        sp.per_source[k].notes["duplicate_rows"] = n
        if n:
            verb = "dropped" if opts.duplicates == "drop" else "kept"
            log(f"{verb} {n} exact duplicate row(s) of {sp.per_source[k].path} (--duplicates {opts.duplicates})")
    wanted = ["TRUE"]
    if opts.domains:
        unknown = [x for x in opts.domains if x not in dom_names]
        if unknown:
            raise InputError(f"domain(s) {unknown} have no interactions; present: {dom_names}", field="--domains")
        wanted.append(f"dcode IN ({', '.join(str(dom_names.index(x)) for x in opts.domains)})")
    if opts.until is not None:
        wanted.append(f"ts <= {float(opts.until)!r}")
    q(f"CREATE TABLE e AS SELECT row, ucode * {n_dom} + dcode AS seq, icode, ts, dcode, src, "
      f"({' AND '.join(wanted)}) AS wanted FROM rows")
    q(f"DROP {'VIEW' if opts.duplicates == 'keep' else 'TABLE'} rows")
    q("DROP TABLE coded")
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
    code = np.full(n_dom, -1, dtype=np.int64)
    code[present] = np.arange(len(present))
    seq_part = part_of_users(user_ids, parts)
    for name, values in (("offsets", offsets), ("train_end", train_end), ("valid_end", valid_end),
                         ("seq_domain", code[seq_dom]), ("seq_part", seq_part)):
        np.save(work / f"{name}.npy", values, allow_pickle=False)
    pq.write_table(pa.table({"user_id": user_ids, "domain": pa.array(dom_names, pa.string()).take(pa.array(seq_dom))}),
                   work / "sequences.parquet")
    pq.write_table(vocab, work / "vocab.parquet")
    con.register("part_table", pa.table({"seq": seq_key, "part": seq_part}))
    q("CREATE TABLE sq AS SELECT * FROM part_table")
    con.unregister("part_table")
    log(f"relations in {time.perf_counter() - t0:.1f}s (DuckDB)")
    return {"stats": stats, "split_info": split_info, "num_items": int(num_items),
            "domains": [dom_names[x] for x in present], "vocab_hash": vocab_hash(vocab["item_id"].to_pylist())}


def _refuse_duplicates(con, sp: _Spilled, keys: str) -> None:
    """``--duplicates error``: the first repeated row in file order, named by file:line with the line it repeats."""
    q = con.sql     # runs a statement now; a query returns a relation to fetch (to its end)
    on = " AND ".join(f"r.{c} = g.{c}" for c in keys.split(", "))
    q(f"CREATE TEMP TABLE dup_groups AS SELECT {keys}, min(row) AS first, count(*) AS c FROM coded GROUP BY {keys} "
      "HAVING count(*) > 1")
    hit = q(f"SELECT r.src, r.prow, g.first FROM coded r JOIN dup_groups g ON {on} WHERE r.row > g.first "
            "ORDER BY r.row LIMIT 1").fetchall()
    if not hit:
        return
    k, prow, first = (int(x) for x in hit[0])
    first_prow = int(one(con, f"SELECT prow FROM coded WHERE row = {first}")[0])
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
