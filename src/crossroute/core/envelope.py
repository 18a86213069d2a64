"""The result envelope: every results/*.json says what it is, which schema and crossroute wrote it, and with
which configuration, beside its data."""

from __future__ import annotations

import re
from typing import Any

SCHEMA_VERSION = 1
CROSSROUTE_VERSION = "0.1.0"
ENVELOPE_KEY = "envelope"


def result_kind(name: str) -> str:
    """The kind of a result from its file name: `damage_math` -> damage, `eval_01_math` -> eval."""
    return re.split(r"_", name, maxsplit=1)[0]


def envelope(name: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """The envelope of result `name`: kind, schema version, crossroute version, the full config and the thread
    policy it ran under (crossroute.core.threads)."""
    from crossroute.core.threads import current_policy

    return {"kind": result_kind(name), "name": name, "schema_version": SCHEMA_VERSION,
            "crossroute_version": CROSSROUTE_VERSION, "config": config or {}, "threads": current_policy()}


def wrap(name: str, data: Any, config: dict[str, Any] | None) -> dict[str, Any]:
    """A result dict with its envelope under ENVELOPE_KEY; the data's own keys stay at the top level so
    readers of earlier runs keep working. Non-dict data goes under "data"."""
    body = dict(data) if isinstance(data, dict) else {"data": data}
    body.pop(ENVELOPE_KEY, None)
    return {ENVELOPE_KEY: envelope(name, config), **body}


def unwrap(obj: Any) -> tuple[dict[str, Any] | None, Any]:
    """(envelope or None for results written before envelopes, data)."""
    if isinstance(obj, dict) and isinstance(obj.get(ENVELOPE_KEY), dict):
        data = {k: v for k, v in obj.items() if k != ENVELOPE_KEY}
        return obj[ENVELOPE_KEY], data.get("data", data) if list(data) == ["data"] else data
    return None, obj
