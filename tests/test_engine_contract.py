"""The engine's contract (engine/task.py), in one process on a toy task: a linear regression with
deterministic micro-batches, no recommender anywhere. Exact accumulation, resume, early stopping,
best-model selection (max and min) and the task's weight-decay hook, each asserted on concrete values.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file, save_file

from crossrec_dist.config import load_config
from crossrec_dist.engine.config import TrainConfig, validate_train_config
from crossrec_dist.errors import InputError
from crossrec_dist.engine.task import FitResult, LossTerms, MicroBatch, Selection, TrainTask, Validation
from crossrec_dist.engine.trainer import Engine
from crossrec_dist.stages.common import RecommenderTask
from crossrec_dist.stages.train_config import RecommenderTrainConfig, validate_recommender_train_config

pytestmark = pytest.mark.usefixtures("own_environment")   # conftest: restores os.environ after each run

FEATURES, TARGETS = 4, 3      # each sample: 4 features -> 3 targets, some of them masked out


class ToyBatches:
    """``n`` samples, shuffled per epoch with a fixed seed, cut into micro-batches of ``micro``.

    A sample carries 1 to 3 loss terms (a mask over its targets), so micro-batches have unequal
    weights: only an exact per-term average over the update makes accumulation size-independent."""

    def __init__(self, n: int, micro: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=g)
        self.y = self.x @ torch.randn(FEATURES, TARGETS, generator=g) + 0.1 * torch.randn(n, TARGETS, generator=g)
        self.mask = torch.zeros(n, TARGETS)
        for i in range(n):
            self.mask[i, : 1 + i % TARGETS] = 1.0
        self.n, self.micro, self.seed = n, micro, seed

    def num_batches(self, world: int) -> int:
        return self.n // (self.micro * world)

    def epoch(self, epoch: int, rank: int, world: int, skip: int = 0) -> Iterator[MicroBatch]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        for i in range(skip, self.num_batches(world)):
            j = i * world + rank
            idx = order[j * self.micro:(j + 1) * self.micro]
            inputs = {"x": self.x[idx], "y": self.y[idx], "mask": self.mask[idx]}
            yield MicroBatch(inputs, weight=int(self.mask[idx].sum()), samples=len(idx), sample_ids=idx)


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.linear = torch.nn.Linear(FEATURES, TARGETS)
        # Two matrices the loss multiplies by zero: Adam moves neither, so only weight decay can.
        self.decayed = torch.nn.Parameter(torch.ones(2, 2))
        self.kept = torch.nn.Parameter(torch.ones(2, 2))

    def forward(self, x):
        return self.linear(x) + 0.0 * (self.decayed.sum() + self.kept.sum())


class ToyTask(TrainTask):
    """Mean squared error over the unmasked targets. ``scores``: the validation metric of the k-th
    validation (scripted, so a known step is the best); ``crash_after``: raise in the loss once that
    many optimizer updates are done (a run killed mid-training)."""

    name = "toy"
    default_lr = 0.05

    def __init__(self, train: TrainConfig, n: int = 16, scores: list[float] | None = None, mode: str = "max",
                 crash_after: int | None = None, no_decay: tuple[str, ...] = (), eligible: list[bool] | None = None):
        self.train, self.n, self.scores, self.crash_after, self.no_decay = train, n, scores, crash_after, no_decay
        self.eligible = eligible
        self.selection = Selection("score", mode)
        self.updates = 0
        self.validations = 0
        self.snapshots: dict[int, dict[str, torch.Tensor]] = {}    # updates done -> weights when validated

    def build_model(self, engine):
        return engine.construct(Regression)

    def batches(self):
        return ToyBatches(self.n, self.train.micro_batch_size)

    def loss(self, model, inputs) -> LossTerms:
        if self.crash_after is not None and self.updates >= self.crash_after:
            raise RuntimeError("killed")
        err = (model(inputs["x"]) - inputs["y"]) ** 2 * inputs["mask"]
        return LossTerms(err.sum() / inputs["mask"].sum())

    def decays(self, name, param) -> bool:
        return super().decays(name, param) and name not in self.no_decay

    def after_step(self, model, step, grad_scale=1.0) -> None:
        self.updates = step + 1

    def validate(self, engine) -> Validation:
        self.snapshots[self.updates] = weights(engine)
        self.validations += 1
        score = self.scores[self.validations - 1] if self.scores else -float(self.updates)
        ok = self.eligible[self.validations - 1] if self.eligible else True
        return Validation(metrics={"score": score}, eligible=ok, note="" if ok else "scripted no")

    def save(self, engine, state_dict, out_dir: Path) -> None:
        if engine.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state_dict.items()}, str(out_dir / "toy.safetensors"))


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in engine.unwrapped(engine.model).state_dict().items()}


def config(**kw) -> TrainConfig:
    base = dict(epochs=100, micro_batch_size=4, mixed_precision="no", tensorboard=False, log_every=1,
                patience=0, max_grad_norm=0.0, warmup_steps=1, weight_decay=0.0)
    return TrainConfig(**{**base, **kw})


@dataclass
class Run:
    task: ToyTask
    engine: Engine
    result: FitResult
    weights: dict


def fit(out, cfg: TrainConfig, **task_kw) -> Run:
    """One in-process run, with accelerate's process-wide state reset around it."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    task = ToyTask(cfg, **task_kw)
    engine = Engine(cfg, out, hidden_size=8, log=lambda msg: None)
    engine.build_model(task)
    try:
        result = engine.fit(task)
        return Run(task, engine, result, weights(engine))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def assert_same_weights(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol, (k, a[k], b[k])


def test_accumulation_is_exact_whatever_the_micro_batch(tmp_path):
    """2 micro-batches of 2 per update give the weights of 1 micro-batch of 4, although the micro-batches
    carry different numbers of loss terms (a plain mean of micro-batch means would not)."""
    split = fit(tmp_path / "split", config(micro_batch_size=2, grad_accum=2, max_steps=6, max_grad_norm=1.0))
    whole = fit(tmp_path / "whole", config(micro_batch_size=4, grad_accum=1, max_steps=6, max_grad_norm=1.0))
    assert split.result.steps == whole.result.steps == 6 and split.result.samples == whole.result.samples == 24
    weights_of_split = [b.weight for b in ToyBatches(16, 2).epoch(0, 0, 1)]
    assert len(set(weights_of_split)) > 1          # the case that needs the exact average
    assert_same_weights(split.weights, whole.weights)
    moved = (split.weights["linear.weight"] - Regression().linear.weight.detach()).abs().max().item()
    assert moved > 0.05                             # it trained: equal weights are not equal initial weights
    losses = [[h["loss"] for h in r.result.history if h["kind"] == "train"] for r in (split, whole)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 6


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path):
    """Killed after update 5 (checkpoint at 4, mid-epoch: 4 updates per epoch); resumed with
    ``resume: auto`` to 8: weights, schedule, optimizer moments and data position all carry over."""
    cfg = dict(micro_batch_size=2, grad_accum=2, max_steps=8, warmup_steps=2, weight_decay=0.1, eval_every=3,
               max_grad_norm=1.0)
    whole = fit(tmp_path / "whole", config(**cfg))
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "cut", config(**cfg, checkpoint_every=4), crash_after=5)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "step_00000004"
    resumed = fit(tmp_path / "cut", config(**cfg, checkpoint_every=4, resume="auto"))
    assert resumed.task.updates == 8 and resumed.result.steps == 8
    assert_same_weights(resumed.weights, whole.weights)
    train = [[h for h in r.result.history if h["kind"] == "train"] for r in (whole, resumed)]
    assert [h["step"] for h in train[1]] == list(range(1, 9))    # the history carries over too
    assert [h["loss"] for h in train[1]] == pytest.approx([h["loss"] for h in train[0]], rel=1e-6)
    assert [h["lr"] for h in train[1]] == pytest.approx([h["lr"] for h in train[0]], rel=1e-9)
    assert resumed.result.best_step == whole.result.best_step


