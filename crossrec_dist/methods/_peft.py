"""What the PEFT methods (lora, adalora) share: an adapter saved apart from the base, loadable by plain
peft, with crossrec_adapter.json naming the base's fingerprint; chosen item-table rows trained whole
(PEFT trainable tokens: the items new to the target and ``train_top_items``); the per-item offsets
retrained as part of the adapter (PEFT ``modules_to_save``)."""
from __future__ import annotations
# heavy imports inside functions (torch, peft, the model via ._training): the registry is read by --help
# and recipe checks, which must not pay import torch (2.6 s) and peft (5.9 s) on the 2-core CI machine

from pathlib import Path
from typing import ClassVar

from .base import ITEM_TABLE, Method


class AdapterMethod(Method):
    output: ClassVar[str] = "adapter"
    mixed = False        # two PEFT adapters in one folder (AdaLoRA on the linears + LoRA on the table)

    @classmethod
    def trains_whole_rows(cls, cfg) -> bool:
        # PEFT cannot wrap the item table twice: with LoRA on it every row already has its own change.
        return not cls.adapts_item_table(cfg)

    def build(self, task, engine):
        # heavy half on first use (see base.py: the registry must not import torch/peft)
        from ._training import load_base, peft_base_context
        with peft_base_context(engine, bool(task.token_rows)):
            model = self.adapt(task, load_base(task.base_dir, task.num_items), engine)
        if self.cfg.init_adapter:       # re-adaptation: start from the region's current adapter
            from ._warm_start import warm_start
            task.warm_start = warm_start(model, task, self.cfg.init_adapter)
            engine.log(f"warm start from {self.cfg.init_adapter}: {task.warm_start['tensors']} tensors and "
                       f"{task.warm_start['item_rows']} whole item rows copied")
        return model

    @staticmethod
    def token_rows(task) -> dict | None:
        """PEFT ``trainable_token_indices``: the item-table rows trained whole (None: none)."""
        return {ITEM_TABLE: task.token_rows} if task.token_rows else None

    def modules_to_save(self, base) -> list[str] | None:
        """The per-item offsets are what shifts most between platforms (popularity): the adapter carries
        its own copy of them (PEFT modules_to_save), N + 1 numbers, when the base has them."""
        return ["item_bias"] if (self.cfg.train_item_bias and base.item_bias is not None) else None

    def adapter_info(self, task) -> dict:
        """crossrec_adapter.json: the base it was trained on (fingerprint), domain and method."""
        info = {"base": str(Path(task.base_dir).resolve()), "base_fingerprint": task.fingerprint,
                "domain": task.domain, "method": self.name, "new_items": len(task.new_items)}
        if task.num_items != task.base_items:     # the base's table grown to the target's vocabulary
            info.update(num_items=task.num_items, base_items=task.base_items)
        return info

    def save(self, task, engine, model, state_dict, out_dir: Path) -> None:
        from ._training import save_adapter, write_vocab
        save_adapter(model, state_dict, out_dir, self.adapter_info(task), mixed=self.mixed)
        if task.num_items != task.base_items:
            write_vocab(task.data, out_dir)     # the region's vocabulary: the base's items, then its new ones

    @classmethod
    def load(cls, out_dir: Path, base_dir: str):
        from ._training import load_adapter
        return load_adapter(out_dir, base_dir)
