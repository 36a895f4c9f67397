"""``init_adapter``: start a region's next adapter from its current one (re-adaptation as data grows).

The new run builds its adapter as usual (the same r, modules and item rows as its config says), then
copies the current adapter's weights in: every LoRA matrix and per-item offset of the same shape, and
the whole item rows both adapters train, row by row by item index (the new period may train rows the
old one did not: those start from the base, as in any run). A shape that differs is refused, naming
what to change, never silently skipped.
"""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from ..errors import InputError
from ..export.adapters import check_adapter_weights, check_base, is_mixed
from ..export.loading import adapter_items
from ..export.vocab import read_vocab

ROWS = "trainable_tokens_delta"


def warm_start(model, task, adapter_dir: str) -> dict:
    """Copy ``adapter_dir``'s weights into the freshly built PEFT ``model``; returns what was copied."""
    folder = Path(adapter_dir)
    check_adapter_weights(folder, field="init_adapter")     # safetensors only; a .bin is named as a pickle
    if is_mixed(folder):
        raise InputError("an AdaLoRA + item-table adapter cannot warm-start a run (its rank budget restarts); "
                         "start from the base", path=str(folder), field="init_adapter")
    check_base(task.base_dir, folder)
    items = adapter_items(folder) or task.base_items
    if items > task.num_items or not _vocabulary_prefix(folder, task, items):
        raise InputError(f"the adapter scores {items:,} items and this dataset has {task.num_items:,}, and its "
                         f"vocabulary is not the start of the dataset's: prepare the new period with "
                         f"'crossrec prepare --vocab-from {folder}' (the adapter's items, then the period's new ones)",
                         path=str(folder), field="init_adapter")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    old_rows = json.loads((folder / "adapter_config.json").read_text()).get("trainable_token_indices") or {}
    mine = {k: v for k, v in model.state_dict().items()}
    plain, rows_copied = {}, 0
    for key, value in saved.items():
        if ROWS in key:
            plain[key], rows_copied = _rows(model, value, old_rows, task)
            continue
        target = _model_key(key, mine)
        if target is None:
            raise InputError(f"the adapter has {key}, which this run's adapter does not (other lora.target_modules "
                             f"or train_item_bias?)", path=str(folder), field="init_adapter")
        if mine[target].shape != value.shape:
            grown = _grown(value, mine[target], items, task.num_items)
            if grown is None:
                raise InputError(f"{key} is {tuple(value.shape)} in the adapter and {tuple(mine[target].shape)} here "
                                 f"(another lora.r?)", path=str(folder), field="init_adapter")
            value = grown
        plain[key] = value
    result = set_peft_model_state_dict(model, plain, adapter_name="default")
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise InputError(f"could not place {unexpected[:3]}", path=str(folder), field="init_adapter")
    return {"tensors": len(plain), "item_rows": rows_copied}


def _model_key(saved_key: str, mine: dict) -> str | None:
    """The model's state-dict key that a saved PEFT key loads into (PEFT inserts the adapter name)."""
    stem = saved_key.rsplit(".", 1)
    candidates = [f"{stem[0]}.default.{stem[1]}", f"{stem[0]}.modules_to_save.default.{stem[1]}", saved_key]
    return next((c for c in candidates if c in mine), None)


def _rows(model, value: torch.Tensor, old_rows: dict, task) -> tuple[torch.Tensor, int]:
    """This run's whole item rows as they start (the base's), with the rows of the items the old
    adapter also trained taken from it, matched by item index."""
    name = next(n for n, _ in model.named_parameters() if ROWS in n and n.endswith(".default"))
    rows = dict(model.named_parameters())[name].detach().clone()
    position = {item: j for j, item in enumerate(task.token_rows)}
    copied = 0
    for i, item in enumerate(old_rows.get("item_embeddings") or []):
        if item in position:
            rows[position[item]] = value[i]
            copied += 1
    return rows, copied


def _vocabulary_prefix(folder: Path, task, items: int) -> bool:
    """Does the dataset's vocabulary start with the adapter's (the base's, then its region's new items)?
    Rows are copied by index: the same size with other ids would copy them to the wrong items."""
    ids = read_vocab(folder) if adapter_items(folder) else read_vocab(task.base_dir)
    if ids is None or len(ids) != items:
        return False
    return list(datasets.load_from_disk(str(Path(task.data.path) / "items"))["item_id"][:items]) == list(ids)


def _grown(value: torch.Tensor, current: torch.Tensor, items: int, num_items: int) -> torch.Tensor | None:
    """A per-item tensor of the adapter (offsets: N+1; LoRA on the table: r x N+1) grown to this run's
    vocabulary: its items' entries copied, the new items' as this run built them. None: not such a tensor."""
    dims = [d for d in range(value.ndim) if value.shape[d] != current.shape[d]]
    if value.ndim != current.ndim or len(dims) != 1 or value.shape[dims[0]] != items + 1 or \
            current.shape[dims[0]] != num_items + 1:
        return None
    out = current.detach().clone()
    out.narrow(dims[0], 0, items + 1).copy_(value)
    return out
