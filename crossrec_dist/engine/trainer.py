"""The training engine: one loop on Accelerate (+ DeepSpeed ZeRO 0-3), shared by every stage.

A stage hands the engine a :class:`~crossrec_dist.engine.task.TrainTask`. The engine owns the rest:
process world, precision and DeepSpeed settings from any launch form, building the model (born
partitioned under ZeRO-3 + zero3_init), optimizer and schedule, exact gradient accumulation,
clipping, validation + selection + early stopping, checkpoints and resume, logging and progress on
the real main rank. It knows nothing about what the model computes.

Loss scaling has one owner, :meth:`Engine._train_step`: each micro-batch's loss is weighted by its
share of the update's loss terms over all micro-batches and ranks, and nothing downstream divides
again (accelerate is given one accumulation step; DeepSpeed's backward runs with
``scale_wrt_gas=False``). So ``grad_accum=k, micro=m`` and ``grad_accum=1, micro=k*m`` give the same
gradients, and clipping sees the true norm (PITFALLS.md #11).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import deepspeed
import torch
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ..errors import InputError, RunStopped
from ..progress import Progress, format_seconds, peak_rss_mib
from . import checkpoint as ckpt
from . import deepspeed_config as dscfg
from . import distributed as dist_info
from .config import TrainConfig, validate_train_config
from .flops import mfu, peak_flops
from .loss_window import LossWindow
from .preemption import Preempted, PreemptionFlag
from .rng import restore_rng, save_rng
from .schedule import lr_lambda
from .state import TrainerState
from .task import FitResult, MicroBatch, TrainTask
from .zero3 import (gathered, held_outside_gather, initialize_partitioned, load_full_weights, partition_report,
                    register_tied_parameters)


@dataclass
class Plan:
    """The run's arithmetic, computed once."""
    micro_batches_per_epoch: int
    updates_per_epoch: int
    total_updates: int
    warmup: int


@dataclass
class _Run:
    """What ``fit`` prepared: the wrapped model and optimizer, the schedule, the data."""
    task: TrainTask
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batches: object
    plan: Plan


def _grad_norm(model) -> torch.Tensor | None:
    """The 2-norm of all gradients present (None when there are none)."""
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


