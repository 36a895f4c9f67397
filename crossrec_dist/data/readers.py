"""Readers: turn a raw log in any supported format into an Arrow table of interactions.

Every reader returns columns ``user``, ``item``, ``timestamp`` (float64) and optionally ``domain``,
in file order (which later breaks ties between equal timestamps), and reports bad rows by file and
line. Parsing, validation and casting stay in Arrow: no Python object per row.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from ..errors import InputError
from .rules import DUPLICATES, check_unique, duplicate_rows, id_column, time_column
from .times import TimeRule

FORMATS = ("recbole", "movielens", "csv", "tsv", "parquet", "jsonl")
# Leading bytes of compressed files, so "gzip behind a .csv name" is named, not parsed as text.
_MAGIC = {b"\x1f\x8b": "gzip", b"PK\x03\x04": "zip", b"BZh": "bzip2", b"\x28\xb5\x2f\xfd": "zstd",
          b"\xfd7zXZ\x00": "xz"}


def _is_gzip(path: Path) -> bool:
    """True for ``*.gz`` (which must hold gzip data); other compressed data behind a text name is an error."""
    with open(path, "rb") as f:
        head = f.read(6)
    kind = next((k for magic, k in _MAGIC.items() if head.startswith(magic)), None)
    if path.name.lower().endswith(".gz"):
        if kind != "gzip":
            raise InputError("named *.gz but does not hold gzip data", path=str(path))
        return True
    if kind:
        hint = "name it *.gz" if kind == "gzip" else "decompress it first (only gzip is read directly)"
        raise InputError(f"this is {kind}-compressed data behind a plain-text name: {hint}", path=str(path))
    return False


def _open_text(path: Path):
    """Binary line reader of a text file, gzip-transparent (error paths and headers only)."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


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
    row_offset: int = 0                     # a part of a file read in pieces: parsed rows before this part

    def line(self, row: int) -> int | None:
        """1-based file line of parsed row ``row`` (computed on the error path only)."""
        if self.line_of_row is not None:
            return int(self.line_of_row[row])
        row += self.row_offset
        p = Path(self.path)
        if not p.is_file():
            return None
        skipped, seen = set(self.skipped_lines), -1
        with _open_text(p) as f:
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
    kept_rows: np.ndarray | None = None   # parsed row of each interaction (bad / duplicate rows removed)
    notes: dict = field(default_factory=dict)   # what the input rules did (counts), for stats.json

    def line(self, i: int) -> int | None:
        """File line of interaction ``i``."""
        return self.source.line(int(self.kept_rows[i]) if self.kept_rows is not None else i)


@dataclass
class _Delimited:
    """How one delimited text file is parsed (shared by the whole-file and the streaming reader)."""
    path: Path
    data: bytes | None
    names: list[str]
    header_lines: int
    compressed: bool
    on_bad_rows: str
    delimiter: str
    skipped: list[int] = field(default_factory=list)
    first_bad: list = field(default_factory=list)

    def on_bad(self, row):  # called by pyarrow; it cannot raise through C++, so remember and stop
        if self.on_bad_rows == "error":
            self.first_bad.append(row)
            return "error"
        self.skipped.append(row.number)
        return "skip"

    def options(self, block_size: int):
        read = pacsv.ReadOptions(column_names=self.names, skip_rows=self.header_lines, block_size=block_size)
        parse = pacsv.ParseOptions(delimiter=self.delimiter, quote_char='"' if self.delimiter == "," else False,
                                   invalid_row_handler=self.on_bad)
        convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in self.names}, strings_can_be_null=False)
        return read, parse, convert

    def source(self):
        if self.data is not None:
            return pa.BufferReader(self.data)
        return pa.input_stream(str(self.path), compression="gzip") if self.compressed else str(self.path)

    def error(self, e: BaseException) -> InputError:
        """The user-facing error for whatever pyarrow raised while parsing this file."""
        path, compressed = self.path, self.compressed
        if isinstance(e, pa.ArrowInvalid):
            if self.first_bad:
                row = self.first_bad[0]
                line = row.number or _find_line(path, self.data, row.text, self.header_lines)
                return InputError(f"expected {row.expected_columns} fields, found {row.actual_columns}: "
                                  f"{row.text[:80]!r} (use --on-bad-rows skip to drop such rows)",
                                  path=str(path), line=line)
            if "invalid UTF8" in str(e):
                return InputError("not UTF-8 text (save the file as UTF-8)", path=str(path),
                                  line=_first_non_utf8_line(path, self.data))
            why = "cannot read the compressed file (truncated or corrupt?)" if compressed else "cannot parse"
            return InputError(f"{why}: {e}", path=str(path))
        if isinstance(e, UnicodeDecodeError):
            return InputError(f"not UTF-8 text: {e}", path=str(path))
        why = "cannot read the compressed file (truncated or corrupt?)" if compressed else "cannot read"
        return InputError(f"{why}: {e}", path=str(path))


