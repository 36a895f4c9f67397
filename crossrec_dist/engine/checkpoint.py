"""Atomic, resumable, verified checkpoints around ``accelerator.save_state``.

A checkpoint is written to ``step_N.tmp`` and renamed to ``step_N`` only when every rank finished
writing, then ``latest`` is replaced atomically: a crash mid-save never leaves a ``latest`` that
points at a half-written folder. ``trainer_state.json`` carries what accelerate does not: step,
epoch, position in the epoch, best metric, patience counter.

Why a manifest. Our own files are JSON and safetensors (``trainer_state.json``,
``rng_rank*.safetensors``), but the libraries we save through write pickles:

* DeepSpeed: ``pytorch_model/*_model_states.pt`` and ``*_optim_states.pt``; DeepSpeed 0.19
  (``TorchCheckpointEngine.load``) and its ``zero_to_fp32`` (our resume on another world size) load
  them with torch's loader and ``weights_only=False``, i.e. plain pickle: loading one runs whatever
  code it names. It also leaves ``latest``, ``zero_to_fp32.py`` and ``zero_to_torch.py`` here.
* accelerate (1.15): ``optimizer.bin`` on the plain path, and on both paths
  ``random_states_<rank>.pkl`` (Python/numpy/torch RNG; ``save_accelerator_state`` always writes it,
  with no option to skip it). 1.15 loads these with ``weights_only=True`` plus an allow-list, but
  older versions did not, the RNG file is loaded inside a bare ``except`` (a damaged one is skipped
  silently), and ``custom_checkpoint_*.pkl`` are always ``weights_only=False``. We restore RNG
  from our own ``rng_rank*.safetensors``; the ``.pkl`` is loaded by ``load_state`` regardless, so it
  is covered by the manifest like every other file rather than patched out of accelerate.

So checkpoints are trusted input, and :func:`save` records what "the checkpoint we wrote" is: after
every rank wrote its files, the main rank writes ``manifest.json`` (every file's relative path,
size and sha256; streamed in 4 MiB chunks; written atomically) before the folder is renamed into
place. :func:`verify` runs on every rank before *any* file of a checkpoint is read (by
:func:`read_state`, :func:`load` and :func:`consolidated_weights`) and refuses, with an
:class:`~crossrec_dist.errors.InputError` naming the file, a missing manifest, a missing file, a
file not in the manifest (anything added to the folder after the save, e.g. the output of
``zero_to_fp32.py``: move it out), a symbolic link, a truncated file, or a file whose size or
sha256 changed since it was saved. A truncated shard thus fails with a clear message instead of
an unpickling traceback, and a pickle planted in place of a shard is never unpickled.

What it is not: a signature. Whoever can rewrite a checkpoint folder can rewrite its manifest
too; the manifest catches damage and swapped or added files, it does not make an untrusted
checkpoint safe to load. Only resume from checkpoints you (or your runs) wrote.

Checkpoints written before manifests existed are refused unless ``CROSSREC_TRUST_UNVERIFIED_CHECKPOINT=1``
is set (an explicit "I wrote this one"); a checkpoint *with* a manifest that does not match is
refused whatever that variable says.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file

from ..errors import InputError
from . import distributed as dist_info

STATE = "trainer_state.json"
MANIFEST = "manifest.json"
DS_TAG = "pytorch_model"   # the folder accelerate.save_state gives the DeepSpeed engine's shards
TRUST_ENV = "CROSSREC_TRUST_UNVERIFIED_CHECKPOINT"
CHUNK = 4 << 20            # bytes read at a time while hashing
TRUSTED = ("Checkpoints are trusted input: DeepSpeed and accelerate load parts of them with pickle, which "
           "can run code, so a checkpoint is loaded only if every file matches the manifest.json written "
           "when it was saved. Delete this checkpoint folder, or point --resume at another checkpoint.")

_verified: dict[str, tuple] = {}   # checkpoint folder -> stat signature it had when it last verified


def step_of(path: Path) -> int | None:
    """The step a ``step_N`` folder holds (None for any other name)."""
    name = path.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def complete_steps(root: Path) -> list[Path]:
    """The complete checkpoints under ``root`` (renamed into place, with a trainer state), by step."""
    found = [p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None and (p / STATE).is_file()]
    return sorted(found, key=step_of)


def latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names; None when there is no pointer (nothing saved yet).

    A pointer to a checkpoint that is not there is an error, not "start again": starting at step 0
    would then rotate the older checkpoints away, the very ones a user would resume from."""
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if (path / STATE).is_file():
        return path
    have = [p.name for p in complete_steps(root)]
    raise InputError(f"names checkpoint {name!r}, which is {'incomplete' if path.exists() else 'missing'}; "
                     + (f"complete checkpoints here: {', '.join(have)}: resume one with --resume {root}/{have[-1]}"
                        if have else "there is no complete checkpoint here: start again with --force")
                     + " (nothing was changed)", path=str(pointer), field="--resume")


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        return latest(root)
    path = Path(resume)
    if not (path / STATE).is_file():
        raise InputError(f"not a checkpoint (no {STATE})", path=str(path), field="--resume")
    return path


