"""Many regions' LoRA adapters on one base, one forward pass for rows of different regions.

The body: PEFT's mixed-adapter inference. Every region's LoRA is loaded into one ``PeftModel`` under its
own adapter name, and ``model(..., adapter_names=[name per row])`` sends each row through its own
region's LoRA in every linear layer (and its own item-table rows on the input side) in the same pass;
nothing switches a shared active adapter, so concurrent regions never race.

The output side is ours: scores are dot products with the item table (tied) plus each item's offset,
computed outside any module's forward, which PEFT's per-row hooks do not reach. ``RegionHead`` holds
what a region changes there -- its whole item rows (PEFT trainable tokens) and its offsets (PEFT
``modules_to_save``) -- and :meth:`SharedAdapters.scores` applies each row's: the base table's scores
for the whole batch in one matmul, the region's rows and offsets patched in per region.

Two PEFT 0.21 limits are worked around here, in one place (tests/test_serving_engine.py pins both):
loading an adapter without trainable tokens into a model whose item table another adapter wrapped
fails (``set_peft_model_state_dict`` asks every ``TrainableTokensWrapper`` for the new adapter's key:
KeyError ``...token_adapter.trainable_tokens_delta``), and the mixed forward of such a wrapper fails
for an adapter it does not hold (KeyError in ``get_merged_weights``). So every adapter loaded here has
item-table rows: one without gets row 0, the padding row, replaced by itself (zeros) -- the same
numbers, and a table every adapter is present in.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from ..errors import InputError
from ..export.adapters import ADAPTER_WEIGHTS, TABLE_ADAPTER, is_mixed
from ..jsonfile import read_json
from ..methods.base import ITEM_TABLE

BASE = "__base__"           # PEFT's name for "no adapter" in adapter_names
PADDING_ROW = [0]
DELTA_KEY = f"base_model.model.{ITEM_TABLE}.token_adapter.trainable_tokens_delta"


def weights_version(folder: str | Path, files=(ADAPTER_WEIGHTS, f"{TABLE_ADAPTER}/{ADAPTER_WEIGHTS}",
                                              "model.safetensors")) -> str:
    """A short content hash of a folder's weights: what responses report as the model's version, so a
    replaced adapter is told apart from the one before it (and the same weights always read the same)."""
    h = hashlib.sha256()
    found = False
    for name in files:
        path = Path(folder) / name
        if path.is_file():
            found = True
            h.update(name.encode())
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    for path in sorted(Path(folder).glob("model-*.safetensors")):     # sharded model folders
        found = True
        h.update(path.name.encode())
        h.update(path.read_bytes())
    if not found:
        raise InputError("no weights to version", path=str(folder))
    return h.hexdigest()[:12]


def shareable(folder: str | Path) -> str | None:
    """None when the adapter can join the shared model; else why it is served as its own merged model."""
    folder = Path(folder)
    if is_mixed(folder):
        return "AdaLoRA with a LoRA on the item table: two adapter types, which one PeftModel cannot hold"
    config = read_json(folder / "adapter_config.json")
    if config.get("peft_type") != "LORA":
        return f"a {config.get('peft_type')} adapter: the shared model holds LoRA adapters (one PEFT type)"
    targets = config.get("target_modules") or []
    if ITEM_TABLE in (targets if isinstance(targets, list) else [targets]):
        return "a LoRA on the item table, which would conflict with other regions' whole item rows"
    if read_json(folder / "crossrec_adapter.json").get("num_items") if (folder / "crossrec_adapter.json").is_file() \
            else None:
        return "its region has items the base lacks (its own, larger item table)"
    return None


@dataclass
class RegionHead:
    """What one adapter changes on the output side: whole item rows and the per-item offsets."""
    rows: torch.Tensor | None        # (n,) item indices whose table rows the adapter replaces
    row_weights: torch.Tensor | None  # (n, H) their values
    bias: torch.Tensor | None        # (N+1,) the adapter's own offsets (None: the base's)


class SharedAdapters:
    """One base with any number of LoRA adapters, scored per row (see the module docstring).

    Not thread-safe by itself: the server's micro-batcher calls it from one thread, and adapters are
    added and removed on that thread between batches."""

    def __init__(self, base_model):
        self.core = base_model          # CrossRecModel, eval
        self.model: PeftModel | None = None
        self.heads: dict[str, RegionHead] = {}

    @property
    def names(self) -> list[str]:
        return list(self.heads)

    def add(self, name: str, folder: str | Path) -> None:
        """Load ``folder``'s adapter under ``name`` (checked against the base by the caller)."""
        folder = Path(folder)
        config = PeftConfig.from_pretrained(str(folder))
        if not isinstance(config, LoraConfig):
            raise InputError(f"not a LoRA adapter ({type(config).__name__})", path=str(folder))
        config.inference_mode = True
        weights = load_file(str(folder / ADAPTER_WEIGHTS))
        if not (config.trainable_token_indices or {}).get(ITEM_TABLE):
            config.trainable_token_indices = {ITEM_TABLE: list(PADDING_ROW)}
            weights[DELTA_KEY] = self._base_table()[PADDING_ROW].detach().clone()
        rows = config.trainable_token_indices[ITEM_TABLE]
        n_rows = self._base_table().shape[0]
        bad = [r for r in rows if not 0 <= int(r) < n_rows]
        if bad:
            raise InputError(f"item-table rows {bad[:5]} outside the base's {n_rows - 1:,} items: the adapter "
                             f"was trained on another vocabulary", path=str(folder / "adapter_config.json"),
                             field="trainable_token_indices")
        if self.model is None:
            self.model = PeftModel(self.core, config, adapter_name=name)
        else:
            self.model.add_adapter(name, config)
        try:
            result = set_peft_model_state_dict(self.model, weights, adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k or k.endswith(f".{name}")]
            if result.unexpected_keys or missing:
                raise InputError(f"adapter weights do not fit the base: unexpected {result.unexpected_keys[:3]}, "
                                 f"missing {missing[:3]}", path=str(folder / ADAPTER_WEIGHTS))
        except (RuntimeError, KeyError) as e:      # shapes that do not fit (another model size)
            self.remove_loaded(name)
            raise InputError(f"adapter weights do not fit the base: {str(e).splitlines()[0]}",
                             path=str(folder / ADAPTER_WEIGHTS)) from None
        except InputError:
            self.remove_loaded(name)
            raise
        self.model.eval()
        self.heads[name] = self._head(name)

    def _base_table(self) -> torch.Tensor:
        emb = self.core.item_embeddings
        tokens = getattr(emb, "token_adapter", None)
        return tokens.base_layer.weight if tokens is not None else emb.weight

    def _head(self, name: str) -> RegionHead:
        tokens = self.core.item_embeddings.token_adapter
        rows = torch.tensor(tokens.token_indices[name], dtype=torch.long)
        row_weights = tokens.trainable_tokens_delta[name].detach()
        bias_module = self.core.item_bias
        bias = None
        if bias_module is not None and hasattr(bias_module, "modules_to_save") and name in bias_module.modules_to_save:
            bias = bias_module.modules_to_save[name].weight.detach()
        return RegionHead(rows, row_weights, bias)

    def remove_loaded(self, name: str) -> None:
        """Drop adapter ``name`` from the shared model (after a swap, or a failed load)."""
        self.heads.pop(name, None)
        if self.model is not None and name in self.model.peft_config:
            if len(self.model.peft_config) > 1:   # PEFT keeps the last one; no row names it any more
                self.model.delete_adapter(name)

    def _base_bias(self) -> torch.Tensor | None:
        module = self.core.item_bias
        if module is None:
            return None
        return module.original_module.weight if hasattr(module, "original_module") else module.weight

    @torch.inference_mode()
    def hidden(self, input_ids: torch.Tensor, domain_ids: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The final hidden state after each history (B, H), row i through adapter ``names[i]``."""
        if self.model is None or all(n == BASE for n in names):
            return self._base_hidden(input_ids, domain_ids)[:, -1]
        return self.model(input_ids=input_ids, domain_ids=domain_ids, adapter_names=list(names)).hidden_states[:, -1]

    def output_side(self, name: str) -> tuple[str, torch.Tensor, torch.Tensor | None]:
        """(key, item table, offsets) adapter ``name`` scores with: the base's, its rows and offsets patched
        in. The key names what is shared: adapters that change neither score with the base's ("base")."""
        head = self.heads.get(name)
        base_bias = self._base_bias()
        own_rows = head is not None and head.rows.tolist() != PADDING_ROW
        own_bias = head is not None and head.bias is not None
        if not (own_rows or own_bias):
            return BASE, self._base_table().detach(), None if base_bias is None else base_bias.detach()
        table = self._base_table().detach()
        if own_rows:
            table = table.clone()
            table[head.rows] = head.row_weights
        bias = head.bias if own_bias else base_bias
        return name, table, None if bias is None else bias.detach()

    @torch.inference_mode()
    def scores(self, input_ids: torch.Tensor, domain_ids: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Scores over every item (B, N+1), row i through adapter ``names[i]`` (``BASE``: the base)."""
        hidden = self.hidden(input_ids, domain_ids, names)
        scores = hidden @ self._base_table().t()
        base_bias = self._base_bias()
        for name in dict.fromkeys(names):
            picked = torch.tensor([i for i, n in enumerate(names) if n == name], dtype=torch.long)
            head = self.heads.get(name)
            bias = head.bias if head is not None and head.bias is not None else base_bias
            if head is not None:
                block = scores[picked]
                block[:, head.rows] = hidden[picked] @ head.row_weights.t()
                scores[picked] = block
            if bias is not None:
                scores[picked] += bias
        return scores

    @torch.inference_mode()
    def scores_switching(self, input_ids: torch.Tensor, domain_ids: torch.Tensor, name: str) -> torch.Tensor:
        """The same scores, the other way: make ``name`` the shared model's active adapter, then run the
        model as trained. One region per call, and a switch a concurrent caller would race with: the
        baseline mixed batching is measured against (and a cross-check of :meth:`scores`)."""
        if self.model is None or name == BASE:
            return self.scores(input_ids, domain_ids, [BASE] * len(input_ids))
        self.model.set_adapter(name)
        return self.model(input_ids=input_ids, domain_ids=domain_ids, return_scores=True)

    def _base_hidden(self, input_ids, domain_ids):
        if self.model is None:
            return self.core(input_ids=input_ids, domain_ids=domain_ids).hidden_states
        with self.model.disable_adapter():
            return self.model(input_ids=input_ids, domain_ids=domain_ids).hidden_states
