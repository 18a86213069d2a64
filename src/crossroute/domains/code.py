"""Code domains: JSONL rows with Python asserts, completions scored by running them in the sandbox."""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import SPLITS, Domain, Example
from crossroute.domains.jsonl import iter_jsonl
from crossroute.domains.sandbox import SandboxLimits, run_sandboxed

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)


_PY_TAGS = {"python", "py", "python3", "py3"}


def extract_code(completion: str) -> str:
    """The code in a completion: the first ```python block (else the first fenced block; an
    unclosed fence runs to the end), or the whole text when there is no fence. Surrounding blank
    lines are dropped."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    if not blocks:
        return completion.strip("\r\n")
    chosen = next((b for tag, b in blocks if tag in _PY_TAGS), blocks[0][1])
    return chosen.strip("\r\n")


def _text(completion: Any) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def score_code(completion: Any, tests: str,
               limits: SandboxLimits = SandboxLimits()) -> tuple[float, str]:  # noqa: B008
    """(reward, reason) for a completion: 1.0 if its extracted code passes every test, else 0.0."""
    res = run_sandboxed(extract_code(_text(completion)), tests, limits)
    return (1.0 if res.passed else 0.0), res.reason


def _score_many(completions: list[Any], tests: list[str],
                limits: SandboxLimits) -> list[tuple[float, str]]:
    if len(completions) != len(tests):
        raise CrossrouteError(f"got {len(completions)} completions but {len(tests)} 'tests' "
                              "entries; give one per completion.")
    if any(not isinstance(t, str) or not t.strip() for t in tests):
        raise CrossrouteError("a completion has no tests (column 'tests' or rubric 'tests'); "
                              "code rewards need non-empty tests, else any code would pass.")
    workers = max(1, min(len(completions), os.cpu_count() or 1, 4))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c, t: score_code(c, t, limits), completions, tests))


def code_reward(prompts: list[Any], completions: list[Any], tests: list[str],
                reasons: list[str] | None = None, **kw: Any) -> list[float]:
    """TRL GRPOTrainer reward: 1.0 if the completion's code passes its `tests` column, else 0.0.
    Pass a list as `reasons` to receive one reason per completion (see REASONS)."""
    scored = _score_many(list(completions), list(tests), kw.get("limits") or SandboxLimits())
    if reasons is not None:
        reasons.extend(r for _, r in scored)
    return [s for s, _ in scored]


@dataclass
class CodeDomain(Domain):
    """A JSONL code domain: an example's tests live in `rubric = {"tests": ...}`; run sandboxed."""

    kind: str = "code"
    limits: SandboxLimits = field(default_factory=SandboxLimits)

    def score(self, example: Example, completion: str) -> float:
        return score_code(completion, (example.rubric or {}).get("tests", ""), self.limits)[0]

    def reward(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rubrics = kwargs.get("rubric") or ["{}"] * len(completions)
        tests = [(json.loads(r) if isinstance(r, str) else (r or {})).get("tests", "")
                 for r in rubrics]
        return [s for s, _ in _score_many(list(completions), tests, self.limits)]


_CODE_FIELDS = ("prompt", "tests", "answer", "split", "id")


def _validate_code_row(path: Path, lineno: int, obj: dict[str, Any]) -> Example:
    where = f"{path}:{lineno}"
    unknown = set(obj) - set(_CODE_FIELDS)
    if unknown:
        raise CrossrouteError(f"{where}: unknown field {sorted(unknown)[0]!r}; allowed: "
                              f"{', '.join(_CODE_FIELDS)}.")
    for key in ("prompt", "tests"):
        if not isinstance(obj.get(key), str) or not obj[key].strip():
            raise CrossrouteError(f"{where}: field {key!r} must be a non-empty string.")
    try:
        compile(obj["tests"], f"{where}:tests", "exec")
    except (SyntaxError, ValueError) as e:
        msg = getattr(e, "msg", str(e))
        raise CrossrouteError(f"{where}: field 'tests' is not valid Python ({msg}, line "
                              f"{getattr(e, 'lineno', '?')}).") from None
    if "answer" in obj and not isinstance(obj["answer"], str):
        raise CrossrouteError(f"{where}: field 'answer' must be a string (a reference solution).")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise CrossrouteError(f"{where}: field 'split' must be 'train' or 'eval', got {split!r}.")
    return Example(obj["prompt"], obj.get("answer", ""), {"tests": obj["tests"]}, split)


def load_code_domain(path: str | Path, name: str | None = None) -> CodeDomain:
    """A code domain from JSONL lines {"prompt", "tests", optional "split"/"answer"/"id"}."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such JSONL file for a code domain.")
    rows: list[Example] = []
    seen: dict[str, int] = {}
    for lineno, obj in iter_jsonl(path):
        e = _validate_code_row(path, lineno, obj)
        if e.prompt in seen:
            raise CrossrouteError(f"{path}:{lineno}: field 'prompt' repeats the prompt of line "
                                  f"{seen[e.prompt]}; prompts must be unique so train and eval "
                                  "never share one.")
        seen[e.prompt] = lineno
        rows.append(e)
    if not rows:
        raise CrossrouteError(f"{path}: empty; a code domain needs at least one line with 'prompt' "
                              "and 'tests'.")
    longest = max((len(e.answer) for e in rows), default=0)
    return CodeDomain(name or path.stem, f"code domain from {path} (sandboxed tests)", fixed=rows,
                      max_new_tokens=max(128, min(1024, 2 * longest)), source=str(path))
