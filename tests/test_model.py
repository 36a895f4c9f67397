"""The model on its own: sizes, save/load, losses."""
import torch

from crossrec_dist.models.config import CrossRecConfig
from crossrec_dist.models.losses import full_softmax, sampled_softmax
from crossrec_dist.models.model import CrossRecModel
from crossrec_dist.models.presets import preset_config
from crossrec_dist.models.sizing import count_parameters


def test_1b_preset_counts_at_least_a_billion_without_memory():
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n = count_parameters(preset_config("1b"))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert n >= 1_000_000_000
    assert grown_mb < 500  # 1B fp32 parameters would be 4 GB


def test_tiny_preset_is_under_a_million_on_movielens():
    assert count_parameters(preset_config("tiny", num_items=1682)) < 1_000_000


def test_save_load_roundtrip_and_peft_friendly_names(tmp_path):
    torch.manual_seed(0)
    model = CrossRecModel(CrossRecConfig(num_items=50, hidden_size=16, num_layers=1, num_heads=2)).eval()
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    x = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    again = CrossRecModel.from_pretrained(tmp_path).eval()
    assert torch.equal(model.score(x), again.score(x))


def test_left_padding_does_not_change_scores():
    torch.manual_seed(0)
    model = CrossRecModel(CrossRecConfig(num_items=30, hidden_size=16, num_layers=2, num_heads=2)).eval()
    short = model.score(torch.tensor([[5, 6, 7]]))
    padded = model.score(torch.tensor([[0, 0, 0, 5, 6, 7]]))
    assert torch.allclose(short, padded, atol=1e-5)


def test_last_k_scores_are_the_scores_after_each_of_the_last_k_prefixes():
    """score_last=k: one causal pass gives the scores after each of the last k prefixes of the input,
    the same as k calls with one prefix each (left padding included)."""
    torch.manual_seed(0)
    model = CrossRecModel(CrossRecConfig(num_items=40, hidden_size=16, num_layers=2, num_heads=2, max_len=8,
                                         item_bias=True, num_domains=2, use_domain_embedding=True)).eval()
    with torch.no_grad():
        model.item_bias.weight.normal_()
    rows = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 7, 3, 9, 4]])
    doms = torch.tensor([1, 0])
    got = model(input_ids=rows, domain_ids=doms, return_scores=True, score_last=3)
    assert got.shape == (2, 3, 41)
    for j in range(3):
        cut = rows[:, :rows.shape[1] - (2 - j)]
        prefix = torch.cat([torch.zeros(2, 2 - j, dtype=torch.long), cut], 1)     # same length, left-padded
        assert torch.allclose(got[:, j], model.score(prefix, doms), atol=1e-5), j


def test_chunked_full_softmax_equals_unchunked():
    torch.manual_seed(0)
    h, w = torch.randn(100, 8), torch.randn(21, 8)
    y = torch.randint(1, 21, (100,))
    assert torch.allclose(full_softmax(h, w, y, chunk_tokens=7), full_softmax(h, w, y, chunk_tokens=1000), atol=1e-5)
    ref = torch.nn.functional.cross_entropy(torch.cat([torch.full((100, 1), -1e9), h @ w[1:].t()], 1), y)
    assert torch.allclose(full_softmax(h, w, y), ref, atol=1e-4)


def test_sampled_softmax_approaches_full_softmax_with_many_negatives():
    torch.manual_seed(0)
    h, w = torch.randn(64, 8) * 0.3, torch.randn(501, 8) * 0.3
    y = torch.randint(1, 501, (64,))
    full = full_softmax(h, w, y).item()
    sampled = sampled_softmax(h, w, y, num_negatives=20000).item()
    assert abs(sampled - full) / full < 0.05
    w.requires_grad_(True)
    sampled_softmax(h, w, y, num_negatives=32).backward()
    assert w.grad.abs().sum() > 0


