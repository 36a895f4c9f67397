"""What an adaptation method is: one class per method, one file per class, in this folder.

A method says how the base becomes the model that is fine-tuned (``build`` / ``adapt``), what it adds
to the loss (``penalty``), what it does around each optimizer step (``after_backward`` /
``after_step``), what it keeps across a resume (``checkpoint_state``), how its output is saved and
loaded back (``save`` / ``load``), what its metrics.json adds (``record``), and what it cannot do
(``refuses_zero3`` / ``refuses_fp16``, checked in one place: :meth:`Method.refuse`). Its options, if
any, are a dataclass (``options``) that becomes the ``<name>:`` section of the fine-tuning config.

The class attributes are read without building anything -- by ``--help``, recipe checks, the
experiment runner and the report -- so this module and the method files import no torch, peft or
model code at module top: ``crossrec --help`` and a recipe check would pay ``import torch`` (2.6 s on
the 2-core CI machine) and ``import peft`` (5.9 s) for nothing. Those imports sit in the functions
that train (see :mod:`crossrec_dist.methods._training`, the heavy half, imported on first use).

peft keeps one package per tuner; trl's trainers override only their loss. Here the fine-tuning task
(``stages/finetune.py``) is the same for every method and hands each of these steps to the method.
"""
from __future__ import annotations
# heavy imports inside functions (torch, peft, the model via ._training): the registry is read by --help
# and recipe checks, which must not pay import torch (2.6 s) and peft (5.9 s) on the 2-core CI machine

from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import InputError

if TYPE_CHECKING:     # types only: the fine-tuning task and engine import torch
    from pathlib import Path

# Module names of the recommender: its linear layers, and its item table (input and, tied, output).
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ITEM_TABLE = "item_embeddings"

# Roles a method can play as a reference in a study's report (paired differences are taken against
# each present reference; the "full" reference is the 100% of "share of full").
ROLES = ("zero-shot", "popularity", "target-only", "full")


def need(ok: bool, field: str, message: str) -> None:
    """Raise the config error ``message`` about ``field`` unless ``ok``."""
    if not ok:
        raise InputError(message, field=field)


class Method:
    """One adaptation method. Subclass it in a new file of this folder and set ``name``; the registry
    (``crossrec_dist.methods``) finds it. Instances live for one fine-tuning run and may keep state
    (L2-SP's anchor weights, AdaLoRA's rank budget)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""            # one line for --help and the docs
    options: ClassVar[type | None] = None  # dataclass of the method's own options: FinetuneConfig.<name>
    output: ClassVar[str] = "model"        # adapter (a PEFT adapter over the base) | model (whole weights) | none
    trains: ClassVar[bool] = True          # False: evaluated as it is (zero-shot: the base; popularity)
    starts_from_base: ClassVar[bool] = True   # step 0 is the base itself (so must_beat_base can keep it);
                                              # False for a fresh model (scratch)
    seeded: ClassVar[bool] = True          # depends on the seed: a study runs it once per seed (and fraction)
    role: ClassVar[str | None] = None      # a reference in reports (ROLES), or None
    default_lr: ClassVar[float] = 1e-3     # train.lr when the config leaves it null
    refuses_zero3: ClassVar[str | None] = None   # why it cannot train under ZeRO-3 (None: it can)
    refuses_fp16: ClassVar[str | None] = None    # why it cannot train in fp16 (None: it can)

    def __init__(self, cfg):
        self.cfg = cfg                     # the whole FinetuneConfig

    # ---- what can be known from the config alone (no torch) ----
    @classmethod
    def check_options(cls, cfg, prefix: str = "") -> None:
        """Ranges of the method's own option section; checked whichever method runs (a typo in a
        section a recipe carries is an error even when that method is not run)."""

    @classmethod
    def check_config(cls, cfg, prefix: str = "") -> None:
        """Rules that hold only when this method is the one that runs (e.g. options it cannot use)."""

    @classmethod
    def adapts_item_table(cls, cfg) -> bool:
        """Does the method give every item-table row its own trainable change (LoRA on the table)?"""
        return False

    @classmethod
    def trains_whole_rows(cls, cfg) -> bool:
        """Does it train chosen rows of the item table whole (new items, ``train_top_items``)?"""
        return False

    @classmethod
    def refuse(cls, *, precision: str | None = None, zero_stage: int | None = None) -> None:
        """The one place a method's unsupported settings are refused (exit 2, naming the field)."""
        if precision == "fp16" and cls.refuses_fp16:
            raise InputError(cls.refuses_fp16, field="train.mixed_precision")
        if zero_stage == 3 and cls.refuses_zero3:
            raise InputError(cls.refuses_zero3, field="train.deepspeed")

    # ---- training (the fine-tuning task calls these; heavy imports inside) ----
    def build(self, task, engine):
        """The model to fine-tune: by default the base, loaded, then :meth:`adapt`-ed."""
        from ._training import load_base
        return self.adapt(task, load_base(task.base_dir, task.num_items), engine)

    def adapt(self, task, base, engine):
        """Which of the base's weights train, and how (default: all of them, as they are)."""
        return base

    def penalty(self, model) -> Any:
        """A loss term of the parameters alone, counted once per optimizer update (default 0)."""
        return 0.0

    def after_backward(self, model, step: int) -> None:
        """Gradients complete (see engine/task.py)."""

    def after_step(self, model, step: int, grad_scale: float = 1.0) -> None:
        """Weights updated (see engine/task.py)."""

    def checkpoint_state(self, model) -> dict:
        return {}

    def restore_checkpoint_state(self, model, state: dict) -> None:
        pass

    def save(self, task, engine, model, state_dict, out_dir: "Path") -> None:
        """Write the kept model: whole weights in Hugging Face format plus the item vocabulary."""
        from ._training import save_whole_model
        save_whole_model(task, model, state_dict, out_dir)

    @classmethod
    def load(cls, out_dir: "Path", base_dir: str):
        """The saved result as a model, in one plain process (for the final record and ``evaluate``)."""
        from ._training import load_whole_model
        return load_whole_model(out_dir)

    def record(self, task, model, out_dir: "Path") -> dict:
        """Method-specific keys of metrics.json."""
        return {}
