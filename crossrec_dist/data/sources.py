"""Several raw logs into one: each input read in its own format, domains assigned inside each, one
item vocabulary joined on the raw item id.

Cross-platform transfer needs both platforms in one prepared dataset (one vocabulary, so a model
pretrained on one scores the other's items). Rules:

* ``--domain-from source``: each input is one domain, named after its source (``--source-name``, or
  the input's folder / file stem). Any other rule (a column, ``user.zip_code:prefix1``...) is
  applied inside each input; with several inputs its domains are named ``SOURCE:VALUE``.
* Items are joined on the raw item id as text (``"1"`` and ``1`` are one item; so are two platforms'
  ``"Toy Story (1995)"``); ``stats.json`` counts each domain's shared and private items.
* Users are never joined: with several inputs a user id becomes ``SOURCE:ID``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .domains import assign_domains
from .readers import RawLog, read_log
from .times import TimeRule

SOURCE_RULE = "source"


@dataclass
class Source:
    name: str
    path: str
    format: str


@dataclass
class CombinedLog:
    """The interactions of every source, in source order then file order (ties keep that order)."""
    user: pa.Array                 # text; SOURCE:ID when there are several sources
    item: pa.Array                 # text, joined across sources
    timestamp: np.ndarray
    dom_code: np.ndarray           # index into dom_names (sorted)
    dom_names: list[str]
    source_code: np.ndarray        # index into sources
    sources: list[Source]
    raws: list[RawLog] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.raws)

    def note(self, key: str) -> int:
        return sum(int(r.notes.get(key, 0)) for r in self.raws)


def default_name(path: str) -> str:
    """A source's name from its path: the folder name, or the file name without its extensions."""
    p = Path(path)
    name = p.name if p.is_dir() else p.name.split(".")[0]
    return name or "source"


def make_sources(inputs: list[str], formats: list[str], names: list[str] | None) -> list[Source]:
    if not inputs:
        raise InputError("give at least one --input", field="--input")
    if len(formats) not in (1, len(inputs)):
        raise InputError(f"{len(formats)} --format values for {len(inputs)} inputs: give one format for all, "
                         "or one per --input in the same order", field="--format")
    formats = formats * len(inputs) if len(formats) == 1 else formats
    if names and len(names) != len(inputs):
        raise InputError(f"{len(names)} source names for {len(inputs)} inputs", field="--source-name")
    names = list(names) if names else [default_name(i) for i in inputs]
    seen: set[str] = set()
    for n in names:
        if not n.strip() or "," in n or ":" in n or any(ord(c) < 32 for c in n):
            raise InputError(f"source name {n!r} must be non-empty, without ',', ':' or control characters",
                             field="--source-name")
        if n in seen:
            raise InputError(f"two inputs are both called {n!r}; name them with --source-name A --source-name B",
                             field="--source-name")
        seen.add(n)
    return [Source(n, str(i), f) for n, i, f in zip(names, inputs, formats)]


