"""``crossrec recommend --input``: the nightly-lists way to deploy, every user's top k to a Parquet file.

Histories stream in chunks (Parquet row groups, CSV blocks, JSON lines), are answered by the same
:class:`~crossrec_dist.serving.engine.ServingEngine` the server runs (so a user gets the answer the
server would give), and the answers stream out. Under ``accelerate launch`` (or torchrun) each process
takes every world-th chunk and writes its own part files; the first process then joins the parts in
input order into ``--out``, written atomically. One output row per input row: ``row`` (the input's row
number), the user column when given, ``region``, ``items``, ``scores``, ``source`` (model | popularity),
``model`` (kind), ``version``, ``dropped`` (history ids the region does not know, left out).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch.distributed as torch_dist
from accelerate import PartialState

from ..errors import InputError
from .engine import NotFound, Query, ServingEngine, engine_from_bundle

FORMATS = ("parquet", "csv", "jsonl")
SCHEMA_FIELDS = [("row", pa.int64()), ("region", pa.string()), ("items", pa.list_(pa.string())),
                 ("scores", pa.list_(pa.float32())), ("source", pa.string()), ("model", pa.string()),
                 ("version", pa.string()), ("dropped", pa.int32())]


def input_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt
    name = path.name.lower()
    for suffix, f in ((".parquet", "parquet"), (".csv", "csv"), (".csv.gz", "csv"), (".jsonl", "jsonl"),
                      (".ndjson", "jsonl")):
        if name.endswith(suffix):
            return f
    raise InputError(f"cannot tell the format from the name; give --format ({', '.join(FORMATS)})", path=str(path),
                     field="--input")


def read_chunks(path: Path, fmt: str, columns: list[str], chunk_rows: int):
    """(first row number, {column: list}) per chunk; a missing column is an error naming the ones there."""
    if not path.is_file():
        raise InputError("no such file", path=str(path), field="--input")
    if fmt == "parquet":
        try:
            pf = pq.ParquetFile(path, pre_buffer=False)     # streamed: see data/readers.py (arrow#39808)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"not a Parquet file: {e}", path=str(path), field="--input") from None
        _check_columns(path, columns, pf.schema_arrow.names)
        start = 0
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield start, batch.to_pydict()
            start += batch.num_rows
    elif fmt == "csv":
        try:
            reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=1 << 22),
                                    convert_options=pacsv.ConvertOptions(
                                        column_types={c: pa.string() for c in columns}))
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"cannot read as CSV: {e}", path=str(path), field="--input") from None
        _check_columns(path, columns, reader.schema.names)
        start = 0
        try:
            for batch in reader:
                yield start, batch.select(columns).to_pydict()
                start += batch.num_rows
        except pa.ArrowInvalid as e:
            raise InputError(f"bad CSV after row {start}: {e}", path=str(path), field="--input") from None
    elif fmt == "jsonl":
        chunk, start = {c: [] for c in columns}, 0
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except ValueError as e:
                    raise InputError(f"not valid JSON: {e}", path=str(path), line=line_no) from None
                if not isinstance(doc, dict):
                    raise InputError("each line must be a JSON object", path=str(path), line=line_no)
                for c in columns:
                    if c not in doc:
                        raise InputError(f"no field {c!r} (fields: {sorted(doc)})", path=str(path), line=line_no,
                                         field=c)
                    chunk[c].append(doc[c])
                if len(chunk[columns[0]]) >= chunk_rows:
                    yield start, chunk
                    start += len(chunk[columns[0]])
                    chunk = {c: [] for c in columns}
        if chunk[columns[0]]:
            yield start, chunk
    else:
        raise InputError(f"must be one of {FORMATS}", field="--format")


def _check_columns(path: Path, want: list[str], have: list[str]) -> None:
    missing = [c for c in want if c not in have]
    if missing:
        raise InputError(f"no column(s) {missing}; the file has {have}", path=str(path), field=missing[0])


def parse_history(value, sep: str, where: str) -> list[str]:
    """A history cell: a list (Parquet, JSON) or a string of ids separated by ``sep`` (CSV)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v for v in value.split(sep) if v != ""]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise InputError(f"a history must be a list or a {sep!r}-separated string, got {type(value).__name__}",
                     field=where)


