"""Hostile and broken inputs, as a table: each case is one line of files + a command + what the error names.

Every case runs the real CLI entry point (in this process, so the table stays fast) in its own
folder and asserts: exit status 2, no traceback, the message names the file / line / field given,
and nothing was written outside the case's output folder. Accepted-by-rule cases (a BOM, a
``.csv.gz``, duplicate rows with ``--duplicates drop``...) are in the second table and assert the
rule's report instead. A new case is one ``Case(...)`` line.
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from crossrec_dist.cli import main

HEAD = "user_id,item_id,timestamp\n"
ROWS = "".join(f"u{u},i{(u * 7 + k) % 12},{1000 + 10 * u + k}\n" for u in range(8) for k in range(6))
GOOD_CSV = HEAD + ROWS


def _parquet(columns: dict):
    """A file writer: a Parquet file from {name: pyarrow array or python list}."""
    def write(path: Path):
        import pyarrow as pa
        import pyarrow.parquet as pq
        names = list(columns)
        arrays = [c if isinstance(c, pa.Array) else pa.array(c) for c in columns.values()]
        pq.write_table(pa.Table.from_arrays(arrays, names=names), path)
    return write


def _pq_cols(**over):
    """Valid interaction columns (48 rows), with some replaced."""
    users = [f"u{u}" for u in range(8) for _ in range(6)]
    items = [f"i{(u * 7 + k) % 12}" for u in range(8) for k in range(6)]
    ts = [float(1000 + 10 * u + k) for u in range(8) for k in range(6)]
    cols = {"user_id": users, "item_id": items, "timestamp": ts}
    cols.update(over)
    return cols


def _gz(text: str):
    return lambda path: path.write_bytes(gzip.compress(text.encode()))


def _replace_row(row: int, new: str, text: str = GOOD_CSV) -> str:
    lines = text.splitlines(keepends=True)
    lines[row] = new + "\n"
    return "".join(lines)


@dataclass
class Case:
    id: str
    argv: str                       # {d} = the case folder, {out} = its output folder, {data} / {model}: fixtures
    expect: list[str]               # fragments the error message must contain (file:line, field, why)
    files: dict = field(default_factory=dict)   # name -> text, or a callable(path) that writes it
    needs: tuple = ()               # fixtures: "data" (a prepared dataset), "model" (a tiny model on it)


PREP = "prepare --format csv --input {d}/in.csv --out {out}"
TRAIN = "pretrain --preset tiny --data {data} --out {out}"
FT = "finetune --base {model} --data {data} --domain a --out {out}"
DIST = "distill --teacher {model} --data {data} --domain a --out {out}"

CASES = [
    # --- files that cannot be read -------------------------------------------------------------
    Case("missing-file", PREP, ["in.csv", "no such file"]),
    Case("empty-file", PREP, ["in.csv:1", "empty"], {"in.csv": ""}),
    Case("header-only", PREP, ["in.csv", "no interactions"], {"in.csv": HEAD}),
    Case("missing-column", PREP, ["in.csv", "field 'timestamp'"], {"in.csv": "user_id,item_id\n1,2\n"}),
    Case("duplicated-header-name", PREP, ["in.csv:1", "field 'item_id'", "twice"],
         {"in.csv": "user_id,item_id,item_id,timestamp\n1,2,3,4\n"}),
    Case("ragged-row", PREP, ["in.csv:4", "expected 3 fields"], {"in.csv": _replace_row(3, "u0,i1")}),
    Case("not-utf8", PREP, ["in.csv", "UTF-8"], {"in.csv": lambda p: p.write_bytes(HEAD.encode() + b"\xff\xfe,1,2\n")}),
    Case("gzip-behind-csv-name", PREP, ["in.csv", "gzip"], {"in.csv": _gz(GOOD_CSV)}),
    Case("zip-behind-csv-name", PREP, ["in.csv", "zip"], {"in.csv": lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40)}),
    Case("truncated-gzip", "prepare --format csv --input {d}/in.csv.gz --out {out}", ["in.csv.gz"],
         {"in.csv.gz": lambda p: p.write_bytes(gzip.compress(GOOD_CSV.encode())[:40])}),
    Case("input-is-folder-for-csv", "prepare --format csv --input {d} --out {out}",
         ["is a folder", "--format csv reads one file", "no *.csv file"], {"in.txt": "not a log"}),
    Case("input-folder-names-its-csv-files", "prepare --format csv --input {d} --out {out}",
         ["is a folder", "it holds a.csv, b.csv.gz"], {"a.csv": GOOD_CSV, "b.csv.gz": _gz(GOOD_CSV)}),
    Case("prepare-into-a-prepared-dataset", "prepare --format csv --input {data}/../in.csv --out {data}",
         ["already holds a prepared dataset", "--force"], needs=("data",)),
    # --- values -------------------------------------------------------------------------------
    Case("empty-user", PREP, ["in.csv:3", "field 'user_id'", "empty"], {"in.csv": _replace_row(2, ",i1,1000")}),
    Case("blank-item", PREP, ["in.csv:3", "field 'item_id'", "empty"], {"in.csv": _replace_row(2, "u1,   ,1000")}),
    Case("text-timestamp", PREP, ["in.csv:5", "field 'timestamp'"], {"in.csv": _replace_row(4, "u1,i2,yesterday")}),
    Case("nan-timestamp-text", PREP, ["in.csv:5", "field 'timestamp'"], {"in.csv": _replace_row(4, "u1,i2,nan")}),
    Case("inf-timestamp-text", PREP, ["in.csv:5", "field 'timestamp'"], {"in.csv": _replace_row(4, "u1,i2,inf")}),
    Case("overflowing-timestamp", PREP, ["in.csv:5", "field 'timestamp'", "finite"],
         {"in.csv": _replace_row(4, "u1,i2,1e400")}),
    Case("parquet-nan-timestamp", "prepare --format parquet --input {d}/in.parquet --out {out}",
         ["in.parquet:3", "field 'timestamp'", "finite"],
         {"in.parquet": _parquet(_pq_cols(timestamp=[1.0, 2.0, float("nan")] + [3.0] * 45))}),
    Case("parquet-inf-timestamp", "prepare --format parquet --input {d}/in.parquet --out {out}",
         ["in.parquet:2", "field 'timestamp'", "finite"],
         {"in.parquet": _parquet(_pq_cols(timestamp=[1.0, float("inf")] + [3.0] * 46))}),
    Case("parquet-bool-timestamp", "prepare --format parquet --input {d}/in.parquet --out {out}",
         ["in.parquet", "field 'timestamp'", "bool"], {"in.parquet": _parquet(_pq_cols(timestamp=[True, False] * 24))}),
    Case("parquet-nan-user", "prepare --format parquet --input {d}/in.parquet --out {out}",
         ["in.parquet:2", "field 'user_id'"],
         {"in.parquet": _parquet(_pq_cols(user_id=[1.0, float("nan")] + [2.0] * 46))}),
    Case("parquet-fractional-item", "prepare --format parquet --input {d}/in.parquet --out {out}",
         ["in.parquet", "field 'item_id'", "whole"], {"in.parquet": _parquet(_pq_cols(item_id=[1.5] * 48))}),
    Case("parquet-list-column", "prepare --format parquet --input {d}/in.parquet --out {out}",
         ["in.parquet", "field 'item_id'", "list"], {"in.parquet": _parquet(_pq_cols(item_id=[[1, 2]] * 48))}),
    Case("parquet-struct-column", "prepare --format parquet --input {d}/in.parquet --out {out}",
         ["in.parquet", "field 'user_id'", "struct"], {"in.parquet": _parquet(_pq_cols(user_id=[{"a": 1}] * 48))}),
    Case("parquet-duplicated-column", "prepare --format parquet --input {d}/in.parquet --out {out}",
         ["in.parquet", "field 'item_id'", "twice"],
         {"in.parquet": lambda p: _dup_parquet(p)}),
    Case("not-parquet", "prepare --format parquet --input {d}/in.parquet --out {out}", ["in.parquet", "Parquet"],
         {"in.parquet": GOOD_CSV}),
    Case("jsonl-bad-line", "prepare --format jsonl --input {d}/in.jsonl --out {out}", ["in.jsonl:3", "JSON"],
         {"in.jsonl": '{"user_id": "a", "item_id": "x", "timestamp": 1}\n'
                      '{"user_id": "a", "item_id": "y", "timestamp": 2}\n{"user_id": "a", "item_id": \n'}),
    Case("jsonl-missing-field", "prepare --format jsonl --input {d}/in.jsonl --out {out}",
         ["in.jsonl:3", "field 'item_id'"],
         {"in.jsonl": '{"user_id": "a", "item_id": "x", "timestamp": 1}\n\n{"user_id": "a", "timestamp": 2}\n'}),
    Case("jsonl-bool-timestamp", "prepare --format jsonl --input {d}/in.jsonl --out {out}",
         ["in.jsonl", "field 'timestamp'", "bool"],
         {"in.jsonl": '{"user_id": "a", "item_id": "x", "timestamp": true}\n'}),
    Case("duplicates-error", PREP + " --duplicates error", ["in.csv:10", "duplicate", "in.csv:9"],
         {"in.csv": _replace_row(9, ROWS.splitlines()[7])}),
    # --- domains ------------------------------------------------------------------------------
    Case("empty-other-domain", PREP + " --domain-from user.zip:prefix1 --user-attrs {d}/users.csv --other-domain ''",
         ["--other-domain", "empty"], {"in.csv": GOOD_CSV, "users.csv": "user_id,zip\n" + "".join(
             f"u{u},{u}1234\n" for u in range(8))}),
    Case("comma-in-domain", PREP + " --domain-col region",
         ["in.csv:2", "field 'region'", "','"],
         {"in.csv": "user_id,item_id,timestamp,region\n" + "".join(
             f"{line},\"a,b\"\n" for line in ROWS.splitlines())}),
    Case("control-char-in-domain", PREP + " --domain-col region", ["in.csv:2", "field 'region'", "control"],
         {"in.csv": "user_id,item_id,timestamp,region\n" + "".join(f"{line},a\tb\n" for line in ROWS.splitlines())}),
    Case("unknown-domain-rule", PREP + " --domain-from user.zip:suffix2 --user-attrs {d}/users.csv",
         ["--domain-from", "suffix2"], {"in.csv": GOOD_CSV, "users.csv": "user_id,zip\n" + "".join(
             f"u{u},{u}1234\n" for u in range(8))}),
    Case("missing-attribute", PREP + " --domain-from user.age --user-attrs {d}/users.csv",
         ["users.csv", "field 'age'"], {"in.csv": GOOD_CSV, "users.csv": "user_id,zip\nu1,1\n"}),
    Case("user-without-attributes", PREP + " --domain-from user.zip --user-attrs {d}/users.csv",
         ["in.csv:", "field 'user'"], {"in.csv": GOOD_CSV, "users.csv": "user_id,zip\nu1,1\n"}),
    Case("unknown-kept-domain", PREP + " --domain-col region --domains x",
         ["--domains", "'x'"], {"in.csv": "user_id,item_id,timestamp,region\n" + "".join(
             f"{line},a\n" for line in ROWS.splitlines())}),
    # --- prepare options ------------------------------------------------------------------------
    Case("temporal-nan", PREP + " --split temporal --temporal-valid nan", ["--temporal-valid"], {"in.csv": GOOD_CSV}),
    Case("temporal-after-data", PREP + " --split temporal --temporal-valid 5000 --temporal-test 6000",
         ["--temporal-valid", "after"], {"in.csv": GOOD_CSV}),
    Case("temporal-before-data", PREP + " --split temporal --temporal-valid 10 --temporal-test 20",
         ["--temporal-valid", "before"], {"in.csv": GOOD_CSV}),
    Case("temporal-reversed", PREP + " --split temporal --temporal-valid 0.9 --temporal-test 0.5",
         ["--temporal-test", "before the valid cut"], {"in.csv": GOOD_CSV}),
    Case("temporal-negative", PREP + " --split temporal --temporal-valid -0.5", ["--temporal-valid"],
         {"in.csv": GOOD_CSV}),
    Case("negative-min-user", PREP + " --min-user -1", ["--min-user"], {"in.csv": GOOD_CSV}),
    Case("filter-removes-all", PREP + " --min-user 100", ["--min-user"], {"in.csv": GOOD_CSV}),
    Case("out-is-a-file", PREP.replace("{out}", "{d}/in.csv"), ["in.csv", "--out", "not a folder"],
         {"in.csv": GOOD_CSV}),
    Case("out-under-a-file", PREP.replace("{out}", "{d}/in.csv/sub"), ["in.csv", "--out"], {"in.csv": GOOD_CSV}),
    Case("out-read-only", PREP.replace("{out}", "/sys/kernel/crossrec_out"), ["crossrec_out", "--out", "cannot write"],
         {"in.csv": GOOD_CSV}),
    Case("zero-shot-other-vocabulary", FT.replace("{model}", "{d}/m") + " --method none", ["item vocabulary"],
         {"m": lambda p: _broken_model(p, shuffle_vocab=True)}, needs=("data", "model")),
    Case("out-not-empty-not-dataset", PREP.replace("{out}", "{d}"), ["--out", "not empty"], {"in.csv": GOOD_CSV}),
    Case("format-auto-without-fetch", "prepare --format auto --input {d} --out {out}", ["--format auto"]),
    # --- other commands' options ------------------------------------------------------------------
    Case("synth-no-users", "data synth --out {out} --users 0", ["--users", ">= 1"]),
    Case("synth-shift-range", "data synth --out {out} --shift 1.5", ["--shift", "[0, 1]"]),
    Case("synth-too-few-items", "data synth --out {out} --items 5 --clusters 20", ["--items", "clusters"]),
    Case("synth-out-is-file", "data synth --out {d}/f.txt", ["f.txt", "--out"], {"f.txt": "x"}),
    Case("presets-world-zero", "presets tiny --world 0", ["--world"]),
    Case("presets-unknown", "presets huge", ["huge"]),
    Case("bench-batch-negative", "bench-serve --student {model} --teacher {model} --out {out}/b.json --batch -1",
         ["--batch"], needs=("data", "model")),
    Case("recommend-k-zero", "recommend --bundle {d} --k 0", ["--k", ">= 1"]),
    Case("recommend-not-a-bundle", "recommend --bundle {d}", ["not a model folder"]),
    Case("evaluate-max-len-zero", "evaluate --model {model} --data {data} --out {out}/m.json --max-len 0",
         ["--max-len"], needs=("data", "model")),
    # --- training configs: caught before any work ----------------------------------------------
    Case("micro-batch-zero", TRAIN + " --set train.micro_batch_size=0", ["train.micro_batch_size"], needs=("data",)),
    Case("negative-batch", TRAIN + " --set train.micro_batch_size=-4", ["train.micro_batch_size"], needs=("data",)),
    Case("grad-accum-zero", TRAIN + " --set train.grad_accum=0", ["train.grad_accum"], needs=("data",)),
    Case("lr-zero", TRAIN + " --set train.lr=0", ["train.lr"], needs=("data",)),
    Case("lr-nan", TRAIN + " --set train.lr=.nan", ["train.lr"], needs=("data",)),
    Case("lr-text", TRAIN + " --set train.lr=fast", ["train.lr"], needs=("data",)),
    Case("unknown-train-key", TRAIN + " --set train.lrr=1", ["train.lrr"], needs=("data",)),
    Case("unknown-precision", TRAIN + " --set train.mixed_precision=fp8", ["train.mixed_precision"], needs=("data",)),
    Case("unknown-schedule", TRAIN + " --set train.schedule=step", ["train.schedule"], needs=("data",)),
    Case("warmup-ratio-2", TRAIN + " --set train.warmup_ratio=2", ["train.warmup_ratio"], needs=("data",)),
    Case("beta2-one", TRAIN + " --set train.adam_beta2=1", ["train.adam_beta2"], needs=("data",)),
    Case("negative-weight-decay", TRAIN + " --set train.weight_decay=-1", ["train.weight_decay"], needs=("data",)),
    Case("epochs-and-steps-zero", TRAIN + " --set train.epochs=0", ["train.epochs"], needs=("data",)),
    Case("unknown-model-loss", TRAIN + " --set model.loss=bpr", ["model.loss"], needs=("data",)),
    Case("model-text-size", TRAIN + " --set model.hidden_size=big", ["model.hidden_size"], needs=("data",)),
    Case("model-heads-mismatch", TRAIN + " --set model.hidden_size=30 --set model.num_heads=4",
         ["model.num_heads", "divide"], needs=("data",)),
    Case("model-dropout-range", TRAIN + " --set model.embedding_dropout=1.5", ["model.embedding_dropout"],
         needs=("data",)),
    Case("model-unknown-option", TRAIN + " --set model.hidden=32", ["model.hidden"], needs=("data",)),
    Case("unknown-preset", TRAIN.replace("tiny", "huge"), ["preset", "huge"], needs=("data",)),
    Case("bad-yaml", TRAIN + " --config {d}/c.yaml", ["c.yaml:3", "invalid YAML"], {"c.yaml": "train:\n  lr: [1, \n"},
         needs=("data",)),
    Case("yaml-not-mapping", TRAIN + " --config {d}/c.yaml", ["c.yaml", "mapping"], {"c.yaml": "- 1\n- 2\n"},
         needs=("data",)),
    Case("set-without-equals", TRAIN + " --set train.lr", ["--set"], needs=("data",)),
    Case("unknown-source-domain", TRAIN + " --domains nowhere", ["--domain", "nowhere"], needs=("data",)),
    Case("missing-deepspeed-json", TRAIN + " --set train.deepspeed={d}/none.json", ["train.deepspeed"],
         needs=("data",)),
    Case("data-not-prepared", "pretrain --preset tiny --data {d} --out {out}", ["not a prepared dataset"]),
    Case("pretrain-out-is-file", TRAIN.replace("{out}", "{d}/f.txt"), ["f.txt", "--out"], {"f.txt": "x"},
         needs=("data",)),
    Case("resume-not-checkpoint", TRAIN + " --resume {d}", ["--resume", "not a checkpoint"], needs=("data",)),
    Case("unknown-method", FT + " --method dora", ["--method", "dora"], needs=("data", "model")),
    Case("lora-rank-zero", FT + " --method lora --set lora.r=0", ["lora.r"], needs=("data", "model")),
    Case("lora-dropout-range", FT + " --method lora --set lora.dropout=1", ["lora.dropout"], needs=("data", "model")),
    Case("lora-unknown-module", FT + " --method lora --set lora.target_modules=[qkv]", ["lora.target_modules", "qkv"],
         needs=("data", "model")),
    Case("rank-pattern-not-a-target", FT + " --method lora --set lora.rank_pattern.gate_proj=4 "
         "--set lora.target_modules=[q_proj]", ["lora.rank_pattern.gate_proj", "target_modules"], needs=("data", "model")),
    Case("rank-pattern-not-an-int", FT + " --method lora --set lora.rank_pattern.q_proj=big",
         ["lora.rank_pattern.q_proj", "integer"], needs=("data", "model")),
    Case("alpha-pattern-zero", FT + " --method lora --set lora.alpha_pattern.q_proj=0",
         ["lora.alpha_pattern.q_proj"], needs=("data", "model")),
    Case("adalora-table-rank-negative", FT + " --method adalora --set adalora.table_r=-1", ["adalora.table_r"],
         needs=("data", "model")),
    Case("adalora-table-and-top-rows", FT + " --method adalora --set adalora.table_r=4 --set train_top_items=20",
         ["train_top_items", "item_embeddings"], needs=("data", "model")),
    Case("adalora-fp16", FT + " --method adalora --set train.mixed_precision=fp16", ["train.mixed_precision", "fp16"],
         needs=("data", "model")),
    Case("adalora-ranks", FT + " --method adalora --set adalora.target_r=20", ["adalora.target_r"],
         needs=("data", "model")),
    Case("adalora-schedule-too-short", FT + " --method adalora --set train.max_steps=2 --set adalora.tinit_ratio=0.6 "
         "--set adalora.tfinal_ratio=0.5", ["adalora"], needs=("data", "model")),
    Case("valid-targets-zero", FT + " --method lora --set valid_targets=0", ["valid_targets"], needs=("data", "model")),
    Case("train-fraction-zero", FT + " --method lora --set train_fraction=0", ["train_fraction"], needs=("data", "model")),
    Case("l2sp-negative", FT + " --method l2sp --set l2sp.weight=-1", ["l2sp.weight"], needs=("data", "model")),
    Case("unknown-catalogue", FT + " --method none --set catalogue=platform", ["catalogue", "platform"],
         needs=("data", "model")),
    Case("top-items-negative", FT + " --method lora --set train_top_items=-1", ["train_top_items"],
         needs=("data", "model")),
    Case("top-items-with-table-lora", FT + " --method lora --set train_top_items=5 "
         "--set lora.target_modules=[q_proj,item_embeddings]", ["train_top_items", "item_embeddings"],
         needs=("data", "model")),
    Case("unknown-model-option-type", TRAIN + " --set model.item_bias=maybe", ["model.item_bias"], needs=("data",)),
    Case("evaluate-unknown-catalogue", "evaluate --model popularity --data {data} --out {out}/m.json "
         "--catalogue platform", ["--catalogue", "platform"], needs=("data",)),
    Case("finetune-unknown-domain", FT.replace("--domain a", "--domain zz") + " --method lora", ["--domain", "zz"],
         needs=("data", "model")),
    Case("finetune-base-not-model", FT.replace("{model}", "{d}") + " --method lora", ["not a model folder"],
         needs=("data",)),
    Case("finetune-truncated-weights", FT.replace("{model}", "{d}/m") + " --method lora",
         ["model.safetensors", "truncated"], {"m": lambda p: _broken_model(p, truncate=True)}, needs=("data", "model")),
    Case("finetune-other-vocabulary", FT.replace("{model}", "{d}/m") + " --method lora",
         ["item vocabulary", "items.json"], {"m": lambda p: _broken_model(p, shuffle_vocab=True)},
         needs=("data", "model")),
    Case("evaluate-other-vocabulary", "evaluate --model {d}/m --data {data} --out {out}/m.json",
         ["item vocabulary"], {"m": lambda p: _broken_model(p, shuffle_vocab=True)}, needs=("data", "model")),
    Case("evaluate-no-vocabulary", "evaluate --model {d}/m --data {data} --out {out}/m.json",
         ["items.json", "vocabulary"], {"m": lambda p: _broken_model(p, drop_vocab=True)}, needs=("data", "model")),
    Case("evaluate-bad-config-json", "evaluate --model {d}/m --data {data} --out {out}/m.json",
         ["config.json", "JSON"], {"m": lambda p: _broken_model(p, bad_config=True)}, needs=("data", "model")),
    Case("evaluate-batch-zero", "evaluate --model {model} --data {data} --out {out}/m.json --batch-size 0",
         ["--batch-size"], needs=("data", "model")),
    Case("adapter-not-adapter", "evaluate --model {model} --adapter {d} --data {data} --out {out}/m.json",
         ["adapter_config.json"], needs=("data", "model")),
    Case("adapter-without-fingerprint", "evaluate --model {model} --adapter {d}/ad --data {data} --out {out}/m.json",
         ["crossrec_adapter.json", "--allow-unverified-adapter"], {"ad": lambda p: _adapter(p, fingerprint=None)},
         needs=("data", "model")),
    Case("adapter-foreign-base", "evaluate --model {model} --adapter {d}/ad --data {data} --out {out}/m.json",
         ["base_fingerprint"], {"ad": lambda p: _adapter(p, fingerprint="sha256:" + "0" * 64)},
         needs=("data", "model")),
    Case("distill-alpha", DIST + " --set alpha=2", ["alpha"], needs=("data", "model")),
    Case("distill-temperature", DIST + " --set temperature=0", ["temperature"], needs=("data", "model")),
    Case("distill-transfer", DIST + " --set transfer=some", ["transfer"], needs=("data", "model")),
    Case("distill-top-k", DIST + " --set top_k=-1", ["top_k"], needs=("data", "model")),
    Case("recipe-unknown-method", "experiment --config {d}/r.yaml --out {out}", ["r.yaml", "methods"],
         {"r.yaml": "targets: ['0']\nmethods: [none, dora]\n"}),
    Case("recipe-empty-target", "experiment --config {d}/r.yaml --out {out}", ["r.yaml", "targets"],
         {"r.yaml": "targets: ['']\nmethods: [none]\n"}),
    Case("recipe-bad-lr", "experiment --config {d}/r.yaml --out {out}", ["r.yaml", "pretrain.train.lr"],
         {"r.yaml": "targets: ['0']\npretrain:\n  train:\n    lr: -1\n"}),
    Case("recipe-bad-lora", "experiment --config {d}/r.yaml --out {out}", ["r.yaml", "lora.r"],
         {"r.yaml": "targets: ['0']\nfinetune:\n  lora:\n    r: 0\n"}),
    Case("recipe-repeated-seeds", "experiment --config {d}/r.yaml --out {out}", ["r.yaml", "seeds"],
         {"r.yaml": "targets: ['0']\nseeds: [1, 1]\n"}),
    Case("recipe-fraction-range", "experiment --config {d}/r.yaml --out {out}", ["r.yaml", "fractions"],
         {"r.yaml": "targets: ['0']\nfractions: [0, 1]\n"}),
    Case("recipe-bad-model-option", "experiment --config {d}/r.yaml --out {out}", ["r.yaml", "pretrain.model.loss"],
         {"r.yaml": "targets: ['0']\npretrain:\n  model:\n    loss: bpr\n"}),
]


def _dup_parquet(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    t = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), pa.array(["c"]), pa.array([1.0])],
                             names=["user_id", "item_id", "item_id", "timestamp"])
    pq.write_table(t, path)


pytestmark = pytest.mark.usefixtures("own_environment")   # conftest: restores os.environ


# --- the tiny fixtures the model cases need: a 2-domain prepared set and a model on it ---------------
@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs_data")
    rows = "".join(f"u{u},i{(u * 5 + k) % 30},{1000 + k},{'ab'[u % 2]}\n" for u in range(40) for k in range(8))
    (root / "in.csv").write_text("user_id,item_id,timestamp,region\n" + rows)
    assert main(["prepare", "--format", "csv", "--input", str(root / "in.csv"), "--out", str(root / "data"),
                 "--domain-col", "region"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def small_model(small_data, tmp_path_factory):
    """A tiny (untrained) model with the dataset's vocabulary: enough for loading and checks."""
    from conftest import untrained_model
    return untrained_model(small_data, tmp_path_factory.mktemp("bad_inputs_model"), ["b"])


