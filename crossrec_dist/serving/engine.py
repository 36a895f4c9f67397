"""``ServingEngine``: every region of an exported bundle behind one call, ``answer(queries)``.

A query names its region and which of the region's models answers it (a **route**). Routes:

- ``adapter`` on the shared base: the region's LoRA, one of many in one ``PeftModel``
  (``shared_adapters.py``); rows of different regions go through one forward pass.
- ``adapter`` merged, or ``model``: adapters PEFT cannot mix with the others (AdaLoRA, a LoRA on the
  item table, a region with items the base lacks) and fully fine-tuned regions are their own models.
- ``student``: a distilled student exported to ONNX, in ONNX Runtime (``export --student``).
- ``base``: a region without an adapter (a source region the base was pretrained on, or a target not
  yet adapted) is answered by the base, and the answer says so.

``answer`` groups a micro-batch by the model that must run -- one forward for all shared-adapter rows,
one per merged model or student present -- and returns each row's top k. It is called from one
thread (the server's batcher, or the caller of ``Recommender``); ``install_adapter`` mutates the
shared model and runs on that same thread, between batches.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..export.adapters import adapter_info, attach_adapter, check_adapter_weights, check_base
from ..export.fingerprint import base_fingerprint
from ..export.loading import adapter_items, check_model_weights
from ..export.manifest import read_manifest
from ..export.vocab import read_popularity, read_vocab
from ..jsonfile import read_json
from ..models.extend import extend_items
from ..models.loading import check_model_dir, load_base_model
from ..paths import inside
from .shared_adapters import BASE, SharedAdapters, shareable, weights_version
from .students import STUDENTS, Student, read_students

KINDS = ("adapter", "model", "student", "base")
UNKNOWN = ("error", "drop")


class NotFound(InputError):
    """An unknown region, or a model the region does not have (HTTP 404)."""


@dataclass
class Route:
    """Which model answers a region's queries, and the vocabulary its rows and columns are in."""
    kind: str                     # adapter | model | student | base
    serving: str                  # shared | merged | onnx | base
    version: str
    vocab: list[str] | None
    index: dict[str, int] | None
    domain_id: int
    popularity: list[tuple[str, int]] | None
    adapter_name: str = BASE      # serving == shared
    model: object = None          # serving == merged: a CrossRecModel; onnx: a Student
    note: str | None = None
    ann: object = None            # an ItemIndex (serve --index faiss): top k from the hidden state

    def describe(self) -> dict:
        out = {"kind": self.kind, "version": self.version, "serving": self.serving}
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class Region:
    name: str
    primary: Route                # the adapter, fine-tuned model or base
    student: Route | None = None
    prefer_student: bool = False  # the bundle's per-region default (export --student-default)
    info: dict = field(default_factory=dict)     # method, trainable parameters, metrics (GET /v1/regions)

    @property
    def default(self) -> Route:
        return self.student if (self.prefer_student and self.student is not None) else self.primary

    def route(self, model: str | None) -> Route:
        """``model``: None or "default" (the region's default), "student", or the primary's kind."""
        if model in (None, "default"):
            return self.default
        if model == "student":
            if self.student is None:
                raise NotFound(f"region {self.name!r} has no student (export one with 'crossrec export --student')",
                               field="model")
            return self.student
        if model == self.primary.kind:
            return self.primary
        raise NotFound(f"region {self.name!r} is served by its {self.primary.kind}"
                       f"{' and its student' if self.student else ''}; no {model!r}", field="model")


@dataclass
class Query:
    route: Route
    known: list[int]              # item indices (1-based) of the history's known items, oldest first
    k: int
    exclude_seen: bool = True
    # Set by the server: the route is looked up again when the query's batch runs, so a query that was
    # queued while its region's adapter was replaced is answered by the new one (never by a removed one).
    region: str | None = None
    selector: str | None = None
    history: list | None = None


