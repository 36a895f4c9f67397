"""``Recommender``: every region of an exported bundle, in process (the server's engine, no HTTP).

A thin front on :class:`crossrec_dist.serving.engine.ServingEngine`, which ``crossrec serve`` and
``crossrec recommend --input`` use too, so the three give the same answers: regions with a LoRA adapter
share one base (rows of different regions in one forward pass, PEFT's mixed-adapter inference),
regions PEFT cannot mix and fully fine-tuned regions are their own merged models, and a region without
an adapter is answered by the base. Items are raw ids from the training data (``items.json``), so
callers never see internal indices.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..serving.engine import Query, ServingEngine

UNKNOWN = ("error", "skip")     # what recommend() does with an item id the region's vocabulary lacks


class Recommender:
    """Serve recommendations from an exported bundle.

    Args:
        base: the base model DIR (``crossrec export``'s ``OUT/base`` or any model DIR).
        adapters: the adapters folder with ``manifest.json`` (``OUT/adapters``); None = base only.
        device: torch device.

    ``recommend(history, domain, k)`` takes raw item ids, returns ``[(item_id, score), ...]`` with the
    history's items excluded; ``recommendation(...)`` returns the same with how it was made (how many
    events were known, which ids were skipped, ``source``: model or popularity, and ``model``: which of
    the region's models answered and its version); ``scores(histories, domain)`` gives the raw score matrix.

    Short histories (docs/serving.md): a user with at least ``min_known`` known events (default 1) is
    ranked by the model. A user with fewer -- a new user, or one whose events are all on items the model
    does not know (``unknown="skip"``) -- gets the region's popularity list (``popularity.json``), the
    answer ``benchmarks/short_histories.py`` measures as better there. Without that file (a bundle from
    before it), the model's scores for an empty history.
    """

    def __init__(self, base: str | Path, adapters: str | Path | None = None, device: str = "cpu",
                 students: str | Path | None = None):
        self.engine = ServingEngine(base, adapters, students, device)

    @property
    def domains(self) -> list[str]:
        return list(self.engine.manifest["domains"])

    @property
    def vocab(self) -> list[str] | None:
        """The base's raw item ids in index order (index i+1 = vocab[i])."""
        return self.engine.vocab

    @property
    def index(self) -> dict[str, int] | None:
        """Raw item id -> the base's item index."""
        return self.engine.index

    @property
    def domain_ids(self) -> dict[str, int]:
        return self.engine.domain_ids

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def _route(self, domain: str | None, model: str | None = None):
        return self.engine.base_route if domain is None else self.engine.region(domain).route(model)

    def popularity(self, domain: str | None = None) -> list[tuple[str, int]] | None:
        """(item, training interactions) of the region, most frequent first (None: the bundle has no list)."""
        return self._route(domain).popularity

    def scores(self, histories: list[list], domain: str | None = None) -> torch.Tensor:
        """Scores over every item (B, N+1) after each history (raw ids), for one domain."""
        route = self._route(domain)
        qs = [Query(route, self.engine.encode(route, h, hint="unknown='skip' leaves such items out")[0], 1)
              for h in histories]
        with self.engine.lock:
            s = self.engine._scores(qs).clone()
        s[:, 0] = -torch.inf
        return s

    def recommend(self, history: list, domain: str | None = None, k: int = 10, exclude_history: bool = True,
                  unknown: str = "error", min_known: int = 1) -> list[tuple[str | int, float]]:
        r = self.recommendation(history, domain, k, exclude_history, unknown, min_known)
        return list(zip(r["items"], r["scores"]))

    def recommendation(self, history: list, domain: str | None = None, k: int = 10, exclude_history: bool = True,
                       unknown: str = "error", min_known: int = 1, model: str | None = None) -> dict:
        """The top ``k`` for one user, and how they were chosen: ``{"items", "scores", "source": "model" |
        "popularity", "known_events", "skipped", "model": {"kind", "version", ...}}`` (``skipped``: history
        ids not in the region's vocabulary, left out under ``unknown="skip"``). Fewer than ``min_known``
        known events: the region's popularity list (scores = training interactions), when the bundle has it."""
        if unknown not in UNKNOWN:
            raise InputError(f"unknown must be one of {UNKNOWN}, got {unknown!r}", field="unknown")
        route = self._route(domain, model)
        known, skipped = self.engine.encode(route, history, "drop" if unknown == "skip" else "error",
                                            hint="unknown='skip' leaves such items out")
        base = {"known_events": len(known), "skipped": skipped, "model": route.describe()}
        if len(known) < min_known:
            popular = self.engine.popular(route, known, k, exclude_history)
            if popular is not None:
                return {"items": popular[0], "scores": popular[1], "source": "popularity", **base}
        items, scores, _ = self.engine.answer([Query(route, known, k, exclude_history)])[0]
        return {"items": items, "scores": scores, "source": "model", **base}
