"""What a stage hands the engine: the one contract between ``engine/`` and everything that trains.

The engine knows nothing about the data, the metrics or the model beyond this file. A task declares

* ``selection``: the validation metric that picks the kept checkpoint and its direction;
* ``build_model()``: the model, built *inside* the engine's construction context (so that under
  ZeRO-3 with ``zero3_init`` it is born partitioned and no rank ever holds all of it);
* ``batches()``: per-rank micro-batches (:class:`Batches`), each a :class:`MicroBatch` that says how
  many loss terms it carries, so the engine can average over every term of an optimizer update
  exactly, whatever the micro-batch size, accumulation or number of processes;
* ``loss(model, inputs)``: a :class:`LossTerms`;
* ``validate(engine)``: a :class:`Validation`;
* ``save(engine, state_dict, out_dir)``: writes the kept model;
* ``decays(name, param)``: which parameters AdamW's weight decay applies to (default: every
  trainable parameter of 2 or more dimensions, i.e. weight matrices, not biases or norms);
* ``flops_per_token`` / ``tokens_per_sample``: for tokens/s and MFU (the engine does the arithmetic);
* hooks with no-op defaults: ``after_backward`` / ``after_step`` (AdaLoRA reads the gradients in
  one and prunes the updated weights in the other), ``checkpoint_state`` /
  ``restore_checkpoint_state`` (JSON the task needs back on resume beyond weights), ``final_record``
  (metrics.json).

Subclass :class:`TrainTask` and override what you need; nothing is probed with ``getattr``.
The ``engine`` every method receives is the running :class:`~crossrec_dist.engine.trainer.Engine`
(not imported here: the engine imports this contract, never the other way round);
:class:`FitResult` is what its ``fit`` returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import torch


@dataclass
class MicroBatch:
    """One rank's share of one accumulation step.

    Args:
        inputs: tensors for ``TrainTask.loss`` (the engine moves them to the device).
        weight: the number of loss terms (e.g. target tokens) in it; the engine normalises the
            loss of an optimizer update by the sum of weights over all its micro-batches and ranks.
        samples: rows in it, for throughput.
        sample_ids: which training examples these rows are (only for ``train.rank_report``).
    """
    inputs: dict[str, torch.Tensor]
    weight: int
    samples: int
    sample_ids: torch.Tensor | None = None


class Batches(Protocol):
    """A deterministic, resumable epoch of micro-batches for one rank."""

    def num_batches(self, world: int) -> int:
        """Micro-batches per epoch, identical on every rank."""

    def epoch(self, epoch: int, rank: int, world: int, skip: int = 0) -> Iterator[MicroBatch]:
        """The epoch's micro-batches for ``rank``, starting after the first ``skip``."""


@dataclass
class LossTerms:
    """A micro-batch's loss, split by how it must be averaged.

    Args:
        mean: mean over the micro-batch's ``weight`` loss terms. The engine turns it into the
            exact mean over the whole update (``mean * weight / total weight of the update``).
        penalty: a term of the parameters alone (L2-SP, AdaLoRA's orthogonality), counted once
            per optimizer update however many micro-batches it spans.
    """
    mean: torch.Tensor
    penalty: torch.Tensor | float = 0.0


@dataclass(frozen=True)
class Selection:
    """Which validation metric picks the kept checkpoint and drives early stopping."""
    metric: str
    mode: str = "max"           # max | min

    def better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best


@dataclass
class Validation:
    """What a validation pass returns.

    Args:
        metrics: flat ``name -> value`` on the selection split; must include ``Selection.metric``.
            Logged to the history as ``valid_<name>``.
        tracked: other flat figures logged as they are (e.g. a test-split metric for time-to-quality
            curves); never used for selection.
        details: anything the stage wants back at the end (e.g. per-subset breakdowns); kept for
            the best validation only.
        eligible: may this state be kept as the run's model? A task's guard says no (e.g. fine-tuning:
            not better than the base it started from by a paired interval over users). An ineligible
            validation that improves the metric still counts as progress for early stopping -- the
            run goes on while it improves -- but is never saved as ``best``.
        note: why it is not eligible, for the log.
    """
    metrics: dict[str, float]
    tracked: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    eligible: bool = True
    note: str = ""


