"""A newcomer's own data, end to end, as the README's "Your own data" section walks it.

A retailer-style CSV of six countries, the way real exports look: times in ISO-8601 with offsets, `Z`
and naive local times, a blank line, an exact duplicate row and a missing SKU. Every step runs as the
user would type it, and every step's outcome and message is asserted: prepare (first refused, naming
the line; then with --on-bad-rows skip) -> pretrain (capped) -> per-country LoRA -> export -> a student
of a sensible size -> recommend; then the second run of a finished command.
"""
from __future__ import annotations

import json
import random

import pytest

from conftest import run_cli

COUNTRIES = {"ES": "+01:00", "DE": "+01:00", "FR": "Z", "IT": "", "PT": "+00:00", "NL": "+01:00"}
pytestmark = pytest.mark.slow


def _orders(path):
    """~1,300 orders: 20 customers per country, 11 orders each, SKUs from a country-flavoured range."""
    rnd = random.Random(0)
    lines = ["customer,sku,ordered_at,country"]
    for country, zone in COUNTRIES.items():
        for c in range(20):
            for k in range(11):
                sku = f"SKU-{(rnd.randrange(40) + 7 * list(COUNTRIES).index(country)) % 60}"
                day, hour = 1 + k, rnd.randrange(8, 20)
                stamp = f"2025-03-{day:02d}T{hour:02d}:15:00{zone}" if zone else f"2025-03-{day:02d} {hour:02d}:15"
                lines.append(f"{country}-{c},{sku},{stamp},{country}")
    lines.insert(40, "")                       # a blank line
    lines.insert(60, lines[59])                # an exact duplicate of the row before
    lines.insert(80, "ES-3,,2025-03-20T10:00:00+01:00,ES")   # a missing SKU (file line 81)
    path.write_text("\n".join(lines) + "\n")
    return len(lines) - 1 - 1                  # data rows, less the blank line


def test_own_data_from_prepare_to_recommend(tmp_path):
    orders, data = tmp_path / "orders.csv", tmp_path / "data"
    rows = _orders(orders)
    cols = ["--user-col", "customer", "--item-col", "sku", "--time-col", "ordered_at", "--domain-col", "country"]

    proc = run_cli("prepare", "--input", orders, "--format", "csv", *cols, "--timezone", "Europe/Rome",
                   "--out", data, check=False)
    assert proc.returncode == 2 and "orders.csv:81, field 'sku': empty value" in proc.stderr
    assert "--on-bad-rows skip" in proc.stderr and not data.exists()

    proc = run_cli("prepare", "--input", orders, "--format", "csv", *cols, "--timezone", "Europe/Rome",
                   "--on-bad-rows", "skip", "--out", data)
    assert "skipped 1 bad row(s)" in proc.stdout and "dropped 1 exact duplicate row(s)" in proc.stdout
    stats = json.loads((data / "stats.json").read_text())
    assert stats["interactions"] == rows - 2 and sorted(stats["domains"]) == sorted(COUNTRIES)
    assert json.loads((data / "meta.json").read_text())["options"]["timezone"] == "Europe/Rome"

    base = tmp_path / "base"
    quick = ["--set", "train.tensorboard=false", "--set", "train.log_every=1"]
    proc = run_cli("pretrain", "--preset", "tiny", "--data", data, "--domains", "DE,FR,IT,NL", "--out", base,
                   "--set", "train.max_steps=3", *quick)
    assert "pretrain done" in proc.stdout and "threads=" in proc.stdout
    assert json.loads((base / "metrics.json").read_text())["train"]["steps"] == 3

    adapters = tmp_path / "adapters"
    run_cli("finetune", "--base", base, "--data", data, "--domains", "ES,PT", "--method", "lora", "--out", adapters,
            "--set", "train.max_steps=2", *quick)
    manifest = json.loads((adapters / "manifest.json").read_text())
    assert set(manifest["domains"]) == {"ES", "PT"}
    assert all((adapters / d / "adapter_model.safetensors").is_file() for d in ("ES", "PT"))

    bundle = tmp_path / "bundle"
    run_cli("export", "--base", base, "--adapters", adapters, "--out", bundle)
    assert (bundle / "base" / "model.safetensors").is_file() and (bundle / "adapters" / "manifest.json").is_file()

    student = tmp_path / "student"
    proc = run_cli("distill", "--teacher", base, "--adapter", adapters / "ES", "--data", data, "--domain", "ES",
                   "--out", student, "--set", "train.max_steps=2", *quick)
    assert "of the teacher's" in proc.stdout and "sized from the teacher" in proc.stdout
    params = json.loads((student / "metrics.json").read_text())["params"]
    teacher = json.loads((base / "metrics.json").read_text())["params"]
    assert params["total"] < teacher["total"]

    proc = run_cli("recommend", "--bundle", bundle, "--domain", "ES", "--history", "SKU-3", "SKU-9", "--k", "5")
    answer = json.loads(proc.stdout)
    assert len(answer["items"]) == 5 and answer["source"] == "model" and answer["known_events"] == 2

    proc = run_cli("pretrain", "--preset", "tiny", "--data", data, "--domains", "DE,FR,IT,NL", "--out", base,
                   "--set", "train.max_steps=3", *quick, check=False)
    assert proc.returncode == 2 and "already holds a finished pretrain run" in proc.stderr