_PARSE_ERRORS = (pa.ArrowInvalid, OSError, EOFError, zlib.error, UnicodeDecodeError)


def _delimited(path: Path, *, delimiter: str, names: list[str] | None, on_bad_rows: str,
               data: bytes | None = None) -> _Delimited:
    """Header and parse options of a delimited text file. ``names=None`` means the first line is a header."""
    header_lines = 0
    compressed = data is None and _is_gzip(path)
    if names is None:
        try:
            with _open_text(path) if data is None else _nullctx() as f:
                first = (f.readline() if data is None else data.split(b"\n", 1)[0]).decode("utf-8", "replace")
        except (OSError, EOFError, zlib.error) as e:
            raise InputError(f"cannot read: {e}", path=str(path)) from None
        first = first.removeprefix("\ufeff")      # a UTF-8 byte-order mark is not part of the first name
        names = [n.strip() for n in first.rstrip("\r\n").split(delimiter)]
        header_lines = 1
        if not first.strip():
            raise InputError("empty file or empty header line", path=str(path), line=1)
        check_unique(names, str(path), line=1)
    return _Delimited(path, data, names, header_lines, compressed, on_bad_rows, delimiter)


def _read_delimited(path: Path, *, delimiter: str, names: list[str] | None, on_bad_rows: str,
                    data: bytes | None = None) -> Table:
    """Delimited text, every column as a string. ``names=None`` means the first line is a header."""
    d = _delimited(path, delimiter=delimiter, names=names, on_bad_rows=on_bad_rows, data=data)
    read, parse, convert = d.options(1 << 24)
    try:
        table = pacsv.read_csv(d.source(), read_options=read, parse_options=parse, convert_options=convert)
    except _PARSE_ERRORS as e:
        raise d.error(e) from None
    return Table(table, str(path), d.header_lines, d.skipped)


def _stream_delimited(d: _Delimited, block_size: int):
    """The file as Tables of about ``block_size`` bytes each, in file order (bounded memory)."""
    read, parse, convert = d.options(block_size)
    rows = 0
    try:
        reader = pacsv.open_csv(d.source(), read_options=read, parse_options=parse, convert_options=convert)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            yield Table(pa.Table.from_batches([batch]), str(d.path), d.header_lines, d.skipped, row_offset=rows)
            rows += batch.num_rows
    except _PARSE_ERRORS as e:
        raise d.error(e) from None


def _find_line(path: Path, data: bytes | None, text: str, header_lines: int) -> int | None:
    """Line number of the first line equal to ``text`` (error path only: pyarrow's multi-threaded
    reader does not number rows)."""
    if data is None:
        with _open_text(path) as f:
            data = f.read()
    lines = data.splitlines()
    want = text.rstrip("\r\n").encode()
    for lineno, raw in enumerate(lines, start=1):
        if lineno > header_lines and raw.rstrip(b"\r") == want:
            return lineno
    return None


