"""A region that arrives after pretraining, with items the base never saw: ``prepare --vocab-from``,
fine-tuning on the base's item table grown to the region's vocabulary, the adapter loaded by plain
peft, evaluated, exported (merged) and served with the new items ranked."""
import csv
import json

import datasets
import pytest
import torch

from conftest import TARGET_REGIONS, run_cli

NEW_SKUS = 30


@pytest.fixture(scope="module")
def new_market(tiny_base, ml100k, tmp_path_factory):
    """Region 3's log as a new market's CSV, 30 of its frequent items renamed to SKUs the base never
    saw; prepared against the base's vocabulary, then adapted with LoRA (one adapter folder per region
    and a manifest, as `finetune --domains` writes them)."""
    root = tmp_path_factory.mktemp("new_market")
    seqs = datasets.load_from_disk(str(ml100k / "sequences"))
    ids = datasets.load_from_disk(str(ml100k / "items"))["item_id"]
    rows = [(r["user_id"], ids[i - 1], int(t)) for r in seqs if r["domain"] == TARGET_REGIONS[1]
            for i, t in zip(r["item_ids"], r["timestamps"])]
    counts = {}
    for _, item, _ in rows:
        counts[item] = counts.get(item, 0) + 1
    renamed = {item: f"sku-{item}" for item in sorted(counts, key=lambda i: -counts[i])[10:10 + NEW_SKUS]}
    with open(root / "market.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp", "country"])
        for user, item, t in rows:
            w.writerow([user, renamed.get(item, item), t, "ES"])
    run_cli("prepare", "--input", root / "market.csv", "--format", "csv", "--domain-col", "country",
            "--out", root / "data", "--vocab-from", tiny_base)
    run_cli("finetune", "--base", tiny_base, "--data", root / "data", "--domains", "ES", "--method", "lora",
            "--out", root / "adapters", "--set", "train.max_steps=16", "--set", "train.eval_every=8",
            "--set", "train.tensorboard=false", "--set", "must_beat_base=false", "--set", "train.lr=0.01")
    return root, renamed


def test_the_new_markets_vocabulary_is_the_bases_followed_by_its_new_items(new_market, tiny_base):
    root, renamed = new_market
    base_ids = json.loads((tiny_base / "items.json").read_text())
    ids = datasets.load_from_disk(str(root / "data" / "items"))["item_id"]
    assert ids[:len(base_ids)] == base_ids and sorted(ids[len(base_ids):]) == sorted(renamed.values())
    stats = json.loads((root / "data" / "stats.json").read_text())
    assert stats["vocab_from"]["base_items"] == len(base_ids) and stats["vocab_from"]["new_items"] == NEW_SKUS
    # meta.json names the base's vocabulary by size and hash, not by listing every id again
    from crossrec_dist.data.vocabulary import vocab_hash
    meta = json.loads((root / "data" / "meta.json").read_text())
    assert meta["options"]["vocab_from"] == {"items": len(base_ids), "vocab_hash": vocab_hash(base_ids)}


