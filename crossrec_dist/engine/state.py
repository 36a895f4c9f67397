"""The trainer's own position, typed: what a checkpoint needs beyond weights and optimizer state.

Saved as JSON beside accelerate's files (never a pickle), so a resume restores step, place in the
epoch, best metric and patience exactly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainerState:
    step: int = 0                   # optimizer updates done
    epoch: int = 0
    batch: int = 0                  # micro-batches of this epoch done (per rank)
    samples: int = 0                # training samples seen, all ranks together
    seconds: float = 0.0            # wall time of training so far, resumes included
    eval_seconds: float = 0.0       # of ``seconds``, spent validating (and saving the best model)
    best: float | None = None       # best value of the selection metric among eligible (kept) states
    best_seen: float | None = None  # best value of any validation, kept or not (drives patience)
    best_step: int = -1
    best_metrics: dict = field(default_factory=dict)   # the best validation's metrics and details
    bad_evals: int = 0              # validations since the best one (patience)
    history: list = field(default_factory=list)        # log and validation records
    world: int = 1                  # processes that wrote this state
    micro_batch_size: int = 0
    task: dict = field(default_factory=dict)           # the task's own (TrainTask.checkpoint_state)
    # Every parameter's full shape ({name: [dims]}) of the model that wrote the checkpoint: a resume
    # with another model size is refused by name before any tensor is loaded (empty: older checkpoints).
    shapes: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in data.items() if k in known})
        if state.best is not None and state.best in (float("inf"), float("-inf")):
            state.best = None       # checkpoints of older versions stored -inf for "none yet"
        if state.best_seen is None and "best_seen" not in data:
            state.best_seen = state.best     # checkpoints before eligibility: every validation was eligible
        return state

    def validated_after_start(self) -> bool:
        return any(h["step"] > 0 and h.get("kind") == "valid" for h in self.history)
