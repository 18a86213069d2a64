"""`crossroute rescore`: score saved completions again with a (changed) verifier, without new generations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crossroute.core.atomic import atomic_write_text, finite_or_none
from crossroute.core.errors import CrossrouteError
from crossroute.domains.domain import Domain
from crossroute.domains.jsonl import iter_jsonl
from crossroute.measure.evaluate import record_example


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Eval records (one JSON object per line, as results/eval_<name>.jsonl holds them)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such records file; eval writes them to RUN/results/eval_<name>.jsonl.")
    out = []
    for lineno, rec in iter_jsonl(path):
        if not isinstance(rec.get("completion"), str):
            raise CrossrouteError(f"{path}:{lineno}: field 'completion' must be a string (an eval record).")
        out.append(rec)
    if not out:
        raise CrossrouteError(f"{path}: no records.")
    return out


def rescore(records: list[dict[str, Any]], domain: Domain, where: str = "records") -> list[dict[str, Any]]:
    """The records scored again by `domain`'s scorer (thinking removed as the domain says); old score kept.

    When the records hold several domains, only those named like `domain` are scored."""
    names = {str(r.get("domain", "")) for r in records}
    chosen = [r for r in records if r.get("domain") == domain.name] if len(names) > 1 else records
    if not chosen:
        raise CrossrouteError(f"{where}: no records of domain {domain.name!r}; the file holds "
                              f"{', '.join(sorted(names))}; pass NAME=SPEC with one of those names.")
    samples = [r["completions"] if isinstance(r.get("completions"), list) else [r["completion"]] for r in chosen]
    flat = domain.score_batch([record_example(r) for r, cs in zip(chosen, samples, strict=True) for _ in cs],
                              [c for cs in samples for c in cs])
    out, pos = [], 0
    for r, cs in zip(chosen, samples, strict=True):
        v = flat[pos : pos + len(cs)]
        pos += len(cs)
        new = {**r, "previous_score": r.get("score"), "score": sum(v) / len(v), "scorer": domain.kind}
        if len(cs) > 1:
            new["previous_scores"], new["scores"] = r.get("scores"), v
        out.append(new)
    return out


def write_rescored(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """The re-scored records, one JSON object per line, written atomically."""
    lines = [json.dumps(finite_or_none(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records]
    return atomic_write_text(path, "".join(lines))
