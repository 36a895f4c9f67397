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
from .vocab import read_vocab


class Recommender:
    """Serve recommendations from an exported bundle.

    Args:
        base: the base model DIR (``crossrec export``'s ``OUT/base`` or any model DIR).
        adapters: the adapters folder with ``manifest.json`` (``OUT/adapters``); None = base only.
        device: torch device.

    ``recommend(history, domain, k)`` takes raw item ids, returns ``[(item_id, score), ...]`` with the
    history's items excluded; ``scores(histories, domain)`` gives the raw score matrix.
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
        _, index = self._vocab(domain)
        if index is None:
            return [int(h) for h in history]
        try:
            return [index[str(h)] for h in history]
        except KeyError as e:
            raise InputError(f"unknown item id {e.args[0]!r}", field="history") from None

    def _model_for(self, domain: str | None):
        entry = self.manifest["domains"].get(domain) if domain else None
        if domain and entry is None and domain not in self.domain_ids:
            raise InputError(f"unknown domain {domain!r}; known: {self.domains or list(self.domain_ids)}", field="domain")
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

    @torch.no_grad()
    def scores(self, histories: list[list], domain: str | None = None) -> torch.Tensor:
        """Scores over every item (B, N+1) after each history, for one domain."""
        ids = [self._encode(h, domain)[-self.max_len:] for h in histories]
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

    def recommend(self, history: list, domain: str | None = None, k: int = 10,
                  exclude_history: bool = True) -> list[tuple[str | int, float]]:
        s = self.scores([history], domain)[0]
        if exclude_history and history:
            s[torch.tensor(self._encode(history, domain))] = -torch.inf
        top = torch.topk(s, k)
        ids = top.indices.tolist()
        vocab, _ = self._vocab(domain)
        names = [vocab[i - 1] for i in ids] if vocab else ids
        return list(zip(names, top.values.tolist()))
