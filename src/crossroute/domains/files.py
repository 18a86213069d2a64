"""Domains: deterministic prompt generators, TRL-shaped rewards and per-example scoring.

Built in (the embedded default's synthetic world, DESIGN.md section 4): `math`, `code`, `qa`, `cw`.
They share skills on purpose: math and code both compute, qa and cw both spell words from one lexicon.
Real domains load from local JSONL files (prompt + answer, or prompt + rubric).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import RUBRIC_KEYS, SPLITS, Domain, Example
from crossroute.domains.builtin import BUILTIN
from crossroute.domains.jsonl import iter_jsonl

# ----------------------------------------------------------------------------- rubric scoring





# ----------------------------------------------------------------------------- domain type

ScoreFn = Callable[[Example, str], float]




# ----------------------------------------------------------------------------- built-in world


























# ----------------------------------------------------------------------------- JSONL domains



def _validate_row(path: Path, lineno: int, obj: dict[str, Any]) -> Example:
    where = f"{path}:{lineno}"
    unknown = set(obj) - {"prompt", "answer", "rubric", "split", "id"}
    if unknown:
        raise CrossrouteError(f"{where}: unknown field {sorted(unknown)[0]!r}; allowed: prompt, answer, rubric, "
                              "split, id.")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CrossrouteError(f"{where}: field 'prompt' must be a non-empty string.")
    has_answer, has_rubric = "answer" in obj, "rubric" in obj
    if has_answer == has_rubric:
        raise CrossrouteError(f"{where}: give exactly one of field 'answer' (string) or 'rubric' (object).")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise CrossrouteError(f"{where}: field 'split' must be 'train' or 'eval', got {split!r}.")
    if has_answer:
        if not isinstance(obj["answer"], str | int | float) or isinstance(obj["answer"], bool):
            raise CrossrouteError(f"{where}: field 'answer' must be a string.")
        return Example(prompt, str(obj["answer"]), None, split)
    rubric = obj["rubric"]
    if not isinstance(rubric, dict) or not rubric:
        raise CrossrouteError(f"{where}: field 'rubric' must be a non-empty object of rules "
                              f"({', '.join(sorted(RUBRIC_KEYS))}).")
    bad = set(rubric) - RUBRIC_KEYS
    if bad:
        raise CrossrouteError(f"{where}: field 'rubric.{sorted(bad)[0]}' unknown; rules: "
                              f"{', '.join(sorted(RUBRIC_KEYS))}.")
    for key in ("n_words", "min_words", "max_words"):
        if key in rubric and (not isinstance(rubric[key], int) or isinstance(rubric[key], bool) or rubric[key] < 0):
            raise CrossrouteError(f"{where}: field 'rubric.{key}' must be a non-negative integer.")
    for key in ("must_include", "must_exclude"):
        if key in rubric and not (isinstance(rubric[key], list) and all(isinstance(w, str) for w in rubric[key])):
            raise CrossrouteError(f"{where}: field 'rubric.{key}' must be a list of strings.")
    if "starts_with" in rubric and not (isinstance(rubric["starts_with"], str) and rubric["starts_with"]):
        raise CrossrouteError(f"{where}: field 'rubric.starts_with' must be a non-empty string.")
    if "lexicon" in rubric and not (rubric["lexicon"] is True or isinstance(rubric["lexicon"], list)):
        raise CrossrouteError(f"{where}: field 'rubric.lexicon' must be true or a list of words.")
    return Example(prompt, str(obj.get("id", "")), rubric, split)


def load_jsonl_domain(path: str | Path, name: str | None = None) -> Domain:
    """A domain from a local JSONL file; every line is validated, errors name file, line and field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such JSONL file; give a domain name ({', '.join(BUILTIN)}) or a path.")
    rows = [_validate_row(path, lineno, obj) for lineno, obj in iter_jsonl(path)]
    if not rows:
        raise CrossrouteError(f"{path}: empty; a JSONL domain needs at least one line with a 'prompt'.")
    kinds = {e.rubric is not None for e in rows}
    if len(kinds) > 1:
        raise CrossrouteError(f"{path}: mixes 'answer' and 'rubric' lines; use one kind per domain file.")
    seen: dict[str, int] = {}
    for i, e in enumerate(rows):
        if e.prompt in seen:
            raise CrossrouteError(f"{path}: line {i + 1} repeats the prompt of line {seen[e.prompt] + 1}; "
                                  "prompts must be unique so train and eval never share one.")
        seen[e.prompt] = i
    kind = "rubric" if kinds.pop() else "exact"
    longest = max(len(e.answer) for e in rows) if kind == "exact" else 64
    return Domain(name or path.stem, f"JSONL domain from {path}", fixed=rows, kind=kind,
                  max_new_tokens=max(8, min(512, 2 * longest)), source=str(path))


def _is_code_jsonl(path: Path) -> bool:
    """A JSONL whose first object has a 'tests' field is a code domain (executed in the sandbox)."""
    try:
        for _, obj in iter_jsonl(path):
            return "tests" in obj
    except (CrossrouteError, OSError):
        return False  # the regular loader reports the error with file and line
    return False


def load_domain_file(path: str | Path, name: str | None = None) -> Domain:
    """A JSONL domain: code (prompt + tests, sandboxed) or prompt + answer / prompt + rubric."""
    path = Path(path).expanduser()
    if path.is_file() and _is_code_jsonl(path):
        from crossroute.domains.code import load_code_domain

        return load_code_domain(path, name)
    return load_jsonl_domain(path, name)


def get_domain(spec: str) -> Domain:
    """Resolve a domain spec: a built-in name, a JSONL path, or NAME=PATH."""
    spec = spec.strip()
    if spec in BUILTIN:
        return BUILTIN[spec]
    if "=" in spec:
        name, path = spec.split("=", 1)
        return load_domain_file(path, name.strip())
    if spec.endswith(".jsonl") or "/" in spec:
        return load_domain_file(spec)
    raise CrossrouteError(f"unknown domain {spec!r}; use one of {', '.join(BUILTIN)}, a .jsonl path, or NAME=PATH.")


def parse_domains(specs: str | list[str]) -> list[Domain]:
    """Parse a comma-separated list (or list) of domain specs, refusing empties and duplicates."""
    items = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise CrossrouteError("no domains given; pass e.g. --domains math,code,qa,cw.")
    doms = [get_domain(s) for s in items]
    names = [d.name for d in doms]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise CrossrouteError(f"domain {dup!r} given twice in --domains.")
    return doms


def as_domains(spec: Sequence[Domain | str] | Domain | str | None) -> list[Domain]:
    """Domains from a comma-separated string, a list of specs or Domain objects, or one Domain; None gives []."""
    if spec is None:
        return []
    if isinstance(spec, Domain):
        return [spec]
    if isinstance(spec, str):
        return parse_domains(spec) if spec.strip() else []
    return [d if isinstance(d, Domain) else get_domain(d) for d in spec]
