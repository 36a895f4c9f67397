"""Adapting the base per region: every method, PEFT export, reload, fingerprints, AdaLoRA, new items."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TARGET_REGIONS, run_cli, child_env

# Mechanics on a few steps: the trained output is kept whatever it scores (must_beat_base: false; the
# guard that keeps the base unless beaten is tested on its own below and in test_references.py).
QUICK = ["--set", "train.max_steps=6", "--set", "train.eval_every=3", "--set", "train.validate_at_start=false", "--set", "train.log_every=3",
         "--set", "train.tensorboard=false", "--set", "must_beat_base=false"]


@pytest.fixture(scope="module")
def lora_run(tiny_base, ml100k, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method", "lora",
            "--out", out, *QUICK)
    return out


@pytest.mark.parametrize("method", ["adalora", "full", "head", "l2sp", "scratch", "none"])
def test_every_method_runs(method, tiny_base, ml100k, tmp_path):
    extra = ["--set", "adalora.tinit_ratio=0.2", "--set", "adalora.tfinal_ratio=0.2",
             "--set", "adalora.delta_t=1"] if method == "adalora" else []
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method", method,
            "--out", tmp_path, *QUICK, *extra)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["stage"] == "finetune" and m["method"] == method and m["domain"] == TARGET_REGIONS[0]
    total, trainable = m["params"]["total"], m["params"]["trainable"]
    cfg = json.loads((tiny_base / "config.json").read_text())
    emb = (cfg["num_items"] + 1) * cfg["hidden_size"]
    expected = {"full": total, "l2sp": total, "scratch": total, "head": emb, "none": 0}
    if method in expected:
        assert trainable == expected[method]
    if method == "adalora":
        # the budget schedule ran: AdaLoRA pruned ranks below init_r somewhere, and saved the pattern
        saved = json.loads((tmp_path / "adapter_config.json").read_text())
        assert saved["rank_pattern"], "update_and_allocate never re-allocated ranks"
        init_r = saved["init_r"]
        ranks = [sum(v) for v in saved["rank_pattern"].values()]
        assert min(ranks) < init_r and sum(ranks) < init_r * len(ranks)
    if method != "none":
        assert m["train"]["steps"] == 6


def test_lora_trainable_parameters_match_the_config(lora_run, tiny_base):
    m = json.loads((lora_run / "metrics.json").read_text())
    cfg = json.loads((tiny_base / "config.json").read_text())
    h, f, r = cfg["hidden_size"], cfg["intermediate_size"], 8
    per_layer = 4 * r * (h + h) + 2 * r * (h + f) + r * (f + h)  # q,k,v,o + gate,up + down
    assert m["params"]["trainable"] == cfg["num_layers"] * per_layer + m["new_items"] * h


def test_rank_pattern_gives_the_item_table_its_own_rank_in_a_plain_peft_adapter(tiny_base, ml100k, tmp_path):
    """``lora.rank_pattern.item_embeddings=K``: the table's LoRA at rank K, every linear layer at ``lora.r``;
    the trainable count says so, and plain PEFT rebuilds the same shapes from the saved config."""
    from peft import PeftModel

    from crossrec_dist.models.model import CrossRecModel
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method", "lora",
            "--out", tmp_path, *QUICK, "--set", "lora.r=2", "--set", "lora.alpha=4",
            "--set", "lora.target_modules=[q_proj,v_proj,item_embeddings]",
            "--set", "lora.rank_pattern.item_embeddings=6", "--set", "lora.alpha_pattern.item_embeddings=12")
    m = json.loads((tmp_path / "metrics.json").read_text())
    cfg = json.loads((tiny_base / "config.json").read_text())
    h, n = cfg["hidden_size"], cfg["num_items"] + 1
    bias = n if cfg.get("item_bias") else 0
    assert m["params"]["trainable"] == cfg["num_layers"] * 2 * 2 * (h + h) + 6 * (n + h) + bias
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"item_embeddings": 6} and saved["alpha_pattern"] == {"item_embeddings": 12}
    model = PeftModel.from_pretrained(CrossRecModel.from_pretrained(tiny_base), str(tmp_path))
    emb = model.base_model.model.item_embeddings
    assert emb.lora_embedding_A["default"].shape == (6, n) and emb.scaling["default"] == 2.0
    assert model.base_model.model.backbone.layers[0].self_attn.q_proj.lora_A["default"].weight.shape[0] == 2


def test_adalora_with_a_table_adapter_is_two_plain_peft_adapters_that_give_its_metrics_back(tiny_base, ml100k, tmp_path):
    """``adalora.table_r=K``: AdaLoRA on the linear layers and LoRA of rank K on the item table (PEFT's
    AdaLoRA has no embedding layer), trained as one PEFT mixed model. The trainable count holds both,
    AdaLoRA's budget allocation ran (its final ranks add up to target_r per module), the folder is PEFT's
    layout for two adapters, and plain peft (PeftMixedModel) loads it and gives the recorded metrics back;
    exported and served, the region scores as the merged model does."""
    from peft import PeftMixedModel

    from crossrec_dist import Recommender
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.stages.common import evaluate_model

    region = TARGET_REGIONS[0]
    root, run = tmp_path / "adapters", tmp_path / "adapters" / region
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domains", region, "--method", "adalora",
            "--out", root, "--set", "train.max_steps=12", "--set", "train.eval_every=12", "--set", "train.validate_at_start=false",
            "--set", "train.tensorboard=false", "--set", "adalora.init_r=3", "--set", "adalora.target_r=1",
            "--set", "adalora.delta_t=1", "--set", "adalora.table_r=5", "--set", "lora.target_modules=[q_proj,v_proj]",
            "--set", "train_top_items=0", "--set", "must_beat_base=false")
    m = json.loads((run / "metrics.json").read_text())
    cfg = json.loads((tiny_base / "config.json").read_text())
    h, n, layers = cfg["hidden_size"], cfg["num_items"] + 1, cfg["num_layers"]
    bias = n if cfg.get("item_bias") else 0
    # AdaLoRA at init_r: A (r x in), B (out x r), E (r) per module; the table: r x (n + h); the offsets
    assert m["params"]["trainable"] == layers * 2 * (3 * (h + h) + 3) + 5 * (n + h) + bias
    assert m["train"]["best_step"] == 12 and sum(m["rank_pattern"].values()) == 1 * layers * 2
    assert json.loads((run / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    table = json.loads((run / "item_table" / "adapter_config.json").read_text())
    assert table["peft_type"] == "LORA" and table["target_modules"] == ["item_embeddings"] and table["r"] == 5
    model = PeftMixedModel.from_pretrained(CrossRecModel.from_pretrained(tiny_base), str(run))
    model.load_adapter(str(run / "item_table"), adapter_name="item_table")
    model.set_adapter(["default", "item_table"])
    emb = model.base_model.model.item_embeddings
    assert float(emb.lora_embedding_B["item_table"].detach().abs().sum()) > 0    # the table's change was trained and saved
    # Pruned singular values are exactly zero, as PEFT's loop leaves them (mask after the optimizer step):
    # the saved adapter computes with the ranks the budget chose, not with one step's regrowth of the rest.
    saved = load_file(run / "adapter_model.safetensors")
    kept = {k.replace("base_model.model.", "").replace("lora_E", "lora_E.default"): int((t != 0).sum())
            for k, t in saved.items() if "lora_E" in k}
    assert kept == m["rank_pattern"]
    ev = evaluate_model(model.eval(), PreparedData(ml100k), [region], cfg["max_len"])
    assert ev["test"]["overall"]["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-9)
    assert ev["valid"]["overall"]["ndcg@10"] == pytest.approx(m["valid"]["ndcg@10"], abs=1e-9)
    run_cli("export", "--base", tiny_base, "--adapters", root, "--out", tmp_path / "bundle", "--merge")
    rec = Recommender(tmp_path / "bundle" / "base", tmp_path / "bundle" / "adapters")
    history = ["50", "172", "133"]
    merged = CrossRecModel.from_pretrained(tmp_path / "bundle" / "merged" / region).eval()
    ids = torch.tensor([[0] * 47 + [rec.index[h] for h in history]])
    dom = torch.tensor([rec.domain_ids[region]])
    s_merged = merged(input_ids=ids, domain_ids=dom, return_scores=True)[0]
    s_mixed = model(input_ids=ids, domain_ids=dom, return_scores=True)[0]
    s_served, s_base = rec.scores([history], region)[0], rec.scores([history])[0]
    assert torch.allclose(s_merged[1:], s_served[1:], atol=1e-4) and torch.allclose(s_mixed[1:], s_served[1:], atol=1e-4)
    assert not torch.allclose(s_served[1:], s_base[1:], atol=1e-3)        # the region's model is not the base


def test_adalora_resumed_past_its_final_budget_step_ends_as_the_uninterrupted_run(tiny_base, ml100k, tmp_path):
    """AdaLoRA's budget lives in PEFT's adapter config, not in the weights: a checkpoint carries it
    (TrainTask.checkpoint_state), so a run resumed after the final-budget step masks with the same
    pattern and ends where the uninterrupted run ended (PEFT fails on a missing pattern otherwise)."""
    args = ["finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method", "adalora",
            "--set", "train.max_steps=12", "--set", "train.eval_every=12", "--set", "train.validate_at_start=false",
            "--set", "train.tensorboard=false", "--set", "train.checkpoint_every=11", "--set", "adalora.delta_t=1",
            "--set", "adalora.init_r=3", "--set", "adalora.target_r=1", "--set", "lora.target_modules=[q_proj,v_proj]"]
    run_cli(*args, "--out", tmp_path / "whole")      # final budget from step 12 - int(0.2 * 12) = 10
    state = json.loads((tmp_path / "whole" / "checkpoints" / "step_00000011" / "trainer_state.json").read_text())
    assert sum(map(sum, state["task"]["rank_pattern"].values())) == 1 * 2 * 2
    run_cli(*args, "--out", tmp_path / "resumed", "--resume", tmp_path / "whole" / "checkpoints" / "step_00000011")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "resumed"))
    assert b["rank_pattern"] == a["rank_pattern"] and sum(a["rank_pattern"].values()) == 1 * 2 * 2
    assert b["test"]["ndcg@10"] == pytest.approx(a["test"]["ndcg@10"], abs=1e-9)


def test_lora_adapter_is_plain_peft_and_reproduces_metrics(lora_run, tiny_base, ml100k):
    from peft import PeftModel

    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.evaluation.evaluator import EvalOptions, model_scorer, rank_eval_set, summarize_ranks
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.stages.common import evaluate_model

    tensors = load_file(lora_run / "adapter_model.safetensors")
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 for t in tensors.values())
    assert any(t.abs().sum() > 0 for t in lora_b)  # lora_B moved away from its zero init
    model = PeftModel.from_pretrained(CrossRecModel.from_pretrained(tiny_base), str(lora_run))
    data = PreparedData(ml100k)
    ev = evaluate_model(model, data, [TARGET_REGIONS[0]], model.config.max_len)
    m = json.loads((lora_run / "metrics.json").read_text())
    assert ev["test"]["overall"]["ndcg@10"] == pytest.approx(m["test"]["ndcg@10"], abs=1e-9)
    assert ev["valid"]["overall"]["ndcg@10"] == pytest.approx(m["valid"]["ndcg@10"], abs=1e-9)
    # in training, validation ranked each user's last valid_targets items (3 by default)
    opts = EvalOptions(split="valid", domains=[TARGET_REGIONS[0]], max_len=model.config.max_len)
    several = data.eval_set("valid", [TARGET_REGIONS[0]], targets_per_user=m["config"]["valid_targets"])
    ranks = rank_eval_set(data, several, model_scorer(model), opts)
    assert m["config"]["valid_targets"] == 3
    assert summarize_ranks(data, several, ranks, opts.ks)["overall"]["ndcg@10"] == pytest.approx(
        m["in_training_valid"]["ndcg@10"], abs=1e-6)


def test_fingerprint_refuses_a_foreign_base(lora_run, tiny_base, ml100k, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for f in tiny_base.iterdir():
        if f.is_file():
            (foreign / f.name).write_bytes(f.read_bytes())
    weights = load_file(foreign / "model.safetensors")
    weights = {k: v + 0.01 for k, v in weights.items()}
    save_file(weights, foreign / "model.safetensors", metadata={"format": "pt"})
    proc = run_cli("evaluate", "--model", foreign, "--adapter", lora_run, "--data", ml100k,
                   "--domain", TARGET_REGIONS[0], "--out", tmp_path / "m.json", check=False)
    assert proc.returncode == 2 and "base_fingerprint" in proc.stderr and "Traceback" not in proc.stderr


def test_regions_loop_manifest_export_and_serving(tiny_base, ml100k, tmp_path):
    from crossrec_dist import Recommender

    root = tmp_path / "adapters"
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domains", ",".join(TARGET_REGIONS),
            "--method", "lora", "--out", root, *QUICK)
    manifest = json.loads((root / "manifest.json").read_text())
    assert set(manifest["domains"]) == set(TARGET_REGIONS)
    assert manifest["base_fingerprint"].startswith("sha256:")
    for d, e in manifest["domains"].items():
        assert e["method"] == "lora" and e["params"]["trainable"] > 0 and "ndcg@10" in e["test"]
    run_cli("export", "--base", tiny_base, "--adapters", root, "--out", tmp_path / "bundle", "--merge")
    rec = Recommender(tmp_path / "bundle" / "base", tmp_path / "bundle" / "adapters")
    history = ["50", "172", "133"]
    a = rec.recommend(history, domain=TARGET_REGIONS[0], k=10)
    b = rec.recommend(history, domain=TARGET_REGIONS[1], k=10)
    base = rec.recommend(history, k=10)
    assert len(a) == 10 and all(isinstance(i, str) and i not in history for i, _ in a)
    assert [s for _, s in a] != [s for _, s in b] != [s for _, s in base]  # adapters really switch
    # A merged model scores exactly like base + adapter.
    from crossrec_dist.models.model import CrossRecModel
    merged = CrossRecModel.from_pretrained(tmp_path / "bundle" / "merged" / TARGET_REGIONS[0]).eval()
    ids = torch.tensor([[0] * 47 + [rec.index[h] for h in history]])
    dom = torch.tensor([rec.domain_ids[TARGET_REGIONS[0]]])
    s_merged = merged(input_ids=ids, domain_ids=dom, return_scores=True)[0]
    s_adapter = rec.scores([history], TARGET_REGIONS[0])[0]
    assert torch.allclose(s_merged[1:], s_adapter[1:], atol=1e-4)
    _short_histories_are_served_sensibly(rec, ml100k, tiny_base, tmp_path / "bundle")


def _short_histories_are_served_sensibly(rec, ml100k, tiny_base, bundle):
    """0-2 known events (docs/serving.md): no known event -> the region's popularity list (counted here
    by hand from its training data), the base's for no region; unknown ids are an error, or skipped
    with unknown="skip" and reported; one known event -> the model; min_known moves the threshold, and
    the popularity answer leaves out what the user already has."""
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.errors import InputError
    import numpy as np
    region = TARGET_REGIONS[0]
    data = PreparedData(ml100k)
    vocab = json.loads((tiny_base / "items.json").read_text())

    def by_hand(domains, k=5, drop=()):
        counts = data.item_counts(domains)
        order = [i for i in np.argsort(-counts[1:], kind="stable") + 1 if counts[i] > 0 and vocab[i - 1] not in drop]
        return [vocab[i - 1] for i in order[:k]], [float(counts[i]) for i in order[:k]]

    cold = rec.recommendation([], region, k=5)
    assert (cold["source"], cold["known_events"], cold["skipped"]) == ("popularity", 0, [])
    assert (cold["items"], cold["scores"]) == by_hand([region])
    base_cold = rec.recommendation([], None, k=5)
    assert base_cold["source"] == "popularity"
    assert base_cold["items"] == by_hand(list(json.loads((tiny_base / "config.json").read_text())["pretrain_domains"]))[0]
    with pytest.raises(InputError, match="unknown item id 'new-sku'"):
        rec.recommend(["new-sku", "50"], region)
    only_new = rec.recommendation(["new-sku"], region, k=5, unknown="skip")
    assert (only_new["source"], only_new["skipped"], only_new["items"]) == ("popularity", ["new-sku"], cold["items"])
    one = rec.recommendation(["new-sku", "50"], region, k=5, unknown="skip")
    assert (one["source"], one["known_events"], one["skipped"]) == ("model", 1, ["new-sku"])
    assert "50" not in one["items"] and one["items"] == [i for i, _ in rec.recommend(["50"], region, k=5)]
    top = cold["items"][0]
    below = rec.recommendation([top], region, k=5, min_known=2)
    assert below["source"] == "popularity" and top not in below["items"]
    assert (below["items"], below["scores"]) == by_hand([region], drop={top})
    with pytest.raises(InputError, match="unknown region"):
        rec.recommendation([], "atlantis")
    # the same from the command line
    cli = run_cli("recommend", "--bundle", bundle, "--domain", region, "--history", "new-sku", "50", "--unknown", "skip",
                  "--k", "5")
    assert json.loads(cli.stdout) == one
    assert json.loads(run_cli("recommend", "--bundle", bundle, "--domain", region, "--k", "5").stdout) == cold
    bad = run_cli("recommend", "--bundle", bundle, "--domain", region, "--history", "new-sku", check=False)
    assert bad.returncode == 2 and "new-sku" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("recommend", "--bundle", bundle / "adapters", check=False)
    assert bad.returncode == 2 and "not a model folder" in bad.stderr


def test_new_target_items_get_trainable_rows(synth_data, tmp_path):
    base = tmp_path / "base"
    run_cli("pretrain", "--preset", "tiny", "--data", synth_data, "--out", base, "--domains", "d0,d1",
            "--set", "train.max_steps=5", "--set", "train.tensorboard=false")
    out = tmp_path / "lora"
    run_cli("finetune", "--base", base, "--data", synth_data, "--domain", "d2", "--method", "lora", "--out", out, *QUICK)
    m = json.loads((out / "metrics.json").read_text())
    assert m["new_items"] > 0
    tensors = load_file(out / "adapter_model.safetensors")
    delta = [t for k, t in tensors.items() if "trainable_tokens_delta" in k]
    assert delta and delta[0].shape[0] == m["new_items"]
    original = load_file(base / "model.safetensors")["item_embeddings.weight"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    rows = cfg["trainable_token_indices"]["item_embeddings"]
    assert not torch.allclose(delta[0], original[rows])  # the new items' rows were trained


@pytest.mark.slow
def test_lora_under_zero3_saves_the_trained_adapter(tiny_base, ml100k, tmp_path):
    """PITFALLS #1/#2: under ZeRO-3 an un-gathered save writes empty tensors; lora_B must move.
    Launched with `--use_deepspeed --zero_stage 3`, so zero3_init is on (accelerate's default) and
    the target has new items: PEFT's trainable-token rows cannot be built on partitioned weights
    without CUDA, so the base is loaded whole and partitioned by DeepSpeed (said in the log)."""
    import subprocess
    import sys
    from pathlib import Path
    from conftest import REPO
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--use_deepspeed",
           "--zero_stage", "3", "-m", "crossrec_dist", "finetune", "--base", str(tiny_base), "--data", str(ml100k),
           "--domain", TARGET_REGIONS[1], "--method", "lora", "--out", str(tmp_path), *QUICK,
           "--set", "valid_targets=1"]      # validated as the final record is: one target per user
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=child_env({"DS_ACCELERATOR": "cpu"}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["new_items"] > 0 and "the base is loaded whole" in proc.stdout
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["zero_stage"] == 3 and m["world_size"] == 2
    # metrics.json's valid figures come from the saved adapter, reloaded in one process
    assert m["valid"]["ndcg@10"] == pytest.approx(m["in_training_valid"]["ndcg@10"], abs=1e-4)


def test_finetuning_never_ends_below_its_starting_point_on_valid(tiny_base, ml100k, tmp_path):
    """validate_at_start (the fine-tuning default): the initial weights are a candidate for 'best'."""
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[1], "--method", "full",
            "--out", tmp_path, "--set", "train.max_steps=4", "--set", "train.eval_every=2", "--set", "train.lr=0.05",
            "--set", "train.tensorboard=false")
    m = json.loads((tmp_path / "metrics.json").read_text())
    start = [h for h in m["history"] if h.get("step") == 0 and "valid_ndcg@10" in h]
    assert start, "no validation of the initial weights"
    assert m["in_training_valid"]["ndcg@10"] >= start[0]["valid_ndcg@10"]


def test_lora_on_a_shifted_target_selects_a_trained_step_and_beats_zero_shot(tmp_path):
    """A synthetic target whose behaviour differs from the sources' (shift 0.9): LoRA must learn
    something — its selected checkpoint is not the starting one, and on the same test users it beats
    zero-shot by a paired bootstrap interval that excludes 0."""
    import json

    from crossrec_dist.evaluation.bootstrap import aligned, paired_difference
    run_cli("data", "synth", "--out", tmp_path / "raw", "--users", "600", "--items", "300", "--domains", "3",
            "--mean-length", "25", "--shift", "0.9", "--private-items", "0.05", "--seed", "2")
    run_cli("prepare", "--input", tmp_path / "raw" / "interactions.parquet", "--format", "parquet",
            "--domain-col", "domain", "--out", tmp_path / "data")
    quiet = ["--set", "train.tensorboard=false", "--set", "train.log_every=1000"]
    run_cli("pretrain", "--preset", "tiny", "--data", tmp_path / "data", "--out", tmp_path / "base",
            "--domains", "d0,d1", "--set", "train.epochs=6", *quiet)
    records = {}
    for method, extra in (("none", []), ("lora", ["--set", "train.max_steps=60", "--set", "train.eval_every=15",
                                                   "--set", "train.patience=0"])):
        run_cli("finetune", "--base", tmp_path / "base", "--data", tmp_path / "data", "--domain", "d2",
                "--method", method, "--out", tmp_path / method, *quiet, *extra)
        records[method] = json.loads((tmp_path / method / "metrics.json").read_text())
    lora = records["lora"]
    assert lora["train"]["best_step"] > 0, lora["history"]
    _, ndcg = aligned(records)
    diff = paired_difference(ndcg["lora"], ndcg["none"])
    assert diff.excludes_zero and diff.mean > 0, (diff, lora["test"], records["none"]["test"])


def test_target_catalogue_never_ranks_a_user_lower(tiny_base, ml100k, tmp_path):
    """``catalogue: target`` ranks only the items of the target's log: the same model's rank for each
    test user can only improve (fewer competitors, the target always among them), and the record
    says which catalogue was ranked."""
    ranks = {}
    for kind in ("all", "target"):
        out = tmp_path / kind
        run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method",
                "none", "--out", out, "--set", f"catalogue={kind}")
        m = json.loads((out / "metrics.json").read_text())
        ranks[kind] = m["test_ranks"]
        assert m["catalogue"]["kind"] == kind
    cfg = json.loads((tiny_base / "config.json").read_text())
    assert json.loads((tmp_path / "target" / "metrics.json").read_text())["catalogue"]["items"] < cfg["num_items"]
    assert ranks["all"]["seq_index"] == ranks["target"]["seq_index"]
    pairs = list(zip(ranks["all"]["rank"], ranks["target"]["rank"]))
    assert all(t <= a for a, t in pairs) and any(t < a for a, t in pairs)


def test_top_items_get_whole_trainable_rows_counted_on_the_training_users(lora_run, tiny_base, ml100k, tmp_path):
    """``train_top_items=K``: the target's K most frequent training items get whole trainable rows
    (PEFT trainable tokens) next to the new items; the parameter count grows by exactly their rows,
    and with ``train_fraction`` the items are counted on the sampled users only."""
    import numpy as np

    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.stages.configs import FinetuneConfig
    from crossrec_dist.stages.finetune import sample_users, trainable_rows
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method", "lora",
            "--out", tmp_path, "--set", "train_top_items=20", *QUICK)
    m = json.loads((tmp_path / "metrics.json").read_text())
    plain = json.loads((lora_run / "metrics.json").read_text())
    h = json.loads((tiny_base / "config.json").read_text())["hidden_size"]
    assert m["new_items"] == plain["new_items"] and m["trainable_rows"] >= 20
    assert m["params"]["trainable"] - plain["params"]["trainable"] == (m["trainable_rows"] - m["new_items"]) * h

    data = PreparedData(ml100k)
    cfg = FinetuneConfig(method="lora", train_top_items=5, train_new_items=False)
    top = trainable_rows(cfg, data, TARGET_REGIONS[0], [])
    counts = data.item_counts([TARGET_REGIONS[0]])
    assert len(top) == 5 and min(counts[top]) >= np.sort(counts)[-5]
    users = sample_users(data, TARGET_REGIONS[0], 0.1, seed=0)
    few = trainable_rows(cfg, data, TARGET_REGIONS[0], [], users)
    seq, pos = data.row_positions()
    seen = set(data.items[np.isin(seq, users) & (pos < data.train_end[seq])].tolist())
    assert len(few) == 5 and set(few) <= seen
    assert trainable_rows(FinetuneConfig(method="full", train_top_items=5), data, TARGET_REGIONS[0], [1]) == []


def test_early_stopping_waits_for_min_steps(tiny_base, ml100k, tmp_path):
    """Patience counts validations; ``train.min_steps`` keeps early stopping off until that many updates
    (on a few dozen users an epoch is 3 updates, and 5 validations without a gain would end a run that
    has barely moved). A learning rate too small to change validation makes every validation a miss."""
    steps = {}
    for min_steps in (0, 12):
        out = tmp_path / str(min_steps)
        run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method",
                "full", "--out", out, "--set", "train.lr=1e-12", "--set", "train.patience=1", "--set",
                "train.eval_every=1", "--set", "train.max_steps=30", "--set", f"train.min_steps={min_steps}",
                "--set", "train.tensorboard=false")
        m = json.loads((out / "metrics.json").read_text())
        steps[min_steps] = m["train"]["steps"]
        assert m["train"]["stopped"] == "early_stop" and m["train"]["best_step"] == 0
    assert steps == {0: 1, 12: 12}


def _per_user(record, split="test"):
    from crossrec_dist.evaluation.bootstrap import per_user_ndcg
    ranks = record["test_ranks"] if split == "test" else record
    return dict(zip(*per_user_ndcg(ranks["seq_index"], ranks["rank"])))


def test_every_run_records_its_paired_difference_to_zero_shot_and_popularity(lora_run, tiny_base, ml100k, tmp_path):
    """metrics.json's ``vs`` block, checked by hand: the mean over users of (this run's NDCG@10 - the
    reference's), on the test users, where the references are ``--method none`` (the base as it is)
    and ``crossrec evaluate --model popularity`` on the region; an untrained method is compared with
    the other reference, and the log names each comparison."""
    region = TARGET_REGIONS[0]
    proc = run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", region, "--method", "none",
                   "--out", tmp_path / "none")
    run_cli("evaluate", "--model", "popularity", "--data", ml100k, "--domain", region, "--out", tmp_path / "pop")
    lora, none, pop = (json.loads((d / "metrics.json").read_text()) for d in (lora_run, tmp_path / "none", tmp_path / "pop"))
    mine = _per_user(lora)
    for name, ref in (("zero-shot", none), ("popularity", pop)):
        theirs = _per_user(ref)
        assert sorted(theirs) == sorted(mine)
        by_hand = sum(mine[u] - theirs[u] for u in mine) / len(mine)
        got = lora["vs"][name]["test"]
        assert got["diff"] == pytest.approx(by_hand, abs=1e-6) and got["users"] == len(mine)
        assert got["low"] <= got["diff"] <= got["high"]
        assert got["verdict"] in ("better", "worse", "no significant difference")
        assert lora["vs"][name]["valid"]["users"] > 0
    assert set(none["vs"]) == {"popularity"}
    assert none["vs"]["popularity"]["test"]["diff"] == pytest.approx(
        none["test"]["ndcg@10"] - pop["test"]["ndcg@10"], abs=1e-6)
    assert "vs the region's popularity list: test NDCG@10" in proc.stdout


def test_every_run_breaks_test_users_down_by_history_length_and_new_items(lora_run, ml100k, tiny_base):
    """metrics.json ``cohorts``: the buckets of known events before the test item partition the test
    users, each with its mean NDCG@10 (checked by hand) inside its interval; ``new_items`` counts the
    test users whose test item no source region's training part holds."""
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.evaluation.bootstrap import ndcg_at
    m = json.loads((lora_run / "metrics.json").read_text())
    data = PreparedData(ml100k)
    c, ranks = m["cohorts"], m["test_ranks"]
    assert sum(c[k]["users"] for k in ("history<=5", "history6-20", "history>20")) == len(ranks["rank"])
    known = data.valid_end[ranks["seq_index"]]
    long = [r for r, n in zip(ranks["rank"], known) if n > 20]
    assert c["history>20"]["users"] == len(long) and c["history>20"]["ndcg@10"] == pytest.approx(ndcg_at(long).mean(), abs=1e-6)
    assert c["history>20"]["low"] <= c["history>20"]["ndcg@10"] <= c["history>20"]["high"]
    base = json.loads((tiny_base / "config.json").read_text())["pretrain_domains"]
    seen = data.item_counts(base) > 0
    targets = data.items[data.offsets[ranks["seq_index"]] + known]
    assert c["new_items"]["users"] == int((~seen[targets]).sum())


def test_defaults_keep_the_base_on_a_small_region_where_adaptation_does_not_pay(tiny_base, ml100k, tmp_path):
    """Region 0 (96 users) from the tiny base with crossrec finetune's defaults: LoRA's validation mean
    rises (step 21: +0.0035 over the base) but never by a paired 95% interval above 0, so the base is
    kept; the exported adapter then ranks every test user exactly as the base does, and the log says so."""
    region = TARGET_REGIONS[0]
    proc = run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", region, "--method", "lora",
                   "--out", tmp_path / "lora", "--set", "train.tensorboard=false")
    run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", region, "--method", "none",
            "--out", tmp_path / "none")
    lora, none = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("lora", "none"))
    sel = lora["selection"]
    assert sel["must_beat_base"] and sel["kept"] == "base" and lora["train"]["best_step"] == 0, sel
    assert sel["best_seen"]["step"] > 0 and sel["best_seen"]["vs_base"]["low"] <= 0
    assert any("not_kept" in h for h in lora["history"])       # it was judged, not merely never better
    assert lora["test_ranks"] == none["test_ranks"]
    assert lora["vs"]["zero-shot"]["test"]["diff"] == 0.0
    assert "did not beat the base on validation" in proc.stdout and "kept step 0" in proc.stdout