def read_sources(sources: list[Source], opts, log=print) -> CombinedLog:
    """Read every source (its own format and rules), assign domains, and concatenate."""
    several = len(sources) > 1
    if several and (opts.user_attrs or opts.item_attrs):
        raise InputError("--user-attrs / --item-attrs name one file, but there are several inputs; keep each "
                         "input's attribute files next to it (recbole / movielens folders find them)",
                         field="--user-attrs" if opts.user_attrs else "--item-attrs")
    users, items, times, codes, source_codes, names_per, raws = [], [], [], [], [], [], []
    for k, src in enumerate(sources):
        raw = read_log(src.path, src.format, opts.columns, on_bad_rows=opts.on_bad_rows, user_attrs=opts.user_attrs,
                       item_attrs=opts.item_attrs, duplicates=opts.duplicates,
                       time_rule=TimeRule(opts.timezone, opts.time_unit))
        report_rules(raw.source.path, raw.skipped, raw.notes, opts, log)
        if opts.domain_from == SOURCE_RULE:
            code, names = np.zeros(raw.interactions.num_rows, dtype=np.int32), [src.name]
        else:
            code, names = assign_domains(raw, opts.domain_from, other=opts.other_domain,
                                         user_key=opts.columns.user, item_key=opts.columns.item)
            if several:
                names = [f"{src.name}:{n}" for n in names]
        check_domain_names(raw, code, names, opts)
        t = raw.interactions
        user = pc.cast(t["user"], pa.string()).combine_chunks()
        if several:
            user = pc.binary_join_element_wise(src.name, user, ":")
        users.append(user)
        items.append(pc.cast(t["item"], pa.string()).combine_chunks())
        times.append(t["timestamp"].to_numpy())
        codes.append(code)
        names_per.append(names)
        source_codes.append(np.full(t.num_rows, k, dtype=np.int32))
        # Keep what stats.json needs (counts, notes), not the tables: at 1e8 rows they are gigabytes.
        raw.interactions, raw.user_attrs, raw.item_attrs, raw.kept_rows = None, None, None, None
        raws.append(raw)
    all_names = sorted({n for names in names_per for n in names})
    index = {n: i for i, n in enumerate(all_names)}
    dom_code = np.concatenate([np.array([index[n] for n in names], dtype=np.int32)[c]
                               for c, names in zip(codes, names_per)])
    return CombinedLog(user=pa.concat_arrays(users), item=pa.concat_arrays(items), timestamp=np.concatenate(times),
                       dom_code=dom_code, dom_names=all_names, source_code=np.concatenate(source_codes),
                       sources=sources, raws=raws)


def report_rules(path: str, skipped: int, notes: dict, opts, log) -> None:
    """One line per input rule that changed something in ``path`` (skipped rows, trimmed ids, duplicates)."""
    if skipped:
        log(f"skipped {skipped} bad row(s) of {path} (--on-bad-rows skip)")
    if notes.get("stripped_whitespace_ids"):
        log(f"stripped surrounding whitespace from {notes['stripped_whitespace_ids']} id value(s) "
            f"of {path} (' u1 ' and 'u1' are one id)")
    if notes.get("duplicate_rows"):
        verb = "dropped" if opts.duplicates == "drop" else "kept"
        log(f"{verb} {notes['duplicate_rows']} exact duplicate row(s) of {path} (--duplicates {opts.duplicates})")
    for warning in notes.get("warnings", []):
        log(f"WARNING: {warning}")


def check_domain_names(raw: RawLog, codes: np.ndarray, names: list[str], opts) -> None:
    """Domain names are data that later become list items (``--domains a,b``) and, sanitised, folder
    names: an empty name, a comma or a control character is refused where it first occurs."""
    flag = opts.columns.domain or "--domain-from"
    for code, name in enumerate(names):
        why = ("is empty" if not name.strip() else
               "contains ',' (the separator of domain lists)" if "," in name else
               "contains a control character" if any(ord(ch) < 32 or ord(ch) == 127 for ch in name) else None)
        if why:
            rows = np.flatnonzero(codes == code)
            line = raw.line(int(rows[0])) if len(rows) else None
            raise InputError(f"domain name {name!r} {why}; rename it in the data or derive domains with a rule",
                             path=raw.source.path, line=line, field=flag)


def item_sharing(item: np.ndarray, group: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group (domain or source): how many of its distinct items also occur in another group
    (shared), and how many only in it (private)."""
    n_items = int(item.max()) + 1 if len(item) else 0
    if n_items * n_groups <= 100_000_000:
        # An (item, group) presence table: one pass, no sort (a sort of 1e8 pairs took gigabytes).
        present = np.zeros((n_items, n_groups), dtype=bool)
        present[item, group] = True
        item_of, group_of = np.nonzero(present)
    else:
        pairs = np.unique(item.astype(np.int64) * n_groups + group)
        item_of, group_of = pairs // n_groups, pairs % n_groups
    groups_per_item = np.bincount(item_of)
    shared_pair = groups_per_item[item_of] > 1
    shared = np.bincount(group_of, weights=shared_pair, minlength=n_groups).astype(np.int64)
    total = np.bincount(group_of, minlength=n_groups).astype(np.int64)
    return shared, total - shared
