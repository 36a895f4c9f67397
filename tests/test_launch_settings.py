"""How the run's DeepSpeed config, accumulation, clipping and precision come out of every launch form.

``accelerate launch`` hands its settings to the script as ``ACCELERATE_*`` variables; these tests set
exactly what accelerate 1.x sets for each form (see accelerate/utils/launch.py) and check what
``engine.deepspeed_config.resolve`` makes of them. The real 2-process launches are in test_launch.py.
"""
import json

import pytest

from crossrec_dist.engine.config import TrainConfig
from crossrec_dist.engine.deepspeed_config import resolve
from crossrec_dist.errors import InputError

# `accelerate launch --config_file cfg.yaml` with a `deepspeed_config:` block written by `accelerate config`
ACCELERATE_CONFIG_BLOCK = {
    "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1", "ACCELERATE_GRADIENT_CLIPPING": "1.0",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true", "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
    "ACCELERATE_MIXED_PRECISION": "no",
    "ACCELERATE_CONFIG_DS_FIELDS": "gradient_accumulation_steps,gradient_clipping,offload_optimizer_device,"
                                   "offload_param_device,zero3_init_flag,zero3_save_16bit_model,zero_stage",
}
# `accelerate launch --use_deepspeed --zero_stage 2` (no config file): only what the flags name
FLAGS_ZERO2 = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
               "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_CONFIG_DS_FIELDS": ""}


@pytest.fixture
def launcher(monkeypatch):
    """Set a launcher's environment (and clear any other ACCELERATE_* left by the caller)."""
    import os
    for key in list(os.environ):
        if key.startswith("ACCELERATE_"):
            monkeypatch.delenv(key)

    def set_env(env):
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    return set_env


def _resolve(**train):
    return resolve(TrainConfig(**{"micro_batch_size": 16, **train}), world=2, hidden_size=32)


def test_accelerate_config_block_without_a_json_gives_a_complete_config(launcher):
    launcher(ACCELERATE_CONFIG_BLOCK)
    s = _resolve(grad_accum=4)
    ds = s.ds_config
    assert s.zero_stage == 3 and s.zero3_init and s.grad_accum == 4 and s.max_grad_norm == 1.0
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_batch_size"] == 16 * 4 * 2          # the real world (2), not accelerate's view
    assert "auto" not in json.dumps(ds) and ds["bf16"]["enabled"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == 32 * 32


def test_flags_form_with_offload(launcher):
    launcher({**FLAGS_ZERO2, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"})
    s = _resolve()
    assert s.zero_stage == 2 and not s.zero3_init
    assert s.ds_config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "auto" not in json.dumps(s.ds_config)


def test_the_launchers_accumulation_and_clipping_win_over_train_defaults(launcher):
    launcher({**FLAGS_ZERO2, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_GRADIENT_CLIPPING": "0.5"})
    s = _resolve()
    assert (s.grad_accum, s.max_grad_norm) == (4, 0.5)
    assert s.ds_config["train_batch_size"] == 16 * 4 * 2 and s.ds_config["gradient_clipping"] == 0.5


def test_two_different_accumulation_values_stop_the_run_naming_both(launcher):
    launcher({**FLAGS_ZERO2, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"})
    with pytest.raises(InputError) as e:
        _resolve(grad_accum=2)
    assert "train.grad_accum=2" in str(e.value) and "gradient_accumulation_steps" in str(e.value) and "=4" in str(e.value)


def test_zero3_init_follows_the_launcher_unless_train_says_otherwise(launcher):
    launcher({**ACCELERATE_CONFIG_BLOCK, "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"})
    assert not _resolve().zero3_init
    assert _resolve(zero3_init=True).zero3_init


def test_deepspeed_config_file_and_our_own_set(launcher, tmp_path):
    conf = tmp_path / "ds.json"
    conf.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2,
                                "zero_optimization": {"stage": 1}}))
    launcher({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(conf),
              "ACCELERATE_MIXED_PRECISION": "no"})
    s = _resolve()
    assert s.zero_stage == 1 and s.grad_accum == 2 and s.source == str(conf)
    # --set train.deepspeed names a JSON explicitly and wins over the launcher's
    s = _resolve(deepspeed="zero2")
    assert s.zero_stage == 2 and s.source.endswith("zero2.json")


def test_explicit_json_values_that_contradict_train_are_refused(launcher, tmp_path):
    launcher({})
    conf = tmp_path / "ds.json"
    conf.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 2}}))
    with pytest.raises(InputError, match="train_micro_batch_size_per_gpu 8 .* train.micro_batch_size 16"):
        _resolve(deepspeed=str(conf))
    conf.write_text(json.dumps({"train_batch_size": 100, "zero_optimization": {"stage": 2}}))
    with pytest.raises(InputError, match="train_batch_size 100"):
        _resolve(deepspeed=str(conf))


def test_precision_auto_takes_the_launchers_and_a_contradiction_is_an_error(launcher):
    launcher({"ACCELERATE_MIXED_PRECISION": "bf16"})
    assert _resolve().precision == "bf16"
    with pytest.raises(InputError, match="mixed_precision"):
        _resolve(mixed_precision="fp16")


def test_bf16_if_native_follows_the_hardware_and_yields_to_the_launcher(launcher, monkeypatch):
    import torch
    from crossrec_dist.engine import deepspeed_config
    launcher({})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for native, want in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert deepspeed_config.native_bf16() is native
        assert _resolve(mixed_precision="bf16_if_native").precision == want
    assert _resolve(mixed_precision="auto").precision == "no"           # auto stays fp32 on a CPU
    launcher({"ACCELERATE_MIXED_PRECISION": "fp16"})
    assert _resolve(mixed_precision="bf16_if_native").precision == "fp16"


def test_no_deepspeed_anywhere_keeps_train_values(launcher):
    launcher({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"})
    s = _resolve(grad_accum=3, max_grad_norm=0.0)
    assert s.ds_config is None and (s.grad_accum, s.max_grad_norm, s.precision) == (3, 0.0, "no")


@pytest.mark.parametrize("key, value", [("micro_batch_size", 0), ("grad_accum", 0), ("lr", 0.0),
                                        ("mixed_precision", "fp8"), ("max_grad_norm", -1.0)])
def test_bad_train_values_name_the_key(key, value, tmp_path):
    from crossrec_dist.engine.trainer import validate_train_config
    with pytest.raises(InputError, match=f"train.{key}"):
        validate_train_config(TrainConfig(**{key: value}))