class ServingEngine:
    """Load a bundle (``crossrec export``'s folder: base/, adapters/, students/) for serving.

    ``base`` and ``adapters`` may also be given apart (``Recommender(base, adapters)``). ``item_index``:
    (item table, offsets) -> an index whose ``search(hidden, k, exclude)`` answers top k (``ann.py``'s
    FAISS ``ItemIndex``; None: exact scores over every item). One index per distinct output side,
    built when a route is loaded, before it takes traffic."""

    def __init__(self, base: str | Path, adapters: str | Path | None = None, students: str | Path | None = None,
                 device: str = "cpu", item_index=None):
        self.base_dir, self.device = Path(base), device
        self.item_index, self._indexes = item_index, {}
        check_model_weights(self.base_dir)
        self.lock = threading.RLock()     # install_adapter vs answer when no batcher serialises them
        self.vocab = read_vocab(self.base_dir)
        self.index = {v: i + 1 for i, v in enumerate(self.vocab)} if self.vocab else None
        self.core = load_base_model(self.base_dir).to(device)
        self.max_len = self.core.config.max_len
        self.num_items = self.core.config.num_items
        self.domain_ids = {d: i for i, d in enumerate(self.core.config.domain_names)}
        self.fingerprint = base_fingerprint(self.base_dir)
        self.shared = SharedAdapters(self.core)
        self.adapters_root = Path(adapters) if adapters else None
        self.manifest = read_manifest(self.adapters_root) if self.adapters_root else {"domains": {}}
        self._serial = 0
        self.base_route = Route("base", "base", self.fingerprint[7:19], self.vocab, self.index, 0,
                                read_popularity(self.base_dir))
        self.student_region = self._student_of_base()
        if self.student_region is not None:         # the bundle is a student alone: it serves its region only
            self.base_route.kind, self.base_route.note = "student", None
        self.regions: dict[str, Region] = {}
        for domain in self.core.config.domain_names:
            if self.student_region is None or domain == self.student_region:
                self.regions[domain] = Region(domain, self._base_route_for(domain), info=self._base_info(domain))
        for domain, entry in self.manifest["domains"].items():
            if entry.get("kind") == "none":
                continue
            folder = inside(self.adapters_root, entry["path"])
            route = self._load_route(domain, entry["kind"], folder)
            self.regions[domain] = Region(domain, route, info=self._entry_info(entry))
        for student in read_students(students):
            region = self.regions.get(student.region)
            if region is None:
                raise InputError(f"a student for region {student.region!r}, which the bundle does not serve",
                                 path=str(student.folder))
            region.student, region.prefer_student = self._student_route(student), student.default
        for region in self.regions.values():
            self._attach_index(region.primary)

    # ---- loading -------------------------------------------------------------------------------------

    def _student_of_base(self) -> str | None:
        path = self.base_dir / "student.json"
        return str(read_json(path)["region"]) if path.is_file() else None

    def _base_route_for(self, domain: str) -> Route:
        r = self.base_route
        if self.student_region is not None:
            note = None
        elif domain in (self.core.config.pretrain_domains or []):
            note = "a source region: the pretrained base answers"
        else:
            note = "no adapter for this region: the base answers (zero-shot)"
        return Route(r.kind, r.serving, r.version, r.vocab, r.index, self.domain_ids.get(domain, 0), r.popularity,
                     note=note)

    def _base_info(self, domain: str) -> dict:
        return {"method": "student" if self.student_region else "base", "params": None, "valid": None, "test": None,
                "source": domain in (self.core.config.pretrain_domains or [])}

    @staticmethod
    def _entry_info(entry: dict) -> dict:
        return {"method": entry.get("method"), "params": entry.get("params"), "valid": entry.get("valid"),
                "test": entry.get("test"), "new_items": entry.get("new_items", 0), "source": False}

    def check_adapter(self, folder: Path) -> None:
        """Before an adapter takes traffic: safetensors weights, trained on this base (fingerprint), and an
        item vocabulary that is the base's or starts with it."""
        check_adapter_weights(folder)
        check_base(self.base_dir, folder)
        if adapter_items(folder):
            ids = read_vocab(folder)
            if ids is None or ids[:len(self.vocab or [])] != list(self.vocab or []):
                raise InputError("an adapter that extends the base's vocabulary needs its items.json, starting with "
                                 "the base's items", path=str(folder))

    def _load_route(self, domain: str, kind: str, folder: Path) -> Route:
        popularity = read_popularity(folder)
        dom = self.domain_ids.get(domain, 0)
        if kind == "model":
            check_model_weights(folder)
            model = load_base_model(folder).to(self.device)
            ids = read_vocab(folder) or self.vocab
            return Route("model", "merged", weights_version(folder), ids, _index(ids), dom, popularity, model=model)
        if kind != "adapter":
            raise InputError(f"unknown kind {kind!r}", field=f"manifest.domains.{domain}.kind")
        self.check_adapter(folder)
        version = weights_version(folder)
        why = shareable(folder)
        if why is None:
            self._serial += 1
            name = f"region{self._serial}"
            self.shared.add(name, folder)
            return Route("adapter", "shared", version, self.vocab, self.index, dom, popularity, adapter_name=name)
        base = load_base_model(self.base_dir)
        ids = self.vocab
        if adapter_items(folder):
            extend_items(base, adapter_items(folder))
            ids = read_vocab(folder)
        merged = attach_adapter(base, folder).merge_and_unload().to(self.device).eval()
        return Route("adapter", "merged", version, ids, _index(ids), dom, popularity, model=merged,
                     note=f"served merged: {why}")

    def _student_route(self, student: Student) -> Route:
        ids = student.vocab
        return Route("student", "onnx", student.version, ids, _index(ids), student.domain_id,
                     self.regions[student.region].default.popularity, model=student)

    def install_adapter(self, region: str, folder: Path, info: dict | None = None) -> Route:
        """Serve ``region`` from the adapter in ``folder`` from the next batch on (checked first; on any
        error the old route keeps serving). Call on the thread that runs ``answer``."""
        with self.lock:
            self.check_adapter(folder)
            old = self.regions.get(region)
            route = self._load_route(region, "adapter", folder)
            try:
                self._attach_index(route)
            except Exception:
                if route.serving == "shared":
                    self.shared.remove_loaded(route.adapter_name)
                raise
            if old is not None and old.primary.serving == "shared":
                self.shared.remove_loaded(old.primary.adapter_name)
                self._indexes.pop(old.primary.adapter_name, None)
            elif old is not None and old.primary.serving == "merged":
                self._indexes.pop(id(old.primary.model), None)
            merged_info = {**(old.info if old else {}), **(info or {}), "source": False}
            self.regions[region] = Region(region, route, old.student if old else None,
                                          old.prefer_student if old else False, merged_info)
            return route

    def _attach_index(self, route: Route) -> None:
        """Give ``route`` the index over the item table and offsets it scores with (shared with every
        route that scores with the same ones: all base-served regions use one)."""
        if self.item_index is None or route.serving == "onnx":
            return
        if route.serving == "merged":
            bias = route.model.output_bias()
            key, table = id(route.model), route.model.item_weight()
        else:
            key, table, bias = self.shared.output_side(route.adapter_name)
        if key not in self._indexes:
            self._indexes[key] = self.item_index(table.detach().float().cpu().numpy(),
                                                 None if bias is None else bias.detach().float().cpu().numpy())
        route.ann = self._indexes[key]

    # ---- requests ------------------------------------------------------------------------------------

    def region(self, name: str) -> Region:
        region = self.regions.get(name)
        if region is None:
            raise NotFound(f"unknown region {name!r}; known: {sorted(self.regions)}", field="region")
        return region

    def encode(self, route: Route, history: list, unknown: str = "error",
               hint: str = '"unknown": "drop" leaves them out and lists them') -> tuple[list[int], list]:
        """(indices of the history's known items, the ids dropped as unknown). ``unknown="error"``: an
        InputError naming every unknown id."""
        if unknown not in UNKNOWN:
            raise InputError(f"must be one of {UNKNOWN}, got {unknown!r}", field="unknown")
        if route.index is None:
            return [int(h) for h in history], []
        known, dropped = [], []
        for h in history:
            i = route.index.get(str(h))
            (known.append(i) if i is not None else dropped.append(h))
        if dropped and unknown == "error":
            shown = ", ".join(repr(str(d)) for d in dropped[:10]) + (f" ... ({len(dropped)} in all)"
                                                                     if len(dropped) > 10 else "")
            raise InputError(f"unknown item id{'s' if len(dropped) > 1 else ''} {shown}: not in this region's "
                             f"vocabulary ({hint})", field="history")
        return known, dropped

    def catalogue_size(self, route: Route) -> int:
        return len(route.vocab) if route.vocab is not None else self.num_items

    def refresh(self, q: Query) -> Query:
        """``q`` on its region's current route (a live swap may have replaced the one it was made for)."""
        if q.region is None:
            return q
        current = self.region(q.region).route(q.selector)
        if current is q.route:
            return q
        known = q.known
        if current.vocab != q.route.vocab:          # re-encode: the new model's items are in another order
            known = self.encode(current, q.history or [], "drop")[0]
        return Query(current, known, q.k, q.exclude_seen, q.region, q.selector, q.history)

    def answer(self, queries: list[Query]) -> list[tuple[list, list[float], Route]]:
        """Each query's top k as (raw item ids, scores, the route that answered), the history's items left
        out when asked."""
        with self.lock:
            queries = [self.refresh(q) for q in queries]
            out: list = [None] * len(queries)
            groups: dict[int, list[int]] = {}
            for i, q in enumerate(queries):
                key = id(q.route.model) if q.route.serving in ("merged", "onnx") else 0
                groups.setdefault(key, []).append(i)
            for rows in groups.values():
                qs = [queries[i] for i in rows]
                top = self._top(qs, self._scores(qs)) if any(q.route.ann is None for q in qs) else self._top_ann(qs)
                for i, q, result in zip(rows, qs, top):
                    out[i] = (*result, q.route)
            return out

    def answer_switching(self, query: Query) -> tuple[list, list[float], Route]:
        """One query alone, the shared model's active adapter switched to its region (the baseline)."""
        with self.lock:
            query = self.refresh(query)
            if query.route.serving != "shared":
                return self.answer([query])[0]
            ids, doms = self._batch([query])
            scores = self.shared.scores_switching(ids.to(self.device), doms.to(self.device), query.route.adapter_name)
            return (*self._top([query], scores.cpu())[0], query.route)

    def _batch(self, qs: list[Query], full: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded histories, as wide as the batch's longest (``full``: ``max_len``, what an ONNX graph
        takes). Narrower is the same answer -- padding is masked and rotary positions are relative -- for
        less work: a 10-item history in a 50-wide window pays for 50 positions."""
        width = self.max_len if full else max(1, min(self.max_len, max(len(q.known) for q in qs)))
        ids = torch.zeros(len(qs), width, dtype=torch.long)
        for row, q in enumerate(qs):
            seq = q.known[-width:]
            if seq:
                ids[row, -len(seq):] = torch.tensor(seq)
        return ids, torch.tensor([q.route.domain_id for q in qs], dtype=torch.long)

    def _scores(self, qs: list[Query]) -> torch.Tensor:
        route = qs[0].route
        ids, doms = self._batch(qs, full=route.serving == "onnx")
        if route.serving == "onnx":
            return torch.from_numpy(route.model.scores(ids.numpy(), doms.numpy()))
        if route.serving == "merged":
            with torch.inference_mode():
                return route.model(input_ids=ids.to(self.device), domain_ids=doms.to(self.device),
                                   return_scores=True).cpu()
        return self.shared.scores(ids.to(self.device), doms.to(self.device), [q.route.adapter_name for q in qs]).cpu()

    def _top_ann(self, qs: list[Query]) -> list[tuple[list, list[float]]]:
        """Top k through each route's item index: the hidden states in one forward, then one search per
        index present."""
        ids, doms = self._batch(qs)
        ids, doms = ids.to(self.device), doms.to(self.device)
        route = qs[0].route
        if route.serving == "merged":
            with torch.inference_mode():
                hidden = route.model.encode(ids, doms, None)[:, -1]
        else:
            hidden = self.shared.hidden(ids, doms, [q.route.adapter_name for q in qs])
        hidden = hidden.float().cpu().numpy()
        by_index: dict[int, list[int]] = {}
        for row, q in enumerate(qs):
            by_index.setdefault(id(q.route.ann), []).append(row)
        out: list = [None] * len(qs)
        for rows in by_index.values():
            ann = qs[rows[0]].route.ann
            scores, items = ann.search(hidden[rows], max(qs[r].k for r in rows),
                                       [qs[r].known if qs[r].exclude_seen else [] for r in rows])
            for r, s, ix in zip(rows, scores, items):
                out[r] = _raw_ids(qs[r], s[:qs[r].k].tolist(), ix[:qs[r].k].tolist())
        return out

    @staticmethod
    def _top(qs: list[Query], scores: torch.Tensor) -> list[tuple[list, list[float]]]:
        scores = scores.float().clone()
        scores[:, 0] = -torch.inf
        for row, q in enumerate(qs):
            if q.exclude_seen and q.known:
                scores[row, torch.tensor(q.known)] = -torch.inf
        k = min(max(q.k for q in qs), scores.shape[1] - 1)
        values, indices = torch.topk(scores, k, dim=1)
        out = []
        for row, q in enumerate(qs):
            out.append(_raw_ids(q, values[row, :q.k].tolist(), indices[row, :q.k].tolist()))
        return out

    def popular(self, route: Route, known: list[int], k: int, exclude_seen: bool = True):
        """The region's popularity list (None: the bundle has none), the history's items left out."""
        if route.popularity is None:
            return None
        seen = {route.vocab[i - 1] for i in known} if exclude_seen and route.vocab else set()
        top = [(item, n) for item, n in route.popularity if item not in seen][:k]
        return [item for item, _ in top], [float(n) for _, n in top]

    def describe(self) -> list[dict]:
        """What GET /v1/regions lists."""
        out = []
        for name, r in sorted(self.regions.items()):
            out.append({"region": name, **r.info, "model": r.default.describe(), "primary": r.primary.describe(),
                        "student": r.student.describe() if r.student else None,
                        "catalogue": self.catalogue_size(r.default), "base_fingerprint": self.fingerprint,
                        "index": r.default.ann.kind if r.default.ann is not None else "exact"})
        return out


def _raw_ids(q: Query, scores: list[float], indices: list[int]) -> tuple[list, list[float]]:
    """A row's top k as the route's raw item ids, the -inf tail (fewer unseen items than k) left out."""
    keep = [j for j, s in enumerate(scores) if s != -np.inf]
    vocab = q.route.vocab
    return [vocab[indices[j] - 1] if vocab else indices[j] for j in keep], [scores[j] for j in keep]


def _index(ids):
    return {v: i + 1 for i, v in enumerate(ids)} if ids else None


def adapter_record(folder: Path) -> dict:
    """The parts of an adapter folder's own records GET /v1/regions shows after a live replacement."""
    info = adapter_info(folder)
    metrics = read_json(folder / "metrics.json") if (folder / "metrics.json").is_file() else {}
    return {"method": info.get("method") or metrics.get("method"), "params": metrics.get("params"),
            "valid": metrics.get("valid"), "test": metrics.get("test"), "new_items": info.get("new_items", 0)}


def engine_from_bundle(bundle: str | Path, device: str = "cpu", item_index=None) -> ServingEngine:
    bundle = Path(bundle)
    check_model_dir(bundle / "base")
    adapters = bundle / "adapters" if (bundle / "adapters" / "manifest.json").is_file() else None
    students = bundle / STUDENTS if (bundle / STUDENTS).is_dir() else None
    return ServingEngine(bundle / "base", adapters, students, device, item_index)
