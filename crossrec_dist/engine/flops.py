"""MFU: the generic half. A task declares its model's FLOPs per training token
(``TrainTask.flops_per_token``, forward + backward); the engine divides the achieved FLOP/s by the
peak of the GPUs it runs on. Peak: dense bf16 tensor-core FLOP/s of the GPU (no figure on a CPU or
an unknown GPU, and then no MFU is logged).
"""
from __future__ import annotations

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops() -> float | None:
    """This process's GPU's peak dense bf16 FLOP/s, or None (CPU, or a GPU not in ``PEAK_BF16``)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None


def mfu(tokens_per_second: float, flops_per_token: float | None, world: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation of ``world`` devices of ``peak`` FLOP/s each processing
    ``tokens_per_second`` tokens between them; None when either figure is unknown."""
    if not peak or not flops_per_token:
        return None
    return tokens_per_second * flops_per_token / (peak * world)