@dataclass
class FitResult:
    """What ``Engine.fit`` returns; ``train_record()`` is the ``train`` block of metrics.json."""
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    best_step: int = -1
    best_valid: dict = field(default_factory=dict)   # the best validation's ``Validation.details``
    history: list = field(default_factory=list)
    stopped: str = "completed"
    eval_seconds: float = 0.0           # of ``seconds``, spent in validation (and best-model saving)

    def train_record(self) -> dict:
        """``samples_per_second`` counts training time only, not validation."""
        train_time = max(self.seconds - self.eval_seconds, 1e-9)
        return {"steps": self.steps, "seconds": round(self.seconds, 3), "eval_seconds": round(self.eval_seconds, 3),
                "samples_per_second": round(self.samples / train_time, 2) if self.seconds else 0.0,
                "best_step": self.best_step, "stopped": self.stopped}


class TrainTask:
    """Base class of the stages' tasks. See the module docstring for the contract."""

    name: str = "task"
    selection: Selection = Selection("loss", "min")
    validates_start: bool = False   # validate the model as built (step 0) even without train.validate_at_start
                                    # (a task that judges later steps against the start needs it)
    default_lr: float = 1e-3
    tokens_per_sample: int = 1            # for tokens/s
    flops_per_token: float | None = None  # training (forward + backward) FLOPs per token, for MFU on GPUs
                                          # with a known peak (engine/flops.py); None: no MFU logged

    def build_model(self, engine) -> torch.nn.Module:
        raise NotImplementedError

    def batches(self) -> Batches:
        raise NotImplementedError

    def loss(self, model, inputs: dict[str, torch.Tensor]) -> LossTerms:
        raise NotImplementedError

    def validate(self, engine) -> Validation:
        raise NotImplementedError

    def save(self, engine, state_dict: dict | None, out_dir: Path) -> None:
        raise NotImplementedError

    def decays(self, name: str, param: torch.nn.Parameter) -> bool:
        """Does AdamW's weight decay (``train.weight_decay``) apply to trainable parameter ``name`` of
        the model ``build_model`` returned? The engine puts those that do in one parameter group with
        ``train.weight_decay`` and the rest in one with none. Default: every parameter of 2 or more
        dimensions (weight matrices; not biases, norms' gains or other vectors)."""
        return param.ndim >= 2

    def after_backward(self, model, step: int) -> None:
        """Called once per optimizer update, after the gradients are complete (reduced over ranks;
        under ZeRO-1/2 they sit in DeepSpeed's partitions: read them with
        ``deepspeed.utils.safe_get_full_grad``), before the step. Without DeepSpeed they are already
        clipped; DeepSpeed clips inside its step (``after_step``'s ``grad_scale`` says by how much)."""

    def after_step(self, model, step: int, grad_scale: float = 1.0) -> None:
        """Called once per optimizer update, after the step: the weights are updated, the gradients
        gone. ``grad_scale``: what clipping multiplied the gradients by after ``after_backward`` read
        them (1.0 when it had already acted or did not act). A change to the weights here is what the
        next forward, validation and checkpoint see; under ZeRO-1/2 it must also go to DeepSpeed's
        fp32 master copy (``deepspeed.utils.safe_set_full_fp32_param``), or the next step overwrites it."""

    def checkpoint_state(self, model) -> dict:
        """What a resume needs back beyond weights, optimizer and position: JSON (a checkpoint holds
        no pickle of ours), saved with the trainer's state."""
        return {}

    def restore_checkpoint_state(self, model, state: dict) -> None:
        """Put back ``checkpoint_state``'s dict (after the weights are loaded)."""

    def final_record(self, engine, result: FitResult) -> dict:
        """The stage's metrics.json record, computed on the main rank after training."""
        raise NotImplementedError