def test_source_replay_mixes_a_seeded_sample_of_the_sources_into_training(tiny_base, ml100k, tmp_path):
    """``source_replay: R``: R source sequences (the base's pretraining regions) per target training
    sequence join the target's windows, the same sample at one seed; a dataset without the sources is
    refused naming the field."""
    from crossrec_dist.data.prepared import PreparedData
    region = TARGET_REGIONS[0]
    args = ["finetune", "--base", tiny_base, "--data", ml100k, "--domain", region, "--method", "lora", *QUICK]
    plain = run_cli(*args, "--out", tmp_path / "plain")
    mixed = run_cli(*args, "--out", tmp_path / "mixed", "--set", "source_replay=0.5")
    m = json.loads((tmp_path / "mixed" / "metrics.json").read_text())
    data = PreparedData(ml100k)
    target = len(data.train_sequences([region], holdout=m["config"]["valid_targets"] - 1)[0])
    assert m["source_replay"] == {"ratio": 0.5, "sequences": round(0.5 * target)}
    per_epoch = [int(p.stdout.split("micro-batches/epoch/rank=")[1].split()[0]) for p in (plain, mixed)]
    assert per_epoch[1] > per_epoch[0]
    bad = run_cli(*args, "--out", tmp_path / "bad", "--set", "source_replay=-1", check=False)
    assert bad.returncode == 2 and "source_replay" in bad.stderr


