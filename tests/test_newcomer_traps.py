"""Traps a newcomer walked into, each once a traceback, a silent 0.0 or a silent pickle load: now an
exit 2 whose message names the file / field and says what to do.

Every test runs the real CLI entry point in this process on tiny data (an untrained 1-layer model,
adapters made with peft directly), so the file stays a few seconds of CPU beyond its imports.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import zipfile
from pathlib import Path

import pytest

from crossrec_dist.cli import main

pytestmark = pytest.mark.usefixtures("own_environment")   # conftest: restores os.environ

PICKLE = "crossrec loads only safetensors: re-save with save_pretrained(..., safe_serialization=True)"


def _refused(argv, capsys) -> str:
    """Run the CLI; it must exit 2 without a traceback. Returns stderr."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err
    return err


# --- fixtures: a 2-domain set whose domain 'few' has no user with 3 events, a model, adapters -------
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("traps_data")
    many = "".join(f"u{u},i{(u * 5 + k) % 30},{1000 + k},many\n" for u in range(30) for k in range(8))
    few = "".join(f"v{u},i{(u + k) % 30},{2000 + k},few\n" for u in range(6) for k in range(2))   # 2 events each
    (root / "in.csv").write_text("user_id,item_id,timestamp,region\n" + many + few)
    assert main(["prepare", "--format", "csv", "--input", str(root / "in.csv"), "--out", str(root / "data"),
                 "--domain-col", "region"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def model(data, tmp_path_factory):
    """A tiny untrained model with the dataset's vocabulary: enough for loading and exporting."""
    from conftest import untrained_model
    return untrained_model(data, tmp_path_factory.mktemp("traps_model"), ["many"])


def _adapter(model: Path, path: Path, *, safe: bool) -> Path:
    """A LoRA adapter of ``model`` with crossrec's fingerprint, saved as safetensors or as a pickle."""
    from peft import LoraConfig, get_peft_model

    from crossrec_dist.export.fingerprint import FILE, base_fingerprint
    from crossrec_dist.models.loading import load_base_model
    peft_model = get_peft_model(load_base_model(model), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(path, safe_serialization=safe)
    (path / FILE).write_text(json.dumps({"base_fingerprint": base_fingerprint(model)}))
    return path


@pytest.fixture(scope="module")
def pickled_adapters(model, tmp_path_factory):
    """An adapters root as finetune --domains writes it (manifest.json + one folder per region), its
    one region's adapter saved as adapter_model.bin (peft's pickle) instead of safetensors."""
    root = tmp_path_factory.mktemp("traps_adapters")
    _adapter(model, root / "many", safe=False)
    assert (root / "many" / "adapter_model.bin").is_file()
    assert not (root / "many" / "adapter_model.safetensors").exists()
    from crossrec_dist.export.fingerprint import base_fingerprint
    (root / "manifest.json").write_text(json.dumps({
        "base": str(model), "base_fingerprint": base_fingerprint(model),
        "domains": {"many": {"path": "many", "method": "lora", "kind": "adapter"}}}))
    return root


# --- 1. evaluate a domain with no test target -------------------------------------------------------
@pytest.mark.parametrize("domain", ["few", "many,few"])
def test_evaluate_refuses_a_domain_with_no_test_target(domain, data, tmp_path, capsys):
    """Was: exit 0 and NDCG 0.0 over 0 users, written to metrics.json as a real result."""
    out = tmp_path / "m.json"
    err = _refused(["evaluate", "--model", "popularity", "--data", data, "--domain", domain, "--out", out], capsys)
    assert "field '--domain'" in err and "domain 'few'" in err and "no user" in err and "test target" in err
    assert "6 user(s)" in err and "at least 3 events" in err
    assert not out.exists()


def test_evaluate_of_an_evaluable_domain_still_reports(data, tmp_path):
    assert main(["evaluate", "--model", "popularity", "--data", str(data), "--domain", "many",
                 "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["test"]["users"] == 30


# --- 2. export --onnx without the [onnx] extra, and a failed export ----------------------------------
@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_export_onnx_without_the_extra_is_refused_before_writing(missing, model, tmp_path, capsys, monkeypatch):
    """Was: a traceback from torch's exporter (or from onnx_parity's import), exit 1, a half bundle.
    None in sys.modules makes ``import onnx`` raise ImportError, as if it were not installed."""
    monkeypatch.setitem(sys.modules, missing, None)
    out = tmp_path / "bundle"
    err = _refused(["export", "--base", model, "--out", out, "--onnx"], capsys)
    assert "field '--onnx'" in err and missing in err and "pip install 'crossrec-dist[onnx]'" in err
    assert not out.exists()


def test_export_onnx_without_the_extra_in_a_fresh_process(model, tmp_path):
    """The same, as the trap was found: a real interpreter whose ``onnx`` module raises ImportError."""
    from conftest import run_cli
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "onnx.py").write_text('raise ImportError("simulated: no onnx")\n')
    proc = run_cli("export", "--base", model, "--out", tmp_path / "bundle", "--onnx", check=False,
                   env={"PYTHONPATH": str(fake)})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "--onnx" in proc.stderr and "crossrec-dist[onnx]" in proc.stderr
    assert not (tmp_path / "bundle").exists()


def test_export_that_fails_half_way_leaves_the_previous_bundle(model, tmp_path, monkeypatch):
    """Was: base/ copied straight into --out before the ONNX step failed: a bundle that looked complete."""
    out = tmp_path / "bundle"
    assert main(["export", "--base", str(model), "--out", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise RuntimeError("simulated: the exporter died")
    monkeypatch.setattr("crossrec_dist.export.bundle.export_onnx", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        main(["export", "--base", str(model), "--out", str(out), "--onnx"])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before                            # untouched, no model.onnx-less half bundle
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []      # no staging left

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="simulated"):
        main(["export", "--base", str(model), "--out", str(fresh), "--onnx"])
    assert not fresh.exists()


# --- 3. data fetch --from a file that is not a zip ---------------------------------------------------
def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


ML100K = {"ml-100k/u.data": b"1\t2\t5\t881250949\n" * 200, "ml-100k/u.user": b"1|24|M|technician|85711\n" * 50,
          "ml-100k/u.item": b"2|GoldenEye (1995)|01-Jan-1995||http://x|0|0|0\n" * 50}


def _corrupt_member(blob: bytes) -> bytes:
    """The archive's directory intact, one member's compressed bytes flipped (CRC / inflate error)."""
    data = bytearray(blob)
    start = data.index(b"ml-100k/u.data") + len(b"ml-100k/u.data")
    for i in range(start + 4, start + 24):
        data[i] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize("name, content", [
    ("notes.txt", b"hello\n"),                                  # not a zip at all
    ("ml-100k.whl", _zip(ML100K)[:300]),                       # truncated (no central directory)
    ("ml-100k.whl", _corrupt_member(_zip(ML100K))),            # a member that fails to inflate / CRC
], ids=["text", "truncated", "corrupt"])
def test_fetch_from_a_file_that_is_not_a_zip_is_refused(name, content, tmp_path, capsys):
    """Was: zipfile.BadZipFile traceback, exit 1 (.zip names are MD5-checked first and were refused)."""
    src = tmp_path / name
    src.write_bytes(content)
    out = tmp_path / "raw"
    err = _refused(["data", "fetch", "movielens-100k", "--from", src, "--out", out], capsys)
    assert str(src) in err and "field '--from'" in err and "zip archive" in err and "expected" in err
    assert not out.exists()


# --- 4. pickled adapters and models -------------------------------------------------------------------
def test_evaluate_refuses_a_pickled_adapter(model, pickled_adapters, data, tmp_path, capsys):
    """Was: exit 0, the pickle loaded by peft (torch.load) without a word."""
    err = _refused(["evaluate", "--model", model, "--adapter", pickled_adapters / "many", "--data", data,
                    "--domain", "many", "--out", tmp_path / "m.json"], capsys)
    assert f"{pickled_adapters / 'many'}: adapter weights are a pickle (adapter_model.bin)" in err and PICKLE in err


@pytest.mark.parametrize("merge", [False, True], ids=["copy", "merge"])
def test_export_refuses_pickled_adapters_before_writing(merge, model, pickled_adapters, tmp_path, capsys):
    """Was: exit 0; without --merge the pickle was copied into the bundle for recommend to unpickle."""
    out = tmp_path / "bundle"
    err = _refused(["export", "--base", model, "--adapters", pickled_adapters, "--out", out,
                    *(["--merge"] if merge else [])], capsys)
    assert str(pickled_adapters / "many") in err and "adapter_model.bin" in err and PICKLE in err
    assert not out.exists()


def test_recommend_refuses_a_bundle_with_a_pickled_adapter(model, pickled_adapters, tmp_path, capsys):
    bundle = tmp_path / "bundle"          # as an older export wrote it, the pickle copied in
    shutil.copytree(model, bundle / "base")
    shutil.copytree(pickled_adapters, bundle / "adapters")
    err = _refused(["recommend", "--bundle", bundle, "--domain", "many", "--history", "i1"], capsys)
    assert str(bundle / "adapters" / "many") in err and "adapter_model.bin" in err and PICKLE in err


def test_distill_refuses_a_pickled_adapter(model, pickled_adapters, data, tmp_path, capsys):
    err = _refused(["distill", "--teacher", model, "--adapter", pickled_adapters / "many", "--data", data,
                    "--domain", "many", "--out", tmp_path / "student", "--set", "train.max_steps=1",
                    "--set", "train.tensorboard=false", "--set", "allow_student_not_smaller=true"], capsys)
    assert "adapter_model.bin" in err and PICKLE in err


def test_init_adapter_refuses_a_pickled_adapter(model, pickled_adapters, data, tmp_path, capsys):
    """Was already exit 2, as 'not an adapter folder': now it says the folder holds a pickle."""
    err = _refused(["finetune", "--base", model, "--data", data, "--domain", "many", "--method", "lora",
                    "--out", tmp_path / "ft", "--set", f"init_adapter={pickled_adapters / 'many'}",
                    "--set", "train.max_steps=1", "--set", "train.tensorboard=false"], capsys)
    assert "field 'init_adapter'" in err and "adapter_model.bin" in err and PICKLE in err


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_pickled_model_is_named_as_one(command, model, data, tmp_path, capsys):
    """Was: 'no *.safetensors weights' -- true, but it reads like a broken copy, not a format refused."""
    import torch
    from safetensors.torch import load_file
    pickled = tmp_path / "model"
    pickled.mkdir()
    for f in ("config.json", "items.json"):
        shutil.copy2(model / f, pickled / f)
    torch.save(load_file(str(model / "model.safetensors")), pickled / "pytorch_model.bin")
    argv = (["evaluate", "--model", pickled, "--data", data, "--domain", "many", "--out", tmp_path / "m.json"]
            if command == "evaluate" else ["export", "--base", pickled, "--out", tmp_path / "bundle"])
    err = _refused(argv, capsys)
    assert f"{pickled}: model weights are a pickle (pytorch_model.bin)" in err and PICKLE in err


# --- 5. AdaLoRA's schedule ---------------------------------------------------------------------------
def test_adalora_ratio_sum_names_both_fields(model, data, tmp_path, capsys):
    """Was: "field 'adalora.tfinal_ratio': tinit_ratio + tfinal_ratio = 1.1 leaves no steps ..."."""
    err = _refused(["finetune", "--base", model, "--data", data, "--domain", "many", "--method", "adalora",
                    "--out", tmp_path / "ft", "--set", "adalora.tinit_ratio=0.6", "--set", "adalora.tfinal_ratio=0.5"],
                   capsys)
    assert "adalora.tinit_ratio + adalora.tfinal_ratio = 1.1" in err and "lower" in err


def test_adalora_run_too_short_for_its_final_budget_is_refused(model, data, tmp_path, capsys):
    """Was: accepted; int(0.2 * 2) = 0 final-budget updates, so PEFT's final budget step (update
    total - tfinal = 2) never came in updates 0..1 and the adapter kept ranks above target_r."""
    err = _refused(["finetune", "--base", model, "--data", data, "--domain", "many", "--method", "adalora",
                    "--out", tmp_path / "ft", "--set", "train.max_steps=2", "--set", "train.tensorboard=false",
                    "--set", "must_beat_base=false"], capsys)
    assert "field 'adalora.tfinal_ratio'" in err and "train.max_steps" in err and "at least 5" in err
    assert "adalora.tinit_ratio" in err


def test_adalora_final_budget_steps():
    from crossrec_dist.errors import InputError
    from crossrec_dist.methods.adalora import AdaLoraOptions, final_budget_steps
    assert final_budget_steps(AdaLoraOptions(tinit_ratio=0.1, tfinal_ratio=0.2), 12) == 2
    assert final_budget_steps(AdaLoraOptions(tfinal_ratio=0.2), 5) == 1
    for total, ratio in ((4, 0.2), (1, 0.5), (99, 0.01)):
        with pytest.raises(InputError, match="train.max_steps"):
            final_budget_steps(AdaLoraOptions(tinit_ratio=0.0, tfinal_ratio=ratio), total)
    with pytest.raises(InputError, match=r"adalora\.tfinal_ratio to at least 0\.25"):
        final_budget_steps(AdaLoraOptions(tfinal_ratio=0.2), 4)      # int(0.25 * 4) = 1


def test_adalora_tfinal_ratio_zero_is_refused_by_the_config_check(model, data, tmp_path, capsys):
    """tfinal_ratio 0 never reaches the final budget, however long the run: refused before training."""
    err = _refused(["finetune", "--base", model, "--data", data, "--domain", "many", "--method", "adalora",
                    "--out", tmp_path / "ft", "--set", "adalora.tfinal_ratio=0"], capsys)
    assert "field 'adalora.tfinal_ratio'" in err and "(0, 1)" in err


# --- --help: every option says what it is, every preset is listed ------------------------------------
def _options_without_help(parser, path=()):
    import argparse
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _options_without_help(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction) and not (action.help or "").strip():
            missing.append(f"crossrec {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_command_has_a_help_line():
    from crossrec_dist.cli import build_parser
    assert _options_without_help(build_parser()) == []


def test_pretrain_help_lists_every_preset(capsys):
    from crossrec_dist.models.presets import PRESETS
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in PRESETS) and "medium" in text


# --- a launch that asks for N processes and gets fewer ------------------------------------------------
def test_requested_processes_reads_the_launch_command_line():
    from crossrec_dist.engine.distributed import requested_processes
    assert requested_processes(["accelerate", "launch", "--num_processes", "4", "-m", "x"]) == 4
    assert requested_processes(["accelerate", "launch", "--num_processes=2", "x.py"]) == 2
    assert requested_processes(["accelerate", "launch", "x.py"]) is None


def test_accelerate_launch_of_two_processes_that_starts_one_is_refused(tmp_path):
    """Before: `accelerate launch --num_processes 2` without --multi_gpu/--use_deepspeed on a CPU machine
    trained in one process (world=1) without a word."""
    import subprocess
    import sys
    from conftest import REPO, child_env
    data = tmp_path / "data"
    data.mkdir()            # never read: the launch is refused first
    proc = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2",
                           "--main_process_port", "29871", "-m", "crossrec_dist", "pretrain", "--preset", "tiny",
                           "--data", str(data), "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=child_env({"DS_ACCELERATOR": "cpu"}))
    assert proc.returncode != 0
    assert "asked for 2 processes but started 1" in proc.stderr and "--multi_gpu" in proc.stderr
    assert not (tmp_path / "out").exists()
