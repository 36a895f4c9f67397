"""The training engine: one loop on Accelerate (+ DeepSpeed ZeRO 0-3), shared by every stage.

A stage hands the engine a *task*: the model to train, its batches, its loss, how to validate, and
how to save. The engine owns everything else: process world, precision, DeepSpeed config, optimizer,
schedule, accumulation, clipping, validation + early stopping + best-model keeping, checkpoints and
resume, logging on the real main rank. Nothing here knows what a recommender is.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from . import checkpoint as ckpt
from . import deepspeed_config as dscfg
from . import distributed as dist_info
from .config import TrainConfig
from ..errors import RunStopped
from .schedule import lr_lambda


class Task(Protocol):
    name: str
    model: torch.nn.Module
    tokens_per_sample: int

    def batches(self): ...                       # -> object with num_batches(world), epoch(e, rank, world, skip)
    def loss(self, model, batch) -> torch.Tensor: ...
    def validate(self, engine: "Engine") -> dict: ...   # {"overall": {...}, "per_domain": {...}}
    def save(self, engine: "Engine", state_dict: dict | None, out_dir: Path) -> None: ...


@dataclass
class FitResult:
    steps: int = 0
    seconds: float = 0.0
    samples: int = 0
    best_step: int = -1
    best_valid: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    stopped: str = "completed"
    eval_seconds: float = 0.0           # of ``seconds``, spent in validation (and best-model saving)

    def train_record(self) -> dict:
        """``samples_per_second`` counts training time only, not validation."""
        train_time = max(self.seconds - self.eval_seconds, 1e-9)
        return {"steps": self.steps, "seconds": round(self.seconds, 3), "eval_seconds": round(self.eval_seconds, 3),
                "samples_per_second": round(self.samples / train_time, 2) if self.seconds else 0.0,
                "best_step": self.best_step, "stopped": self.stopped}


def _precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class Engine:
    def __init__(self, cfg: TrainConfig, out_dir: str | Path, hidden_size: int = 64, log: Callable = print):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, ProjectConfiguration

        self.cfg, self.out_dir = cfg, Path(out_dir)
        self._log = log
        self.precision = _precision(cfg)
        import transformers.utils.logging as tlog
        tlog.disable_progress_bar()
        ds_path = dscfg.resolve_path(cfg.deepspeed)
        self.ds_config = None
        plugin = None
        if ds_path is not None:
            dist_info.ensure_single_process_env()
            world = int(os.environ.get("WORLD_SIZE", 1))
            self.ds_config = dscfg.fill(ds_path, micro_batch=cfg.micro_batch_size, grad_accum=cfg.grad_accum,
                                        world=world, max_grad_norm=cfg.max_grad_norm,
                                        precision=self.precision, hidden_size=hidden_size)
            plugin = DeepSpeedPlugin(hf_ds_config=self.ds_config)
        self.accelerator = Accelerator(
            deepspeed_plugin=plugin, mixed_precision=self.precision,
            gradient_accumulation_steps=1 if plugin else cfg.grad_accum,
            project_config=ProjectConfiguration(project_dir=str(self.out_dir), logging_dir=str(self.out_dir / "logs")),
            log_with="tensorboard" if cfg.tensorboard and dist_info.is_main() else None,
        )
        self.zero_stage = dscfg.zero_stage(self.ds_config)
        self.device = self.accelerator.device
        self.world, self.rank = dist_info.world_size(), dist_info.rank()
        self._t_start: float | None = None   # wall clock origin of this run's training (resumes included)

    # ---- logging on the real main rank only ----
    def log(self, msg: str) -> None:
        if dist_info.is_main():
            self._log(msg)

    @property
    def is_main(self) -> bool:
        return dist_info.is_main()

    # ---- model access ----
    def unwrapped(self, model):
        return self.accelerator.unwrap_model(model)

    def full_state_dict(self, model) -> dict | None:
        """Consolidated weights on the main rank (all ranks must call: ZeRO-3 gathers them)."""
        if self.zero_stage == 3:
            sd = model._zero3_consolidated_16bit_state_dict()  # gathers one parameter at a time
        else:
            sd = self.unwrapped(model).state_dict()
        return sd if self.is_main else None

    def _build_optimizer(self, model):
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr,
                                 betas=(0.9, self.cfg.adam_beta2))

    # ---- the loop ----
    def fit(self, task: Task) -> FitResult:
        cfg, acc = self.cfg, self.accelerator
        batches = task.batches()
        per_epoch = batches.num_batches(self.world)
        updates_per_epoch = max(1, per_epoch // cfg.grad_accum)
        total_updates = cfg.max_steps or cfg.epochs * updates_per_epoch
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_updates)
        model = task.model
        ckpt_root = self.out_dir / "checkpoints"
        resume_from = ckpt.resolve_resume(cfg.resume, ckpt_root)
        resharded_from = None
        if resume_from is not None:
            saved_world = ckpt.read_state(resume_from).get("world", self.world)
            if saved_world != self.world:
                # Another number of processes wrote it: start from its consolidated weights (before
                # DeepSpeed partitions the model), keep step/schedule/data position; Adam restarts.
                self._load_weights(model, ckpt.consolidated_weights(resume_from), resume_from)
                resharded_from = saved_world
        self.lr = cfg.lr or getattr(task, "default_lr", 1e-3)
        if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optimizer = self._build_optimizer(model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_updates, warmup, cfg.schedule,
                                                                           cfg.min_lr_ratio))
        # The schedule is ours, not accelerate's: its wrapper would step it once per process (and
        # not at all under DeepSpeed with a torch scheduler); we step it once per optimizer update.
        model, optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(scheduler)  # saved/restored with save_state/load_state
        self.model = model
        if self.zero_stage == 3:
            import deepspeed
            for module in self.unwrapped(model).modules():
                if hasattr(module, "tied_parameters"):
                    for p in module.tied_parameters():
                        deepspeed.zero.register_external_parameter(module, p)
        if self.is_main and cfg.tensorboard:
            acc.init_trackers(task.name, config={k: v for k, v in asdict(cfg).items() if v is not None})

        res = FitResult()
        state = {"step": 0, "epoch": 0, "batch": 0, "best": -math.inf, "best_step": -1, "bad_evals": 0,
                 "samples": 0, "seconds": 0.0, "history": [], "world": self.world,
                 "micro_batch_size": cfg.micro_batch_size}
        if resume_from is not None and resharded_from is None:
            state = ckpt.load(acc, resume_from)
            _restore_rng(resume_from, self.rank)
            self.log(f"resumed from {resume_from} at step {state['step']} (epoch {state['epoch']}, batch {state['batch']})")
        elif resume_from is not None:
            state = self._resharded_state(ckpt.read_state(resume_from), resharded_from, scheduler)
            self.log(f"resumed from {resume_from} at step {state['step']} (epoch {state['epoch']}, batch {state['batch']}) "
                     f"on {self.world} process(es) instead of {resharded_from}: weights, step, schedule and data "
                     f"position kept; optimizer moments restart")
            self._validate(task, model, state, state["step"], note={"resharded_from_world": resharded_from})

        self.log(f"[{task.name}] world={self.world} zero={self.zero_stage if self.ds_config else 'off'} "
                 f"precision={self.precision} batches/epoch/rank={per_epoch} updates={total_updates}")
        if cfg.validate_at_start and state["step"] == 0 and state["best_step"] < 0:
            self._validate(task, model, state, 0)
        t_start = time.perf_counter() - state["seconds"]
        self._t_start = t_start
        step, stop = state["step"], None
        window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
        is_ds = self.ds_config is not None
        seen: dict[int, list[int]] = {}
        preempt = PreemptionFlag(self.device)
        from .flops import peak_flops
        peak = peak_flops()
        while stop is None:
            epoch = state["epoch"]
            if epoch >= cfg.epochs and not cfg.max_steps:
                break
            model.train()
            for batch in batches.epoch(epoch, self.rank, self.world, skip=state["batch"]):
                sample_ids = batch.pop("sample_ids", None)
                if cfg.rank_report and sample_ids is not None:
                    seen.setdefault(epoch, []).extend(sample_ids.tolist())
                batch = {k: v.to(self.device) for k, v in batch.items()}
                loss = task.loss(model, batch)
                if not torch.isfinite(loss):
                    raise Diverged(f"error: non-finite loss {loss.item()} at step {step} (epoch {epoch}); "
                                             f"lower train.lr or check the data")
                boundary = (state["batch"] + 1) % cfg.grad_accum == 0
                if is_ds:
                    model.backward(loss)
                    if boundary:
                        task_after_backward(task, model, step)
                    model.step()
                    if boundary:
                        scheduler.step()
                else:
                    acc.backward(loss / cfg.grad_accum)
                    if boundary:
                        if cfg.max_grad_norm:
                            acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                        task_after_backward(task, model, step)
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                state["batch"] += 1
                state["samples"] += batch["input_ids"].shape[0] * self.world
                window_loss += loss.item()
                window_n += 1
                if not boundary:
                    continue
                step += 1
                state["step"] = step
                if step % cfg.log_every == 0:
                    dt = time.perf_counter() - t_window
                    mean_loss = dist_info.all_reduce_sum(window_loss / window_n, self.device) / self.world
                    rec = {"step": step, "epoch": epoch, "loss": mean_loss, "lr": _current_lr(model, optimizer),
                           "samples_per_second": window_n * batch["input_ids"].shape[0] * self.world / dt}
                    rec["tokens_per_second"] = rec["samples_per_second"] * batch["input_ids"].shape[1]
                    if peak and getattr(task, "flops_per_token", None):
                        rec["mfu"] = rec["tokens_per_second"] * task.flops_per_token / (peak * self.world)
                    state["history"].append(rec)
                    acc.log({f"train/{k}": v for k, v in rec.items() if k not in ("step", "epoch")}, step=step)
                    self.log(f"step {step} epoch {epoch} loss {mean_loss:.4f} lr {rec['lr']:.2e} "
                             f"{rec['samples_per_second']:.0f} samples/s {rec['tokens_per_second']:.0f} tokens/s"
                             + (f" MFU {rec['mfu']:.1%}" if "mfu" in rec else ""))
                    window_loss, window_n, t_window = 0.0, 0, time.perf_counter()
                end_of_epoch = state["batch"] >= per_epoch
                if (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and end_of_epoch):
                    t_eval = time.perf_counter()
                    stop = self._validate(task, model, state, step)
                    state["eval_seconds"] = state.get("eval_seconds", 0.0) + time.perf_counter() - t_eval
                    model.train()
                if preempt.any_rank():
                    state["seconds"] = time.perf_counter() - t_start
                    path = ckpt.save(acc, ckpt_root, state, cfg.keep_checkpoints,
                                     per_rank=lambda d: _save_rng(d, self.rank))
                    preempt.restore()
                    raise Preempted(f"preempted by signal at step {step}: checkpoint saved to {path}; "
                                    f"run the same command with --resume auto to continue")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    state["seconds"] = time.perf_counter() - t_start
                    ckpt.save(acc, ckpt_root, state, cfg.keep_checkpoints,
                              per_rank=lambda d: _save_rng(d, self.rank))
                if cfg.max_steps and step >= cfg.max_steps:
                    stop = stop or "max_steps"
                if cfg.max_train_seconds and time.perf_counter() - t_start > cfg.max_train_seconds:
                    stop = stop or "time_budget"
                if stop:
                    break
            if stop is None:
                state["epoch"] += 1
                state["batch"] = 0
        preempt.restore()
        res.steps, res.samples, res.seconds = step, state["samples"], time.perf_counter() - t_start
        if not any("valid_ndcg@10" in h and h["step"] > 0 for h in state["history"]):
            # never validated after training (tiny runs): validate the final weights once
            self._validate(task, model, state, step)
        res.eval_seconds = state.get("eval_seconds", 0.0)
        res.best_step, res.history, res.stopped = state["best_step"], state["history"], stop or "completed"
        res.best_valid = state.get("best_metrics", {})
        if cfg.rank_report:
            self._write_rank_report(model, seen)
        self._finalize(task)
        acc.end_training()
        if self.ds_config is not None:
            # Training is over: later from_pretrained calls in this process must build plain models,
            # not ZeRO-3 partitioned ones (transformers keeps the DeepSpeed config in a global).
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config
            unset_hf_deepspeed_config()
        return res

    def _validate(self, task, model, state, step, note: dict | None = None) -> str | None:
        model.eval()
        metrics = task.validate(self)
        ndcg = metrics["overall"]["ndcg@10"]
        rec = {"step": step, "epoch": state["epoch"], "valid_ndcg@10": ndcg, "valid_hr@10": metrics["overall"]["hr@10"],
               "seconds": round(time.perf_counter() - self._t_start, 3) if self._t_start else 0.0, **(note or {})}
        test = metrics.pop("test_overall", None)
        if test is not None:
            rec.update({"test_ndcg@10": test["ndcg@10"], "test_hr@10": test["hr@10"]})
        state["history"].append(rec)
        self.accelerator.log({"valid/ndcg@10": ndcg, "valid/hr@10": rec["valid_hr@10"]}, step=step)
        improved = ndcg > state["best"]
        self.log(f"valid step {step}: ndcg@10 {ndcg:.4f} hr@10 {rec['valid_hr@10']:.4f}"
                 + (" (best)" if improved else ""))
        if improved:
            state.update(best=ndcg, best_step=step, bad_evals=0, best_metrics=metrics)
            sd = self.full_state_dict(model)
            task.save(self, sd, self.out_dir / "best")
            dist_info.barrier()
            return None
        state["bad_evals"] += 1
        if self.cfg.patience and state["bad_evals"] >= self.cfg.patience:
            self.log(f"early stop: no improvement in {self.cfg.patience} validations (best step {state['best_step']})")
            return "early_stop"
        return None

    def _load_weights(self, model, weights: dict, source: Path) -> None:
        own = model.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        if missing or unexpected:
            from ..errors import InputError
            raise InputError(f"checkpoint weights do not fit this model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}", path=str(source), field="--resume")
        model.load_state_dict(weights)

    def _resharded_state(self, state: dict, saved_world: int, scheduler) -> dict:
        """Trainer state of a checkpoint written by ``saved_world`` processes, for this world: the
        position in the epoch is kept in samples, so no sample is seen twice or skipped when the
        global batch is the same (micro_batch_size x world x grad_accum)."""
        mb_old = state.get("micro_batch_size", self.cfg.micro_batch_size)
        consumed = state["batch"] * mb_old * saved_world
        per_batch = self.cfg.micro_batch_size * self.world
        if consumed % per_batch:
            self.log(f"warning: {consumed % per_batch} sample(s) of epoch {state['epoch']} will be seen again: "
                     f"the old and new global batches do not divide each other")
        state.update(batch=consumed // per_batch, world=self.world, micro_batch_size=self.cfg.micro_batch_size)
        scheduler.last_epoch = state["step"] - 1
        scheduler.step()   # the learning rate of step ``step``, as the schedule defines it
        return state

    def _write_rank_report(self, model, seen: dict) -> None:
        """What this rank held and saw: evidence that ZeRO-3 partitions and data sharding are real."""
        params = {}
        for name, p in self.unwrapped(model).named_parameters():
            if hasattr(p, "ds_tensor"):
                params[name] = {"local": int(p.ds_tensor.numel()), "full": int(p.ds_numel)}
            else:
                params[name] = {"local": int(p.numel()), "full": int(p.numel())}
        report = {"rank": self.rank, "world": self.world, "zero_stage": self.zero_stage,
                  "accelerate_num_processes": self.accelerator.num_processes,
                  "accelerate_process_index": self.accelerator.process_index,
                  "params": params, "samples_by_epoch": {str(k): v for k, v in seen.items()}}
        path = self.out_dir / "ranks" / f"rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(__import__("json").dumps(report))

    def _finalize(self, task) -> None:
        """Promote the best model to the output folder (HF layout at its top level)."""
        import shutil
        best = self.out_dir / "best"
        if self.is_main and best.is_dir():
            for f in best.iterdir():
                if f.is_file():
                    shutil.copy2(f, self.out_dir / f.name)
        dist_info.barrier()


class Preempted(RunStopped):
    """Training stopped on SIGUSR1/SIGTERM after writing a resumable checkpoint."""


class Diverged(RunStopped):
    """The loss became NaN/inf: stop before non-finite weights are saved anywhere."""


class PreemptionFlag:
    """Set by SIGUSR1/SIGTERM (Slurm's --signal, scancel, a dying node's agent). The loop checks it at
    every optimizer step; ranks agree through an all-reduce so they checkpoint at the same step."""

    SIGNALS = ("SIGUSR1", "SIGTERM")

    def __init__(self, device="cpu"):
        import signal
        import threading
        self.flag, self._old, self.device = False, {}, device
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._set)

    def _set(self, *_):
        self.flag = True

    def any_rank(self) -> bool:
        if dist_info.world_size() == 1:
            return self.flag
        return dist_info.all_reduce_sum(1.0 if self.flag else 0.0, self.device) > 0

    def restore(self) -> None:
        import signal
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _current_lr(model, optimizer) -> float:
    """The learning rate the optimizer actually used (under DeepSpeed: the engine's view of it)."""
    if hasattr(model, "get_lr"):
        return float(model.get_lr()[0])
    return float(optimizer.param_groups[0]["lr"])


def task_after_backward(task, model, step: int) -> None:
    hook = getattr(task, "after_backward", None)
    if hook is not None:
        hook(model, step)


def _save_rng(path: Path, rank: int) -> None:
    """Per-rank torch and numpy RNG state, saved with safetensors (no pickles)."""
    import numpy as np
    from safetensors.torch import save_file
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    save_file({"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
               "numpy_pos": torch.tensor([pos, has_gauss]), "numpy_gauss": torch.tensor([gauss])},
              str(path / f"rng_rank{rank}.safetensors"))


def _restore_rng(path: Path, rank: int) -> None:
    import numpy as np
    from safetensors.torch import load_file
    f = path / f"rng_rank{rank}.safetensors"
    if not f.is_file():
        return
    t = load_file(str(f))
    torch.set_rng_state(t["torch"])
    pos, has_gauss = (int(x) for x in t["numpy_pos"])
    np.random.set_state(("MT19937", t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(t["numpy_gauss"][0])))
