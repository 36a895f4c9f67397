"""``Recommender``: one base model in memory, one adapter per region switched per request.

Regions fine-tuned with a PEFT method are adapters on the shared base (loaded once, switched with
``set_adapter``); regions fine-tuned fully, and AdaLoRA adapters with a LoRA on the item table (two
adapter types, which one ``PeftModel`` cannot hold), are separate models, loaded (merged) on first use. Items are raw
ids from the training data (``items.json``), so callers never see internal indices.
"""
from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from ..errors import InputError
from ..models.model import CrossRecModel
from ..paths import inside
from ..models.extend import extend_items
from .adapters import attach_adapter, check_base, is_mixed
from .loading import adapter_items
from .manifest import read_manifest
from .vocab import read_popularity, read_vocab

UNKNOWN = ("error", "skip")     # what recommend() does with an item id the region's vocabulary lacks


class Recommender:
    """Serve recommendations from an exported bundle.

    Args:
        base: the base model DIR (``crossrec export``'s ``OUT/base`` or any model DIR).
        adapters: the adapters folder with ``manifest.json`` (``OUT/adapters``); None = base only.
        device: torch device.

    ``recommend(history, domain, k)`` takes raw item ids, returns ``[(item_id, score), ...]`` with the
    history's items excluded; ``recommendation(...)`` returns the same with how it was made (how many
    events were known, which ids were skipped, ``source``: model or popularity); ``scores(histories,
    domain)`` gives the raw score matrix.

    Short histories (docs/serving.md): a user with at least ``min_known`` known events (default 1) is
    ranked by the model, whose input is that short history, as in training. A user with fewer -- a new
    user, or one whose events are all on items the model does not know (``unknown="skip"``) -- has
    nothing for the model to condition on: they get the region's popularity list (``popularity.json``,
    written by fine-tuning from the region's training data; the base's own for ``domain=None``), the
    answer ``benchmarks/short_histories.py`` measures as better there. Without that file (a bundle
    from before it), the model's scores for an empty history.
    """

    def __init__(self, base: str | Path, adapters: str | Path | None = None, device: str = "cpu"):
        self.base_dir, self.device = Path(base), device
        self.vocab = read_vocab(self.base_dir)
        self.index = {v: i + 1 for i, v in enumerate(self.vocab)} if self.vocab else None
        model = CrossRecModel.from_pretrained(self.base_dir, use_safetensors=True)
        self.max_len = model.config.max_len
        self.domain_ids = {d: i for i, d in enumerate(model.config.domain_names)}
        self.manifest = read_manifest(adapters) if adapters else {"domains": {}}
        self.adapters_root = Path(adapters) if adapters else None
        folders = {d: inside(self.adapters_root, e["path"]) for d, e in self.manifest["domains"].items()
                   if e["kind"] == "adapter"}
        self._mixed = {d: f for d, f in folders.items() if is_mixed(f)}
        # Adapters of regions prepared after the base (--vocab-from) hold rows of items the base never
        # saw: each is its own model (the base's table grown, the adapter merged) with its own items.json.
        self._extended = {d: f for d, f in folders.items() if adapter_items(f) and d not in self._mixed}
        self._vocabs = {}
        for d, folder in self._extended.items():
            ids = read_vocab(folder)
            if ids is None or ids[:len(self.vocab or [])] != list(self.vocab or []):
                raise InputError("an adapter that extends the base's vocabulary needs its items.json, starting with "
                                 "the base's items", path=str(folder), field=f"manifest.domains.{d}")
            self._vocabs[d] = (ids, {v: i + 1 for i, v in enumerate(ids)})
        for folder in [*self._mixed.values(), *self._extended.values()]:
            check_base(self.base_dir, folder)        # now, not at the first request
        self.adapter_domains = [d for d in folders if d not in self._mixed and d not in self._extended]
        self._full_models: dict[str, CrossRecModel] = {}
        self._popularity: dict[str | None, list[tuple[str, int]] | None] = {}
        # Domain names are data: folders come from the manifest through paths.inside, and PEFT adapter
        # names (module keys, where '.' is not allowed) are our own, one per domain.
        self._adapter_name = {d: f"region{i}" for i, d in enumerate(self.adapter_domains)}
        if self.adapter_domains:
            for i, d in enumerate(self.adapter_domains):
                folder = folders[d]
                check_base(self.base_dir, folder)
                if i == 0:
                    model = PeftModel.from_pretrained(model, str(folder), adapter_name=self._adapter_name[d])
                else:
                    model.load_adapter(str(folder), adapter_name=self._adapter_name[d])
        self.model = model.to(device).eval()

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    def _vocab(self, domain: str | None):
        """(ids, id -> index) of ``domain``: its own when its adapter extends the base's vocabulary."""
        return self._vocabs.get(domain, (self.vocab, self.index))

    def _encode(self, history, domain: str | None = None) -> list[int]:
        return self._known(history, domain, "error")[0]

    def _known(self, history, domain: str | None, unknown: str) -> tuple[list[int], list]:
        """(indices of the history's known items, the ids skipped as unknown)."""
        if unknown not in UNKNOWN:
            raise InputError(f"unknown must be one of {UNKNOWN}, got {unknown!r}", field="unknown")
        _, index = self._vocab(domain)
        if index is None:
            return [int(h) for h in history], []
        known, skipped = [], []
        for h in history:
            i = index.get(str(h))
            if i is not None:
                known.append(i)
            elif unknown == "skip":
                skipped.append(h)
            else:
                raise InputError(f"unknown item id {h!r} (unknown='skip' leaves such items out)", field="history")
        return known, skipped

    def popularity(self, domain: str | None = None) -> list[tuple[str, int]] | None:
        """(item, training interactions) of the region, most frequent first (None: the bundle has no list)."""
        if domain not in self._popularity:
            entry = self.manifest["domains"].get(domain) if domain else None
            folder = inside(self.adapters_root, entry["path"]) if entry else self.base_dir
            self._popularity[domain] = read_popularity(folder)
        return self._popularity[domain]

    def _check_domain(self, domain: str | None) -> None:
        if domain and domain not in self.manifest["domains"] and domain not in self.domain_ids:
            raise InputError(f"unknown domain {domain!r}; known: {self.domains or list(self.domain_ids)}", field="domain")

    def _model_for(self, domain: str | None):
        self._check_domain(domain)
        entry = self.manifest["domains"].get(domain) if domain else None
        if entry and entry["kind"] == "model":
            if domain not in self._full_models:
                self._full_models[domain] = CrossRecModel.from_pretrained(
                    inside(self.adapters_root, entry["path"]), use_safetensors=True).to(self.device).eval()
            return self._full_models[domain], None
        if domain in self._mixed or domain in self._extended:
            if domain not in self._full_models:
                folder = self._mixed.get(domain) or self._extended[domain]
                base = CrossRecModel.from_pretrained(self.base_dir, use_safetensors=True)
                if adapter_items(folder):
                    extend_items(base, adapter_items(folder))
                model = attach_adapter(base, folder)        # checked against the base in __init__
                self._full_models[domain] = model.merge_and_unload().to(self.device).eval()
            return self._full_models[domain], None
        if entry and entry["kind"] == "adapter":
            self.model.set_adapter(self._adapter_name[domain])
            return self.model, None
        return self.model, "base"

    def scores(self, histories: list[list], domain: str | None = None) -> torch.Tensor:
        """Scores over every item (B, N+1) after each history (raw ids), for one domain."""
        return self._scores_of([self._encode(h, domain) for h in histories], domain)

    @torch.no_grad()
    def _scores_of(self, encoded: list[list[int]], domain: str | None) -> torch.Tensor:
        ids = [seq[-self.max_len:] for seq in encoded]
        batch = torch.zeros(len(ids), self.max_len, dtype=torch.long)
        for row, seq in enumerate(ids):
            if seq:
                batch[row, -len(seq):] = torch.tensor(seq)
        dom = torch.full((len(ids),), self.domain_ids.get(domain, 0), dtype=torch.long)
        model, mode = self._model_for(domain)
        batch, dom = batch.to(self.device), dom.to(self.device)
        if mode == "base" and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                s = model(input_ids=batch, domain_ids=dom, return_scores=True)
        else:
            s = model(input_ids=batch, domain_ids=dom, return_scores=True)
        s[:, 0] = -torch.inf
        return s

    def recommend(self, history: list, domain: str | None = None, k: int = 10, exclude_history: bool = True,
                  unknown: str = "error", min_known: int = 1) -> list[tuple[str | int, float]]:
        r = self.recommendation(history, domain, k, exclude_history, unknown, min_known)
        return list(zip(r["items"], r["scores"]))

    def recommendation(self, history: list, domain: str | None = None, k: int = 10, exclude_history: bool = True,
                       unknown: str = "error", min_known: int = 1) -> dict:
        """The top ``k`` for one user, and how they were chosen: ``{"items", "scores", "source": "model" |
        "popularity", "known_events", "skipped"}`` (``skipped``: history ids not in the region's vocabulary,
        left out under ``unknown="skip"``). Fewer than ``min_known`` known events: the region's
        popularity list (scores = training interactions), when the bundle has it."""
        self._check_domain(domain)           # an unknown domain is an error whatever the history
        known, skipped = self._known(history, domain, unknown)
        vocab, _ = self._vocab(domain)
        popular = self.popularity(domain) if len(known) < min_known else None
        if popular is not None:
            seen = {vocab[i - 1] for i in known} if exclude_history and vocab else set()
            top = [(item, n) for item, n in popular if item not in seen][:k]
            return {"items": [item for item, _ in top], "scores": [float(n) for _, n in top],
                    "source": "popularity", "known_events": len(known), "skipped": skipped}
        s = self._scores_of([known], domain)[0]
        if exclude_history and known:
            s[torch.tensor(known)] = -torch.inf
        top = torch.topk(s, min(k, len(s) - 1))
        ids = top.indices.tolist()
        names = [vocab[i - 1] for i in ids] if vocab else ids
        return {"items": names, "scores": top.values.tolist(), "source": "model", "known_events": len(known),
                "skipped": skipped}
