"""The FAISS item index (crossrec serve --index faiss): inner products with the offsets folded in."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")

from crossrec_dist.errors import InputError  # noqa: E402
from crossrec_dist.serving.ann import AnnConfig, ItemIndex, recall_at_k  # noqa: E402


def _exact(table, bias, hidden, k, exclude):
    scores = hidden @ table.T + bias
    scores[:, 0] = -np.inf
    for row, seen in enumerate(exclude):
        scores[row, seen] = -np.inf
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, top, 1), top


@pytest.fixture(scope="module")
def catalogue():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(3001, 16)).astype(np.float32)       # row 0: padding
    bias = rng.normal(scale=2.0, size=3001).astype(np.float32)
    hidden = rng.normal(size=(40, 16)).astype(np.float32)
    exclude = [list(rng.choice(np.arange(1, 3001), size=int(rng.integers(0, 30)), replace=False)) for _ in range(40)]
    return table, bias, hidden, exclude


def test_every_cell_probed_is_exact_and_the_offsets_count(catalogue):
    table, bias, hidden, exclude = catalogue
    index = ItemIndex(table, bias, AnnConfig(exact_below=0, nlist=16, nprobe=16))
    assert index.kind.startswith("ivf-flat")
    scores, items = index.search(hidden, 10, exclude)
    want_scores, want_items = _exact(table, bias, hidden, 10, exclude)
    assert (items == want_items).all()
    assert np.allclose(scores, want_scores, atol=1e-4)
    assert all(not set(row) & set(seen) for row, seen in zip(items.tolist(), exclude))
    assert (items > 0).all()                                      # never the padding row
    # without the offsets folded in, the answer would differ: they matter here
    plain = ItemIndex(table, None, AnnConfig(exact_below=0, nlist=16, nprobe=16)).search(hidden, 10, exclude)[1]
    assert recall_at_k(plain, want_items) < 0.9


def test_fewer_cells_probed_is_approximate_and_recall_says_how_much(catalogue):
    table, bias, hidden, exclude = catalogue
    want = _exact(table, bias, hidden, 10, exclude)[1]
    recalls = [recall_at_k(ItemIndex(table, bias, AnnConfig(exact_below=0, nlist=64, nprobe=p)).search(
        hidden, 10, exclude)[1], want) for p in (1, 8, 64)]
    assert recalls[0] < recalls[1] <= recalls[2] == 1.0, recalls


def test_cells_follow_scores_when_item_norms_differ():
    """Few cells probed must still find most of the top 10 when items' norms (and offsets) vary -- an
    inner-product IVF piles items into a few long-norm cells and found ~0% here at nprobe 8 of 141."""
    rng = np.random.default_rng(0)
    table = (rng.normal(size=(20001, 32)) / np.sqrt(32)).astype(np.float32)
    bias = rng.normal(size=20001).astype(np.float32)
    hidden = rng.normal(size=(100, 32)).astype(np.float32)
    want = _exact(table, bias, hidden, 10, [[]] * 100)[1]
    found = ItemIndex(table, bias, AnnConfig(exact_below=0, nprobe=8)).search(hidden, 10)[1]
    assert recall_at_k(found, want) > 0.6


def test_small_catalogue_is_exact_and_short_rows_are_padded(catalogue):
    table, bias, hidden, _ = catalogue
    small = ItemIndex(table[:6], bias[:6])                        # 5 items, under exact_below
    assert small.kind == "exact"
    scores, items = small.search(hidden[:2], 10, [[1, 2], []])
    assert items[0].tolist()[:3] != [0, 0, 0] and items[0, 3:].tolist() == [0] * 7
    assert np.isneginf(scores[0, 3:]).all() and np.isfinite(scores[1, :5]).all()
    assert sorted(items[1, :5].tolist()) == [1, 2, 3, 4, 5]


def test_bad_settings_name_the_flag():
    with pytest.raises(InputError, match="--faiss-nprobe"):
        AnnConfig(nprobe=0)