_MODEL: dict = {}


def _broken_model(path: Path, *, truncate=False, shuffle_vocab=False, drop_vocab=False, bad_config=False):
    import shutil
    shutil.copytree(_MODEL["dir"], path)
    if truncate:
        w = path / "model.safetensors"
        w.write_bytes(w.read_bytes()[:200])
    if shuffle_vocab:
        ids = json.loads((path / "items.json").read_text())
        (path / "items.json").write_text(json.dumps(ids[::-1]))    # same size, other ids at each index
    if drop_vocab:
        (path / "items.json").unlink()
    if bad_config:
        (path / "config.json").write_text('{"model_type": "crossrec", ')


def _adapter(path: Path, *, fingerprint):
    from peft import LoraConfig, get_peft_model
    from crossrec_dist.models.loading import load_base_model
    model = get_peft_model(load_base_model(_MODEL["dir"]), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(path)
    if fingerprint:
        (path / "crossrec_adapter.json").write_text(json.dumps({"base_fingerprint": fingerprint}))


def _snapshot(root: Path, skip: Path) -> dict:
    out = {}
    for p in root.rglob("*"):
        if p == skip or skip in p.parents:
            continue
        out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_by_name(case: Case, tmp_path, capsys, request):
    fixtures = {}
    if "data" in case.needs:
        fixtures["data"] = request.getfixturevalue("small_data")
    if "model" in case.needs:
        fixtures["model"] = _MODEL["dir"] = request.getfixturevalue("small_model")
    root = tmp_path / "case"            # everything the case may touch lives here; out/ is the output
    d, out = root / "in", root / "out"
    d.mkdir(parents=True)
    for name, content in case.files.items():
        if callable(content):
            content(d / name)
        else:
            (d / name).write_text(content)
    before = _snapshot(tmp_path, out)
    import shlex
    argv = [a.format(d=d, out=out, **fixtures) for a in shlex.split(case.argv)]
    try:
        rc = main(argv)
    except SystemExit as e:        # argparse's own usage errors (a flag's range), also exit 2
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err
    for fragment in case.expect:
        assert fragment.format(d=d) in err, f"{fragment!r} not in:\n{err}"
    after = _snapshot(tmp_path, out)
    assert after == before, f"written outside the output folder: {set(after) ^ set(before)}"


# --- accepted by a documented rule, and the rule is reported --------------------------------------
def _prepare_ok(tmp_path, name, content, *extra):
    d = tmp_path / "in"
    d.mkdir(exist_ok=True)
    if callable(content):
        content(d / name)
    else:
        (d / name).write_text(content)
    fmt = "jsonl" if ".jsonl" in name else "csv"
    out = tmp_path / "out"
    assert main(["prepare", "--format", fmt, "--input", str(d / name), "--out", str(out), *extra]) == 0
    return json.loads((out / "stats.json").read_text()), out


def test_utf8_bom_header_is_read(tmp_path):
    stats, _ = _prepare_ok(tmp_path, "in.csv", "\ufeff" + GOOD_CSV)
    assert stats["interactions"] == 48


def test_csv_gz_is_read_like_csv(tmp_path):
    stats, _ = _prepare_ok(tmp_path, "in.csv.gz", _gz(GOOD_CSV))
    assert stats["interactions"] == 48


def test_gz_error_names_the_decompressed_line(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    _gz(_replace_row(4, "u1,i2,yesterday"))(d / "in.csv.gz")
    assert main(["prepare", "--format", "csv", "--input", str(d / "in.csv.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "in.csv.gz:5" in capsys.readouterr().err


def test_whitespace_around_ids_is_stripped_and_reported(tmp_path, capsys):
    text = HEAD + ROWS.replace("u1,", " u1 ,").replace(",i3,", ",i3\t,")
    stats, out = _prepare_ok(tmp_path, "in.csv", text)
    assert stats["users"] == 8 and stats["items"] == 12            # ' u1 ' is u1, not a ninth user
    assert stats["input_rules"]["stripped_whitespace_ids"] > 0
    assert "surrounding whitespace" in capsys.readouterr().out


@pytest.mark.parametrize("mode,expected", [("drop", 48), ("keep", 49)])
def test_exact_duplicate_rows_follow_the_chosen_rule(tmp_path, capsys, mode, expected):
    text = GOOD_CSV + ROWS.splitlines()[5] + "\n"
    stats, _ = _prepare_ok(tmp_path, "in.csv", text, "--duplicates", mode)
    assert stats["interactions"] == expected
    assert stats["input_rules"]["duplicate_rows"] == 1
    if mode == "drop":
        assert "dropped 1 exact duplicate row" in capsys.readouterr().out


def test_jsonl_blank_lines_do_not_shift_line_numbers(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "in.jsonl").write_text('\n{"user_id": "a", "item_id": "x", "timestamp": 1}\n\n'
                                '{"user_id": "", "item_id": "y", "timestamp": 2}\n')
    assert main(["prepare", "--format", "jsonl", "--input", str(d / "in.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "in.jsonl:4" in capsys.readouterr().err


def test_hostile_domain_names_become_safe_folders(tmp_path):
    """Domain names are data: ../x, an absolute path and a dot become folder names inside OUT."""
    from crossrec_dist.paths import inside, safe_name
    for name in ("../x", "/etc/passwd", "..", ".", "a/b", "", "C:\\x", "ok-1.2"):
        folder = inside(tmp_path, name)
        assert folder.parent == tmp_path and folder.name not in (".", "..") and "/" not in folder.name
    assert safe_name("ok-1.2") == "ok-1.2" and safe_name("../x") != safe_name("__x")


def test_prepare_dying_mid_write_leaves_no_dataset(tmp_path, monkeypatch):
    """The folder appears complete or not at all: a failure in the last write leaves the old one."""
    import datasets
    _prepare_ok(tmp_path, "in.csv", GOOD_CSV)
    out = tmp_path / "out"
    before = (out / "meta.json").read_text()
    calls = []

    def dies(self, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(self, path, *a, **k)
    original = datasets.Dataset.save_to_disk
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", dies)
    (tmp_path / "in" / "in.csv").write_text(GOOD_CSV + "u9,i1,5000\nu9,i2,5001\nu9,i3,5002\n")
    rc = main(["prepare", "--format", "csv", "--input", str(tmp_path / "in" / "in.csv"), "--out", str(out)])
    assert rc == 2
    assert (out / "meta.json").read_text() == before                      # the old dataset, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]    # no temporary left behind


def test_hostile_domain_names_never_leave_the_output_folder(tmp_path):
    """A log whose regions are called '../escape' and '/abs/x': finetune --domains all writes one
    folder per region inside OUT, and manifest.json maps each name to its folder."""
    from crossrec_dist.data.prepared import PreparedData
    from crossrec_dist.export.vocab import write_vocab
    from crossrec_dist.models.config import CrossRecConfig
    from crossrec_dist.models.model import CrossRecModel
    names = ["a", "../escape", "/abs/x"]
    rows = "".join(f"u{u},i{(u * 5 + k) % 30},{1000 + k},{names[u % 3]}\n" for u in range(60) for k in range(8))
    (tmp_path / "in.csv").write_text("user_id,item_id,timestamp,region\n" + rows)
    work = tmp_path / "work"
    assert main(["prepare", "--format", "csv", "--input", str(tmp_path / "in.csv"), "--out", str(work / "data"),
                 "--domain-col", "region"]) == 0
    data = PreparedData(work / "data")
    cfg = CrossRecConfig(num_items=data.num_items, num_domains=3, domain_names=data.domain_names,
                         pretrain_domains=["a"], hidden_size=16, num_layers=1, num_heads=2, max_len=10)
    CrossRecModel(cfg).save_pretrained(work / "base", safe_serialization=True)
    write_vocab(data, work / "base")
    before = {p for p in tmp_path.parent.rglob("*") if work / "out" not in p.parents}
    out = work / "out"
    assert main(["finetune", "--base", str(work / "base"), "--data", str(work / "data"), "--domains", "all",
                 "--method", "none", "--out", str(out)]) == 0
    after = {p for p in tmp_path.parent.rglob("*") if out not in p.parents and p != out}
    assert after == before
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["domains"]) == ["../escape", "/abs/x"]
    for name, entry in manifest["domains"].items():
        folder = out / entry["path"]
        assert folder.parent == out and (folder / "metrics.json").is_file()
        assert json.loads((folder / "metrics.json").read_text())["domain"] == name


def _check_output_dir_many_times(folder: str, times: int) -> None:
    from crossrec_dist.paths import check_output_dir
    for _ in range(times):
        check_output_dir(folder)


def test_every_rank_checks_the_shared_output_folder_at_once(tmp_path):
    """Every rank of every node checks ``--out`` at the same moment on a shared filesystem. With one
    probe file name a rank unlinked the probe another rank had just written: the first two-node Slurm
    job failed with "cannot write here: No such file or directory". Four processes, 300 checks each."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_check_output_dir_many_times, args=(str(tmp_path / "out"), 300)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert list((tmp_path / "out").iterdir()) == [], "probe files left behind"