class Engine:
    """One training run of one task. Create it, ``build_model(task)``, then ``fit(task)``.

    Args:
        cfg: the train section of the stage's config.
        out_dir: where ``best/``, ``checkpoints/``, ``logs/`` and the final model go.
        hidden_size: the model's width, for DeepSpeed's bucket-size defaults.
        log: where main-rank messages go.
    """

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, hidden_size: int = 64, log: Callable = print):
        validate_train_config(cfg)
        self.cfg, self.out_dir, self._log = cfg, Path(out_dir), log
        if cfg.deepspeed not in (None, "none", "off") or dscfg.launcher_uses_deepspeed():
            dist_info.ensure_single_process_env()   # DeepSpeed wants a process group even for one process
        self.settings = dscfg.resolve(cfg, world=dist_info.world_size(), hidden_size=hidden_size)
        self.precision, self.ds_config = self.settings.precision, self.settings.ds_config
        self.zero_stage = self.settings.zero_stage
        self._deepspeed_reports_norm = False   # set once DeepSpeed's step has returned a gradient norm
        # Accumulation is ours (one owner of loss scaling): accelerate must never divide the loss.
        # Under DeepSpeed it is told DeepSpeed's value only to keep its consistency check quiet.
        steps = self.settings.grad_accum if self.ds_config else 1
        self.accelerator = Accelerator(
            # on CPU with several processes and no DeepSpeed, else accelerate does not wrap the model in DDP
            cpu=self.ds_config is None and dist_info.is_cpu_world(),
            deepspeed_plugin=self.settings.plugin, mixed_precision=self.precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=steps, sync_with_dataloader=False),
            project_config=ProjectConfiguration(project_dir=str(self.out_dir), logging_dir=str(self.out_dir / "logs")),
            log_with="tensorboard" if cfg.tensorboard and dist_info.is_main() else None,
        )
        if self.ds_config is not None and not self.settings.zero3_init:
            # accelerate publishes its DeepSpeed config to transformers, which then builds every
            # from_pretrained model under zero.Init; without zero3_init models are built whole.
            unset_hf_deepspeed_config()
        self.device = self.accelerator.device
        self.world, self.rank = dist_info.world_size(), dist_info.rank()
        self.lr = cfg.lr
        self.step = 0                   # optimizer updates done when the task last validated
        self.model: torch.nn.Module | None = None
        self._built_report: dict = {}
        self._t_start: float | None = None
        self._progress: Progress | None = None
        self._seen: dict[int, list[int]] = {}    # sample ids per epoch (train.rank_report)
        self._memory: dict[str, dict] = {}       # this process's RSS at named points (train.rank_report)
        self._held: dict[str, dict] = {}         # ZeRO-3: partitioned elements held outside a gather, by point
        self._note_memory("engine_created")

    # ---- small services for tasks ----
    @property
    def is_main(self) -> bool:
        return dist_info.is_main()

    def log(self, msg: str) -> None:
        if self.is_main:
            (self._progress.write if self._progress else self._log)(msg)

    def unwrapped(self, model):
        return self.accelerator.unwrap_model(model)

    def full_state_dict(self, model) -> dict | None:
        """Consolidated weights on the main rank (all ranks must call: ZeRO-3 gathers them)."""
        if self.zero_stage == 3:
            sd = model._zero3_consolidated_16bit_state_dict()  # gathers one parameter at a time
        else:
            sd = self.unwrapped(model).state_dict()
        return sd if self.is_main else None

    def plan(self, batches) -> Plan:
        """Micro-batches, updates and warm-up of this run (AdaLoRA's budget needs the real total)."""
        cfg, k = self.cfg, self.settings.grad_accum
        per_epoch = batches.num_batches(self.world)
        if per_epoch < k:
            raise InputError(f"an epoch has {per_epoch} micro-batch(es) per process, fewer than grad_accum={k}; "
                             "lower train.grad_accum or train.micro_batch_size", field="train.grad_accum")
        updates = per_epoch // k
        total = cfg.max_steps or cfg.epochs * updates
        return Plan(per_epoch, updates, total, cfg.warmup_steps or int(cfg.warmup_ratio * total))

    # ---- building the model ----
    def build_model(self, task: TrainTask) -> torch.nn.Module:
        """``task.build_model(engine)``, recorded as the task's model. Tasks build fresh models with
        :meth:`construct` and load pretrained ones with ``from_pretrained`` (which transformers
        loads straight into ZeRO-3 partitions when zero3_init is on)."""
        model = task.build_model(self)
        self._note_memory("model_built")
        if self.settings.zero3_init:
            self._built_report = partition_report(model)
        # Training randomness (dropout) starts from train.seed however the model was built: a
        # partitioned build draws nothing from the global generator, a plain one does.
        torch.manual_seed(self.cfg.seed)
        task.model = model
        return model

    def construct(self, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """A freshly initialised model from ``build()``. Under ZeRO-3 with zero3_init every parameter
        is partitioned as its module is created (``deepspeed.zero.Init``), so no rank ever holds the
        whole model; the transformers models inside then get their own weight init, one module's
        parameters gathered at a time."""
        if not self.settings.zero3_init:
            return build()
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
            model = build()
        initialize_partitioned(model)
        return model

    @contextlib.contextmanager
    def unpartitioned(self):
        """Inside, ``from_pretrained`` builds a whole model even under zero3_init (DeepSpeed then
        partitions it in ``prepare``): for libraries that cannot touch partitioned parameters."""
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            if self.settings.zero3_init:
                self.settings.plugin.set_deepspeed_weakref()

    def gathered(self, params, modifier_rank: int | None = 0):
        """Context in which ``params`` are whole on every rank (ZeRO-3); what ``modifier_rank``
        writes is kept. A no-op for parameters that are not partitioned."""
        return gathered(list(params), modifier_rank=modifier_rank)

    # ---- the loop ----
    def fit(self, task: TrainTask) -> FitResult:
        """Train ``task`` (its model built by :meth:`build_model`) to the end of its budget."""
        run = self._prepare(task)
        state = self._resume(run)
        self._announce(run, state)
        if (self.cfg.validate_at_start or task.validates_start) and state.step == 0 and state.best_step < 0:
            self._validate(run, state)
        stop, window = None, LossWindow(self.device)
        self._t_start = time.perf_counter() - state.seconds
        self._progress = Progress(run.plan.total_updates, state.step, task.name, enabled=self.is_main)
        preempt = PreemptionFlag()
        if state.step >= run.plan.total_updates:
            # A resume of a run that already reached its budget: nothing to train (a loop entered here
            # would make one update past max_steps before checking it).
            self.log(f"nothing left to train: the checkpoint is at step {state.step} of {run.plan.total_updates}; "
                     "raise train.max_steps (or train.epochs) to train further")
            stop = "completed"
        try:
            while stop is None and (self.cfg.max_steps or state.epoch < self.cfg.epochs):
                for micro_batches in self._updates(run, state):
                    window.add(state.step + 1, *self._train_step(run, state, micro_batches))
                    stop = self._after_step(run, state, window, preempt)
                    if stop:
                        break
                else:
                    state.epoch, state.batch = state.epoch + 1, 0
            self._log_window(run, state, window)     # the last, partial logging window
        finally:
            preempt.restore()
            self._progress.close()
            self._progress = None
        return self._finish(run, state, stop or "completed")

    def _prepare(self, task: TrainTask) -> _Run:
        cfg, model = self.cfg, task.model
        if model is None:
            raise RuntimeError("Engine.fit: build the task's model with Engine.build_model first")
        batches = task.batches()
        plan = self.plan(batches)
        self.lr = cfg.lr or task.default_lr
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = self._build_optimizer(task, model)
        # The schedule is ours, not accelerate's: its wrapper would step it once per process (and
        # not at all under DeepSpeed with a torch scheduler); we step it once per optimizer update
        # and restore it from the step count on resume (no pickled scheduler state).
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(plan.total_updates, plan.warmup, cfg.schedule, cfg.min_lr_ratio))
        model, optimizer = self.accelerator.prepare(model, optimizer)
        if self.world > 1 and self.ds_config is None and not isinstance(
                model, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(f"{self.world} processes but accelerate did not wrap the model in DDP "
                               f"({self.accelerator.distributed_type}): the ranks would train apart")
        self._note_memory("engine_prepared")
        if cfg.rank_report and self.zero_stage == 3:
            self._held["engine_prepared"] = held_outside_gather(self.unwrapped(model))
        self.model = model
        if self.zero_stage == 3:
            register_tied_parameters(self.unwrapped(model))
        if self.is_main and cfg.tensorboard:
            self.accelerator.init_trackers(task.name, config={k: v for k, v in asdict(cfg).items() if v is not None})
        return _Run(task, model, optimizer, scheduler, batches, plan)

    def _build_optimizer(self, task: TrainTask, model):
        """AdamW over the trainable parameters: those the task says decay (``TrainTask.decays``) with
        ``train.weight_decay``, the rest without."""
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if task.decays(name, p) else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr, betas=(0.9, self.cfg.adam_beta2))

    def _resume(self, run: _Run) -> TrainerState:
        cfg = self.cfg
        state = TrainerState(world=self.world, micro_batch_size=cfg.micro_batch_size)
        path = ckpt.resolve_resume(cfg.resume, self.out_dir / "checkpoints")
        if path is None:
            return state
        saved = TrainerState.from_json(ckpt.read_state(path))   # checks the manifest first (every rank)
        ckpt.check_shapes(path, saved.shapes, self._shapes(run.model))
        if saved.world == self.world:
            ckpt.load(self.accelerator, path)     # accelerate's / DeepSpeed's files, some of them pickles
            restore_rng(path, self.rank)
            state = saved
            self.log(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch})")
        else:
            # Another number of processes wrote it: its consolidated weights, step, schedule and data
            # position (in samples) carry over; Adam's moments and the per-rank RNG streams restart.
            load_full_weights(self.unwrapped(run.model), ckpt.consolidated_weights(path), path)
            saved_world = saved.world
            state = self._resharded_state(saved, run.plan)
            self.log(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch}) "
                     f"on {self.world} process(es) instead of {saved_world}: weights, step, schedule and data "
                     f"position kept; optimizer moments restart")
            self._validate(run, state, note={"resharded_from_world": saved_world})
        run.scheduler.last_epoch = state.step - 1
        with warnings.catch_warnings():   # torch warns that no optimizer step came first: none should
            warnings.simplefilter("ignore", UserWarning)
            run.scheduler.step()    # the learning rate of update ``state.step``, as the schedule defines it
        run.task.restore_checkpoint_state(run.model, saved.task)
        return state

    def _shapes(self, model) -> dict:
        """Every parameter's full shape (under ZeRO-3 a parameter's own shape is its empty partition)."""
        return {n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.unwrapped(model).named_parameters()}

    def _resharded_state(self, state: TrainerState, plan: Plan) -> TrainerState:
        """The position in the epoch is kept in samples, so no sample is seen twice or skipped when
        the global batch (micro_batch_size x world x grad_accum) is the same."""
        consumed = state.batch * (state.micro_batch_size or self.cfg.micro_batch_size) * state.world
        per_update = self.cfg.micro_batch_size * self.world * self.settings.grad_accum
        if consumed % per_update:
            self.log(f"warning: {consumed % per_update} sample(s) of epoch {state.epoch} will be seen again: "
                     f"the old and new global batches do not divide each other")
        state.batch = consumed // per_update * self.settings.grad_accum
        state.world, state.micro_batch_size = self.world, self.cfg.micro_batch_size
        return state

    def _announce(self, run: _Run, state: TrainerState) -> None:
        s = self.settings
        zero = f"zero{s.zero_stage}{' (zero.Init)' if s.zero3_init else ''} from {s.source}" if s.ds_config else "off"
        self.log(f"[{run.task.name}] world={self.world} deepspeed={zero} precision={self.precision} "
                 f"micro_batch={self.cfg.micro_batch_size} grad_accum={s.grad_accum} clip={s.max_grad_norm} "
                 f"micro-batches/epoch/rank={run.plan.micro_batches_per_epoch} updates={run.plan.total_updates} "
                 f"threads={torch.get_num_threads()}")
        if self.precision == "bf16" and self.device.type == "cpu":
            if not dscfg.native_bf16():
                self.log("note: bf16 on a CPU without AVX512-BF16 or AMX is emulated, slower than fp32; "
                         "train.mixed_precision=bf16_if_native picks fp32 on such a CPU")

    def _updates(self, run: _Run, state: TrainerState):
        """The rest of this epoch, as lists of ``grad_accum`` micro-batches (one optimizer update each)."""
        k, group = self.settings.grad_accum, []
        last = run.plan.updates_per_epoch * k
        for mb in run.batches.epoch(state.epoch, self.rank, self.world, skip=state.batch):
            group.append(mb)
            if len(group) == k:
                yield group
                group = []
                if state.batch >= last:
                    return

    def _train_step(self, run: _Run, state: TrainerState, micro_batches: list[MicroBatch]):
        """One optimizer update over ``micro_batches``: returns its loss and gradient norm (left on the
        device, read at the log interval) and the samples it used on all ranks."""
        model, k, is_ds = run.model, len(micro_batches), self.ds_config is not None
        weight = torch.tensor(float(sum(mb.weight for mb in micro_batches)), device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(weight)          # loss terms of the whole update, all ranks
        scale = self.world / weight.clamp_min(1.0)        # DDP / DeepSpeed average over ranks
        update_loss = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro_batches):
            last = i == k - 1
            inputs = {name: t.to(self.device) for name, t in mb.inputs.items()}
            if mb.sample_ids is not None and self.cfg.rank_report:
                self._seen.setdefault(state.epoch, []).extend(mb.sample_ids.tolist())
            sync = contextlib.nullcontext() if last or is_ds else self.accelerator.no_sync(model)
            with sync:
                terms = run.task.loss(model, inputs)
                loss = terms.mean * (mb.weight * scale) + terms.penalty / k
                if is_ds:
                    model.set_gradient_accumulation_boundary(last)
                    model.backward(loss, scale_wrt_gas=False)
                else:
                    self.accelerator.backward(loss)
            update_loss += loss.detach()
        grad_norm = self._optimizer_step(run, state.step)
        samples = sum(mb.samples for mb in micro_batches) * self.world
        state.batch, state.samples, state.step = state.batch + k, state.samples + samples, state.step + 1
        return update_loss, grad_norm, samples

    def _optimizer_step(self, run: _Run, step: int):
        model = run.model
        if self.ds_config is not None:
            run.task.after_backward(model, step)
            # DeepSpeed without a ZeRO optimizer keeps no norm (fp32 ZeRO-0: get_global_grad_norm is
            # None; its bf16 optimizer keeps one); its gradients are whole and reduced here, so measure
            # the norm its clipping will see, until DeepSpeed is seen to report one itself.
            measure = self.zero_stage == 0 and not self._deepspeed_reports_norm
            whole = _grad_norm(model) if measure else None
            model.step()                              # DeepSpeed clips to gradient_clipping itself
            norm = model.get_global_grad_norm()
            if norm is None:
                norm = whole
            else:
                self._deepspeed_reports_norm = True
            run.task.after_step(model, step, grad_scale=self._clip_factor(norm))
        else:
            clip = self.settings.max_grad_norm or math.inf   # inf: measure the norm, change nothing
            norm = self.accelerator.clip_grad_norm_(model.parameters(), clip)
            run.task.after_backward(model, step)
            run.optimizer.step()
            run.task.after_step(model, step, grad_scale=1.0)   # after_backward saw clipped gradients
            run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        return norm

    def _clip_factor(self, norm) -> float:
        """What DeepSpeed's clipping multiplied the gradients by in the step just taken (its formula and
        torch's: max_norm / (norm + 1e-6) when that is below 1), for tasks that read the gradients
        before the step, where DeepSpeed has not clipped them yet."""
        clip = float(self.settings.max_grad_norm or 0.0)     # DeepSpeed's gradient_clipping
        norm = float(norm) if norm is not None else 0.0
        factor = clip / (norm + 1e-6) if clip > 0 else 1.0
        return factor if factor < 1.0 else 1.0

    def _after_step(self, run: _Run, state: TrainerState, window: LossWindow, preempt: "PreemptionFlag") -> str | None:
        """Logging, validation/selection, checkpoints and stop conditions after one update."""
        cfg, step = self.cfg, state.step
        self._progress.advance()
        if cfg.rank_report and self.zero_stage == 3:
            self._held[f"step_{step}"] = held_outside_gather(self.unwrapped(run.model))
        if step % cfg.log_every == 0:
            self._log_window(run, state, window)
        end_of_epoch = state.batch >= run.plan.updates_per_epoch * self.settings.grad_accum
        stop = None
        if (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch):
            self._check_finite(window)
            stop = self._validate(run, state)
        budget = bool(cfg.max_train_seconds and time.perf_counter() - self._t_start > cfg.max_train_seconds)
        preempted, over_budget = preempt.agree(budget)
        if preempted:
            self._check_finite(window)
            path = self._checkpoint(run, state)
            how = "interrupted (Ctrl-C)" if preempt.interrupted else "preempted by signal"
            raise Preempted(f"{how} at step {step}: checkpoint saved to {path}; run the same command with "
                            "--resume auto (and without --force) to continue", exit_code=130 if preempt.interrupted else 1)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            self._check_finite(window)
            self.log(f"checkpoint at step {step} saved to {self._checkpoint(run, state)}")
        if cfg.max_steps and step >= cfg.max_steps:
            stop = stop or "max_steps"
        return stop or ("time_budget" if over_budget else None)

    def _log_window(self, run: _Run, state: TrainerState, window: LossWindow) -> None:
        """One record per logging window; the only place training syncs device and host."""
        if not window.steps:
            return
        losses, norms = self._check_finite(window)
        dt = time.perf_counter() - window.t0
        rec = {"kind": "train", "step": state.step, "epoch": state.epoch, "loss": sum(losses) / len(losses),
               "lr": _current_lr(run.model, run.optimizer), "samples_per_second": window.samples / dt}
        if norms:
            rec["grad_norm"] = sum(norms) / len(norms)
        rec["tokens_per_second"] = rec["samples_per_second"] * run.task.tokens_per_sample
        utilisation = mfu(rec["tokens_per_second"], run.task.flops_per_token, self.world, peak_flops())
        if utilisation is not None:
            rec["mfu"] = utilisation
        state.history.append(rec)
        self.accelerator.log({f"train/{k}": v for k, v in rec.items() if k not in ("kind", "step", "epoch")},
                             step=state.step)
        left = (run.plan.total_updates - state.step) * dt / len(window.steps)
        self._progress.show(loss=f"{rec['loss']:.4f}", samples_s=f"{rec['samples_per_second']:.0f}")
        if not self._progress.interactive:
            self.log(f"step {state.step}/{run.plan.total_updates} epoch {state.epoch} loss {rec['loss']:.4f} "
                     f"lr {rec['lr']:.2e}" + (f" grad_norm {rec['grad_norm']:.3f}" if norms else "")
                     + f" {rec['samples_per_second']:.0f} samples/s {rec['tokens_per_second']:.0f} tokens/s"
                     + (f" MFU {rec['mfu']:.1%}" if "mfu" in rec else "") + f" eta {format_seconds(left)}")
        window.reset()

    def _check_finite(self, window: LossWindow):
        """Losses and norms of the pending updates (synced once); a non-finite loss stops the run
        before any weights are validated, saved or checkpointed."""
        losses, norms = window.values(self.world)
        for step, value in zip(window.steps, losses):
            if not math.isfinite(value):
                raise Diverged(f"error: non-finite loss {value} at step {step}; lower train.lr or check the data")
        return losses, norms

    def _validate(self, run: _Run, state: TrainerState, note: dict | None = None) -> str | None:
        t0 = time.perf_counter()
        run.model.eval()
        self.step = state.step          # what a task's validate may read (0: the model as built)
        v = run.task.validate(self)
        run.model.train()
        sel = run.task.selection
        if sel.metric not in v.metrics:
            raise RuntimeError(f"task {run.task.name!r} selects on {sel.metric!r} but its validation returned "
                               f"{sorted(v.metrics)}")
        value = v.metrics[sel.metric]
        rec = {"kind": "valid", "step": state.step, "epoch": state.epoch,
               **{f"valid_{k}": x for k, x in v.metrics.items()}, **v.tracked,
               "seconds": round(time.perf_counter() - self._t_start, 3) if self._t_start else 0.0, **(note or {})}
        state.history.append(rec)
        self.accelerator.log({f"valid/{k}": x for k, x in v.metrics.items()}, step=state.step)
        # Progress (the best value seen) drives patience; only an eligible validation is kept as the
        # model. Without a task guard the two are the same.
        progress = sel.better(value, state.best_seen)
        kept = v.eligible and sel.better(value, state.best)
        if progress:
            state.best_seen = value
        if not v.eligible:
            rec["not_kept"] = v.note or "not eligible"
        mark = " (best)" if kept else (f" (best seen, not kept: {v.note})" if progress and v.note else "")
        self.log(f"valid step {state.step}: " + " ".join(f"{k} {x:.4f}" for k, x in v.metrics.items()) + mark)
        stop = None
        if kept:
            state.best, state.best_step, state.best_metrics = value, state.step, v.details
            self._save_best(run)
        if progress or kept:
            state.bad_evals = 0
        else:
            state.bad_evals += 1
            if self.cfg.patience and state.bad_evals >= self.cfg.patience and state.step >= self.cfg.min_steps:
                self.log(f"early stop: no improvement in {state.bad_evals} validations (best step {state.best_step})")
                stop = "early_stop"
        state.eval_seconds += time.perf_counter() - t0
        return stop

    def _checkpoint(self, run: _Run, state: TrainerState) -> Path:
        state.seconds = time.perf_counter() - self._t_start
        state.task = run.task.checkpoint_state(run.model)
        state.shapes = self._shapes(run.model)
        return ckpt.save(self.accelerator, self.out_dir / "checkpoints", state.to_json(), self.cfg.keep_checkpoints,
                         per_rank=lambda d: save_rng(d, self.rank))

    def _finish(self, run: _Run, state: TrainerState, stop: str) -> FitResult:
        if not state.validated_after_start():
            self._validate(run, state)     # never validated after training (tiny runs): the final weights
        if self.cfg.rank_report:
            self._note_memory("trained")
            self._write_rank_report(run.model)
        self._promote_best()
        self.accelerator.end_training()
        if self.ds_config is not None:
            # Later from_pretrained calls in this process must build plain models, not partitioned ones.
            unset_hf_deepspeed_config()
        seconds = time.perf_counter() - self._t_start
        return FitResult(steps=state.step, seconds=seconds, samples=state.samples, best_step=state.best_step,
                         best_valid=state.best_metrics, history=state.history, stopped=stop,
                         eval_seconds=state.eval_seconds)

    def _write_rank_report(self, model) -> None:
        """What this rank held and saw: evidence that ZeRO-3 partitions and data sharding are real."""
        report = {"rank": self.rank, "world": self.world, "zero_stage": self.zero_stage,
                  **dist_info.placement(),
                  "zero3_init": self.settings.zero3_init,
                  "accelerate_num_processes": self.accelerator.num_processes,
                  "accelerate_process_index": self.accelerator.process_index,
                  "params": partition_report(self.unwrapped(model)), "built": self._built_report,
                  "memory": self._memory, "held_outside_gather": self._held,
                  "samples_by_epoch": {str(k): v for k, v in self._seen.items()}}
        path = self.out_dir / "ranks" / f"rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report))

    def _note_memory(self, point: str) -> None:
        """Resident and peak resident memory of this process (MiB) when it reached ``point``."""
        try:
            with open("/proc/self/statm") as f:     # Linux; elsewhere the report has no memory figures
                rss_pages = int(f.read().split()[1])
        except OSError:
            return
        self._memory[point] = {"rss_mib": round(rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1),
                               "peak_rss_mib": round(peak_rss_mib() or 0.0, 1)}

    def _save_best(self, run: _Run) -> None:
        """The best model to ``best.tmp``, then swapped in for ``best``: a run killed mid-save keeps
        the previous best whole (every rank joins the gather, the main rank writes and renames)."""
        best, tmp, old = (self.out_dir / n for n in ("best", "best.tmp", "best.old"))
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        dist_info.barrier()
        run.task.save(self, self.full_state_dict(run.model), tmp)
        dist_info.barrier()
        if self.is_main:
            shutil.rmtree(old, ignore_errors=True)
            if best.exists():
                os.replace(best, old)
            os.replace(tmp, best)
            shutil.rmtree(old, ignore_errors=True)
        dist_info.barrier()

    def _promote_best(self) -> None:
        """The best model's files to the output folder (HF layout at its top level), each copied to a
        temporary name and renamed, so no file there is ever half-written; a subfolder (a second PEFT
        adapter, PEFT's layout for several) likewise, the old one removed only once the new one is
        whole. The stage writes ``metrics.json`` after this: a folder is complete when it has it."""
        best = self.out_dir / "best"
        if self.is_main and best.is_dir():
            for f in best.iterdir():
                tmp, dest = self.out_dir / (f.name + ".tmp"), self.out_dir / f.name
                if f.is_file():
                    shutil.copy2(f, tmp)
                    os.replace(tmp, dest)
                elif f.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(f, tmp)
                    shutil.rmtree(dest, ignore_errors=True)
                    os.replace(tmp, dest)
        dist_info.barrier()


class Diverged(RunStopped):
    """The loss became NaN/inf: stop before non-finite weights are saved anywhere."""


def _current_lr(model, optimizer) -> float:
    """The learning rate the optimizer actually used (under DeepSpeed: the engine's view of it)."""
    if hasattr(model, "get_lr"):
        return float(model.get_lr()[0])
    return float(optimizer.param_groups[0]["lr"])


