"""Code domains: JSONL rows with Python asserts, completions scored by running them in the sandbox."""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from crossroute.core.errors import CrossrouteError
from crossroute.domains.sandbox import SandboxLimits, run_sandboxed

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:\n[ \t]*```|\Z)", re.DOTALL)


_PY_TAGS = {"python", "py", "python3", "py3"}


def extract_code(completion: str) -> str:
    """The code in a completion: the last ```python block (else the last fenced block; an
    unclosed fence runs to the end), or the whole text when there is no fence. Surrounding blank
    lines are dropped. Strip thinking first: a draft inside <think> is a block too."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    if not blocks:
        return completion.strip("\r\n")
    python = [b for tag, b in blocks if tag in _PY_TAGS]
    chosen = python[-1] if python else blocks[-1][1]
    return chosen.strip("\r\n")


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE) is not None


def _is_python(text: str) -> bool:
    try:
        compile(text, "<prompt>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True


def build_program(example_prompt: str, code: str, entry_point: str) -> str:
    """The program to test. HumanEval-style rows (`entry_point` set): when the code does not define
    `def <entry_point>(` it is the body, appended to the prompt (signature and docstring; an unindented
    body is indented). When it does, the code, preceded by the prompt when that is valid Python (for its
    imports and helpers; the code's later def wins). Without `entry_point`: the code."""
    if not entry_point:
        return code
    prompt = extract_code(example_prompt) if "```" in example_prompt else example_prompt
    if _defines(code, entry_point):
        return f"{prompt.rstrip()}\n\n\n{code}\n" if prompt.strip() and _is_python(prompt) else code
    first = next((line for line in code.splitlines() if line.strip()), "")
    if first and not first[0].isspace():
        code = "\n".join(f"    {line}" if line.strip() else line for line in code.splitlines())
    return prompt.rstrip("\r\n") + "\n" + code.rstrip("\r\n") + "\n"


def build_tests(tests: str, entry_point: str) -> str:
    """The tests to run: HumanEval-style `def check(candidate)` tests get `check(<entry_point>)` appended
    unless they already call it."""
    if entry_point and re.search(r"^def[ \t]+check[ \t]*\(", tests, re.MULTILINE) \
            and not re.search(r"^check[ \t]*\(", tests, re.MULTILINE):
        return tests + f"\ncheck({entry_point})\n"
    return tests


def _text(completion: Any) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


def score_code(completion: Any, tests: str,
               limits: SandboxLimits = SandboxLimits(),  # noqa: B008
               prompt: str = "", entry_point: str = "") -> tuple[float, str]:
    """(reward, reason) for a completion: 1.0 if its extracted code passes every test, else 0.0.
    With `entry_point` (HumanEval-style rows) see build_program and build_tests."""
    program = build_program(prompt, extract_code(_text(completion)), entry_point)
    res = run_sandboxed(program, build_tests(tests, entry_point), limits)
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
