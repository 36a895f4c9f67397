"""Folder layout of an experiment folder OUT, read by the runner (which writes it) and the report.

    raw/ (raw/NAME/ per data source)  data/ (stats.json)  pretrain/  configs/  timings.json
    targets/T/RUN/ -- RUN is METHOD, METHOD.fracF, METHOD.seedS or METHOD.fracF.seedS; the students
                      student_kd/ and student_ce/ (with serving.json)
    steps/STEP.json -- a step's record (steps/finetune/T/RUN.json, ...); logs/STEP.log with --jobs
"""
from __future__ import annotations

from pathlib import Path

from ..methods import get_method
from ..paths import inside


def run_folder(method: str, seeds: list[int], seed: int, fraction: float = 1.0) -> str:
    """``METHOD`` for all users and the first seed, then ``.fracF`` for a share of the users and
    ``.seedS`` for another seed."""
    return method + ("" if fraction == 1.0 else f".frac{fraction:g}") + ("" if seed == seeds[0] else f".seed{seed}")


def runs_of(recipe, method: str) -> list[tuple[float, int]]:
    """(fraction, seed) of every fine-tuning run of ``method``: once when the method does not depend
    on the seed (zero-shot); else at every seed, and at the fractions below 1 when in ``fraction_methods``."""
    if not get_method(method).seeded:
        return [(1.0, recipe.seeds[0])]
    fractions = [f for f in recipe.fractions if f == 1.0 or method in recipe.fraction_methods]
    if 1.0 not in fractions:
        fractions.append(1.0)
    return [(f, s) for f in sorted(fractions, reverse=True) for s in recipe.seeds]


def target_dir(out: Path, target: str, run: str) -> Path:
    """``OUT/targets/TARGET/RUN``, inside OUT whatever the names are."""
    return inside(out, "targets", target, run)


def record_path(out: Path, parts: tuple[str, ...]) -> Path:
    """A step's record, ``OUT/steps/<parts>.json``."""
    return inside(out / "steps", *parts[:-1], f"{parts[-1]}.json")


def log_path(out: Path, parts: tuple[str, ...]) -> Path:
    """A side-by-side step's output, ``OUT/logs/<parts>.log``."""
    return inside(out / "logs", *parts[:-1], f"{parts[-1]}.log")
