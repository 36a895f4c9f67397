"""Identity of an item vocabulary: what models, datasets and adapters are matched on.

Written by ``prepare`` (meta.json), recomputed by :class:`~crossrec_dist.data.prepared.PreparedData`
for folders prepared before it was recorded, and checked by :mod:`crossrec_dist.export.vocab`.
"""
from __future__ import annotations

import hashlib


def vocab_hash(item_ids: list[str]) -> str:
    """Identity of an item vocabulary: SHA-256 of the raw ids in index order (index i+1 = ids[i]).

    Two vocabularies of the same size but other ids (or another order) differ; models, datasets and
    adapters are matched on this, never on the size alone."""
    h = hashlib.sha256()
    for i in item_ids:
        h.update(str(i).encode("utf-8", "surrogatepass") + b"\0")
    return "sha256:" + h.hexdigest()
