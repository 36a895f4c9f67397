"""Training FLOPs per token of a :class:`~crossrec_dist.models.model.CrossRecModel`, written down once
(the engine turns it into MFU: ``engine/flops.py``).

FLOPs per token (forward + backward = 3x forward, PaLM appendix B):
    6 * N_body  +  6 * H * V  +  12 * L * H * S
N_body = parameters of the transformer body (no embedding table), H hidden size, V catalogue size
(+1 padding; the full-softmax output over tied item embeddings is a V x H matmul per token; with
sampled softmax V is the number of candidates), L layers, S sequence length (attention scores and
values).
"""
from __future__ import annotations


def flops_per_token(model_config, body_params: int, candidates: int | None = None) -> float:
    c = model_config
    v = candidates or (c.num_items + 1)
    return 6 * body_params + 6 * c.hidden_size * v + 12 * c.num_layers * c.hidden_size * c.max_len
