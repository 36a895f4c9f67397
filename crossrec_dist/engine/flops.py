"""Model FLOPs per training token and MFU, written down once.

FLOPs per token (forward + backward = 3x forward, PaLM appendix B):
    6 * N_body  +  6 * H * V  +  12 * L * H * S
N_body = parameters of the transformer body (no embedding table), H hidden size, V catalogue size
(+1 padding; the full-softmax output over tied item embeddings is a V x H matmul per token; with
sampled softmax V is the number of candidates), L layers, S sequence length (attention scores and
values). Peak: dense bf16 tensor-core FLOP/s of the GPU.
"""
from __future__ import annotations

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def flops_per_token(model_config, body_params: int, candidates: int | None = None) -> float:
    c = model_config
    v = candidates or (c.num_items + 1)
    return 6 * body_params + 6 * c.hidden_size * v + 12 * c.num_layers * c.hidden_size * c.max_len


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16.items():
        if key in name:
            return peak
    return None
