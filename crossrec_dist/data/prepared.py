"""Read a prepared dataset DIR back as flat numpy arrays (zero-copy from Arrow).

Sequences stay in CSR form (``offsets`` + ``items``): slicing a user's history is two integer reads,
and no stage ever holds one Python list per user.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError


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

    def __init__(self, path: str | Path):
        import datasets

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
        table = datasets.load_from_disk(str(self.path / "sequences")).with_format("arrow")[:]
        col = table["item_ids"].combine_chunks()
        self.offsets = col.offsets.to_numpy().astype(np.int64)
        self.items = col.values.to_numpy().astype(np.int64)
        self.train_end = table["train_end"].to_numpy().astype(np.int64)
        self.valid_end = table["valid_end"].to_numpy().astype(np.int64)
        self.domain_names: list[str] = list(self.meta["domains"])
        dom = table["domain"].to_pylist()  # one short string per sequence, not per interaction
        index = {d: i for i, d in enumerate(self.domain_names)}
        self.seq_domain = np.fromiter((index[d] for d in dom), dtype=np.int64, count=len(dom))
        self.user_ids = table["user_id"]
        self.num_items = int(self.meta["num_items"])

    @property
    def vocab_hash(self) -> str:
        """Identity of the item vocabulary (recorded by prepare; computed for older folders)."""
        if "vocab_hash" not in self.meta:
            import datasets

            from .prepare import vocab_hash
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
            return EvalSet(seqs, ends, self.items[self.offsets[seqs] + ends], self.seq_domain[seqs])
        mask = self.sequence_mask(domains)
        hist_end = self.train_end if split == "valid" else self.valid_end
        has_target = (self.valid_end > self.train_end) if split == "valid" else (self.lengths > self.valid_end)
        idx = np.flatnonzero(mask & has_target & (hist_end >= 1))
        targets = self.items[self.offsets[idx] + hist_end[idx]]
        return EvalSet(idx, hist_end[idx], targets, self.seq_domain[idx])

    def history(self, seq: int, end: int) -> np.ndarray:
        start = self.offsets[seq]
        return self.items[start:start + end]

    def row_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """(sequence index, position within its sequence) of every stored interaction."""
        lengths = self.lengths
        seq = np.repeat(np.arange(self.num_sequences), lengths)
        return seq, np.arange(len(self.items)) - self.offsets[:-1][seq]

    def catalogue(self, domains=None) -> np.ndarray:
        """Items (bool mask over indices, 0 = padding = False) with any interaction in ``domains``:
        the platform's catalogue when each platform is a domain. Every validation or test target of
        those domains is in it, so ranking only these items never hides a right answer; it drops
        items the target platform does not have (a cross-platform base knows thousands)."""
        seq, _ = self.row_positions()
        mask = np.zeros(self.num_items + 1, dtype=bool)
        mask[self.items[self.sequence_mask(domains)[seq]]] = True
        mask[0] = False
        return mask

    def item_counts(self, domains=None, only: np.ndarray | None = None) -> np.ndarray:
        """Interaction counts per item index over the training parts (index 0 = padding = 0), of the
        sequences in ``only`` alone when given."""
        seq, pos = self.row_positions()
        keep = self.sequence_mask(domains)[seq] & (pos < self.train_end[seq])
        if only is not None:
            keep &= np.isin(seq, only)
        return np.bincount(self.items[keep], minlength=self.num_items + 1)