def test_offsets_retrains_the_per_item_offsets_and_nothing_else(shifted, tiny_base, ml100k, tmp_path):
    """``offsets``: a learned popularity prior. Only item_bias changes (N + 1 trainable numbers); a base
    without offsets is refused naming the method, before any training."""
    from crossrec_dist.models.model import CrossRecModel
    data_dir, base = shifted
    run_cli("finetune", "--base", base, "--data", data_dir, "--domain", "d2", "--method", "offsets",
            "--out", tmp_path / "offsets", *QUICK)
    m = json.loads((tmp_path / "offsets" / "metrics.json").read_text())
    cfg = json.loads((base / "config.json").read_text())
    assert m["params"]["trainable"] == cfg["num_items"] + 1
    before = CrossRecModel.from_pretrained(base).state_dict()
    after = CrossRecModel.from_pretrained(tmp_path / "offsets").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"item_bias.weight"}
    bad = run_cli("finetune", "--base", tiny_base, "--data", ml100k, "--domain", TARGET_REGIONS[0], "--method",
                  "offsets", "--out", tmp_path / "bad", *QUICK, check=False)
    assert bad.returncode == 2 and "item_bias" in bad.stderr and "--method" in bad.stderr and "Traceback" not in bad.stderr


def _probe_accuracy(a: torch.Tensor, b: torch.Tensor, folds: int = 5) -> float:
    """Held-out accuracy of a linear classifier (L2-regularised logistic regression, 5-fold) telling the
    rows of ``a`` from those of ``b``: how separable the two domains' representations are."""
    x, y = torch.cat([a, b]), torch.cat([torch.zeros(len(a)), torch.ones(len(b))])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    correct = 0
    for f in range(folds):
        test = order[f::folds]
        train = order[torch.isin(order, test, invert=True)]
        w, b0 = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
        opt = torch.optim.LBFGS([w, b0], max_iter=200)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x[train] @ w + b0, y[train]) + 1e-2 * w.pow(2).sum()
            loss.backward()
            return loss
        opt.step(closure)
        correct += int(((x[test] @ w + b0 > 0).float() == y[test]).sum())
    return correct / len(x)


