"""What a training command's ``--out`` already holds, and what the command may do with it.

A user's second run of the same command must never silently redo, replace or lose work. So before
anything is trained, the output folder is classified:

- **new**: nothing of a run there (missing, empty, or files of no run): train;
- **finished**: ``metrics.json`` (written last, so a folder with it is complete): refused unless
  ``--force`` (replace it) or ``--resume auto`` with a larger ``train.max_steps`` and a checkpoint to
  continue from; ``--resume auto`` with nothing left to train says so and does nothing;
- **unfinished**: checkpoints but no ``metrics.json`` (preempted, crashed, Ctrl-C): refused unless
  ``--resume auto`` (continue) or ``--force`` (start again).

``--force`` replaces atomically: the old run is renamed aside (``.NAME.replaced``, one ``rename``)
before training, and deleted only once the new run has finished; if the new run fails, the old one
is still there, and the message says where. Every rank classifies the folder the same way (one
shared filesystem); only the main rank renames and deletes.

Light on purpose (no torch): the CLI checks this before any model or process group exists.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

FINISHED = "metrics.json"


@dataclass
class Found:
    kind: str                                   # new | finished | unfinished
    steps: int | None = None                    # finished: steps trained; unfinished: newest checkpoint's
    stopped: str | None = None                  # finished: why training stopped (completed, patience, ...)
    checkpoints: list[str] = field(default_factory=list)


def _checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda n: int(n[5:]))


def inspect(out: str | Path) -> Found:
    out = Path(out)
    checkpoints = _checkpoints(out)
    if (out / FINISHED).is_file():
        try:
            train = json.loads((out / FINISHED).read_text()).get("train", {})
        except (OSError, ValueError, AttributeError):
            train = {}
        return Found("finished", train.get("steps"), train.get("stopped"), checkpoints)
    if checkpoints or (out / "checkpoints" / "latest").is_file():
        return Found("unfinished", int(checkpoints[-1][5:]) if checkpoints else None, None, checkpoints)
    return Found("new")


def is_main_process() -> bool:
    """Rank 0 of a launched world (or a plain process): the launcher's RANK, before any process group."""
    return os.environ.get("RANK", "0") == "0"


def plan_output(out: str | Path, what: str, *, force: bool, resume: str | None, max_steps: int = 0,
                log=print) -> str:
    """``train`` (go ahead), ``replace`` (with --force: set the old run aside first, see
    :func:`replacing`) or ``done`` (nothing to do: a finished run and --resume auto with no more
    steps asked for). Raises InputError (exit 2) naming ``--out`` for everything else."""
    out = Path(out)
    if force and resume:
        raise InputError("give --force (start again, replacing the run in --out) or --resume (continue it), "
                         "not both", field="--force")
    found = inspect(out)
    if found.kind == "new":
        return "train"
    if force:
        return "replace"
    if found.kind == "unfinished":
        if resume:
            return "train"
        at = f"checkpoints up to step {found.steps}" if found.steps is not None else "a checkpoint pointer"
        raise InputError(f"holds an unfinished {what} run ({at}); add --resume auto to continue it, --force to "
                         "start again (the old run is replaced only once the new one has finished), or give "
                         "another --out", path=str(out), field="--out")
    done = f"a finished {what} run ({found.steps} steps, stopped: {found.stopped})"
    if not resume:
        raise InputError(f"already holds {done}; add --force to replace it (only once the new run has finished), "
                         "--resume auto with a larger train.max_steps to train it further, or give another --out",
                         path=str(out), field="--out")
    if max_steps and found.steps is not None and max_steps > found.steps:
        if found.checkpoints:
            return "train"
        raise InputError(f"holds {done} that kept no checkpoint to continue from (train.checkpoint_every was 0); "
                         "add --force to train again from step 0, or give another --out", path=str(out), field="--out")
    log(f"{out} already holds {done}: nothing to do (raise train.max_steps to train further, or --force to "
        "train again)")
    return "done"


def aside_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.replaced"


@contextmanager
def replacing(out: str | Path, action: str, log=print):
    """Around the run that writes ``out``: for ``replace`` (--force) the old run is renamed aside before
    and deleted after the new one finished; if the new one fails, the old one stays and the log says
    where. Other actions pass through. Renames and deletes happen on the main rank only."""
    if action != "replace":
        yield
        return
    out, aside = Path(out), aside_path(out)
    if is_main_process() and out.exists():
        if aside.exists():
            shutil.rmtree(aside)       # a run an earlier --force was already told to replace
        os.replace(out, aside)
        log(f"--force: the previous run in {out} is set aside as {aside} until this run finishes")
    try:
        yield
    except BaseException:
        if is_main_process() and aside.exists():
            log(f"--force: this run did not finish; the run it was to replace is kept at {aside}")
        raise
    if is_main_process() and aside.exists():
        shutil.rmtree(aside)
        log(f"--force: removed the replaced run ({aside})")