def test_early_stopping_counts_validations_and_waits_for_min_steps(tmp_path):
    scores = [0.1, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3]
    stopped = fit(tmp_path / "a", config(eval_every=1, patience=2, max_steps=10), scores=scores)
    assert (stopped.result.stopped, stopped.result.steps, stopped.result.best_step) == ("early_stop", 4, 2)
    waited = fit(tmp_path / "b", config(eval_every=1, patience=2, min_steps=7, max_steps=10), scores=scores)
    assert (waited.result.stopped, waited.result.steps, waited.result.best_step) == ("early_stop", 7, 2)
    never = fit(tmp_path / "c", config(eval_every=1, patience=0, max_steps=10), scores=scores)
    assert (never.result.stopped, never.result.steps) == ("max_steps", 10)
    valid = [h["step"] for h in waited.result.history if h["kind"] == "valid"]
    assert valid == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("mode,scores,best", [
    ("max", [0.1, 0.3, 0.8, 0.4, 0.6, 0.7], 3),
    ("min", [0.5, 0.2, 0.3, 0.05, 0.4, 0.1], 4),
])
def test_the_kept_model_is_the_best_validations(tmp_path, mode, scores, best):
    run = fit(tmp_path, config(eval_every=1, max_steps=6), scores=scores, mode=mode)
    assert run.result.best_step == best and run.result.stopped == "max_steps"
    kept = load_file(str(tmp_path / "toy.safetensors"))      # promoted from best/ to the output folder
    assert_same_weights(kept, run.task.snapshots[best], tol=0.0)
    last = run.task.snapshots[6]
    assert (kept["linear.weight"] - last["linear.weight"]).abs().max().item() > 1e-3   # not the final weights
    assert [h["valid_score"] for h in run.result.history if h["kind"] == "valid"] == scores