def save(accelerator, root: Path, state: dict, keep: int, per_rank=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{state['step']:08d}"
    tmp, final = root / (name + ".tmp"), root / name
    if dist_info.is_main() and tmp.exists():
        shutil.rmtree(tmp)
    dist_info.barrier()
    accelerator.save_state(str(tmp))   # every rank writes its own shard files
    if per_rank is not None:
        per_rank(tmp)                  # e.g. this rank's RNG state
    dist_info.barrier()
    if dist_info.is_main():
        (tmp / STATE).write_text(json.dumps(state, indent=2))
        write_manifest(tmp)            # last file written: it covers everything above
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ptr = root / "latest.tmp"
        ptr.write_text(name)
        os.replace(ptr, root / "latest")
        # Keep the newest ``keep`` checkpoints up to this one. Later steps (a resume from an earlier
        # checkpoint left them) are not this run's past and are left alone; this one is never removed.
        earlier = [p for p in complete_steps(root) if step_of(p) < state["step"]]
        for old in earlier[:len(earlier) - (keep - 1)] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist_info.barrier()
    return final


def load(accelerator, path: Path) -> dict:
    verify(path)
    try:
        accelerator.load_state(str(path))
    except RuntimeError as e:
        if "size mismatch" not in str(e) and "Missing key" not in str(e) and "Unexpected key" not in str(e):
            raise
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "key" in line), str(e))
        raise InputError(f"this checkpoint was written by a model of another size or layout ({first[:200]}); "
                         "resume with the preset and model settings of the run that wrote it, or train into "
                         "another --out", path=str(path), field="--resume") from None
    return read_state(path)


def check_shapes(path: Path, saved: dict, current: dict) -> None:
    """Refuse, naming the first parameter that differs, a checkpoint of another model (size, layers,
    vocabulary): loading it would fail deep inside accelerate / DeepSpeed with a size-mismatch trace."""
    if not saved:
        return                      # written before shapes were recorded: the load itself reports it
    for name in sorted(saved.keys() | current.keys()):
        a, b = saved.get(name), current.get(name)
        if a != b:
            what = (f"parameter {name} is {a} there and {b} in this model" if a and b else
                    f"parameter {name} is {'only in the checkpoint' if a else 'not in the checkpoint'}")
            raise InputError(f"this checkpoint was written by another model: {what}; resume with the preset and "
                             "model settings (--preset, --set model.*) of the run that wrote it, or train into "
                             "another --out", path=str(path), field="--resume")


def read_state(path: Path) -> dict:
    verify(path)
    return json.loads((path / STATE).read_text())


