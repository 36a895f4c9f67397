"""The method registry: every method is a component found in crossrec_dist/methods/, documented, and
refusing what it cannot do from one place; a new method is one file (the documented example, built and
applied in-process)."""
import re
import sys
import textwrap

import pytest

from conftest import REPO
from crossrec_dist.config import load_config
from crossrec_dist.errors import InputError
from crossrec_dist.methods import ROLES, all_methods, discover, get_method, method_names, with_role
from crossrec_dist.stages.configs import FinetuneConfig, check_finetune_config, finetune_config_class

DOC = REPO / "docs" / "methods.md"


def _doc_table() -> dict[str, list[str]]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([a-z0-9_]+)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_every_method_is_documented_as_it_declares_itself():
    rows = _doc_table()
    assert sorted(rows) == method_names()
    for cls in all_methods():
        output, trains, seeded, role, lr, refuses = rows[cls.name][:6]
        assert output == cls.output and (trains == "yes") == cls.trains and (seeded == "yes") == cls.seeded
        assert role == (cls.role or "")
        assert (lr == "") == (not cls.trains) and (not cls.trains or float(lr) == cls.default_lr), cls.name
        assert ("ZeRO-3" in refuses) == bool(cls.refuses_zero3) and ("fp16" in refuses) == bool(cls.refuses_fp16)


def test_each_report_role_is_played_by_exactly_one_method():
    assert {role: len(with_role(role)) for role in ROLES} == {role: 1 for role in ROLES}


def test_refusals_come_from_the_method_and_name_the_field():
    with pytest.raises(InputError) as e:
        get_method("adalora").refuse(precision="fp16")
    assert e.value.field == "train.mixed_precision" and "bf16 or fp32" in e.value.message
    for name in ("adalora", "l2sp"):
        with pytest.raises(InputError) as e:
            get_method(name).refuse(zero_stage=3)
        assert e.value.field == "train.deepspeed"
    for cls in all_methods():
        cls.refuse(precision="bf16", zero_stage=2)          # nothing refuses these
    get_method("lora").refuse(precision="fp16", zero_stage=3)


def test_unknown_method_names_the_choices():
    with pytest.raises(InputError) as e:
        get_method("lorax")
    assert e.value.field == "--method" and all(n in e.value.message for n in method_names())


def test_each_method_owns_its_config_section_and_its_checks():
    cfg = load_config(FinetuneConfig, None, ["l2sp.weight=0.5", "lora.r=4", "adalora.table_r=2"])
    assert (cfg.l2sp.weight, cfg.lora.r, cfg.adalora.table_r) == (0.5, 4, 2)
    for override, field in (("l2sp.weight=-1", "l2sp.weight"), ("lora.r=0", "lora.r"),
                            ("adalora.delta_t=0", "adalora.delta_t")):
        with pytest.raises(InputError) as e:
            check_finetune_config(load_config(FinetuneConfig, None, [override]))
        assert e.value.field == field
    # a rule that holds only when that method runs
    table = load_config(FinetuneConfig, None, ["lora.target_modules=[q_proj,item_embeddings]"])
    check_finetune_config(table)
    table.method = "adalora"
    with pytest.raises(InputError, match="AdaLoRA adapts linear layers only"):
        check_finetune_config(table)


def _doc_example() -> str:
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


def test_the_documented_new_method_is_one_file(tmp_path, monkeypatch):
    """The example in docs/methods.md, saved as one file of a methods folder, is found, gets its own
    config section, and adapts a real model as it says."""
    import torch

    from crossrec_dist.models.config import CrossRecConfig
    from crossrec_dist.models.model import CrossRecModel
    pkg = tmp_path / "more_methods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "norms.py").write_text(_doc_example().replace("from .base import", "from crossrec_dist.methods.base import"))
    monkeypatch.syspath_prepend(str(tmp_path))
    found = discover([str(pkg)], "more_methods")
    assert list(found) == ["norms"]
    cls = found["norms"]
    config_class = finetune_config_class([*all_methods(), cls])
    cfg = load_config(config_class, None, ["method=norms", "norms.item_bias=false"])
    assert cfg.norms.item_bias is False
    torch.manual_seed(0)
    model = CrossRecModel(CrossRecConfig(num_items=20, hidden_size=16, num_layers=1, num_heads=2, max_len=8,
                                         item_bias=True))
    adapted = cls(cfg).adapt(None, model, None)
    trained = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trained == ["backbone.layers.0.input_layernorm.weight", "backbone.layers.0.post_attention_layernorm.weight",
                       "backbone.norm.weight"]
    sys.modules.pop("more_methods.norms", None)
    sys.modules.pop("more_methods", None)


def test_a_methods_folder_with_two_classes_in_one_file_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "bad_methods"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "two.py").write_text(textwrap.dedent("""
        from crossrec_dist.methods.base import Method
        class A(Method):
            name = "a"
        class B(Method):
            name = "b"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="exactly one Method"):
        discover([str(pkg)], "bad_methods")
