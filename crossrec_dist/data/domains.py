"""Domain assignment: from a column of the log, or from a rule on a user/item attribute.

Rule syntax (``--domain-from``):
  ``column:NAME``           the interaction column NAME
  ``user.ATTR[:RULE]``      attribute ATTR of the user (from the user file)
  ``item.ATTR[:RULE]``      attribute ATTR of the item (from the item file)
RULE is ``value`` (default) or ``prefixN``: the first N characters when they are digits (zip-code
regions); anything else (empty, letters such as Canadian postcodes) goes to the ``other`` bucket,
so nothing is dropped.
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .readers import RawLog


def _encode(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, list[str]]:
    """Domain strings -> (codes in sorted-name order, names)."""
    enc = pc.dictionary_encode(pc.cast(values, pa.string())).combine_chunks()
    names = enc.dictionary.to_pylist()
    order = np.argsort(np.array(names, dtype=object), kind="stable")
    remap = np.empty(len(names), dtype=np.int32)
    remap[order] = np.arange(len(names), dtype=np.int32)
    return remap[enc.indices.to_numpy(zero_copy_only=False)], [names[i] for i in order]


def _apply_rule(values: pa.Array, rule: str, other: str, field: str) -> pa.Array:
    values = pc.utf8_trim_whitespace(pc.fill_null(pc.cast(values, pa.string()), ""))
    if rule in ("", "value"):
        return pc.if_else(pc.equal(values, ""), pa.scalar(other), values)
    m = re.fullmatch(r"prefix(\d+)", rule)
    if not m:
        raise InputError(f"unknown rule {rule!r}; use 'value' or 'prefixN'", field=field)
    n = int(m.group(1))
    prefix = pc.utf8_slice_codeunits(values, 0, n)
    digits = pc.match_substring_regex(prefix, rf"^\d{{{n}}}$")
    return pc.if_else(digits, prefix, pa.scalar(other))


def assign_domains(log: RawLog, rule: str | None, *, other: str = "other",
                   user_key: str = "user_id", item_key: str = "item_id") -> tuple[np.ndarray, list[str]]:
    """One domain code per interaction, and the domain names (sorted)."""
    t = log.interactions
    if not rule:
        if "domain" in t.column_names:
            return _encode(t["domain"])
        return np.zeros(t.num_rows, dtype=np.int32), ["all"]
    if rule.startswith("column:"):
        if "domain" not in t.column_names:
            raise InputError(f"rule {rule!r} needs the domain column; pass --domain-col", field="--domain-from")
        return _encode(t["domain"])
    m = re.fullmatch(r"(user|item)\.([^:]+)(?::(.*))?", rule)
    if not m:
        raise InputError(f"cannot parse {rule!r}; expected column:NAME, user.ATTR[:RULE] or item.ATTR[:RULE]",
                         field="--domain-from")
    side, attr, sub = m.group(1), m.group(2), m.group(3) or "value"
    table = log.user_attrs if side == "user" else log.item_attrs
    if table is None:
        raise InputError(f"rule {rule!r} needs a {side} attribute file; none was found or given "
                         f"(--{side}-attrs FILE)", field="--domain-from")
    cols = table.table.column_names
    if attr not in cols:
        raise InputError(f"the {side} file has no attribute {attr!r}; it has {cols}", path=table.path, field=attr)
    key = (user_key if side == "user" else item_key)
    key = key if key in cols else cols[0]
    keys = pc.cast(table.table[key], pa.string()).combine_chunks()
    if pc.count_distinct(keys).as_py() != len(keys):
        dup = pc.value_counts(keys).filter(pc.greater(pc.struct_field(pc.value_counts(keys), [1]), 1))
        raise InputError(f"duplicate {side} id(s), e.g. {dup[0]['values'].as_py()!r}", path=table.path, field=key)
    ids = pc.cast(t[side], pa.string())
    idx = pc.index_in(ids, value_set=keys)
    missing = pc.is_null(idx).to_numpy(zero_copy_only=False)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise InputError(f"{int(missing.sum())} interaction(s) have a {side} with no row in {table.path}, "
                         f"e.g. {side} {ids[first].as_py()!r}", path=log.source.path,
                         line=log.line(first), field=side)
    values = pc.take(table.table[attr].combine_chunks(), idx)
    return _encode(_apply_rule(values, sub, other, "--domain-from"))
