"""Readers: turn a raw log in any supported format into an Arrow table of interactions.

Every reader returns columns ``user``, ``item``, ``timestamp`` (float64) and optionally ``domain``,
in file order (which later breaks ties between equal timestamps), and reports bad rows by file and
line. Parsing, validation and casting stay in Arrow: no Python object per row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from ..errors import InputError

FORMATS = ("recbole", "movielens", "csv", "tsv", "parquet", "jsonl")
NUMERIC = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


@dataclass
class Columns:
    """Which input columns hold the user, item, timestamp and (optionally) domain."""
    user: str = "user_id"
    item: str = "item_id"
    time: str = "timestamp"
    domain: str | None = None


@dataclass
class Table:
    """A parsed file: the Arrow table plus what is needed to name lines in error messages."""
    table: pa.Table
    path: str
    header_lines: int = 0
    skipped_lines: list[int] = field(default_factory=list)
    line_of_row: np.ndarray | None = None   # only for formats without line structure (None = compute)

    def line(self, row: int) -> int | None:
        """1-based file line of parsed row ``row`` (computed on the error path only)."""
        if self.line_of_row is not None:
            return int(self.line_of_row[row])
        p = Path(self.path)
        if not p.is_file():
            return None
        skipped, seen = set(self.skipped_lines), -1
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno <= self.header_lines or lineno in skipped or not raw.strip():
                    continue
                seen += 1
                if seen == row:
                    return lineno
        return None


@dataclass
class RawLog:
    interactions: pa.Table          # user, item, timestamp[, domain]
    source: Table                   # where the interactions came from (for line numbers)
    user_attrs: Table | None = None
    item_attrs: Table | None = None
    skipped: int = 0


def _read_delimited(path: Path, *, delimiter: str, names: list[str] | None, on_bad_rows: str,
                    data: bytes | None = None) -> Table:
    """Delimited text, every column as a string. ``names=None`` means the first line is a header."""
    header_lines = 0
    if names is None:
        with open(path, "rb") if data is None else _nullctx() as f:
            first = (f.readline() if data is None else data.split(b"\n", 1)[0]).decode("utf-8", "replace")
        names = [n.strip() for n in first.rstrip("\r\n").split(delimiter)]
        header_lines = 1
        if not first.strip():
            raise InputError("empty file or empty header line", path=str(path), line=1)
    skipped: list[int] = []
    first_bad: list = []

    def on_bad(row):  # called by pyarrow; it cannot raise through C++, so remember and stop
        if on_bad_rows == "error":
            first_bad.append(row)
            return "error"
        skipped.append(row.number)
        return "skip"

    read = pacsv.ReadOptions(column_names=names, skip_rows=header_lines, block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=delimiter, quote_char='"' if delimiter == "," else False,
                               invalid_row_handler=on_bad)
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
    source = pa.BufferReader(data) if data is not None else str(path)
    try:
        table = pacsv.read_csv(source, read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as e:
        if first_bad:
            row = first_bad[0]
            line = row.number or _find_line(path, data, row.text, header_lines)
            raise InputError(f"expected {row.expected_columns} fields, found {row.actual_columns}: "
                             f"{row.text[:80]!r} (use --on-bad-rows skip to drop such rows)",
                             path=str(path), line=line) from None
        raise InputError(f"cannot parse: {e}", path=str(path)) from None
    except UnicodeDecodeError as e:
        raise InputError(f"not UTF-8 text: {e}", path=str(path)) from None
    return Table(table, str(path), header_lines, skipped)


def _find_line(path: Path, data: bytes | None, text: str, header_lines: int) -> int | None:
    """Line number of the first line equal to ``text`` (error path only: pyarrow's multi-threaded
    reader does not number rows)."""
    lines = data.splitlines() if data is not None else open(path, "rb").read().splitlines()
    want = text.rstrip("\r\n").encode()
    for lineno, raw in enumerate(lines, start=1):
        if lineno > header_lines and raw.rstrip(b"\r") == want:
            return lineno
    return None


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def _strip_types(table: Table) -> Table:
    """RecBole atomic headers are ``name:type``; keep the names."""
    table.table = table.table.rename_columns([c.split(":", 1)[0] for c in table.table.column_names])
    return table


def _require(table: Table, columns: list[str], what: str) -> None:
    missing = [c for c in columns if c not in table.table.column_names]
    if missing:
        raise InputError(f"missing {what} column(s) {missing}; the file has {table.table.column_names}",
                         path=table.path, field=missing[0])


def _validate(table: Table, cols: Columns, on_bad_rows: str) -> tuple[pa.Table, int]:
    """Cast to the interaction schema; rows with empty ids or non-numeric timestamps are bad rows."""
    t = table.table
    _require(table, [c for c in (cols.user, cols.item, cols.time, cols.domain) if c], "interaction")
    out = {"user": t[cols.user], "item": t[cols.item]}
    ok = np.ones(t.num_rows, dtype=bool)
    reasons = []
    for name, col in (("user", cols.user), ("item", cols.item)) + ((("domain", cols.domain),) if cols.domain else ()):
        arr = t[col]
        if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
            bad = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(arr), ""), True)
        else:
            bad = pc.is_null(arr)
        bad = bad.to_numpy(zero_copy_only=False)
        reasons.append((bad, col, "empty value"))
        ok &= ~bad
        out[name] = arr
    ts = t[cols.time]
    if pa.types.is_string(ts.type) or pa.types.is_large_string(ts.type):
        numeric = pc.fill_null(pc.match_substring_regex(ts, NUMERIC), False).to_numpy(zero_copy_only=False)
        if not numeric.any() and t.num_rows:
            try:  # ISO dates instead of epoch numbers
                ts_num = pc.cast(pc.cast(ts, pa.timestamp("s")), pa.int64())
                out["timestamp"] = pc.cast(ts_num, pa.float64())
                numeric = np.ones(t.num_rows, dtype=bool)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
        reasons.append((~numeric, cols.time, "not a number or date"))
        ok &= numeric
        if "timestamp" not in out:
            clean = pc.if_else(pa.array(numeric), ts, pa.scalar("0"))
            out["timestamp"] = pc.cast(pc.utf8_trim_whitespace(clean), pa.float64())
    elif pa.types.is_timestamp(ts.type):
        out["timestamp"] = pc.cast(pc.cast(ts, pa.timestamp("s")).cast(pa.int64()), pa.float64())
    else:
        nulls = pc.is_null(ts).to_numpy(zero_copy_only=False)
        reasons.append((nulls, cols.time, "empty value"))
        ok &= ~nulls
        out["timestamp"] = pc.cast(ts, pa.float64())
    n_bad = int((~ok).sum())
    if n_bad and on_bad_rows == "error":
        row = int(np.flatnonzero(~ok)[0])
        for bad, col, why in reasons:
            if bad[row]:
                raise InputError(f"{why} ({n_bad} bad row(s) in all; use --on-bad-rows skip to drop them)",
                                 path=table.path, line=table.line(row), field=col)
    result = pa.table(out)
    if n_bad:
        result = result.filter(pa.array(ok))
    return result, n_bad


def _read_any(path: Path, fmt: str, on_bad_rows: str) -> Table:
    if not path.is_file():
        raise InputError("no such file", path=str(path))
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, delimiter="," if fmt == "csv" else "\t", names=None, on_bad_rows=on_bad_rows)
    if fmt == "parquet":
        try:
            t = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"not a readable Parquet file: {e}", path=str(path)) from None
        return Table(t, str(path), line_of_row=np.arange(1, t.num_rows + 1))  # "line" = row number
    if fmt == "jsonl":
        try:
            t = pajson.read_json(path)
        except pa.ArrowInvalid as e:
            raise InputError(f"not valid JSON lines: {e}", path=str(path)) from None
        return Table(t, str(path))
    raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", field="--format")


def _attr_path(path: Path, given: str | None, default_names: list[str]) -> Path | None:
    if given:
        return Path(given)
    for n in default_names:
        if (path.parent / n).is_file():
            return path.parent / n
    return None


def read_log(path: str | Path, fmt: str, cols: Columns | None = None, *, on_bad_rows: str = "error",
             user_attrs: str | None = None, item_attrs: str | None = None) -> RawLog:
    """Read interactions (and user/item attribute tables when present) in format ``fmt``."""
    if on_bad_rows not in ("error", "skip"):
        raise InputError(f"--on-bad-rows must be 'error' or 'skip', not {on_bad_rows!r}", field="--on-bad-rows")
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path=str(path))
    cols = cols or Columns()
    uattr = iattr = None
    if fmt == "recbole":
        if path.is_dir():
            inter = sorted(path.glob("*.inter"))
            if len(inter) != 1:
                raise InputError(f"expected exactly one *.inter file, found {len(inter)}", path=str(path))
            path = inter[0]
        src = _strip_types(_read_delimited(path, delimiter="\t", names=None, on_bad_rows=on_bad_rows))
        stem = path.name[: -len(".inter")] if path.name.endswith(".inter") else path.stem
        up = _attr_path(path, user_attrs, [stem + ".user"])
        ip = _attr_path(path, item_attrs, [stem + ".item"])
        uattr = _strip_types(_read_delimited(up, delimiter="\t", names=None, on_bad_rows=on_bad_rows)) if up else None
        iattr = _strip_types(_read_delimited(ip, delimiter="\t", names=None, on_bad_rows=on_bad_rows)) if ip else None
        cols = Columns(cols.user, cols.item, cols.time, cols.domain)
    elif fmt == "movielens":
        folder = path if path.is_dir() else path.parent
        if (folder / "u.data").is_file():
            path = folder / "u.data"
            src = _read_delimited(path, delimiter="\t", names=["user_id", "item_id", "rating", "timestamp"],
                                  on_bad_rows=on_bad_rows)
            up = _attr_path(path, user_attrs, ["u.user"])
            uattr = _read_delimited(up, delimiter="|", on_bad_rows=on_bad_rows,
                                    names=["user_id", "age", "gender", "occupation", "zip_code"]) if up else None
        elif (folder / "ratings.dat").is_file():
            path = folder / "ratings.dat"
            # '::' separators: pyarrow wants one character; '\t' never occurs in these files.
            src = _read_delimited(path, delimiter="\t", names=["user_id", "item_id", "rating", "timestamp"],
                                  on_bad_rows=on_bad_rows, data=path.read_bytes().replace(b"::", b"\t"))
            up = _attr_path(path, user_attrs, ["users.dat"])
            uattr = _read_delimited(up, delimiter="\t", names=["user_id", "gender", "age", "occupation", "zip_code"],
                                    on_bad_rows=on_bad_rows, data=up.read_bytes().replace(b"::", b"\t")) if up else None
        else:
            raise InputError("no MovieLens ratings here: expected u.data (ML-100K) or ratings.dat (ML-1M)",
                             path=str(folder))
        cols = Columns("user_id", "item_id", "timestamp", cols.domain)
    else:
        src = _read_any(path, fmt, on_bad_rows)
        if user_attrs:
            uattr = _read_any(Path(user_attrs), _fmt_of(user_attrs, fmt), on_bad_rows)
        if item_attrs:
            iattr = _read_any(Path(item_attrs), _fmt_of(item_attrs, fmt), on_bad_rows)
    interactions, n_bad = _validate(src, cols, on_bad_rows)
    if interactions.num_rows == 0:
        raise InputError("no interactions left to read", path=str(path))
    skipped = n_bad + len(src.skipped_lines)
    return RawLog(interactions, src, uattr, iattr, skipped)


def _fmt_of(path: str, default: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"csv": "csv", "tsv": "tsv", "txt": "tsv", "parquet": "parquet", "jsonl": "jsonl",
            "json": "jsonl"}.get(suffix, default)