# ---- manifest ----
def _sha256(path: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _entries(folder: Path) -> tuple[dict[str, os.stat_result], list[str]]:
    """Every plain file under ``folder`` except the manifest ({relative posix path: stat}), and
    the relative paths of what is neither a plain file nor a folder (links, sockets...)."""
    files, odd = {}, []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for n in dirnames + filenames:
            p = base / n
            rel = p.relative_to(folder).as_posix()
            st = p.lstat()
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                odd.append(rel)
            elif n in filenames and rel != MANIFEST:
                files[rel] = st
    return files, sorted(odd)


def write_manifest(folder: Path) -> Path:
    """``manifest.json`` in ``folder``: relative path, size and sha256 of every file under it."""
    files, _ = _entries(folder)
    manifest = {"format": 1, "hash": "sha256",
                "files": [{"path": rel, "size": st.st_size, "sha256": _sha256(folder / rel)}
                          for rel, st in sorted(files.items())]}
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


def _signature(folder: Path, files: dict[str, os.stat_result]) -> tuple:
    """What a folder looks like to stat: any rewrite of a file (or the manifest) changes it."""
    stats = sorted({**files, MANIFEST: (folder / MANIFEST).stat()}.items())
    return tuple((rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for rel, st in stats)


def verify(path: Path) -> None:
    """Refuse (InputError naming the file) a checkpoint whose files are not exactly those its
    manifest lists, with the same sizes and sha256. Run on every rank before anything is loaded;
    a folder already verified in this process, unchanged since (stat), is not hashed again."""
    path = Path(path)

    def refuse(file, what):
        raise InputError(f"{what}. {TRUSTED}", path=str(file), field="--resume")

    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        if os.environ.get(TRUST_ENV) == "1":
            if dist_info.is_main():
                print(f"crossrec: warning: {path} has no {MANIFEST}; its files are loaded unchecked because "
                      f"{TRUST_ENV}=1", file=sys.stderr)
            return
        refuse(manifest_file,
               f"this checkpoint has no {MANIFEST}, so its files cannot be checked before they are loaded (it "
               f"was written by an older version, or by something else); if you wrote it yourself and trust "
               f"it, set {TRUST_ENV}=1 to load it unchecked")
    files, odd = _entries(path)
    if odd:
        refuse(path / odd[0], "is a symbolic link or special file; a checkpoint holds only plain files")
    key = str(path.resolve())
    if _verified.get(key) == _signature(path, files):
        return
    try:
        listed = json.loads(manifest_file.read_text())["files"]
        expected = {e["path"]: (int(e["size"]), str(e["sha256"])) for e in listed}
    except (OSError, ValueError, KeyError, TypeError) as e:
        refuse(manifest_file, f"unreadable manifest ({type(e).__name__}: {e})")
    for rel in sorted(expected.keys() - files.keys()):
        refuse(path / rel, "is missing: the manifest lists it but the checkpoint folder does not have it")
    for rel in sorted(files.keys() - expected.keys()):
        refuse(path / rel, "is not in the manifest: it was added to the checkpoint folder after the checkpoint "
                           "was saved (move it out if you put it there)")
    for rel in sorted(files):   # sizes first: cheap, and the common damage (a copy cut short)
        size, want = files[rel].st_size, expected[rel][0]
        if size < want:
            refuse(path / rel, f"is truncated: {size:,} bytes, {want:,} when it was saved")
        if size != want:
            refuse(path / rel, f"changed since it was saved: {size:,} bytes, {want:,} when it was saved")
    for rel in sorted(files):
        if _sha256(path / rel) != expected[rel][1]:
            refuse(path / rel, "changed since it was saved: its sha256 differs from the manifest's")
    _verified[key] = _signature(path, files)


def consolidated_weights(path: Path) -> dict:
    """The full fp32 weights of a checkpoint, whatever number of processes wrote it.

    This is what a resume on a *different* number of processes starts from: DeepSpeed's optimizer
    shards are laid out per rank and cannot be re-split, the weights can (DeepSpeed's own
    zero_to_fp32 merges the ZeRO-1/2/3 fp32 master shards).
    """
    verify(path)
    ds_dir = path / DS_TAG
    if ds_dir.is_dir():
        if any(ds_dir.glob("*optim_states.pt")):
            return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=DS_TAG)
        raise InputError("a DeepSpeed checkpoint without ZeRO optimizer shards (stage 0) cannot be resumed on "
                         "another number of processes; resume it on the world size that wrote it", path=str(ds_dir))
    weights = path / "model.safetensors"
    if weights.is_file():
        return load_file(str(weights))
    raise InputError("checkpoint holds neither DeepSpeed shards nor model.safetensors", path=str(path))