def _first_non_utf8_line(path: Path, data: bytes | None) -> int | None:
    if data is None:
        with _open_text(path) as f:
            data = f.read()
    for lineno, raw in enumerate(data.splitlines(), start=1):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
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


def _validate(table: Table, cols: Columns, on_bad_rows: str, notes: dict,
              time_rule: TimeRule | None = None, part: bool = False) -> tuple[pa.Table, np.ndarray]:
    """Cast to the interaction schema by the rules of ``rules.id_column`` / ``rules.time_column``; rows with an
    empty id or a time that cannot be read are bad rows. Returns the table and the parsed row index of
    each kept row (for line numbers later).

    The hint ``--on-bad-rows skip`` is offered only when it would keep some rows: a column that no
    row can be read from is a wrong option (``--time-col``, ``--time-unit``), not a few bad rows.
    ``part``: ``table`` is one piece of a file read in pieces; a piece with no good row is then not
    the whole file's verdict (``read_log_chunks`` checks the file at its end)."""
    t = table.table
    check_unique(t.column_names, table.path)
    _require(table, [c for c in (cols.user, cols.item, cols.time, cols.domain) if c], "interaction")
    out = {}
    ok = np.ones(t.num_rows, dtype=bool)
    reasons = []
    for name, col in (("user", cols.user), ("item", cols.item)) + ((("domain", cols.domain),) if cols.domain else ()):
        out[name], bad = id_column(t[col], col, table.path, notes)
        reasons.append((bad, col, "empty value"))
        ok &= ~bad
    out["timestamp"], bad, why = time_column(t[cols.time], cols.time, table.path, t.num_rows, time_rule, notes)
    reasons.append((bad, cols.time, why))
    ok &= ~bad
    n_bad = int((~ok).sum())
    if n_bad and (on_bad_rows == "error" or (n_bad == t.num_rows and not part)):
        row = int(np.flatnonzero(~ok)[0])
        for bad, col, why in reasons:
            if bad[row]:
                value = t[col][row].as_py()
                if value is None or (isinstance(value, str) and not value.strip()):
                    why = "empty value"
                if n_bad == t.num_rows and not part:
                    all_bad = bool(bad.all())
                    hint = (f"no row of column {col!r} can be read, so --on-bad-rows skip would drop every row"
                            if all_bad else f"every row has a bad value (this one in {col!r}), so "
                            "--on-bad-rows skip would drop every row")
                    if col == cols.time and all_bad:
                        hint += f"; is {col!r} the time column (--time-col)?"
                    raise InputError(f"{why}: {value!r} ({hint})", path=table.path, line=table.line(row), field=col)
                counted = f"{n_bad} bad row(s) of {t.num_rows} in all" if not part else \
                    f"the first bad row of {table.path}"
                raise InputError(f"{why}: {value!r} ({counted}; use --on-bad-rows skip to drop them)",
                                 path=table.path, line=table.line(row), field=col)
    result = pa.table(out)
    kept = np.flatnonzero(ok)
    if n_bad:
        result = result.filter(pa.array(ok))
    return result, kept


def _read_any(path: Path, fmt: str, on_bad_rows: str) -> Table:
    if path.is_dir():
        ext = {"jsonl": ("jsonl", "json")}.get(fmt, (fmt,))
        found = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.lower().split(".gz")[0].endswith(ext))
        listed = f"; it holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}" if found else \
            f"; it holds no *.{ext[0]} file"
        raise InputError(f"is a folder, and --format {fmt} reads one file: give the file as --input (repeat "
                         f"--input for several files){listed}", path=str(path), field="--input")
    if not path.is_file():
        raise InputError("no such file", path=str(path))
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, delimiter="," if fmt == "csv" else "\t", names=None, on_bad_rows=on_bad_rows)
    if fmt == "parquet":
        try:
            check_unique(pq.ParquetFile(path).schema_arrow.names, str(path))
            t = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as e:
            raise InputError(f"not a readable Parquet file: {e}", path=str(path)) from None
        except ValueError as e:   # e.g. duplicated column names in the file's schema
            raise InputError(f"cannot read this Parquet file's columns: {e}", path=str(path)) from None
        return Table(t, str(path), line_of_row=np.arange(1, t.num_rows + 1))  # "line" = row number
    if fmt == "jsonl":
        compressed = _is_gzip(path)
        try:
            t = pajson.read_json(pa.input_stream(str(path), compression="gzip") if compressed else str(path))
        except (pa.ArrowInvalid, OSError, EOFError, zlib.error) as e:
            line, why = _first_bad_json_line(path)
            raise InputError(f"not valid JSON lines: {why or e}", path=str(path), line=line) from None
        return Table(t, str(path))
    raise InputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", field="--format")


