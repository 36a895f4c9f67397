"""Per-rank RNG state in checkpoints, as safetensors (no pickles): a resumed run draws the same dropout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def save_rng(path: Path, rank: int) -> None:
    """Per-rank torch and numpy RNG state, saved with safetensors (no pickles)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    save_file({"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
               "numpy_pos": torch.tensor([pos, has_gauss]), "numpy_gauss": torch.tensor([gauss])},
              str(path / f"rng_rank{rank}.safetensors"))


def restore_rng(path: Path, rank: int) -> None:
    f = path / f"rng_rank{rank}.safetensors"
    if not f.is_file():
        return
    t = load_file(str(f))
    torch.set_rng_state(t["torch"])
    pos, has_gauss = (int(x) for x in t["numpy_pos"])
    np.random.set_state(("MT19937", t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         float(t["numpy_gauss"][0])))
