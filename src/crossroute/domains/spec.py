"""Domain specs: a domain declared once by name (files, field mapping, prompt rendering, scorer), then built.

A spec lives in a train/cpift YAML (`domains: {gsm8k: {...}}`) or in its own YAML file. Files are local JSONL,
JSON, Parquet or CSV; a field mapping names the columns a dataset's rows use (`prompt: question`, dotted paths
for nested columns such as `answers: answer.aliases`). Every row is checked by the domain's scorer when the
domain is built, so a reference the scorer cannot score fails before any training, naming file, line and field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from crossroute.core.config import load_yaml_mapping, validate_config
from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import RUBRIC_KEYS, SPLITS, Example
from crossroute.domains.domain import Domain
from crossroute.domains.jsonl import iter_jsonl
from crossroute.domains.scorers import make_scorer

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# Generation budgets when a spec sets none: short answers, reasoning/code, writing.
DEFAULT_MAX_NEW_TOKENS = {"exact": 64, "qa": 64, "math": 1024, "code": 1024, "rubric": 512, "judge": 512}


class FieldMap(BaseModel):
    """Which column of a row holds each part of an example (dotted paths reach into nested columns)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = "prompt"
    messages: str | None = Field(None, description="a column of chat messages [{role, content}, ...]")
    answer: str = "answer"
    answers: str | None = Field(None, description="a column of accepted aliases (qa)")
    tests: str = "tests"
    tests_setup: str | None = Field(None, description="code run before the tests (MBPP's test_setup_code)")
    entry_point: str = "entry_point"
    rubric: str = "rubric"
    split: str = "split"
    id: str = "id"
    stratum: str | None = Field(None, description="a column (e.g. level) the eval set keeps in fixed proportion")


class DomainSpec(BaseModel):
    """One domain: where its rows are, how to read them, how to show the prompt and how to score a completion."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    builtin: str | None = Field(None, description="a built-in synthetic domain (math, code, qa, cw)")
    file: str | None = Field(None, description="one file, split into train/eval by its split column or a hash")
    train: str | None = Field(None, description="the training rows (all of them train)")
    eval: str | None = Field(None, description="the evaluation rows (all of them eval; never trained on)")
    format: Literal["auto", "jsonl", "json", "parquet", "csv"] = "auto"
    fields: FieldMap = Field(default_factory=FieldMap)
    system_prompt: str | None = None
    chat_template: Literal["auto", "true", "false"] = "auto"
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    think_end: str | None = "</think>"
    max_new_tokens: int | None = Field(None, gt=0)
    scorer: str | dict[str, Any] = "auto"

    @field_validator("chat_template", mode="before")
    @classmethod
    def _bool_as_mode(cls, v: Any) -> Any:
        return str(v).lower() if isinstance(v, bool) else v

    @model_validator(mode="after")
    def _one_source(self) -> DomainSpec:
        if self.builtin is not None:
            if self.file or self.train or self.eval:
                raise ValueError("a builtin domain takes no files; drop file/train/eval")
            return self
        if self.file and (self.train or self.eval):
            raise ValueError("give either file (split by hash) or train/eval files, not both")
        if not (self.file or self.train or self.eval):
            raise ValueError("no rows: give file, or train and/or eval (local JSONL, JSON, Parquet or CSV)")
        return self

    def scorer_name(self) -> str:
        """The scorer's registry name (or 'auto' until rows are seen)."""
        return self.scorer if isinstance(self.scorer, str) else str(self.scorer.get("name", ""))


# ----------------------------------------------------------------------------- reading files

def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.suffix.lower() in FORMATS:
        return FORMATS[path.suffix.lower()]
    raise CrossrouteError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv, or set "
                          "format: in the domain spec.")


