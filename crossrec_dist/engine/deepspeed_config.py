"""One DeepSpeed configuration for the run, whatever way the user asked for DeepSpeed.

Four ways reach us, and all must give a config DeepSpeed accepts without a data loader in
``accelerator.prepare`` (PITFALLS.md #12):

a. an ``accelerate config`` YAML with a ``deepspeed_config:`` block and no JSON file,
b. ``accelerate launch --use_deepspeed --zero_stage N [--offload_optimizer_device cpu ...]``,
c. ``--deepspeed_config_file FILE`` (or a launch YAML naming one, like ours in ``launch/``),
d. ``--set train.deepspeed=zero2|PATH`` (also without any launcher).

For a-c accelerate puts the settings in ``ACCELERATE_*`` environment variables; its own
``DeepSpeedPlugin()`` reads them, and we build the plugin the same way, then fill every ``"auto"``
with the run's real numbers. Accelerate would fill them from its own process count, which is wrong
on CPU (PITFALLS.md #9), and DeepSpeed refuses ``train_batch_size != micro * accum * world``.

Precedence (stated in docs/distributed.md):
* ``train.deepspeed`` (d) names the JSON explicitly and wins over a launcher's JSON or fields.
* Accumulation steps and gradient clipping: both accelerate and ``train.*`` default to 1 step and a
  norm of 1.0; whichever source differs from that default wins; two different non-default values
  stop the run naming both.
* Precision: ``train.mixed_precision: auto`` (or ``bf16_if_native``, which also picks bf16 on a CPU
  with AVX512-BF16 / AMX) takes the launcher's ``--mixed_precision`` (or the
  JSON's ``bf16``/``fp16.enabled``), else bf16 on a GPU that has it, else fp32; an explicit
  ``train.mixed_precision`` that contradicts an explicit launcher value is an error.
* Micro-batch and global batch: explicit JSON values must equal ``train.micro_batch_size`` and
  ``micro * accum * world``; say ``"auto"`` to take ours.
* ``zero3_init``: ``train.zero3_init`` if set, else the launcher's ``zero3_init_flag`` (accelerate's
  default: on for ZeRO-3).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "ds_configs"
DEFAULT_ACCUM, DEFAULT_CLIP = 1, 1.0     # accelerate's and TrainConfig's shared defaults


@dataclass
class RunSettings:
    """What the run will actually use, after every source was reconciled."""
    precision: str                  # no | bf16 | fp16
    grad_accum: int
    max_grad_norm: float
    ds_config: dict | None = None   # complete DeepSpeed config (no "auto" left), None without DeepSpeed
    plugin: object | None = None    # accelerate's DeepSpeedPlugin around ds_config
    zero3_init: bool = False        # build the model partitioned (deepspeed.zero.Init)
    source: str = "none"            # where the DeepSpeed config came from, for the log

    @property
    def zero_stage(self) -> int:
        return int((self.ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def resolve_path(name: str | None) -> Path | None:
    """A DeepSpeed JSON: an explicit path or a name in ds_configs/ (``zero2``); None for none/off."""
    if not name or name in ("none", "off"):
        return None
    p = Path(name)
    for cand in (p, REPO_CONFIGS / name, REPO_CONFIGS / f"{name}.json"):
        if cand.is_file():
            return cand
    raise InputError("DeepSpeed config not found", path=name, field="train.deepspeed")


def launcher_uses_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def resolve(cfg, *, world: int, hidden_size: int) -> RunSettings:
    """Reconcile ``cfg`` (a TrainConfig) with whatever the launcher asked for."""
    grad_accum = _pick_int("gradient accumulation steps", "train.grad_accum", cfg.grad_accum,
                           "the launcher's gradient_accumulation_steps",
                           os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"), DEFAULT_ACCUM)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    explicit = resolve_path(cfg.deepspeed)
    if cfg.deepspeed in ("none", "off") and launcher_uses_deepspeed():
        raise InputError("the launcher asks for DeepSpeed but train.deepspeed says off; drop one of them",
                         field="train.deepspeed")
    if explicit is None and not launcher_uses_deepspeed():
        precision = _precision(cfg.mixed_precision, launcher_precision, None)
        return RunSettings(precision=precision, grad_accum=grad_accum, max_grad_norm=cfg.max_grad_norm)

    plugin, source = _plugin(explicit)
    ds = plugin.deepspeed_config
    grad_accum = _pick_int("gradient accumulation steps", "train.grad_accum", grad_accum,
                           f"gradient_accumulation_steps of {source}", ds.get("gradient_accumulation_steps"),
                           DEFAULT_ACCUM)
    clip = _pick_float("gradient clipping", "train.max_grad_norm", cfg.max_grad_norm,
                       f"gradient_clipping of {source}", ds.get("gradient_clipping"), DEFAULT_CLIP)
    ds_precision = "bf16" if _enabled(ds.get("bf16")) else "fp16" if _enabled(ds.get("fp16")) else None
    precision = _precision(cfg.mixed_precision, launcher_precision, ds_precision)
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro != "auto" and int(micro) != cfg.micro_batch_size:
        raise InputError(f"train_micro_batch_size_per_gpu {micro} in {source} != train.micro_batch_size "
                         f"{cfg.micro_batch_size}; set one of them to the other (or \"auto\")",
                         field="train.micro_batch_size")
    want = cfg.micro_batch_size * grad_accum * world
    total = ds.get("train_batch_size", "auto")
    if total != "auto" and int(total) != want:
        raise InputError(f"train_batch_size {total} in {source} != micro {cfg.micro_batch_size} x accum "
                         f"{grad_accum} x world {world}; use \"auto\"", field="train_batch_size")
    ds.update(train_micro_batch_size_per_gpu=cfg.micro_batch_size, gradient_accumulation_steps=grad_accum,
              train_batch_size=want, gradient_clipping=clip)
    for key in ("bf16", "fp16"):
        ds[key] = {**(ds.get(key) or {}), "enabled": precision == key}
    zero = ds.setdefault("zero_optimization", {})
    h2 = hidden_size * hidden_size
    for key, value in (("reduce_bucket_size", h2), ("stage3_prefetch_bucket_size", int(0.9 * h2)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key, "auto") == "auto":
            zero[key] = value
    left = _autos(ds)
    if left:
        raise InputError(f"no value for \"auto\" key(s) {left} of {source}; give them a value", field=left[0])
    stage = int(zero.get("stage", 0))
    zero3_init = stage == 3 and (cfg.zero3_init if cfg.zero3_init is not None else bool(plugin.zero3_init_flag))
    plugin.zero3_init_flag = zero3_init
    return RunSettings(precision=precision, grad_accum=grad_accum, max_grad_norm=clip, ds_config=ds,
                       plugin=plugin, zero3_init=zero3_init, source=source)


def _plugin(explicit: Path | None):
    """accelerate's DeepSpeedPlugin, built from the explicit JSON or from the launcher's environment."""
    # Here, not at the top: a recipe check imports this module (resolve_path) and must not pay
    # accelerate's 2.5 s (tests/test_layers.py: the light layer).
    from accelerate.utils import DeepSpeedPlugin
    if explicit is not None:
        source, hf_ds_config = str(explicit), _read_json(explicit)
    elif os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none") != "none":
        path = Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
        source, hf_ds_config = str(path), _read_json(path)
    else:
        source, hf_ds_config = "the accelerate launcher's DeepSpeed settings", None
    try:
        plugin = DeepSpeedPlugin(hf_ds_config=hf_ds_config)
    except (ValueError, TypeError) as e:
        raise InputError(f"accelerate refused the DeepSpeed settings: {e}", path=source) from None
    return plugin, source


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise InputError("DeepSpeed config not found", path=str(path), field="deepspeed_config_file")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(f"invalid JSON: {e}", path=str(path)) from None
    if not isinstance(data, dict) or "zero_optimization" not in data:
        raise InputError("a DeepSpeed config needs a zero_optimization section", path=str(path),
                         field="zero_optimization")
    return data


def _pick_int(what, ours_name, ours, theirs_name, theirs, default) -> int:
    if theirs in (None, "auto", "none", ""):
        return ours
    try:
        theirs = int(theirs)
    except ValueError:
        raise InputError(f"{theirs_name} is not an integer: {theirs!r}", field=ours_name) from None
    return _reconcile(what, ours_name, ours, theirs_name, theirs, default)


def _pick_float(what, ours_name, ours, theirs_name, theirs, default) -> float:
    if theirs in (None, "auto", "none", ""):
        return ours
    try:
        theirs = float(theirs)
    except (TypeError, ValueError):
        raise InputError(f"{theirs_name} is not a number: {theirs!r}", field=ours_name) from None
    return _reconcile(what, ours_name, ours, theirs_name, theirs, default)


def _reconcile(what, ours_name, ours, theirs_name, theirs, default):
    if theirs == ours or theirs == default:
        return ours
    if ours == default:
        return theirs
    raise InputError(f"two {what} values: {ours_name}={ours} and {theirs_name}={theirs}; "
                     f"give it in one place only", field=ours_name)


def _enabled(section) -> bool:
    return isinstance(section, dict) and section.get("enabled") is True


def native_bf16() -> bool:
    """Whether this process computes bf16 in hardware: a CUDA GPU with bf16, or (no GPU) a CPU with
    AVX512-BF16 or AMX, where oneDNN runs bf16 matrix products faster than fp32 (pretraining the
    medium preset, same loss to 4 digits: 225 vs 115 samples/s on a 2-core EPYC, 232 vs 184 on a
    2-core Xeon with AMX; benchmarks/RESULTS.md §2.5). Elsewhere bf16 on a CPU is emulated and slower
    than fp32."""
    import torch   # training only; a recipe check imports this module without torch (2.6 s)
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    return any(bool(getattr(cpu, name, lambda: False)()) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def _precision(ours: str, launcher: str, ds: str | None) -> str:
    theirs = ds or (launcher if launcher not in ("no", "", None) else None)
    if ours in ("auto", "bf16_if_native"):
        if theirs:
            return theirs
        import torch   # training only; a recipe check imports this module without torch (2.6 s)
        if ours == "bf16_if_native":
            return "bf16" if native_bf16() else "no"
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if theirs and theirs != ours:
        raise InputError(f"train.mixed_precision={ours} but the launcher / DeepSpeed config asks for {theirs}; "
                         "give it in one place only", field="train.mixed_precision")
    return ours


def _autos(node, prefix="") -> list[str]:
    out = []
    for k, v in node.items():
        if isinstance(v, dict):
            out += _autos(v, prefix + k + ".")
        elif v == "auto":
            out.append(prefix + k)
    return out
