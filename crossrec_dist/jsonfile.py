"""Read a JSON file someone may have edited, damaged or replaced: errors name the file, never trace back."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError


def read_json(path: str | Path, expect: type = dict, what: str = "a JSON object"):
    """The file's JSON, which must be an instance of ``expect`` (e.g. a dict, a list)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"not valid JSON: {e}", path=str(path)) from None
    if not isinstance(doc, expect):
        raise InputError(f"expected {what}, found {type(doc).__name__}", path=str(path))
    return doc
