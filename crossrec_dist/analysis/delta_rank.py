"""How low-rank is the change full fine-tuning makes? The arithmetic behind ``benchmarks.delta_rank``.

For a base and the same base fully fine-tuned, :func:`changes` gives each weight's change
``W_full - W_base``; :func:`energy_rows` how much of a change's energy (squared singular values) its
top directions hold; :func:`low_rank` a change's best rank-r approximation from its SVD (Eckart-Young),
which is what a cut model keeps; :func:`parse_cut` reads a ``BODY_RANK:TABLE_RANK`` cut.
"""
from __future__ import annotations

import torch

from crossrec_dist.errors import InputError

TABLE = "item_embeddings.weight"


def low_rank(factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int | None) -> torch.Tensor:
    """From a change's SVD ``(u, s, vh)``: its best rank-``rank`` approximation (None: all of it)."""
    u, s, vh = factors
    if rank is None:
        rank = len(s)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def changes(base: dict, full: dict) -> dict[str, torch.Tensor]:
    """``W_full - W_base`` per weight (float32), after checking the two are the same model's weights."""
    if set(base) != set(full):
        raise InputError("is not a fine-tune of --base: different weight names "
                         f"({sorted(set(base) ^ set(full))[:3]} ...)", field="--full")
    bad = [n for n in base if base[n].shape != full[n].shape]
    if bad:
        raise InputError(f"is not a fine-tune of --base: {bad[0]} is {tuple(full[bad[0]].shape)} in --full, "
                         f"{tuple(base[bad[0]].shape)} in --base", field="--full")
    return {n: full[n].float() - base[n].float() for n in sorted(base)}


def energy_rows(base: dict, deltas: dict, factors: dict) -> list[dict]:
    """Per matrix: relative size of its change, energy share of the top 1/2/8 directions, and how many
    directions hold 50% and 90% of the energy."""
    rows = []
    for name, (_, s, _) in factors.items():
        d = deltas[name]
        s2 = s ** 2
        cum = (s2.cumsum(0) / s2.sum()).tolist()
        rows.append({"weight": name, "shape": list(d.shape),
                     "relative_change": float(d.norm() / base[name].float().norm()),
                     "energy_top": {k: cum[min(k, len(cum)) - 1] for k in (1, 2, 8)},
                     "rank_50": next(i + 1 for i, c in enumerate(cum) if c >= 0.5),
                     "rank_90": next(i + 1 for i, c in enumerate(cum) if c >= 0.9)})
    return rows


def parse_cut(text: str) -> tuple[int | None, int | None]:
    """``BODY_RANK:TABLE_RANK`` -> (body, table); ``full`` = the whole change (None), 0 = none of it."""
    body, table = text.split(":")
    return tuple(None if x == "full" else int(x) for x in (body, table))