def test_model_options_list_matches_the_config_signature():
    """Configs are checked against MODEL_OPTIONS without importing transformers; it must not drift."""
    import inspect

    from crossrec_dist.models.config import CrossRecConfig
    from crossrec_dist.models.presets import MODEL_OPTIONS
    params = [n for n, p in inspect.signature(CrossRecConfig.__init__).parameters.items()
              if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert sorted(MODEL_OPTIONS) == sorted(params)


def test_lora_on_the_item_table_adapts_both_sides_and_merges_exactly():
    """LoRA on ``item_embeddings``: the low-rank delta reaches the tied output side too (scores), and
    merging it into the table gives the same scores as the adapter."""
    import torch
    from peft import LoraConfig, get_peft_model

    from crossrec_dist.models.config import CrossRecConfig
    from crossrec_dist.models.model import CrossRecModel
    torch.manual_seed(0)
    base = CrossRecModel(CrossRecConfig(num_items=40, hidden_size=16, num_layers=1, num_heads=2, max_len=8)).eval()
    ids = torch.randint(1, 41, (3, 8))
    before = base(ids, return_scores=True).detach()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "item_embeddings"])).eval()
    emb = model.base_model.model.item_embeddings
    with torch.no_grad():
        emb.lora_embedding_A["default"].normal_()          # PEFT starts the table's delta at zero
    delta = emb.get_delta_weight("default")
    inner = model.base_model.model
    assert torch.allclose(inner.item_weight(), emb.get_base_layer().weight + delta)
    adapted = model(input_ids=ids, return_scores=True).detach()
    assert not torch.allclose(adapted, before, atol=1e-4)
    # Only the input side adapted would differ: the output side must use the delta as well.
    merged = model.merge_and_unload().eval()
    assert torch.allclose(merged(ids, return_scores=True), adapted, atol=1e-5)


def test_item_bias_starts_at_zero_enters_scores_and_losses_and_travels_in_a_plain_peft_adapter(tmp_path):
    """``item_bias``: one learned offset per item, zero at start (a base built with it scores like one
    without), added to scores and to both losses; an adapter retrains it through PEFT's
    ``modules_to_save``, plain ``PeftModel.from_pretrained`` reproduces the adapted scores, merging keeps
    them, and the base on disk is untouched."""
    from peft import LoraConfig, PeftModel, get_peft_model
    torch.manual_seed(0)
    kw = dict(num_items=40, hidden_size=16, num_layers=1, num_heads=2, max_len=8)
    plain = CrossRecModel(CrossRecConfig(**kw)).eval()
    torch.manual_seed(0)
    biased = CrossRecModel(CrossRecConfig(**kw, item_bias=True)).eval()
    ids = torch.randint(1, 41, (3, 8))
    assert biased.item_bias.weight.abs().sum() == 0
    assert torch.allclose(plain(ids, return_scores=True), biased(ids, return_scores=True))
    with torch.no_grad():
        biased.item_bias.weight[5] = 3.0
    h = biased(ids).hidden_states[:, -1]
    scores = biased(ids, return_scores=True)
    assert torch.allclose(scores, h @ biased.item_weight().t() + biased.item_bias.weight)
    y = torch.tensor([5, 6, 7])
    by_hand = torch.nn.functional.cross_entropy(
        torch.cat([torch.full((3, 1), -float("inf")), scores[:, 1:]], 1), y)
    assert torch.isclose(full_softmax(h, biased.item_weight(), y, bias=biased.item_bias.weight), by_hand)
    with torch.no_grad():
        biased.item_bias.weight.zero_()
    biased.save_pretrained(tmp_path / "base")

    base = CrossRecModel.from_pretrained(tmp_path / "base")
    assert base.config.item_bias and base.item_bias is not None
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["item_bias"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("item_bias" in n for n in trainable)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    adapted = model(input_ids=ids, return_scores=True).detach()
    model.save_pretrained(tmp_path / "adapter")
    fresh = CrossRecModel.from_pretrained(tmp_path / "base")
    assert fresh.item_bias.weight.abs().sum() == 0                       # the base never changed
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert torch.allclose(loaded(input_ids=ids, return_scores=True), adapted, atol=1e-5)
    merged = loaded.merge_and_unload().eval()
    assert merged.item_bias.weight.abs().sum() > 0
    assert torch.allclose(merged(ids, return_scores=True), adapted, atol=1e-5)
