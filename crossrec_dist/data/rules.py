"""Input rules: how each column type becomes an id or a time, and which rows are bad or repeated.

Every reader's table goes through these, whatever its format, so a rule holds for csv, Parquet and
JSON lines alike (docs/data.md, "Input rules", lists them). Vectorised in Arrow / numpy: no Python object
per row.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .times import UNITS, WHAT_IS_READ, TimeRule, text_times, typed_times, unit_warning

DUPLICATES = ("drop", "keep", "error")

def check_unique(names: list[str], path: str, line: int | None = None) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise InputError(f"column {n!r} appears twice in the header; rename one", path=path, line=line, field=n)
        seen.add(n)


def id_column(arr: pa.ChunkedArray, col: str, path: str, notes: dict) -> tuple[pa.ChunkedArray, np.ndarray]:
    """An id column by rule: text is trimmed of surrounding whitespace (counted in ``notes``); whole
    numbers stay numbers; floats must be whole (pandas writes integer ids with gaps as floats) and
    become integers; NaN / null / blank is an empty value; any other type is refused."""
    if pa.types.is_dictionary(arr.type):
        arr = pc.cast(arr, arr.type.value_type)
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        trimmed = pc.utf8_trim_whitespace(arr)
        changed = pc.sum(pc.fill_null(pc.not_equal(arr, trimmed), False)).as_py() or 0
        notes["stripped_whitespace_ids"] = notes.get("stripped_whitespace_ids", 0) + int(changed)
        return trimmed, pc.fill_null(pc.equal(trimmed, ""), True).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(t):
        return arr, pc.is_null(arr).to_numpy(zero_copy_only=False)
    if pa.types.is_floating(t):
        bad = pc.fill_null(pc.is_nan(arr), True).to_numpy(zero_copy_only=False)
        values = np.nan_to_num(arr.to_numpy(zero_copy_only=False).astype(np.float64)[~bad])
        if len(values) and (np.any(values != np.round(values)) or np.any(np.abs(values) > 2**53)):
            raise InputError(f"ids must be text or whole numbers; this column holds fractional values such as "
                             f"{values[values != np.round(values)][:1].tolist()}", path=path, field=col)
        filled = pc.if_else(pa.array(bad), pa.scalar(0.0, t), arr)
        return pc.cast(filled, pa.int64()), bad
    raise InputError(f"ids must be text or whole numbers, not {t}", path=path, field=col)


def time_column(ts: pa.ChunkedArray, col: str, path: str, n: int, rule: TimeRule | None = None,
                notes: dict | None = None) -> tuple[pa.ChunkedArray, np.ndarray, str]:
    """Timestamps as float epoch seconds (UTC) by ``rule`` (data/times.py), and the mask of bad rows
    (empty, not a number or an ISO-8601 date/time, NaN or infinite)."""
    rule = rule or TimeRule()
    if pa.types.is_dictionary(ts.type):
        ts = pc.cast(ts, ts.type.value_type)
    t = ts.type
    why = WHAT_IS_READ
    numeric = None                     # rows that are epoch numbers (checked for a likely unit mistake)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        values, numeric = text_times(ts, rule)
        out = pa.chunked_array([pa.array(values, pa.float64())])
        bad = ~np.isfinite(values)
    elif pa.types.is_timestamp(t) or pa.types.is_date(t):
        out = typed_times(ts, rule)
        bad = pc.is_null(ts).to_numpy(zero_copy_only=False)
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        out = pc.multiply(pc.cast(ts, pa.float64()), UNITS[rule.unit])
        bad = pc.is_null(ts).to_numpy(zero_copy_only=False)
        numeric = ~bad
    else:
        raise InputError(f"timestamps must be numbers, dates or ISO-8601 text, not {t}"
                         + (" (a true/false column is not a time)" if pa.types.is_boolean(t) else ""),
                         path=path, field=col)
    values = pc.fill_null(out, np.nan).to_numpy(zero_copy_only=False)
    warning = unit_warning(values, numeric, rule, col) if numeric is not None and notes is not None else None
    if warning:
        notes.setdefault("warnings", []).append(f"{path}: {warning}")
    return out, bad | ~np.isfinite(values), why


def duplicate_rows(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Exact repeats of an earlier (user, item, timestamp[, domain]) row, in file order: the mask of
    repeats, and for each row the first row with the same values."""
    keys = [pc.dictionary_encode(t[c]).combine_chunks().indices.to_numpy(zero_copy_only=False)
            for c in ("user", "item", "domain") if c in t.column_names]
    keys.append(t["timestamp"].to_numpy().view(np.int64))
    rows = np.arange(t.num_rows)
    order = np.lexsort([rows] + keys[::-1])     # equal keys stay in file order
    same = np.ones(max(len(order) - 1, 0), dtype=bool)
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    starts = np.r_[True, ~same]
    first = np.empty(t.num_rows, dtype=np.int64)
    first[order] = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
    return first != rows, first