def _stream_any(path: Path, fmt: str, on_bad_rows: str, block_size: int):
    """``_read_any`` in pieces of about ``block_size`` bytes (csv, tsv, Parquet row batches, JSON lines)."""
    if path.is_dir() or not path.is_file() or fmt not in ("csv", "tsv", "parquet", "jsonl"):
        return iter([_read_any(path, fmt, on_bad_rows)])     # the same errors as a whole-file read
    if fmt in ("csv", "tsv"):
        return _stream_delimited(_delimited(path, delimiter="," if fmt == "csv" else "\t", names=None,
                                            on_bad_rows=on_bad_rows), block_size)
    return _stream_parquet(path, block_size) if fmt == "parquet" else _stream_jsonl(path, block_size)


def _stream_parquet(path: Path, block_size: int):
    try:
        # pre_buffer=False: a pre-buffered reader caches every row group it has read until it is closed
        # (apache/arrow#39808), ~11 B per row: 10.4 GiB of a 1e9-row prepare that should stay near 3.
        f = pq.ParquetFile(path, pre_buffer=False)
        check_unique(f.schema_arrow.names, str(path))
        rows = 0
        per_row = max(1, (f.metadata.serialized_size + sum(f.metadata.row_group(g).total_byte_size
                                                           for g in range(f.num_row_groups))) // max(1, f.metadata.num_rows))
        for batch in f.iter_batches(batch_size=max(1024, block_size // per_row)):
            yield Table(pa.Table.from_batches([batch]), str(path), row_offset=rows,
                        line_of_row=np.arange(rows + 1, rows + batch.num_rows + 1))   # "line" = row number
            rows += batch.num_rows
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"not a readable Parquet file: {e}", path=str(path)) from None
    except ValueError as e:
        raise InputError(f"cannot read this Parquet file's columns: {e}", path=str(path)) from None


def _stream_jsonl(path: Path, block_size: int):
    compressed = _is_gzip(path)
    rows = 0
    try:
        reader = pajson.open_json(pa.input_stream(str(path), compression="gzip") if compressed else str(path),
                                  read_options=pajson.ReadOptions(block_size=block_size))
        for batch in reader:
            yield Table(pa.Table.from_batches([batch]), str(path), row_offset=rows)
            rows += batch.num_rows
    except (pa.ArrowInvalid, OSError, EOFError, zlib.error) as e:
        line, why = _first_bad_json_line(path)
        raise InputError(f"not valid JSON lines: {why or e}", path=str(path), line=line) from None


def _first_bad_json_line(path: Path) -> tuple[int | None, str | None]:
    """(1-based line, reason) of the first line that is not one JSON object (error path only)."""
    try:
        with _open_text(path) as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError as e:
                    return lineno, f"JSON error: {e}"
                if not isinstance(obj, dict):
                    return lineno, f"each line must be one JSON object, not {type(obj).__name__}"
    except (OSError, EOFError, zlib.error) as e:
        return None, f"cannot read the compressed file (truncated or corrupt?): {e}"
    return None, None


def _attr_path(path: Path, given: str | None, default_names: list[str]) -> Path | None:
    if given:
        return Path(given)
    for n in default_names:
        if (path.parent / n).is_file():
            return path.parent / n
    return None


def _check_rule_options(on_bad_rows: str, duplicates: str) -> None:
    if on_bad_rows not in ("error", "skip"):
        raise InputError(f"--on-bad-rows must be 'error' or 'skip', not {on_bad_rows!r}", field="--on-bad-rows")
    if duplicates not in DUPLICATES:
        raise InputError(f"must be one of {', '.join(DUPLICATES)}, not {duplicates!r}", field="--duplicates")


def _source(path: Path, fmt: str, cols: Columns, on_bad_rows: str, user_attrs: str | None,
            item_attrs: str | None, block_size: int | None):
    """Where a log's interactions are and how they are parsed, by format: ``(interactions, user
    attributes, item attributes, columns, path)``. The interactions are one Table, or with
    ``block_size`` an iterator of Tables of about that many bytes each (attribute files are read whole)."""
    if not path.exists():
        raise InputError("no such file or folder", path=str(path))

    def delimited(p, **kw):
        if block_size is None:
            return _read_delimited(p, on_bad_rows=on_bad_rows, **kw)
        return _stream_delimited(_delimited(p, on_bad_rows=on_bad_rows, **kw), block_size)
    uattr = iattr = None
    if fmt == "recbole":
        if path.is_dir():
            inter = sorted(path.glob("*.inter"))
            if len(inter) != 1:
                raise InputError(f"expected exactly one *.inter file, found {len(inter)}", path=str(path))
            path = inter[0]
        src = delimited(path, delimiter="\t", names=None)
        if block_size is None:
            src = _strip_types(src)
        else:
            src = (_strip_types(t) for t in src)
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
            src = delimited(path, delimiter="\t", names=["user_id", "item_id", "rating", "timestamp"])
            up = _attr_path(path, user_attrs, ["u.user"])
            uattr = _read_delimited(up, delimiter="|", on_bad_rows=on_bad_rows,
                                    names=["user_id", "age", "gender", "occupation", "zip_code"]) if up else None
        elif (folder / "ratings.dat").is_file():
            path = folder / "ratings.dat"
            # '::' separators: pyarrow wants one character; '\t' never occurs in these files (read whole:
            # MovieLens files are at most a few hundred MB).
            src = delimited(path, delimiter="\t", names=["user_id", "item_id", "rating", "timestamp"],
                            data=path.read_bytes().replace(b"::", b"\t"))
            up = _attr_path(path, user_attrs, ["users.dat"])
            uattr = _read_delimited(up, delimiter="\t", names=["user_id", "gender", "age", "occupation", "zip_code"],
                                    on_bad_rows=on_bad_rows, data=up.read_bytes().replace(b"::", b"\t")) if up else None
        else:
            raise InputError("no MovieLens ratings here: expected u.data (ML-100K) or ratings.dat (ML-1M)",
                             path=str(folder))
        cols = Columns("user_id", "item_id", "timestamp", cols.domain)
    else:
        src = _read_any(path, fmt, on_bad_rows) if block_size is None else _stream_any(path, fmt, on_bad_rows, block_size)
        if user_attrs:
            uattr = _read_any(Path(user_attrs), _fmt_of(user_attrs, fmt), on_bad_rows)
        if item_attrs:
            iattr = _read_any(Path(item_attrs), _fmt_of(item_attrs, fmt), on_bad_rows)
    return src, uattr, iattr, cols, path


def read_log(path: str | Path, fmt: str, cols: Columns | None = None, *, on_bad_rows: str = "error",
             user_attrs: str | None = None, item_attrs: str | None = None, duplicates: str = "drop",
             time_rule: TimeRule | None = None) -> RawLog:
    """Read interactions (and user/item attribute tables when present) in format ``fmt``.

    Rules applied to every format (counted in ``RawLog.notes``): surrounding whitespace of ids is
    stripped; exact repeats of a (user, item, timestamp[, domain]) row are dropped, kept or an
    error (``duplicates``); rows with an empty id or a non-finite timestamp are bad rows.
    """
    _check_rule_options(on_bad_rows, duplicates)
    src, uattr, iattr, cols, path = _source(Path(path), fmt, cols or Columns(), on_bad_rows, user_attrs,
                                            item_attrs, None)
    notes: dict = {}
    interactions, kept = _validate(src, cols, on_bad_rows, notes, time_rule)
    n_bad = src.table.num_rows - len(kept)
    if interactions.num_rows == 0:
        raise InputError("no interactions left to read", path=str(path))
    dup, first = duplicate_rows(interactions)
    notes["duplicate_rows"] = int(dup.sum())
    if dup.any() and duplicates == "error":
        row = int(np.flatnonzero(dup)[0])
        raise InputError(f"{int(dup.sum())} exact duplicate row(s); this one repeats {src.path}:"
                         f"{src.line(int(kept[first[row]]))} (choose --duplicates drop or keep)",
                         path=src.path, line=src.line(int(kept[row])), field="--duplicates")
    if dup.any() and duplicates == "drop":
        interactions = interactions.filter(pa.array(~dup))
        kept = kept[~dup]
    skipped = n_bad + len(src.skipped_lines)
    return RawLog(interactions, src, uattr, iattr, skipped, kept_rows=kept, notes=notes)


class ChunkedLog:
    """A log read in pieces of bounded size (``crossrec prepare``'s out-of-core path): the same
    formats, attribute files and row rules as :func:`read_log`, except the duplicate rule, which needs
    the whole log and is applied by the caller. Iterate it for one :class:`RawLog` per piece (its
    ``line()`` names lines of the whole file); after the last piece, ``skipped`` and ``notes`` hold
    the whole file's counts."""

    def __init__(self, path: str | Path, fmt: str, cols: Columns | None = None, *, on_bad_rows: str = "error",
                 user_attrs: str | None = None, item_attrs: str | None = None, time_rule: TimeRule | None = None,
                 block_size: int = 64 << 20):
        _check_rule_options(on_bad_rows, "keep")
        self.on_bad_rows, self.time_rule = on_bad_rows, time_rule
        self.pieces, self.user_attrs, self.item_attrs, self.cols, self.path = _source(
            Path(path), fmt, cols or Columns(), on_bad_rows, user_attrs, item_attrs, block_size)
        self.skipped, self.rows, self.notes = 0, 0, {}
        self._last: Table | None = None

    def line(self, parsed_row: int) -> int | None:
        """File line of the file's ``parsed_row``-th parsed row (error path only)."""
        last = self._last
        if last is None:
            return None
        if last.line_of_row is not None:
            return parsed_row + 1
        return Table(last.table, last.path, last.header_lines, last.skipped_lines).line(parsed_row)

    def __iter__(self):
        for table in self.pieces:
            notes: dict = {}
            interactions, kept = _validate(table, self.cols, self.on_bad_rows, notes, self.time_rule, part=True)
            self.skipped += table.table.num_rows - len(kept)
            self.rows += len(kept)
            for key, value in notes.items():
                if key == "warnings":
                    self.notes.setdefault(key, [])
                    self.notes[key] += [w for w in value if w not in self.notes[key]]
                else:
                    self.notes[key] = self.notes.get(key, 0) + value
            self._last = table
            yield RawLog(interactions, table, self.user_attrs, self.item_attrs, kept_rows=kept, notes=notes)
        if self._last is None:      # a file with a header and no rows
            raise InputError("no interactions left to read", path=str(self.path))
        if self._last is not None:
            self.skipped += len(self._last.skipped_lines)
        if self.rows == 0 and self._last is not None:
            raise InputError("no interactions left to read: no row of the file could be read"
                             + (" (every row is bad, so --on-bad-rows skip drops every row)" if self.skipped else ""),
                             path=str(self.path))


def _fmt_of(path: str, default: str) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    return {"csv": "csv", "tsv": "tsv", "txt": "tsv", "parquet": "parquet", "jsonl": "jsonl",
            "json": "jsonl"}.get(suffix, default)