def answer_chunk(engine: ServingEngine, rows: dict, start: int, cols: dict, k: int, model: str | None,
                 unknown: str, min_known: int, exclude_seen: bool, batch_size: int, path: Path) -> pa.Table:
    n = len(rows[cols["region"]])
    out = {name: [] for name, _ in SCHEMA_FIELDS}
    user_col = cols.get("user")
    users = []
    pending: list[tuple[int, Query]] = []
    answers: dict[int, tuple] = {}
    for i in range(n):
        row = start + i
        region_name = rows[cols["region"]][i]
        try:
            region = engine.region(str(region_name))
            route = region.route(model)
            history = parse_history(rows[cols["history"]][i], cols["sep"], cols["history"])
            known, dropped = engine.encode(route, history, unknown, hint="--unknown skip leaves them out, counted "
                                                                          "in the output's 'dropped'")
        except InputError as e:
            raise InputError(f"row {row}: {e.message}", path=str(path),
                             field=cols["region"] if isinstance(e, NotFound) else (e.field or cols["history"])) from None
        if not 1 <= k <= engine.catalogue_size(route):
            raise InputError(f"must be between 1 and region {region_name!r}'s catalogue size "
                             f"({engine.catalogue_size(route):,})", field="--k")
        popular = engine.popular(route, known, k, exclude_seen) if len(known) < min_known else None
        if popular is not None:
            answers[i] = (popular[0], popular[1], route, "popularity", len(dropped))
        else:
            pending.append((i, Query(route, known, k, exclude_seen)))
            answers[i] = (None, None, route, "model", len(dropped))
    for b in range(0, len(pending), batch_size):
        part = pending[b:b + batch_size]
        for (i, _), (items, scores, route) in zip(part, engine.answer([q for _, q in part])):
            answers[i] = (items, scores, route, "model", answers[i][4])
    for i in range(n):
        items, scores, route, source, dropped = answers[i]
        out["row"].append(start + i)
        out["region"].append(str(rows[cols["region"]][i]))
        out["items"].append([str(x) for x in items])
        out["scores"].append([float(s) for s in scores])
        out["source"].append(source)
        out["model"].append(route.kind)
        out["version"].append(route.version)
        out["dropped"].append(dropped)
        if user_col:
            users.append(None if rows[user_col][i] is None else str(rows[user_col][i]))
    fields = list(SCHEMA_FIELDS)
    if user_col:
        out[user_col] = users
        fields.insert(1, (user_col, pa.string()))
    schema = pa.schema(fields)
    return pa.table({name: out[name] for name, _ in fields}, schema=schema)


def world() -> tuple[int, int]:
    """(rank, world size) of a launched run (torch.distributed's, which accelerate initialises), else (0, 1)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        PartialState(cpu=True)
        if torch_dist.is_initialized():
            return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def recommend_file(bundle: str | Path, input_path: str | Path, out: str | Path, *, region_col: str,
                   history_col: str, user_col: str | None = None, fmt: str | None = None, k: int = 10,
                   model: str | None = None, unknown: str = "drop", min_known: int = 1, exclude_seen: bool = True,
                   sep: str = " ", chunk_rows: int = 8192, batch_size: int = 256, log=print) -> dict:
    input_path, out = Path(input_path), Path(out)
    fmt = input_format(input_path, fmt)
    if out.exists() and out.is_dir():
        raise InputError("is a folder; --out is the Parquet file to write", path=str(out), field="--out")
    rank, size = world()
    engine = engine_from_bundle(bundle)
    columns = [c for c in dict.fromkeys([region_col, history_col, user_col]) if c]
    cols = {"region": region_col, "history": history_col, "user": user_col, "sep": sep}
    stage = out.with_name(f".{out.name}.parts")
    if rank == 0:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    _barrier(size)
    rows = 0
    for index, (start, chunk) in enumerate(read_chunks(input_path, fmt, columns, chunk_rows)):
        if index % size != rank:
            continue
        table = answer_chunk(engine, chunk, start, cols, k, model, unknown, min_known, exclude_seen, batch_size,
                             input_path)
        pq.write_table(table, stage / f"chunk-{index:09d}.parquet")
        rows += table.num_rows
    _barrier(size)
    total = rows
    if rank == 0:
        parts = sorted(stage.glob("chunk-*.parquet"))
        tmp = out.with_name(f".{out.name}.tmp")
        writer = None
        total = 0
        try:
            for part in parts:
                table = pq.read_table(part)
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                total += table.num_rows
            if writer is None:        # an empty input: an empty file with the schema
                fields = list(SCHEMA_FIELDS) if not user_col else [SCHEMA_FIELDS[0], (user_col, pa.string()),
                                                                    *SCHEMA_FIELDS[1:]]
                pq.write_table(pa.schema(fields).empty_table(), tmp)
        finally:
            if writer is not None:
                writer.close()
        tmp.replace(out)
        shutil.rmtree(stage, ignore_errors=True)
        log(f"recommend: {total:,} users, top {k} each -> {out} ({size} process{'es' if size > 1 else ''})")
    _barrier(size)
    return {"rows": total, "processes": size}


def _barrier(size: int) -> None:
    if size > 1:
        torch_dist.barrier()
