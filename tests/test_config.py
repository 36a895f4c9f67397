"""Config loading: defaults <- YAML <- --set, with nested sections keeping their parent's defaults."""
from dataclasses import dataclass, field

import pytest

from crossrec_dist.config import load_config
from crossrec_dist.errors import InputError
from crossrec_dist.stages.finetune import FinetuneConfig


@dataclass
class Inner:
    a: int = 1
    b: bool = False


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(a=7, b=True))
    name: str = "x"


def test_override_of_one_nested_key_keeps_the_parents_other_defaults(tmp_path):
    cfg = load_config(Outer, overrides=["inner.a=3"])
    assert cfg.inner == Inner(a=3, b=True)
    ft = load_config(FinetuneConfig, overrides=["train.max_steps=4"])
    assert ft.train.max_steps == 4 and ft.train.validate_at_start and ft.train.patience == 5
    y = tmp_path / "c.yaml"
    y.write_text("inner:\n  b: false\nname: y\n")
    cfg = load_config(Outer, y, overrides=["inner.a=5"])
    assert cfg.inner == Inner(a=5, b=False) and cfg.name == "y"


def test_unknown_and_mistyped_keys_name_the_key(tmp_path):
    with pytest.raises(InputError, match="inner.c"):
        load_config(Outer, overrides=["inner.c=1"])
    with pytest.raises(InputError, match="inner.a"):
        load_config(Outer, overrides=["inner.a=1.5"])


def test_optional_fields_are_coerced_and_checked():
    from crossrec_dist.engine.config import TrainConfig
    assert load_config(TrainConfig, overrides=["lr=1e-3"]).lr == 1e-3      # YAML reads 1e-3 as a string
    assert load_config(TrainConfig, overrides=["lr=null"]).lr is None
    with pytest.raises(InputError, match="lr"):
        load_config(TrainConfig, overrides=["lr=fast"])


def test_no_and_off_are_strings_for_string_fields_and_booleans_for_bool_fields(tmp_path):
    # PyYAML reads YAML 1.1, where `no` is False: `mixed_precision: no`, a documented value, was refused
    # ("unknown mixed_precision 'False'") from --set and from a YAML file alike.
    from crossrec_dist.stages.train_config import RecommenderTrainConfig, validate_recommender_train_config
    cfg = load_config(RecommenderTrainConfig, overrides=["mixed_precision=no"])
    assert cfg.mixed_precision == "no"
    validate_recommender_train_config(cfg)
    y = tmp_path / "t.yaml"
    y.write_text("mixed_precision: no\ntensorboard: off\ntrack_test: yes\n")
    cfg = load_config(RecommenderTrainConfig, y)
    assert (cfg.mixed_precision, cfg.tensorboard, cfg.track_test) == ("no", False, True)
    assert load_config(Outer, overrides=["name=off", "inner.b=on"]) == Outer(inner=Inner(a=7, b=True), name="off")
    assert load_config(Outer, overrides=["inner.b=false"]).inner.b is False