def test_an_ineligible_validation_is_progress_but_never_the_kept_model(tmp_path):
    """A task's guard (fine-tuning: must beat the base) can refuse a validation: the run goes on while
    the metric improves (patience is reset by steps 2 and 5), but only eligible ones are saved. With
    every validation eligible, patience 2 would stop at step 7 too, but keep step 5."""
    scores = [0.1, 0.2, 0.5, 0.3, 0.6, 0.4, 0.35, 0.3, 0.2, 0.1]
    eligible = [True, False, True, False, False, False, False, False, False, False]
    run = fit(tmp_path, config(eval_every=1, patience=2, max_steps=10), scores=scores, eligible=eligible)
    assert (run.result.stopped, run.result.steps, run.result.best_step) == ("early_stop", 7, 3)
    assert_same_weights(load_file(str(tmp_path / "toy.safetensors")), run.task.snapshots[3], tol=0.0)
    refused = [h["step"] for h in run.result.history if h["kind"] == "valid" and "not_kept" in h]
    assert refused == [2, 4, 5, 6, 7]
    plain = fit(tmp_path / "plain", config(eval_every=1, patience=2, max_steps=10), scores=scores)
    assert (plain.result.steps, plain.result.best_step) == (7, 5)


def test_the_task_decides_which_parameters_decay(tmp_path):
    """``decayed`` and ``kept`` get zero gradients: AdamW leaves them alone except for decoupled weight
    decay, p <- p * (1 - lr * wd) per update, which the task's ``decays`` hook grants ``decayed`` only.
    With the default hook both matrices decay and the bias (1-d) does not."""
    lr, wd, steps = 0.05, 0.5, 5
    cfg = config(lr=lr, weight_decay=wd, max_steps=steps, schedule="constant", warmup_steps=0, warmup_ratio=0.0)
    run = fit(tmp_path / "hook", cfg, no_decay=("kept",))
    assert run.weights["decayed"] == pytest.approx(torch.full((2, 2), (1 - lr * wd) ** steps), rel=1e-6)
    assert torch.equal(run.weights["kept"], torch.ones(2, 2))
    default = fit(tmp_path / "default", cfg)
    assert default.weights["kept"] == pytest.approx(torch.full((2, 2), (1 - lr * wd) ** steps), rel=1e-6)
    model = Regression()
    assert sorted(n for n, p in model.named_parameters() if TrainTask().decays(n, p)) == ["decayed", "kept", "linear.weight"]


def test_recommender_tasks_keep_embedding_tables_out_of_weight_decay():
    """RecommenderTask's rule (the engine's before it moved to the task): matrices decay, embedding
    tables and vectors do not, whatever prefix PEFT or a wrapper puts on the name."""
    task = RecommenderTask()
    table, matrix, vector = torch.zeros(5, 2), torch.zeros(2, 2), torch.zeros(2)
    cases = {("item_embeddings.weight", table): False, ("base_model.model.domain_embeddings.weight", table): False,
             ("student.item_embeddings.weight", table): False, ("backbone.layers.0.mlp.up_proj.weight", matrix): True,
             ("projection.weight", matrix): True, ("backbone.norm.weight", vector): False,
             ("item_bias.weight", table[:, :1]): True}
    assert {case: task.decays(*case) for case in cases} == cases


def test_the_engine_config_has_no_recommender_fields(tmp_path):
    """``train.eval_batch_size`` / ``track_test`` / ``window_stride`` live in the stages' subclass, under
    the same YAML keys, with their own checks; the engine takes the subclass as it is."""
    recommender = {"eval_batch_size", "track_test", "window_stride"}
    assert not recommender & set(TrainConfig.__dataclass_fields__)
    with pytest.raises(InputError, match="unknown key.*track_test"):
        load_config(TrainConfig, overrides=["track_test=true"])
    cfg = load_config(RecommenderTrainConfig, overrides=["track_test=true", "window_stride=2", "eval_batch_size=8"])
    assert (cfg.track_test, cfg.window_stride, cfg.eval_batch_size) == (True, 2, 8)
    for key, value in (("window_stride", -1), ("eval_batch_size", 0), ("grad_accum", 0)):
        with pytest.raises(InputError, match=f"pretrain.train.{key}"):
            validate_recommender_train_config(RecommenderTrainConfig(**{key: value}), "pretrain.")
    validate_train_config(RecommenderTrainConfig(window_stride=-1))     # not the engine's business
    sub = RecommenderTrainConfig(**{**config(max_steps=2).__dict__, "track_test": True})
    assert fit(tmp_path, sub).result.steps == 2
