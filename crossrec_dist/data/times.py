"""Timestamps as one UTC order: every way a real log writes a time becomes float epoch seconds.

Real logs write times as epoch numbers (seconds or milliseconds), ISO-8601 strings with an offset or
``Z`` (``2025-01-01T00:00:00+01:00``), naive local date-times (``2025-01-01 09:30``), dates, or Parquet
timestamp columns of any unit and zone. Parsing is left to the libraries made for it (pandas'
ISO-8601 parser for text, Arrow's casts for typed columns); this module only decides what a value
*means*:

- a value with an offset or ``Z`` is that instant;
- a naive date-time or date is wall-clock time in ``timezone`` (UTC unless ``--timezone`` says
  otherwise). In a daylight-saving change, an ambiguous wall time (the repeated hour) is read as
  standard time and a wall time that does not exist (the skipped hour) is moved forward, so every
  row gets one instant and the order stays monotone in the wall clock;
- a number is epoch time in ``unit`` (``s`` by default; ``ms``, ``us``, ``ns`` for logs that store
  milliseconds and finer).

Anything else (``01/02/2025`` is January or February depending on the country) is a bad row, named
by file and line: guessing a day-first or month-first order would reorder a log silently.
"""
from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError

UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
NUMERIC = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
# An explicit zone at the end of an ISO-8601 time: Z, +01:00, +0100, -05 (after a time, not a date).
_ZONE = re.compile(r"(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$")
_HAS_TIME = re.compile(r"\d[T ]\d")
# Epoch numbers past this many seconds (year 5138) are almost surely milliseconds or finer.
_SECONDS_LOOK_TOO_LARGE = 1e11
WHAT_IS_READ = ("not a time (a finite epoch number in --time-unit, or an ISO-8601 date/time such as "
                "2025-01-01T09:30:00+01:00, 2025-01-01T08:30:00Z or 2025-01-01 09:30)")


@dataclass(frozen=True)
class TimeRule:
    """How a log's times are read (``prepare --timezone`` and ``--time-unit``)."""
    timezone: str = "UTC"       # the zone of naive date-times and dates
    unit: str = "s"             # the unit of epoch numbers

    def check(self) -> "TimeRule":
        if self.unit not in UNITS:
            raise InputError(f"must be one of {', '.join(UNITS)}, not {self.unit!r}", field="--time-unit")
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise InputError(f"unknown time zone {self.timezone!r}; use an IANA name such as UTC, Europe/Berlin "
                             "or America/New_York", field="--timezone") from None
        return self