def test_alignment_moves_the_statistic_it_claims_to(shifted, tmp_path):
    """On a shifted synthetic target (its own Markov chain, private items), ``align`` with source replay,
    after the same 40 updates, measured on the saved adapters' representations of source and target
    sequences (not assumed from the loss): ``coral`` cuts the covariance distance it minimises by 10x,
    ``mmd`` cuts the MMD, and ``adversarial`` (a discriminator through gradient reversal) makes the two
    domains harder to tell apart for a linear probe it never saw, and cuts the MMD too. A whole-model
    method saves no discriminator weight."""
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.export.loading import load_model
    from crossrec_dist.models.model import CrossRecModel
    from crossrec_dist.stages.alignment import coral, last_hidden, mmd
    data_dir, base = shifted
    common = ["finetune", "--base", base, "--data", data_dir, "--domain", "d2", "--method", "lora",
              "--set", "source_replay=1.0", "--set", "train.max_steps=40", "--set", "train.eval_every=40",
              "--set", "train.validate_at_start=false", "--set", "must_beat_base=false", "--set", "train.lr=0.01",
              "--set", "train.tensorboard=false"]
    kinds = (("none", 1), ("coral", 1000), ("mmd", 10), ("adversarial", 0.1))
    for kind, weight in kinds:
        run_cli(*common, "--set", f"align={kind}", "--set", f"align_weight={weight}", "--out", tmp_path / kind)
    data = PreparedData(data_dir)

    def reps(model, domains):
        seq, end = data.train_sequences(domains)
        x = torch.from_numpy(data.left_padded(seq, end, 50))
        with torch.no_grad():
            return last_hidden(model(input_ids=x, domain_ids=torch.zeros(len(x), dtype=torch.long)).hidden_states)

    stats = {}
    for kind, _ in kinds:
        model = load_model(base, tmp_path / kind)
        s, t = reps(model, ["d0", "d1"]), reps(model, ["d2"])
        stats[kind] = {"coral": float(coral(s, t)), "mmd": float(mmd(s, t)), "probe": _probe_accuracy(s, t)}
    assert stats["none"]["probe"] > 0.7, stats          # the shift is there to be removed
    assert stats["coral"]["coral"] < stats["none"]["coral"] / 10, stats
    assert stats["mmd"]["mmd"] < stats["none"]["mmd"], stats
    assert stats["adversarial"]["probe"] < stats["none"]["probe"] - 0.03, stats
    assert stats["adversarial"]["mmd"] < stats["none"]["mmd"], stats
    m = json.loads((tmp_path / "adversarial" / "metrics.json").read_text())
    assert m["align"] == {"kind": "adversarial", "weight": 0.1}
    assert not any("discriminator" in k for k in load_file(tmp_path / "adversarial" / "adapter_model.safetensors"))
    # a whole-model method: the discriminator trains beside it and is not in what from_pretrained loads
    run_cli(*common[:8], "full", *QUICK, "--set", "source_replay=1.0", "--set", "align=adversarial",
            "--out", tmp_path / "full")
    assert not any("discriminator" in k for k in load_file(tmp_path / "full" / "model.safetensors"))
    CrossRecModel.from_pretrained(tmp_path / "full")
    bad = run_cli(*common[:8], "lora", "--set", "align=coral", "--out", tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "source_replay" in bad.stderr
    bad = run_cli(*common, "--set", "align=dann", "--out", tmp_path / "bad2", check=False)
    assert bad.returncode == 2 and "adversarial" in bad.stderr