def read_rows(path: str | Path, fmt: str = "auto") -> list[tuple[str, dict[str, Any]]]:
    """(where, row) pairs of a local data file; JSONL line by line (errors name the line), the rest via datasets."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such data file; give a local .jsonl, .json, .parquet or .csv file.")
    kind = _format_of(path, fmt)
    if kind == "jsonl":
        return [(f"{path}:{lineno}", obj) for lineno, obj in iter_jsonl(path)]
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    reader = {"json": Dataset.from_json, "parquet": Dataset.from_parquet, "csv": Dataset.from_csv}[kind]
    was_on = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        ds = reader(str(path), keep_in_memory=True)
    except Exception as e:  # noqa: BLE001  (pyarrow/datasets raise many types; one line for the user)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrossrouteError(f"{path}: cannot read as {kind} ({first}).") from None
    finally:
        if was_on:
            enable_progress_bar()
    offset = 2 if kind == "csv" else 0  # CSV: line 1 is the header
    label = "line" if kind == "csv" else "row"
    return [(f"{path}:{label} {i + offset if kind == 'csv' else i}", row) for i, row in enumerate(ds)]


def _get(row: dict[str, Any], path: str) -> Any:
    """A (possibly nested, dotted) column of a row; None when absent."""
    cur: Any = row
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
    return cur


def _text(value: Any, where: str, field: str, column: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise CrossrouteError(f"{where}: field {column!r} (mapped as {field}) must be a string, got "
                              f"{type(value).__name__}.")
    return str(value)


def _strings(value: Any, where: str, field: str, column: str) -> tuple[str, ...]:
    """A list of strings from a list column, a dict with 'aliases'/'text'/'value', or one string."""
    if isinstance(value, dict):
        for key in ("aliases", "normalized_aliases", "text", "value"):
            if key in value and value[key]:
                return _strings(value[key], where, field, column)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return (str(value),)
    if isinstance(value, list) and value and all(isinstance(v, str | int | float) for v in value):
        return tuple(str(v) for v in value)
    raise CrossrouteError(f"{where}: field {column!r} (mapped as {field}) must be a string or a non-empty list of "
                          "strings.")


def _messages(value: Any, where: str, column: str) -> tuple[dict[str, str], ...]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise CrossrouteError(f"{where}: field {column!r} (mapped as messages) must be a non-empty list of "
                              "{role, content} objects.")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _rubric(value: Any, where: str, column: str) -> dict[str, Any]:
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            value = None
    if not isinstance(value, dict) or not value:
        raise CrossrouteError(f"{where}: field {column!r} must be a non-empty object of rules "
                              f"({', '.join(sorted(RUBRIC_KEYS))}).")
    value = {k: v for k, v in value.items() if v is not None}  # columnar formats fill absent keys with null
    bad = set(value) - RUBRIC_KEYS
    if bad:
        raise CrossrouteError(f"{where}: field '{column}.{sorted(bad)[0]}' unknown; rules: "
                              f"{', '.join(sorted(RUBRIC_KEYS))}.")
    return value


def row_to_example(row: dict[str, Any], fields: FieldMap, where: str, split: str | None = None) -> Example:
    """One Example from a raw row through the field mapping; errors name the row and the column."""
    messages = None
    answer_default: str | None = None
    if fields.messages is not None:
        raw = _get(row, fields.messages)
        if raw is None:
            raise CrossrouteError(f"{where}: no field {fields.messages!r} (mapped as messages); the row has "
                                  f"{', '.join(sorted(row)) or 'no fields'}.")
        msgs = list(_messages(raw, where, fields.messages))
        if msgs[-1]["role"] == "assistant":
            answer_default = msgs.pop()["content"]
        if not msgs or not any(m["role"] == "user" for m in msgs):
            raise CrossrouteError(f"{where}: field {fields.messages!r} has no user message before the answer.")
        messages = tuple(msgs)
        prompt = next(m["content"] for m in reversed(msgs) if m["role"] == "user")
    else:
        raw = _get(row, fields.prompt)
        if raw is None:
            raise CrossrouteError(f"{where}: no field {fields.prompt!r} (mapped as prompt); the row has "
                                  f"{', '.join(sorted(row)) or 'no fields'}; set fields.prompt in the domain spec.")
        prompt = _text(raw, where, "prompt", fields.prompt)
        if not prompt.strip():
            raise CrossrouteError(f"{where}: field {fields.prompt!r} (mapped as prompt) is empty.")
    raw_answer = _get(row, fields.answer)
    answers: tuple[str, ...] = ()
    if fields.answers is not None:
        raw_aliases = _get(row, fields.answers)
        if raw_aliases is None:
            raise CrossrouteError(f"{where}: no field {fields.answers!r} (mapped as answers).")
        answers = _strings(raw_aliases, where, "answers", fields.answers)
    if isinstance(raw_answer, dict | list):
        answers = answers or _strings(raw_answer, where, "answer", fields.answer)
        answer = answers[0]
    elif raw_answer is not None:
        answer = _text(raw_answer, where, "answer", fields.answer)
    else:
        answer = answer_default if answer_default is not None else (answers[0] if answers else "")
    tests_raw = _get(row, fields.tests)
    tests = ""
    if tests_raw is not None:
        tests = "\n".join(_strings(tests_raw, where, "tests", fields.tests)) if isinstance(tests_raw, list) else \
            _text(tests_raw, where, "tests", fields.tests)
        setup = _get(row, fields.tests_setup) if fields.tests_setup else None
        if setup:
            tests = _text(setup, where, "tests_setup", fields.tests_setup or "") + "\n" + tests
    entry = _get(row, fields.entry_point)
    rubric_raw = _get(row, fields.rubric)
    rubric = _rubric(rubric_raw, where, fields.rubric) if rubric_raw is not None else None
    row_split = _get(row, fields.split)
    if split is None and row_split is not None:
        if row_split not in SPLITS:
            raise CrossrouteError(f"{where}: field {fields.split!r} must be 'train' or 'eval', got {row_split!r}.")
        split = row_split
    rid = _get(row, fields.id)
    stratum = ""
    if fields.stratum is not None:
        raw_stratum = _get(row, fields.stratum)
        if raw_stratum is None:
            raise CrossrouteError(f"{where}: no field {fields.stratum!r} (mapped as stratum); the row has "
                                  f"{', '.join(sorted(row)) or 'no fields'}.")
        stratum = str(raw_stratum)
    return Example(prompt, answer, rubric, split, answers, tests, str(entry) if entry else "", messages,
                   str(rid) if rid is not None else "", where, stratum)


def infer_scorer(examples: list[Example]) -> str:
    """The scorer a spec with `scorer: auto` gets: code when rows carry tests, rubric, qa for aliases, else exact."""
    first = examples[0]
    if first.tests:
        return "code"
    if first.rubric is not None:
        return "rubric"
    if first.answers:
        return "qa"
    return "exact"


def _load_split(path: str, spec: DomainSpec, split: str | None, base: Path | None) -> list[Example]:
    p = Path(path).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    rows = read_rows(p, spec.format)
    if not rows:
        raise CrossrouteError(f"{p}: empty; a domain file needs at least one row.")
    return [row_to_example(row, spec.fields, where, split) for where, row in rows]


def build_domain(spec: DomainSpec, name: str | None = None, judge: Any = None, base: Path | None = None) -> Domain:
    """The Domain a spec declares: rows read and mapped, scorer built and run over every reference (check)."""
    from crossroute.domains.builtin import BUILTIN

    name = name or spec.name
    if not name:
        raise CrossrouteError("a domain spec needs a name (its key under domains:, or name: in its file).")
    if spec.builtin is not None:
        if spec.builtin not in BUILTIN:
            raise CrossrouteError(f"domain {name!r}: builtin {spec.builtin!r} unknown; use one of "
                                  f"{', '.join(BUILTIN)}.")
        return BUILTIN[spec.builtin]
    if spec.file:
        rows = _load_split(spec.file, spec, None, base)
    else:
        rows = (_load_split(spec.train, spec, "train", base) if spec.train else []) + \
               (_load_split(spec.eval, spec, "eval", base) if spec.eval else [])
    seen: dict[tuple[str | None, str], str] = {}
    for e in rows:
        key = (e.split if not spec.file else None, e.prompt if e.messages is None else repr(e.messages))
        if key in seen:
            raise CrossrouteError(f"{e.where}: repeats the prompt of {seen[key]}; prompts must be unique within a "
                                  "split so train and eval never share one.")
        seen[key] = e.where
    if spec.train and spec.eval:
        train_prompts = {e.prompt for e in rows if e.split == "train"}
        leak = next((e for e in rows if e.split == "eval" and e.prompt in train_prompts), None)
        if leak is not None:
            raise CrossrouteError(f"{leak.where}: this eval prompt is also in the train file {spec.train}; "
                                  "remove it from one of them (eval rows are never trained on).")
    kind = spec.scorer_name()
    if kind == "auto":
        kind = infer_scorer(rows)
    scorer_spec: str | dict[str, Any] = kind if isinstance(spec.scorer, str) else {**spec.scorer, "name": kind}
    scorer = make_scorer(scorer_spec, judge=judge)
    for e in rows:
        scorer.check(e)
    srcs = ", ".join(s for s in (spec.file, spec.train, spec.eval) if s)
    base_kind = kind.split(":")[0]
    return Domain(name, spec.description or f"{kind} domain from {srcs}", fixed=rows,
                  max_new_tokens=spec.max_new_tokens or DEFAULT_MAX_NEW_TOKENS.get(base_kind, 512), kind=kind,
                  source=srcs, scorer=scorer, think_end=spec.think_end, chat_template=spec.chat_template,
                  system_prompt=spec.system_prompt, chat_template_kwargs=dict(spec.chat_template_kwargs))


def load_spec_file(path: str | Path) -> DomainSpec:
    """A DomainSpec from its own YAML file (its relative paths are taken from the file's folder)."""
    path = Path(path).expanduser()
    raw = load_yaml_mapping(path, "examples/domains/gsm8k.yaml", "name, train/eval or file, fields, scorer")
    spec = parse_spec(raw, str(path))
    base = path.parent
    updates = {k: str(base / v) for k in ("file", "train", "eval")
               if (v := getattr(spec, k)) and not Path(v).expanduser().is_absolute()}
    return spec.model_copy(update={**updates, "name": spec.name or path.stem})


def parse_spec(raw: dict[str, Any], where: str) -> DomainSpec:
    """A DomainSpec validated from a mapping; the first error is one line naming `where` and the field."""
    return validate_config(DomainSpec, raw, where, "scorer")