def test_the_adapter_trains_the_new_items_rows_and_plain_peft_loads_it(new_market, tiny_base):
    from peft import PeftModel

    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.models.extend import extend_items
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.stages.common import evaluate_model
    root, _ = new_market
    run = root / "adapters" / "ES"
    m = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "crossrec_adapter.json").read_text())
    base_items = len(json.loads((tiny_base / "items.json").read_text()))
    assert (info["num_items"], info["base_items"]) == (base_items + NEW_SKUS, base_items)
    # new to the base: the 30 SKUs, and the region's items the base's own rows never trained (its regions
    # never held them: untrained_items.json, written by pretrain)
    untrained = set(json.loads((tiny_base / "untrained_items.json").read_text()))
    counts = PreparedData(root / "data").item_counts(["ES"])
    expected = sum(1 for i in range(1, len(counts)) if counts[i] > 0 and (i > base_items or i in untrained))
    assert expected > NEW_SKUS and m["new_items"] == expected
    assert m["trainable_rows"] >= expected and m["train"]["best_step"] > 0
    assert m["cohorts"]["new_items"]["users"] > 0
    # plain peft: grow the base's table (models/extend.py), then PeftModel.from_pretrained
    model = PeftModel.from_pretrained(extend_items(CrossRecModel.from_pretrained(tiny_base), info["num_items"]), str(run))
    delta = model.base_model.model.item_embeddings.token_adapter.trainable_tokens_delta["default"]
    assert delta.shape[0] >= NEW_SKUS and float(delta.abs().sum()) > 0      # the new rows moved
    ev = evaluate_model(model.eval(), PreparedData(root / "data"), ["ES"], model.config.max_len)
    assert ev["test"]["overall"]["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-9)
    out = root / "eval.json"
    run_cli("evaluate", "--model", tiny_base, "--adapter", run, "--data", root / "data", "--out", out)
    assert json.loads(out.read_text())["test"]["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-9)


def test_the_exported_region_ranks_items_the_base_never_saw(new_market, tiny_base):
    from crossrec_dist import Recommender
    from crossrec_dist.models.model import CrossRecModel
    root, renamed = new_market
    run_cli("export", "--base", tiny_base, "--adapters", root / "adapters", "--out", root / "bundle", "--merge")
    merged = root / "bundle" / "merged" / "ES"
    assert json.loads((merged / "items.json").read_text())[-NEW_SKUS:] == \
        json.loads((root / "adapters" / "ES" / "items.json").read_text())[-NEW_SKUS:]
    rec = Recommender(root / "bundle" / "base", root / "bundle" / "adapters")
    history = [next(iter(renamed.values())), "50", "172"]
    ranked = rec.recommend(history, "ES", k=200)
    assert any(str(item).startswith("sku-") for item, _ in ranked)
    model = CrossRecModel.from_pretrained(merged).eval()
    ids = json.loads((merged / "items.json").read_text())
    index = {v: i + 1 for i, v in enumerate(ids)}
    x = torch.tensor([[0] * (model.config.max_len - 3) + [index[h] for h in history]])
    expected = model(input_ids=x, domain_ids=torch.zeros(1, dtype=torch.long), return_scores=True)[0]
    served = rec.scores([history], "ES")[0]
    assert torch.allclose(expected[1:], served[1:], atol=1e-4)
    with pytest.raises(Exception, match="unknown item id"):
        rec.recommend(["sku-does-not-exist"], "ES")


def test_vocab_from_a_folder_without_a_vocabulary_names_the_option(tmp_path):
    (tmp_path / "market.csv").write_text("user_id,item_id,timestamp\nu,i,1\nu,j,2\nu,k,3\n")
    proc = run_cli("prepare", "--input", tmp_path / "market.csv", "--format", "csv", "--out", tmp_path / "d",
                   "--vocab-from", tmp_path, check=False)
    assert proc.returncode == 2 and "--vocab-from" in proc.stderr and "items.json" in proc.stderr


@pytest.fixture(scope="module")
def periods(new_market, tiny_base):
    """The new market in two periods (--until the median timestamp; then all of it), each prepared
    against the base's vocabulary, and period 1's adapter."""
    root, _ = new_market
    times = sorted(int(line.split(",")[2]) for line in (root / "market.csv").read_text().splitlines()[1:])
    cut = times[len(times) // 4]
    run_cli("prepare", "--input", root / "market.csv", "--format", "csv", "--domain-col", "country",
            "--out", root / "p1", "--vocab-from", tiny_base, "--until", str(cut))
    run_cli("finetune", "--base", tiny_base, "--data", root / "p1", "--domain", "ES", "--method", "lora",
            "--out", root / "a1", "--set", "train.max_steps=10", "--set", "train.eval_every=5",
            "--set", "train.tensorboard=false", "--set", "must_beat_base=false", "--set", "train.lr=0.01")
    # period 2 against period 1's adapter: its items keep their indices, the period's new SKUs follow
    run_cli("prepare", "--input", root / "market.csv", "--format", "csv", "--domain-col", "country",
            "--out", root / "p2", "--vocab-from", root / "a1")
    return root, cut


def test_until_keeps_the_log_up_to_a_time(periods):
    root, cut = periods
    p1, p2 = (json.loads((root / p / "stats.json").read_text()) for p in ("p1", "p2"))
    assert p1["interactions"] < p2["interactions"]
    # period 2 holds SKUs period 1 never had: they follow period 1's (which keep their indices)
    assert p2["vocab_from"]["new_items"] > 0 and p2["vocab_from"]["base_items"] == json.loads(
        (root / "a1" / "crossrec_adapter.json").read_text())["num_items"]
    stamps = datasets.load_from_disk(str(root / "p1" / "sequences"))["timestamps"]
    assert max(max(t) for t in stamps) <= cut
    proc = run_cli("prepare", "--input", root / "market.csv", "--format", "csv", "--out", root / "none",
                   "--until", "5", check=False)
    assert proc.returncode == 2 and "--until" in proc.stderr


def test_a_warm_start_that_learns_nothing_is_exactly_the_adapter_it_started_from(periods, tiny_base):
    """--init-adapter: the run starts from the current adapter (every LoRA matrix and whole item row
    copied). On period 1's own data, with lr 1e-9 nothing can beat the start, it is kept, and the result
    ranks every test user exactly as the adapter it started from. On period 2, whose vocabulary grew
    (new SKUs), the same copy goes into a larger model, and `crossrec evaluate` scores the stale adapter
    there (its items as trained, the new SKUs as average items)."""
    root, _ = periods
    slow = ["--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.lr=1e-9",
            "--set", "train.tensorboard=false"]
    for data, out in (("p1", "warm_p1"), ("p2", "warm_p2")):
        run_cli("finetune", "--base", tiny_base, "--data", root / data, "--domain", "ES", "--method", "lora",
                "--init-adapter", root / "a1", "--out", root / out, *slow)
    a1, same, grown = (json.loads((root / d / "metrics.json").read_text()) for d in ("a1", "warm_p1", "warm_p2"))
    saved = load_adapter_tensors(root / "a1")
    for warm in (same, grown):
        assert warm["warm_start"]["tensors"] == len(saved) and warm["warm_start"]["item_rows"] > 0
        assert warm["selection"]["start"] == "init_adapter" and warm["train"]["best_step"] == 0
        assert warm["selection"]["kept"] == "init_adapter"
    assert same["test_ranks"] == a1["test_ranks"]
    assert grown["params"]["total"] > a1["params"]["total"]
    run_cli("evaluate", "--model", tiny_base, "--adapter", root / "a1", "--data", root / "p2", "--domain", "ES",
            "--out", root / "stale.json")
    stale = json.loads((root / "stale.json").read_text())
    assert stale["test"]["users"] == grown["test"]["users"]


def test_a_warm_start_refuses_what_it_cannot_continue(periods, tiny_base):
    root, _ = periods
    common = ["finetune", "--base", tiny_base, "--data", root / "p2", "--domain", "ES", "--init-adapter", root / "a1",
              "--set", "train.max_steps=2"]
    full = run_cli(*common, "--method", "full", "--out", root / "x1", check=False)
    assert full.returncode == 2 and "init_adapter" in full.stderr
    other_rank = run_cli(*common, "--method", "lora", "--set", "lora.r=3", "--out", root / "x2", check=False)
    assert other_rank.returncode == 2 and "lora.r" in other_rank.stderr and "Traceback" not in other_rank.stderr


def load_adapter_tensors(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter_model.safetensors"))
