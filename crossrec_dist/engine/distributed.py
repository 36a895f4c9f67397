"""The real process world, from ``torch.distributed`` when it is up.

Why not ``accelerator.num_processes``: under ``accelerate launch --use_deepspeed`` on CPU, accelerate
reports 1 process and index 0 on every rank while torch.distributed sees the true world
(PITFALLS.md #9). Data sharding, main-rank logging, saving and metric reduction all use this module.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist

from ..errors import InputError


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and world_size() > 1:
        dist.barrier()


_MPI_WORLD = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK")


def requested_processes(parent_cmdline: list[str]) -> int | None:
    """The process count an ``accelerate launch`` command line asked for (``--num_processes N``), or
    None when it does not say."""
    for i, arg in enumerate(parent_cmdline):
        if arg in ("--num_processes", "--num-processes") and i + 1 < len(parent_cmdline):
            value = parent_cmdline[i + 1]
        elif arg.startswith(("--num_processes=", "--num-processes=")):
            value = arg.split("=", 1)[1]
        else:
            continue
        return int(value) if value.isdigit() else None
    return None


def check_launch() -> None:
    """Refuse a launch that asked for several processes and got one.

    ``accelerate launch --num_processes 2 -m crossrec_dist ...`` without ``--multi_gpu`` or
    ``--use_deepspeed`` on a machine without a GPU goes to accelerate's simple launcher, which starts
    one process (it expects MPI to start the others) and sets no RANK/WORLD_SIZE: the run would train
    alone, silently, at half the speed asked for. The simple launcher's marks are ACCELERATE_USE_CPU
    and no world variables; the count asked for is on the launcher's command line (our parent)."""
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ or any(v in os.environ for v in _MPI_WORLD):
        return
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return                      # not Linux: nothing to read the request from
    asked = requested_processes(parent)
    if asked and asked > 1:
        raise InputError(f"accelerate launch was asked for {asked} processes but started 1: without --multi_gpu or "
                         "--use_deepspeed (and with no GPU) it uses its one-process launcher. Add --multi_gpu (on a "
                         f"CPU machine it starts {asked} Gloo processes) or --use_deepspeed, or use torchrun "
                         f"--nproc_per_node {asked}", field="--num_processes")


def placement() -> dict:
    """Where this rank runs and whom it met: its host and address, the rendezvous it was given
    (MASTER_ADDR/PORT from the launcher), its node (GROUP_RANK = machine rank under torchrun) and the
    process group's backend. Multi-node tests assert on these; a user reads them when a rank hangs."""
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = None
    return {"host": host, "address": address,
            "rendezvous": {"addr": os.environ.get("MASTER_ADDR"), "port": os.environ.get("MASTER_PORT")},
            "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0))),
            "local_rank": int(os.environ.get("LOCAL_RANK", 0)),
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_cpu_world() -> bool:
    """Several processes on a machine without an accelerator. Started by torchrun or ``accelerate
    launch --multi_gpu`` there, accelerate settles on ``DistributedType.NO`` while torch.distributed has
    the real world, leaves the model unwrapped, and every rank trains its own shard of the data with no
    gradient all-reduce, unless the Accelerator is told it runs on CPU (PITFALLS.md #9's cousin,
    without DeepSpeed)."""
    accel = getattr(torch, "accelerator", None)
    has_accelerator = accel.is_available() if accel is not None else torch.cuda.is_available()
    return world_size() > 1 and not has_accelerator


def ensure_single_process_env() -> None:
    """DeepSpeed wants a process group even for one process: give it a loopback world of one."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def all_gather_tensor(t: torch.Tensor) -> list[torch.Tensor]:
    """Gather 1-D tensors of different lengths from every rank (for evaluation ranks)."""
    if world_size() == 1 or not dist.is_initialized():
        return [t]
    n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(out, padded)
    return [o[: int(s.item())] for o, s in zip(out, sizes)]


def all_reduce_sum(value: float, device="cpu") -> float:
    if world_size() == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_reduce_max(values: list[float], device="cpu") -> list[float]:
    """Element-wise maximum over ranks (e.g. "did any rank get the signal")."""
    if world_size() == 1 or not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_object(obj):
    if world_size() == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
