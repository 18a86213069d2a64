"""Config files: read a YAML mapping and validate it with pydantic, errors naming the file and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from crossroute.core.errors import CrossrouteError

M = TypeVar("M", bound=BaseModel)


def load_yaml_mapping(path: str | Path, example: str, top_level: str) -> dict[str, Any]:
    """The YAML file at `path` as a mapping; `example` names a shipped config to copy from."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such config file; see {example} for an example.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CrossrouteError(f"{path}: invalid YAML ({str(e).splitlines()[0]}).") from None
    if not isinstance(raw, dict):
        raise CrossrouteError(f"{path}: expected a mapping ({top_level}, ...) at the top level.")
    return raw


def validate_config(cls: type[M], raw: dict[str, Any], where: str, domains_field: str) -> M:
    """`cls` validated from `raw`; the first error becomes one line naming `where` and the field."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        raise CrossrouteError(f"{where}: field {loc}: {msg}" if loc else f"{where}: {msg}") from None
    except CrossrouteError as e:  # a domain spec that does not resolve
        raise CrossrouteError(f"{where}: field {domains_field}: {e}") from None


def parse_layers(spec: str, flag: str = "--layers") -> list[int]:
    """'28-35,40' -> [28, ..., 35, 40]: decoder-layer indices (sorted, unique) from a CLI range list."""
    out: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise CrossrouteError(f"{flag} {spec!r}: {part!r} is not a layer index or range; write e.g. "
                                  "28-35 or 0,4,8.") from None
        if a < 0 or b < a:
            raise CrossrouteError(f"{flag} {spec!r}: range {part!r} is empty or negative; write LOW-HIGH with "
                                  "0 <= LOW <= HIGH.")
        out.update(range(a, b + 1))
    return sorted(out)
