"""JSONL reading with one-line errors naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossroute.core.errors import CrossrouteError


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CrossrouteError(f"{path}: not UTF-8 text; a JSONL domain is one JSON object per line.") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CrossrouteError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
        except RecursionError:
            raise CrossrouteError(f"{path}:{lineno}: nested too deeply to read as JSON; flatten the row.") from None
        if not isinstance(obj, dict):
            raise CrossrouteError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field.")
        yield lineno, obj
