"""``crossrec``: one entry point, one verb per pipeline step; each verb is a plain function.

Exit status: 0 success, 2 bad usage or bad input (message names file, line or field), 1 otherwise.
The verbs live in :mod:`crossrec_dist.commands`, which imports heavy libraries inside each verb so
``crossrec --help`` stays instant.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import warnings

from .commands import add_commands
from .errors import InputError, RunStopped


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crossrec", description=__doc__.splitlines()[0])
    add_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def _quiet_libraries() -> None:
    """Progress bars of datasets/transformers clutter logs of multi-process runs; our logs say enough."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")      # also transformers' bars
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    # DeepSpeed's ZeRO-3 calls these renamed torch.distributed collectives on every step; the
    # FutureWarning would fill a log with one line per collective.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # peft's PeftModel asks transformers for the deprecated `is_gradient_checkpointing` on every load.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if not shutil.which("nvidia-smi"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would probe for GPUs and warn
    # transformers reads the variables above when it is first imported; a caller in this process
    # may have imported it already (importing it here would cost --help 1.0 s).
    tlog = sys.modules.get("transformers.utils.logging")
    if tlog is not None:
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except InputError as e:
        print(f"crossrec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except RunStopped as e:
        print(f"crossrec: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    return 0


def exit_process(code: int):
    """Leave the process with ``code``. A rank of a launched multi-process world (WORLD_SIZE > 1)
    leaves without interpreter finalization (``os._exit``, after flushing its streams and logs).

    Why: on a busy machine a 2-process ZeRO-3 run's rank aborted after its work was done ("terminate
    called without an active exception", SIGABRT; the launch then reports failure). The process
    group is already destroyed by then (accelerate's end_training), but objects that DeepSpeed and
    accelerate keep in module globals still hold Gloo process-group objects, whose worker threads meet
    a half-torn-down interpreter when those objects are finally freed (pytorch/pytorch#190489). Beside
    3 busy processes, 3 of 16 ZeRO-3 pretrain launches aborted so, 0 of 16 with this
    (benchmarks/teardown_stress.py); skipping finalization in launched ranks removes the window, also
    after a collective stop (preemption) that leaves the group alive. Every file crossrec writes is closed
    before this point; a one-process run (and a caller of :func:`main`) exits normally."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def run() -> None:
    """The ``crossrec`` console script: :func:`main`, then :func:`exit_process`."""
    exit_process(main())