def _epoch_seconds(ticks: np.ndarray, per_second: int, missing: np.ndarray | None = None) -> np.ndarray:
    """Integer ticks since the epoch -> float seconds, whole seconds and the fraction apart so a value
    such as ...00.250 stays exact (one float division of nanoseconds is off in the 7th decimal)."""
    ticks = ticks.astype(np.int64)
    out = (ticks // per_second).astype(np.float64) + (ticks % per_second) / per_second
    if missing is not None:
        out[missing] = np.nan
    return out


def _utc_seconds(stamps) -> np.ndarray:
    """pandas UTC datetimes -> float epoch seconds, NaN where missing."""
    ns = stamps.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    return _epoch_seconds(ns.view(np.int64), 10**9, np.isnat(ns))


def parse_text_times(values: np.ndarray, rule: TimeRule) -> np.ndarray:
    """ISO-8601 strings -> epoch seconds (NaN where a value is not an ISO-8601 date or date-time)."""
    text = pd.Series(values, dtype=object).str.strip()
    zoned = text.str.contains(_ZONE, na=False) & text.str.contains(_HAS_TIME, na=False)
    out = np.full(len(text), np.nan)
    if zoned.any():
        out[zoned.to_numpy()] = _utc_seconds(pd.to_datetime(text[zoned], format="ISO8601", errors="coerce", utc=True))
    naive = ~zoned
    if naive.any():
        wall = pd.to_datetime(text[naive], format="ISO8601", errors="coerce")
        if getattr(wall.dt, "tz", None) is None:
            wall = wall.dt.tz_localize(rule.timezone, ambiguous=np.zeros(len(wall), dtype=bool),
                                       nonexistent="shift_forward")
        out[naive.to_numpy()] = _utc_seconds(wall.dt.tz_convert("UTC"))
    return out


def typed_times(ts: pa.ChunkedArray, rule: TimeRule) -> pa.ChunkedArray:
    """A Parquet / Arrow timestamp or date column -> float epoch seconds. A zoned timestamp is an
    instant whatever its unit or zone; a naive one (and a date) is wall-clock time in ``rule.timezone``."""
    t = ts.type
    if pa.types.is_date(t):
        ts = pc.cast(ts, pa.timestamp("s"))
        t = ts.type
    if t.tz is None and rule.timezone != "UTC":
        ts = pc.assume_timezone(ts, rule.timezone, ambiguous="latest", nonexistent="latest")
    per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[ts.type.unit]
    ticks = pc.cast(ts, pa.int64())     # zoned timestamps are stored as UTC instants
    missing = pc.is_null(ticks).to_numpy(zero_copy_only=False)
    seconds = _epoch_seconds(pc.fill_null(ticks, 0).to_numpy(zero_copy_only=False), per_second, missing)
    return pa.chunked_array([pa.array(seconds, pa.float64(), mask=missing)])


def text_times(ts: pa.ChunkedArray, rule: TimeRule) -> tuple[np.ndarray, np.ndarray]:
    """A text column of times -> (float epoch seconds, mask of rows that are epoch numbers). A row may
    be a number or an ISO-8601 string; one that is neither is NaN (a bad row)."""
    numeric = pc.fill_null(pc.match_substring_regex(ts, NUMERIC), False).to_numpy(zero_copy_only=False)
    out = np.full(len(ts), np.nan)
    if numeric.any():
        nums = pc.cast(pc.utf8_trim_whitespace(pc.filter(ts, pa.array(numeric))), pa.float64())
        out[numeric] = nums.to_numpy() * UNITS[rule.unit]
    rest = ~numeric & pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(ts), ""), False).to_numpy(zero_copy_only=False)
    if rest.any():
        out[rest] = parse_text_times(pc.filter(ts, pa.array(rest)).to_numpy(zero_copy_only=False), rule)
    return out, numeric


def unit_warning(seconds: np.ndarray, numeric: np.ndarray, rule: TimeRule, col: str) -> str | None:
    """A note when epoch numbers read as seconds land past the year 5000: a log in milliseconds read as
    seconds keeps its order but puts every date (and an absolute --until or temporal cut) wrong."""
    if rule.unit != "s" or not numeric.any():
        return None
    values = seconds[numeric]
    values = values[np.isfinite(values)]
    if len(values) and float(np.median(np.abs(values))) > _SECONDS_LOOK_TOO_LARGE:
        return (f"the numbers in column {col!r} look like epoch milliseconds or finer (median "
                f"{float(np.median(values)):.0f}); if so, pass --time-unit ms (or us, ns)")
    return None


def time_option(text: str | float | None, rule: TimeRule, flag: str, quantile_ok: bool = False) -> float | None:
    """A time given on the command line (``--until``, ``--temporal-valid``): an epoch number in the log's
    unit or an ISO-8601 date/time (naive = ``rule.timezone``), as epoch seconds. With ``quantile_ok`` a
    number in [0, 1] is a quantile and is returned as it is."""
    if text is None:
        return None
    raw = str(text).strip()
    if re.match(NUMERIC, raw):
        value = float(raw)
        return value if quantile_ok and 0 <= value <= 1 else value * UNITS[rule.unit]
    seconds = parse_text_times(np.array([raw], dtype=object), rule)[0]
    if not np.isfinite(seconds):
        raise InputError(f"{raw!r} is " + ("neither a quantile in [0, 1] nor " if quantile_ok else "not ")
                         + "an epoch time or an ISO-8601 date/time such as 2025-01-01 or 2025-01-01T09:30:00+01:00",
                         field=flag)
    return float(seconds)
