"""Resolving domains: a built-in name, a domain spec (YAML), a native JSONL file, or NAME=PATH.

Built in (the embedded default's synthetic world, DESIGN.md section 4): `math`, `code`, `qa`, `cw`.
A native JSONL file holds crossroute's own columns (prompt + answer, prompt + rubric, or prompt + tests);
any other dataset is read through a domain spec's field mapping (crossroute.domains.spec).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import RUBRIC_KEYS, SPLITS, Example
from crossroute.domains.builtin import BUILTIN
from crossroute.domains.domain import Domain
from crossroute.domains.jsonl import iter_jsonl

# ----------------------------------------------------------------------------- native JSONL files

def _validate_row(path: Path, lineno: int, obj: dict[str, Any]) -> Example:
    where = f"{path}:{lineno}"
    unknown = set(obj) - {"prompt", "answer", "rubric", "split", "id"}
    if unknown:
        raise CrossrouteError(f"{where}: unknown field {sorted(unknown)[0]!r}; allowed: prompt, answer, rubric, "
                              "split, id (another dataset's columns: declare a domain spec with fields:, see README "
                              "'Your own data').")
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
        return Example(prompt, str(obj["answer"]), None, split, id=str(obj.get("id", "")), where=where)
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
    return Example(prompt, str(obj.get("id", "")), rubric, split, id=str(obj.get("id", "")), where=where)


_CODE_FIELDS = ("prompt", "tests", "answer", "entry_point", "split", "id")


def _validate_code_row(path: Path, lineno: int, obj: dict[str, Any]) -> Example:
    where = f"{path}:{lineno}"
    unknown = set(obj) - set(_CODE_FIELDS)
    if unknown:
        raise CrossrouteError(f"{where}: unknown field {sorted(unknown)[0]!r}; allowed: {', '.join(_CODE_FIELDS)} "
                              "(another dataset's columns: declare a domain spec with fields:).")
    for key in ("prompt", "tests"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise CrossrouteError(f"{where}: field {key!r} must be a non-empty string.")
    for key in ("answer", "entry_point"):
        if key in obj and not isinstance(obj[key], str):
            raise CrossrouteError(f"{where}: field {key!r} must be a string.")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise CrossrouteError(f"{where}: field 'split' must be 'train' or 'eval', got {split!r}.")
    return Example(obj["prompt"], obj.get("answer", ""), None, split, tests=obj["tests"],
                   entry_point=obj.get("entry_point", ""), id=str(obj.get("id", "")), where=where)


def _is_code_jsonl(path: Path) -> bool:
    """A JSONL whose first object has a 'tests' field is a code domain (executed in the sandbox)."""
    try:
        for _, obj in iter_jsonl(path):
            return "tests" in obj
    except (CrossrouteError, OSError):
        return False  # the regular loader reports the error with file and line
    return False


def load_jsonl_domain(path: str | Path, name: str | None = None) -> Domain:
    """A domain from a native JSONL file (prompt + answer, prompt + rubric, or prompt + tests); every line is
    validated and checked by the scorer, errors name file, line and field."""
    from crossroute.domains.scorers import make_scorer
    from crossroute.domains.spec import DEFAULT_MAX_NEW_TOKENS

    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such JSONL file; give a domain name ({', '.join(BUILTIN)}), a domain spec "
                              "(.yaml) or a data file.")
    code = _is_code_jsonl(path)
    check = _validate_code_row if code else _validate_row
    rows = [check(path, lineno, obj) for lineno, obj in iter_jsonl(path)]
    if not rows:
        raise CrossrouteError(f"{path}: empty; a JSONL domain needs at least one line with a 'prompt'.")
    kinds = {e.rubric is not None for e in rows}
    if len(kinds) > 1:
        raise CrossrouteError(f"{path}: mixes 'answer' and 'rubric' lines; use one kind per domain file.")
    seen: dict[str, str] = {}
    for e in rows:
        if e.prompt in seen:
            raise CrossrouteError(f"{e.where}: field 'prompt' repeats the prompt of line {seen[e.prompt]}; "
                                  "prompts must be unique so train and eval never share one.")
        seen[e.prompt] = e.where.rsplit(":", 1)[-1]
    kind = "code" if code else ("rubric" if kinds.pop() else "exact")
    scorer = make_scorer(kind)
    for e in rows:
        scorer.check(e)
    if kind == "exact":
        budget = max(8, min(512, 2 * max(len(e.answer) for e in rows)))
    else:
        budget = DEFAULT_MAX_NEW_TOKENS[kind]
    return Domain(name or path.stem, f"{kind} domain from {path}", fixed=rows, kind=kind, max_new_tokens=budget,
                  source=str(path), scorer=scorer)


def _spec_path(path: str) -> bool:
    return path.lower().endswith((".yaml", ".yml"))


def load_domain_file(path: str | Path, name: str | None = None) -> Domain:
    """A domain from a file: a domain spec (.yaml), a native JSONL, or any data file read with default fields."""
    from crossroute.domains.spec import DomainSpec, build_domain, load_spec_file

    p = str(path)
    if _spec_path(p):
        spec = load_spec_file(p)
        return build_domain(spec, name or spec.name)
    if p.lower().endswith(".jsonl"):
        return load_jsonl_domain(p, name)
    return build_domain(DomainSpec(file=p), name or Path(p).stem)


def get_domain(spec: str) -> Domain:
    """Resolve a domain spec string: a built-in name, a file (.yaml spec, .jsonl, .json, .parquet, .csv), or
    NAME=PATH."""
    spec = spec.strip()
    if spec in BUILTIN:
        return BUILTIN[spec]
    if "=" in spec:
        name, path = spec.split("=", 1)
        return load_domain_file(path.strip(), name.strip())
    if _looks_like_path(spec):
        return load_domain_file(spec)
    raise CrossrouteError(f"unknown domain {spec!r}; use one of {', '.join(BUILTIN)}, a domain spec (.yaml), a data "
                          "file, or NAME=PATH.")


def domains_field(value: Any) -> dict[str, Any]:
    """A config's `domains:` as {name: DomainSpec | spec string}, from a list (names, files, NAME=PATH) or a
    mapping (name -> spec mapping, spec file, data file or built-in name)."""
    from crossroute.domains.spec import DomainSpec

    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for name, v in value.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"domain names must be non-empty strings, got {name!r}")
            if isinstance(v, DomainSpec):
                out[name] = v
            elif isinstance(v, dict):
                out[name] = DomainSpec.model_validate({**v, "name": v.get("name", name)})
            elif isinstance(v, str) and (v.strip() in BUILTIN or _looks_like_path(v.strip())):
                out[name] = v.strip()
            elif v is None and name in BUILTIN:
                out[name] = name
            else:
                raise ValueError(f"domains.{name}: give a spec mapping, a spec/data file path or a built-in name")
        return out
    if isinstance(value, list | tuple):
        out = {}
        for item in value:
            if not isinstance(item, str) or not item.strip():
                raise ValueError(f"domains: entry {item!r} is not a domain name, file or NAME=PATH")
            item = item.strip()
            if "=" in item:
                name, path = item.split("=", 1)
                name, spec = name.strip(), path.strip()
            elif item in BUILTIN:
                name, spec = item, item
            elif _looks_like_path(item):
                name, spec = Path(item).stem, item
            else:
                raise ValueError(f"unknown domain {item!r}; use one of {', '.join(BUILTIN)}, a domain spec (.yaml), "
                                 "a data file, NAME=PATH, or declare it as a mapping name -> spec")
            if name in out:
                raise ValueError(f"domain {name!r} given twice")
            out[name] = spec
        return out
    raise ValueError("domains: give a list of names/files or a mapping name -> spec")


def _looks_like_path(s: str) -> bool:
    return "/" in s or Path(s).suffix.lower() in (".yaml", ".yml", ".jsonl", ".json", ".parquet", ".csv")


def _rebase(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def rebase_domains(raw: Any, base: Path) -> Any:
    """A config's raw `domains:` with relative file paths taken from `base` (the config file's folder)."""
    if isinstance(raw, list):
        out = []
        for item in raw:
            if isinstance(item, str) and "=" in item:
                name, path = item.split("=", 1)
                out.append(f"{name}={_rebase(path.strip(), base)}")
            elif isinstance(item, str) and item.strip() not in BUILTIN and _looks_like_path(item):
                out.append(_rebase(item.strip(), base))
            else:
                out.append(item)
        return out
    if isinstance(raw, dict):
        fixed: dict[Any, Any] = {}
        for name, v in raw.items():
            if isinstance(v, str) and v not in BUILTIN and _looks_like_path(v):
                v = _rebase(v, base)
            elif isinstance(v, dict):
                v = {k: (_rebase(x, base) if k in ("file", "train", "eval") and isinstance(x, str) else x)
                     for k, x in v.items()}
            fixed[name] = v
        return fixed
    return raw


def build_domains(field: dict[str, Any], judge: Any = None) -> dict[str, Domain]:
    """Every declared domain built (files read, references checked), keyed by its declared name."""
    from dataclasses import replace

    from crossroute.domains.spec import DomainSpec, build_domain

    out: dict[str, Domain] = {}
    for name, spec in field.items():
        if isinstance(spec, DomainSpec):
            d = build_domain(spec, name, judge=judge)
        elif spec == name and spec in BUILTIN:
            d = BUILTIN[spec]
        elif spec in BUILTIN:
            d = replace(BUILTIN[spec], name=name, _cache={})
        else:
            d = load_domain_file(spec, name)
        out[name] = d
    return out


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
