"""Read a prepared dataset DIR back as flat numpy arrays, memory-mapped.

Sequences stay in CSR form (``offsets`` + ``items``): slicing a user's history is two integer reads,
and no stage ever holds one Python list per user.

Why memory-mapped. ``prepare`` writes the columns every stage reads (item ids in time order, the
sequence offsets, split points, domain codes) a second time as plain ``.npy`` files in ``arrays/``,
item ids as 32-bit integers while the vocabulary fits. They are opened with ``mmap_mode="r"``: the
ranks of a node share one copy in the page cache, a rank reads only the pages of the windows it
trains on, and loading a dataset of a billion interactions costs no resident memory up front. (The
HF ``datasets`` Arrow files stay the record of the data; they are also memory-mapped, but written in
chunks of a thousand rows, so one contiguous array of them is always a copy.) Folders prepared before
``arrays/`` existed are read the old way, into memory from Arrow.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np

from ..errors import InputError
from .vocabulary import vocab_hash

ARRAYS = "arrays"
ARRAY_NAMES = ("offsets", "items", "train_end", "valid_end", "seq_domain")
SHARDS = "shards"                 # arrays/shards/: the item ids of a sharded folder, one file per shard
SEQ_SHARD = "seq_shard"           # arrays/seq_shard.npy: the shard of each sequence


def shard_file(folder: Path, shard: int, shards: int) -> Path:
    return folder / SHARDS / f"shard-{shard:05d}-of-{shards:05d}.npy"


def item_dtype(num_items: int):
    """32-bit item ids while the vocabulary fits (half the bytes of int64 in memory and on disk)."""
    return np.int32 if num_items < 2**31 - 1 else np.int64


def write_arrays(folder: Path, offsets: np.ndarray, items: np.ndarray, train_end: np.ndarray,
                 valid_end: np.ndarray, seq_domain: np.ndarray, num_items: int) -> None:
    """The ``arrays/`` of a prepared dataset (see the module docstring): plain ``.npy``, no pickles."""
    folder.mkdir(parents=True, exist_ok=True)
    small = np.int32 if int(offsets[-1]) < 2**31 else np.int64      # split points are positions in a sequence
    for name, values, dtype in (("offsets", offsets, np.int64), ("items", items, item_dtype(num_items)),
                                ("train_end", train_end, small), ("valid_end", valid_end, small),
                                ("seq_domain", seq_domain, np.int32)):
        if values is None:      # written by the caller (the out-of-core prepare streams items.npy)
            continue
        np.save(folder / f"{name}.npy", np.ascontiguousarray(values, dtype=dtype), allow_pickle=False)


class ShardedItems:
    """The item ids of a folder prepared with ``--shards N``, addressed like ``items.npy`` (by global
    position, ``offsets[s] + k``) but stored as N files, one per user-hash shard, each holding its
    sequences' rows in the global order. A shard's file is memory-mapped on its first read: a rank
    that reads only its own shards' sequences (``SequenceBatches`` and the sharded evaluator deal them
    out that way) never opens, let alone pages in, another shard's rows. ``opened`` says which it did."""

    def __init__(self, folder: Path, offsets: np.ndarray, seq_shard: np.ndarray, shards: int, num_items: int):
        self.folder, self.offsets, self.seq_shard, self.shards = folder, offsets, seq_shard, shards
        self.dtype = np.dtype(item_dtype(num_items))
        self.shape, self.ndim = (int(offsets[-1]),), 1
        lengths = np.diff(offsets)
        local_start = np.zeros(len(lengths), dtype=np.int64)
        for k in range(shards):
            mine = seq_shard == k
            local_start[mine] = np.r_[0, np.cumsum(lengths[mine])[:-1]] if mine.any() else 0
        self.delta = local_start - offsets[:-1]        # global position p of sequence s = local p + delta[s]
        self.opened: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.shape[0]

    def shard(self, k: int) -> np.ndarray:
        if k not in self.opened:
            file = shard_file(self.folder, k, self.shards)
            try:
                self.opened[k] = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read shard {k} ({e}); prepare the dataset again", path=str(file)) from None
        return self.opened[k]

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1 and stop > start:
                seq = int(np.searchsorted(self.offsets, start, side="right")) - 1
                if stop <= self.offsets[seq + 1]:        # one sequence: one contiguous run of its shard
                    local = start + int(self.delta[seq])
                    return self.shard(int(self.seq_shard[seq]))[local:local + stop - start]
            key = np.arange(start, stop, step)
        scalar = np.ndim(key) == 0
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        flat = key.reshape(-1).astype(np.int64)
        seq = np.searchsorted(self.offsets, flat, side="right") - 1
        shard, local = self.seq_shard[seq], flat + self.delta[seq]
        out = np.empty(len(flat), dtype=self.dtype)
        for k in np.unique(shard):
            mine = shard == k
            out[mine] = self.shard(int(k))[local[mine]]
        return out[0] if scalar else out.reshape(key.shape)

    def __array__(self, dtype=None, copy=None):
        """Every item id in the global order (reads every shard: for small data and tests)."""
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)


