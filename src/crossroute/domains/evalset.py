"""Eval sets pinned in a run directory: drawn once (stratified), written to RUN/eval_sets/, read by every later
command, so all of a run's checkpoints, repairs and analyses score exactly the same prompts.

A resumed run, or a later `rollback`/`eval --eval-set RUN`, reads the files back instead of drawing again, so a
changed generator, data file or crossroute version cannot silently change what a run is scored on.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from crossroute.core.atomic import atomic_write_json, atomic_write_text
from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import Example
from crossroute.domains.domain import Domain

EVAL_SETS = "eval_sets"
MIX_TOLERANCE = 0.05  # largest share difference per stratum between the set and a 100-prompt set before warning
REFERENCE_N = 100


def example_json(e: Example) -> dict[str, Any]:
    """An Example as one JSON object (every field, so it reads back identical)."""
    d = asdict(e)
    d["answers"] = list(e.answers)
    d["messages"] = [dict(m) for m in e.messages] if e.messages is not None else None
    return d


def example_from_json(d: dict[str, Any], where: str) -> Example:
    """The Example `example_json` wrote; a malformed line names its file and line."""
    try:
        msgs = d.get("messages")
        return Example(str(d["prompt"]), str(d["answer"]), d.get("rubric"), d.get("split"),
                       tuple(d.get("answers") or ()), str(d.get("tests", "")), str(d.get("entry_point", "")),
                       tuple(dict(m) for m in msgs) if msgs else None, str(d.get("id", "")),
                       str(d.get("where", "")), str(d.get("stratum", "")))
    except (KeyError, TypeError, AttributeError) as e:
        raise CrossrouteError(f"{where}: not an eval-set row ({e}); delete {EVAL_SETS}/ to draw the sets again.") \
            from None


def _digest(rows: list[str]) -> str:
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def _stratum_of(d: Domain, e: Example) -> str:
    return e.stratum or (d.stratum(e) if d.stratum is not None else "")


def _mix_shift(d: Domain, exs: list[Example], strata: dict[str, int]) -> float:
    """The largest difference of a stratum's share between `exs` and the domain's 100-prompt eval set (0 when the
    domain has no strata or the set is no larger): how far capacity limits moved the mix."""
    if not strata or len(exs) <= REFERENCE_N:
        return 0.0
    ref = Counter(_stratum_of(d, e) for e in d.examples("eval", REFERENCE_N))
    total = sum(ref.values()) or 1
    keys = set(ref) | set(strata)
    return round(max(abs(strata.get(k, 0) / len(exs) - ref.get(k, 0) / total) for k in keys), 4)


def write_eval_sets(root: Path, domains: list[Domain], n: int) -> dict[str, Any]:
    """Draw each domain's eval set of (up to) n prompts and write RUN/eval_sets/<name>.jsonl plus a manifest
    (counts per stratum, a digest); warns when a domain has fewer than n eval prompts."""
    manifest: dict[str, Any] = {"n": n, "domains": {}}
    for d in domains:
        exs = d.examples("eval", n)
        rows = [json.dumps(example_json(e), ensure_ascii=False, sort_keys=True) for e in exs]
        atomic_write_text(root / EVAL_SETS / f"{d.name}.jsonl", "\n".join(rows) + ("\n" if rows else ""))
        counts = Counter(_stratum_of(d, e) for e in exs)
        strata = dict(sorted(counts.items())) if set(counts) - {""} else {}
        shift = _mix_shift(d, exs, strata)
        manifest["domains"][d.name] = {"n": len(exs), "strata": strata, "mix_shift": shift, "sha256_16": _digest(rows)}
        if shift > MIX_TOLERANCE:
            warnings.warn(f"domain {d.name}: at n = {n} the stratum mix differs from a small eval set's by "
                          f"{100 * shift:.0f} points (a stratum ran out of distinct prompts; see "
                          f"{EVAL_SETS}/manifest.json): scores at this n are not comparable with smaller n.",
                          stacklevel=2)
        if len(exs) < n:
            warnings.warn(f"domain {d.name}: only {len(exs)} eval prompts (asked for {n}); its CIs are wider than "
                          "planned.", stacklevel=2)
    atomic_write_json(root / EVAL_SETS / "manifest.json", manifest)
    return manifest


def read_eval_set(root: Path, name: str) -> list[Example] | None:
    """The eval set pinned for domain `name` in run `root` (None when the run has none for it)."""
    path = root / EVAL_SETS / f"{name}.jsonl"
    if not path.exists():
        return None
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                raw = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise CrossrouteError(f"{path}:{i}: invalid JSON; delete {root / EVAL_SETS} to draw the sets "
                                      "again.") from None
            out.append(example_from_json(raw, f"{path}:{i}"))
    return out


def pinned(domain: Domain, examples: list[Example]) -> Domain:
    """A copy of `domain` whose eval split is exactly `examples` (in this order)."""
    return replace(domain, eval_fixed=list(examples), _cache={})


def with_eval_sets(root: Path, domains: list[Domain]) -> list[Domain]:
    """`domains` with the eval sets pinned in run `root` where it has one (others unchanged)."""
    out = []
    for d in domains:
        exs = read_eval_set(root, d.name)
        out.append(d if exs is None else pinned(d, exs))
    return out


def pin_eval_sets(root: Path, domains: list[Domain], n: int) -> list[Domain]:
    """The run's eval sets: read back when the run has them (a resume), drawn and written otherwise. A pinned
    set smaller than n that could be larger is refused, so a resumed run never scores different prompts."""
    missing = [d for d in domains if read_eval_set(root, d.name) is None]
    if missing:
        write_eval_sets(root, missing, n)
    out = with_eval_sets(root, domains)
    for d in out:
        have = len(d.eval_fixed or [])
        if have < n and len(replace(d, eval_fixed=None, _cache={}).examples("eval", n)) > have:
            raise CrossrouteError(f"{root / EVAL_SETS / (d.name + '.jsonl')}: pins {have} prompts but this run asks "
                                  f"for eval_n {n}; use a new output directory (or the old eval_n).")
    return out
