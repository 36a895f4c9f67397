"""Live adapter uploads: a zip of an adapter folder, unpacked where the server chooses, then checked.

Nothing from the request becomes a path: the archive's member names must be one of the files an
adapter folder holds (``ALLOWED``), the folder it lands in is named by the server, and the region
name only ever becomes a manifest key. ``zip_adapter`` builds the archive ``crossrec push-adapter``
sends.
"""
from __future__ import annotations

import hmac
import io
import json
import os
import shutil
import uuid
import zipfile
from pathlib import Path

from ..errors import InputError
from ..export.adapters import TABLE_ADAPTER
from ..export.manifest import MANIFEST

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "crossrec_adapter.json", "items.json",
                 "popularity.json", "metrics.json", "README.md")
ALLOWED = set(ADAPTER_FILES) | {f"{TABLE_ADAPTER}/{n}" for n in ("adapter_config.json", "adapter_model.safetensors")}
TOKEN_ENV = "CROSSREC_ADMIN_TOKEN"


def read_token(token_file: str | None) -> str | None:
    """The admin token: the file's first line, else $CROSSREC_ADMIN_TOKEN, else None (admin disabled)."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise InputError("no such token file", path=str(path), field="--admin-token-file")
        token = path.read_text().strip().splitlines()[0].strip() if path.read_text().strip() else ""
        if len(token) < 16:
            raise InputError("the admin token must be at least 16 characters", path=str(path),
                             field="--admin-token-file")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and len(token) < 16:
        raise InputError("the admin token must be at least 16 characters", field=TOKEN_ENV)
    return token or None


def token_matches(expected: str, authorization: str | None) -> bool:
    if not authorization or not authorization.startswith("Bearer "):
        return False
    return hmac.compare_digest(expected.encode(), authorization[len("Bearer "):].strip().encode())


def zip_adapter(folder: str | Path) -> bytes:
    """The adapter folder's files (those in ``ALLOWED``) as a zip, in memory."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise InputError("not an adapter folder (no adapter_config.json)", path=str(folder), field="--adapter")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name in sorted(ALLOWED):
            if (folder / name).is_file():
                z.write(folder / name, name)
    return buf.getvalue()


def unpack_adapter(data: bytes, root: Path) -> Path:
    """Unpack an uploaded zip into a new folder under ``root`` (named here); InputError for anything
    that is not an adapter folder's files."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile as e:
        raise InputError(f"the body is not a zip archive of an adapter folder ({e})", field="body") from None
    unexpected = [n for n in names if n not in ALLOWED]
    if unexpected:
        raise InputError(f"unexpected file(s) in the archive: {unexpected[:5]}; an adapter archive holds only "
                         f"{sorted(ALLOWED)}", field="body")
    if "adapter_config.json" not in names or "adapter_model.safetensors" not in names:
        raise InputError("the archive needs adapter_config.json and adapter_model.safetensors", field="body")
    target = root / f".incoming-{uuid.uuid4().hex}"
    (target / TABLE_ADAPTER).mkdir(parents=True)
    try:
        for name in names:
            with archive.open(name) as src, open(target / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        shutil.rmtree(target, ignore_errors=True)
        raise InputError(f"cannot unpack the archive: {e}", field="body") from None
    if not any((target / TABLE_ADAPTER).iterdir()):
        (target / TABLE_ADAPTER).rmdir()
    return target


def record_in_manifest(root: Path, region: str, folder_name: str, info: dict) -> None:
    """The region now served from ``root/folder_name``: written to manifest.json (atomically), so a
    restarted server serves what the running one does."""
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["domains"][region] = {"path": folder_name, "method": info.get("method"), "kind": "adapter",
                                   "params": info.get("params"), "valid": info.get("valid"), "test": info.get("test"),
                                   "new_items": info.get("new_items", 0), "live": True}
    tmp = path.with_name(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)