@dataclass
class EvalSet:
    """Histories (CSR slices of ``PreparedData.items``) and the next item to predict."""
    seq_index: np.ndarray     # which sequence each example comes from
    hist_end: np.ndarray      # history = items[offsets[s] : offsets[s] + hist_end]
    targets: np.ndarray
    domains: np.ndarray       # domain code per example

    def only(self, sequences: np.ndarray) -> "EvalSet":
        """The examples of these sequences (users) only."""
        keep = np.isin(self.seq_index, sequences)
        return EvalSet(self.seq_index[keep], self.hist_end[keep], self.targets[keep], self.domains[keep])


class PreparedData:
    """A prepared dataset DIR (written by ``crossrec prepare``), read once into flat arrays.

    Attributes:
        offsets, items: CSR sequences; user ``s``'s items in time order are
            ``items[offsets[s]:offsets[s + 1]]``, as vocabulary indices (1..num_items, 0 = padding).
        seq_domain: domain code of each sequence; ``domain_names[code]`` is its name.
        num_items: vocabulary size without padding.
        stats, meta: the folder's ``stats.json`` and ``meta.json``.

    Splits follow the folder's protocol (leave-one-out by default: the last item of each sequence is
    its test target, the one before its validation target, the rest training).
    """

    def __init__(self, path: str | Path, memory_map: bool = True):
        self.path = Path(path)
        for need in ("sequences", "items", "stats.json", "meta.json"):
            if not (self.path / need).exists():
                raise InputError(f"not a prepared dataset (missing {need}); run 'crossrec prepare' first",
                                 path=str(self.path))
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            self.stats = json.loads((self.path / "stats.json").read_text())
        except ValueError as e:
            raise InputError(f"meta.json / stats.json is not valid JSON ({e}); prepare it again",
                             path=str(self.path)) from None
        self.domain_names: list[str] = list(self.meta["domains"])
        self.num_items = int(self.meta["num_items"])
        self._user_ids = None
        self.shards = 0                    # > 0: a folder prepared with --shards (``seq_shard``, ``ShardedItems``)
        self.seq_shard: np.ndarray | None = None
        self.memory_mapped = memory_map and (self.path / ARRAYS).is_dir()
        if self.memory_mapped:
            self._map_arrays()
        else:
            self._read_arrow()

    def _map_arrays(self) -> None:
        folder = self.path / ARRAYS
        arrays = {}
        self.shards = int(self.meta.get("options", {}).get("shards") or 0)
        for name in ARRAY_NAMES + ((SEQ_SHARD,) if self.shards else ()):
            if name == "items" and self.shards:
                continue
            file = folder / f"{name}.npy"
            try:
                arrays[name] = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot read {name}.npy ({e}); prepare the dataset again", path=str(file)) from None
        self.offsets = arrays["offsets"]
        self.train_end, self.valid_end, self.seq_domain = arrays["train_end"], arrays["valid_end"], arrays["seq_domain"]
        if self.shards:
            self.seq_shard = np.asarray(arrays[SEQ_SHARD])
            self.items = ShardedItems(folder, np.asarray(self.offsets), self.seq_shard, self.shards, self.num_items)
        else:
            self.items = arrays["items"]
        n = len(self.train_end)
        shapes_ok = (len(self.offsets) == n + 1 and len(self.valid_end) == n and len(self.seq_domain) == n
                     and int(self.offsets[-1]) == len(self.items) == int(self.stats.get("interactions", len(self.items))))
        if not shapes_ok or self.items.dtype.kind != "i" or self.offsets.dtype != np.int64:
            raise InputError(f"{ARRAYS}/ does not match this dataset ({n} sequences, offsets {len(self.offsets)}, "
                             f"{len(self.items)} items, stats say {self.stats.get('interactions')}); prepare it again",
                             path=str(folder))

    def _read_arrow(self) -> None:
        """The loader of folders without ``arrays/``: every column copied into memory from Arrow."""
        table = datasets.load_from_disk(str(self.path / "sequences")).with_format("arrow")[:]
        col = table["item_ids"].combine_chunks()
        self.offsets = col.offsets.to_numpy().astype(np.int64)
        self.items = col.values.to_numpy().astype(np.int64)
        self.train_end = table["train_end"].to_numpy().astype(np.int64)
        self.valid_end = table["valid_end"].to_numpy().astype(np.int64)
        dom = table["domain"].to_pylist()  # one short string per sequence, not per interaction
        index = {d: i for i, d in enumerate(self.domain_names)}
        self.seq_domain = np.fromiter((index[d] for d in dom), dtype=np.int64, count=len(dom))
        self._user_ids = table["user_id"]

    @property
    def user_ids(self):
        """Raw user id of each sequence (an Arrow column, memory-mapped), read on first use."""
        if self._user_ids is None:
            self._user_ids = datasets.load_from_disk(str(self.path / "sequences")).with_format("arrow")[:]["user_id"]
        return self._user_ids

    @property
    def vocab_hash(self) -> str:
        """Identity of the item vocabulary (recorded by prepare; computed for older folders)."""
        if "vocab_hash" not in self.meta:
            self.meta["vocab_hash"] = vocab_hash(datasets.load_from_disk(str(self.path / "items"))["item_id"])
        return self.meta["vocab_hash"]

    @property
    def num_sequences(self) -> int:
        return len(self.train_end)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def domain_codes(self, domains: list[str] | str | None) -> np.ndarray:
        if domains is None or domains == "all" or domains == ["all"] and "all" not in self.domain_names:
            return np.arange(len(self.domain_names))
        if isinstance(domains, str):
            domains = [d for d in domains.split(",") if d]
        unknown = [d for d in domains if d not in self.domain_names]
        if unknown:
            raise InputError(f"unknown domain(s) {unknown}; this dataset has {self.domain_names}",
                             path=str(self.path), field="--domain")
        return np.array([self.domain_names.index(d) for d in domains], dtype=np.int64)

    def sequence_mask(self, domains=None) -> np.ndarray:
        return np.isin(self.seq_domain, self.domain_codes(domains))

    def train_sequences(self, domains=None, *, include_valid: bool = False,
                        holdout: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(sequence indices, usable lengths) of the training part of each sequence; ``holdout`` more
        items at its end are kept out of training (extra validation targets, see ``eval_set``)."""
        mask = self.sequence_mask(domains)
        ends = (self.valid_end if include_valid else self.train_end) - holdout
        idx = np.flatnonzero(mask & (ends >= 2))
        return idx, ends[idx]

    def eval_set(self, split: str, domains=None, targets_per_user: int = 1) -> EvalSet:
        """valid: predict items[train_end] from items[:train_end]; test: items[valid_end] from items[:valid_end].

        ``targets_per_user`` = K > 1 (valid only): also predict each of the K - 1 items before
        items[train_end], each from its own prefix. Those items must then be kept out of training
        (``train_sequences(holdout=K - 1)``). On a target of ~100 users, one validation item each is
        too noisy to select a checkpoint on; K of them shrink that noise by about sqrt(K)."""
        if split not in ("valid", "test"):
            raise ValueError(split)
        if targets_per_user > 1:
            if split != "valid":
                raise ValueError("several targets per user exist for the valid split only")
            one = self.eval_set("valid", domains)
            ends = np.concatenate([one.hist_end - j for j in range(targets_per_user)])
            seqs = np.concatenate([one.seq_index] * targets_per_user)
            keep = ends >= 1
            order = np.lexsort((ends[keep], seqs[keep]))
            seqs, ends = seqs[keep][order], ends[keep][order]
            return EvalSet(seqs, ends, self.items[self.offsets[seqs] + ends].astype(np.int64),
                           self.seq_domain[seqs].astype(np.int64))
        mask = self.sequence_mask(domains)
        hist_end = self.train_end if split == "valid" else self.valid_end
        has_target = (self.valid_end > self.train_end) if split == "valid" else (self.lengths > self.valid_end)
        idx = np.flatnonzero(mask & has_target & (hist_end >= 1))
        targets = self.items[self.offsets[idx] + hist_end[idx]].astype(np.int64)
        return EvalSet(idx, hist_end[idx].astype(np.int64), targets, self.seq_domain[idx].astype(np.int64))

    def left_padded(self, seq: np.ndarray, end: np.ndarray, length: int) -> np.ndarray:
        """The last ``length`` items before ``end`` of each sequence ``seq``, right-aligned, 0-padded,
        as int64 (the stored ids may be int32). Only those rows are read: on a memory-mapped dataset a
        rank touches the pages of its own windows and no neighbour's. Training windows and evaluation
        histories are both cut here."""
        start = self.offsets[seq]
        pos = start[:, None] + end[:, None] - length + np.arange(length)[None, :]
        valid = pos >= start[:, None]
        out = np.zeros(pos.shape, dtype=np.int64)
        out[valid] = self.items[pos[valid]]
        return out

    def history(self, seq: int, end: int) -> np.ndarray:
        start = self.offsets[seq]
        return self.items[start:start + end]

    def row_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(sequence index, position within its sequence) of every stored interaction (16 bytes per
        interaction: for tests and small data; the methods below avoid it)."""
        lengths = self.lengths
        seq = np.repeat(np.arange(self.num_sequences), lengths)
        return seq, np.arange(len(self.items)) - self.offsets[:-1][seq]

    def _item_pieces(self, sequences: np.ndarray, ends: np.ndarray | None = None, piece: int = 1 << 24):
        """The item ids of the first ``ends[k]`` items (all, when None) of each selected sequence (sorted
        indices), in pieces spanning at most ``piece`` stored interactions (one sequence longer than that
        is a piece of its own). Memory is bounded by the piece, not by the log: over 250M interactions a
        mask and a gather over all of them cost rank 0 ~2 GiB more than the same run on 20M
        (benchmarks/RESULTS.md §4.7)."""
        starts = self.offsets[:-1][sequences]
        span_ends = self.offsets[1:][sequences]
        stops = span_ends if ends is None else starts + ends[sequences]
        k = 0
        while k < len(sequences):
            lo = int(starts[k])
            j = max(int(np.searchsorted(span_ends, lo + piece, side="right")), k + 1)
            n = int(span_ends[j - 1]) - lo
            marks = np.zeros(n + 1, dtype=np.int8)    # +1 at each start, -1 at each stop: a running sum
            np.add.at(marks, starts[k:j] - lo, 1)
            np.add.at(marks, stops[k:j] - lo, -1)
            yield np.asarray(self.items[lo:lo + n])[np.cumsum(marks[:-1], dtype=np.int8) > 0]
            k = j

    def catalogue(self, domains=None) -> np.ndarray:
        """Items (bool mask over indices, 0 = padding = False) with any interaction in ``domains``:
        the platform's catalogue when each platform is a domain. Every validation or test target of
        those domains is in it, so ranking only these items never hides a right answer; it drops
        items the target platform does not have (a cross-platform base knows thousands)."""
        mask = np.zeros(self.num_items + 1, dtype=bool)
        for items in self._item_pieces(np.flatnonzero(self.sequence_mask(domains))):
            mask[items] = True
        mask[0] = False
        return mask

    def item_counts(self, domains=None, only: np.ndarray | None = None) -> np.ndarray:
        """Interaction counts per item index over the training parts (index 0 = padding = 0), of the
        sequences in ``only`` alone when given."""
        selected = self.sequence_mask(domains)
        if only is not None:
            chosen = np.zeros(self.num_sequences, dtype=bool)
            chosen[only] = True
            selected &= chosen
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for items in self._item_pieces(np.flatnonzero(selected), np.asarray(self.train_end)):
            counts += np.bincount(items, minlength=self.num_items + 1)
        return counts
