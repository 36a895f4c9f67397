"""The item vocabulary travels with every model: ``items.json`` maps index i+1 -> raw item id.

A model and a dataset fit together only when their vocabularies are *the same list*: the same size
is not enough (two preparations of different logs can both have 1,682 items, and a model would then
score the wrong items without a word). Both sides are compared by ``vocab_hash`` (SHA-256 of the ids
in index order): the dataset records it in meta.json, the model carries items.json.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np

from ..data.vocabulary import vocab_hash
from ..errors import InputError
from ..jsonfile import read_json
from ..models.loading import check_model_dir

VOCAB = "items.json"
UNTRAINED = "untrained_items.json"
POPULARITY = "popularity.json"
POPULAR_KEPT = 10_000    # popularity.json's length: a cold-start answer never needs more (5M items would be 100 MB)


def write_vocab(data, out_dir: str | Path) -> None:
    ids = datasets.load_from_disk(str(Path(data.path) / "items"))["item_id"]
    (Path(out_dir) / VOCAB).write_text(json.dumps(list(ids)))


def read_vocab(model_dir: str | Path) -> list[str] | None:
    path = Path(model_dir) / VOCAB
    return read_json(path, list, "a JSON list of item ids") if path.is_file() else None


def check_same_vocabulary(model_dir: str | Path, data, what: str = "model", is_model: bool = True) -> None:
    """``model_dir``'s items.json lists exactly ``data``'s items, in the same order (``is_model``: False
    for an adapter folder, which carries items.json when it extends its base's vocabulary)."""
    if is_model:
        check_model_dir(model_dir)      # first: "not a model folder" says more than "no items.json"
    path = Path(model_dir) / VOCAB
    ids = read_vocab(model_dir)
    if ids is None:
        raise InputError(f"the {what} has no {VOCAB} (its item vocabulary), so which item each of its rows "
                         f"scores is unknown; "
                         f"models written by crossrec carry one (copy it from the model it was made from)",
                         path=str(path))
    if vocab_hash(ids) != data.vocab_hash:
        size = (f"same size ({len(ids):,} items) but other ids or another order" if len(ids) == data.num_items
                else f"{len(ids):,} items vs the dataset's {data.num_items:,}")
        raise InputError(f"the {what}'s item vocabulary is not the dataset's ({size}): it was trained on another "
                         f"preparation; evaluate and adapt it on the prepared folder it was trained on, or "
                         f"prepare a new region's log with 'crossrec prepare --vocab-from {model_dir}'",
                         path=str(path))


def check_vocabulary_starts_with(model_dir: str | Path, data, what: str = "base model", is_model: bool = True) -> int:
    """``data``'s vocabulary is ``model_dir``'s, or starts with it (``prepare --vocab-from``: items new to
    the model follow its own). Returns the model's item count."""
    if is_model:
        check_model_dir(model_dir)
    ids = read_vocab(model_dir)
    if ids is not None and len(ids) < data.num_items:
        data_ids = datasets.load_from_disk(str(Path(data.path) / "items"))["item_id"][:len(ids)]
        if vocab_hash(list(data_ids)) == vocab_hash(ids):
            return len(ids)
        raise InputError(f"the dataset has more items than the {what} ({data.num_items:,} vs {len(ids):,}) but its "
                         f"vocabulary does not start with the {what}'s: prepare the new region with "
                         f"'crossrec prepare --vocab-from {model_dir}'", path=str(Path(model_dir) / VOCAB))
    check_same_vocabulary(model_dir, data, what, is_model)
    return data.num_items


def write_untrained_items(data, domains, out_dir: str | Path) -> None:
    """``untrained_items.json``: the item indices no training part of the pretraining ``domains`` holds.
    Their rows of the base are never trained; a region prepared later against the base's vocabulary
    (``--vocab-from``) no longer holds those domains, so this is how it still knows which are new."""
    counts = data.item_counts(domains)
    (Path(out_dir) / UNTRAINED).write_text(json.dumps([int(i) for i in (counts[1:] == 0).nonzero()[0] + 1]))


def read_untrained_items(model_dir: str | Path) -> list[int] | None:
    path = Path(model_dir) / UNTRAINED
    return read_json(path, list, "a JSON list of item indices") if path.is_file() else None


def popularity_record(data, domains, only=None) -> dict:
    """What ``popularity.json`` holds: the training interactions per item of ``domains`` (of the sequences
    in ``only`` when given: a run on sampled users knows only theirs), most frequent first, as raw ids.
    What ``Recommender`` answers a user none of whose events it knows (a new user, or only new items):
    the model has nothing to condition on, and a region's own counts are the measured answer there."""
    counts = data.item_counts(domains, only=only)
    ids = datasets.load_from_disk(str(Path(data.path) / "items"))["item_id"]
    order = np.argsort(-counts[1:], kind="stable")[:POPULAR_KEPT] + 1      # ties: index order
    order = [int(i) for i in order if counts[i] > 0]
    return {"domains": list(domains) if domains else None, "sequences": None if only is None else int(len(only)),
            "items": [ids[i - 1] for i in order], "counts": [int(counts[i]) for i in order]}


def write_popularity(record: dict, out_dir: str | Path) -> None:
    (Path(out_dir) / POPULARITY).write_text(json.dumps(record))


def read_popularity(folder: str | Path) -> list[tuple[str, int]] | None:
    """(raw item id, training interactions) of ``folder``'s popularity.json, most frequent first (None:
    no such file)."""
    path = Path(folder) / POPULARITY
    if not path.is_file():
        return None
    record = read_json(path, dict, "an object with the items, most frequent first, and their counts")
    items, counts = record.get("items"), record.get("counts")
    if not isinstance(items, list) or not isinstance(counts, list) or len(items) != len(counts):
        raise InputError("expected two lists of the same length, 'items' and 'counts'", path=str(path), field="items")
    return [(str(i), int(c)) for i, c in zip(items, counts)]
