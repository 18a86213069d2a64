"""One registry of scorers: each scores a completion (after strip_thinking) in [0, 1], as GRPO reward and in eval.

A spec names one: "math", {"name": "qa", "match": "contains"}, or "python:package.module:function" for a
user's TRL-shaped reward `fn(prompts, completions, **columns) -> list[float]`. Register more with
`@register_scorer("name")` on a class (or function) whose keyword parameters are the scorer's options; a
parameter named `judge` receives the run's JudgeConfig.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from crossroute.core.errors import CrossrouteError
from crossroute.domains.answers import (
    extract_math_answer,
    math_equal,
    math_gold,
    parses_as_math,
    qa_match,
    squad_normalize,
)
from crossroute.domains.base import RUBRIC_KEYS, Example, normalise, score_rubric
from crossroute.domains.code import score_code
from crossroute.domains.judge import JudgeConfig, JudgeResult, judge_reward
from crossroute.domains.sandbox import SandboxLimits


def _at(example: Example) -> str:
    """The location prefix of an example's error lines: its file:line, else its id."""
    return f"{example.where}: " if example.where else (f"example {example.id!r}: " if example.id else "")


class Scorer:
    """Scores completions of examples in [0, 1]; `text` is the completion after strip_thinking."""

    name: str = ""

    def score(self, example: Example, text: str) -> float:
        raise NotImplementedError

    def score_batch(self, examples: list[Example], texts: list[str]) -> list[float]:
        """One score per (example, text) pair; override to batch or parallelise."""
        if len(examples) != len(texts):
            raise CrossrouteError(f"scorer {self.name!r} got {len(examples)} examples but {len(texts)} completions.")
        return [self.score(e, t) for e, t in zip(examples, texts, strict=True)]

    def check(self, example: Example) -> None:
        """Raise CrossrouteError (naming example.where and the field) when this scorer cannot score `example`."""

    def __repr__(self) -> str:
        return f"<scorer {self.name}>"


ScorerFactory = Callable[..., Scorer]
SCORERS: dict[str, ScorerFactory] = {}


def register_scorer(name: str) -> Callable[[ScorerFactory], ScorerFactory]:
    """Decorator adding a scorer factory under `name`; its keyword parameters are the spec's options."""

    def add(factory: ScorerFactory) -> ScorerFactory:
        if not name or ":" in name:
            raise ValueError(f"scorer name {name!r} must be non-empty and contain no ':'")
        SCORERS[name] = factory
        return factory

    return add


def _options(factory: ScorerFactory) -> list[str]:
    params = inspect.signature(factory).parameters.values()
    return [p.name for p in params if p.name != "judge" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def make_scorer(spec: str | dict[str, Any], judge: JudgeConfig | None = None) -> Scorer:
    """The scorer a spec names: "math", {"name": "qa", "match": "contains"} or "python:module:function"."""
    if isinstance(spec, str):
        name, options = spec.strip(), {}
    elif isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str) or not name.strip():
            raise CrossrouteError(f"scorer {spec!r} has no 'name'; use e.g. {{name: qa, match: contains}} "
                                  f"with a name among {', '.join(sorted(SCORERS))}.")
        name = name.strip()
    else:
        raise CrossrouteError(f"scorer {spec!r} must be a name or a mapping with 'name'.")
    if name.startswith("python:"):
        if options:
            raise CrossrouteError(f"scorer {name!r} takes no options, got {', '.join(sorted(options))}.")
        return PythonScorer(name)
    factory = SCORERS.get(name)
    if factory is None:
        raise CrossrouteError(f"scorer {name!r} unknown; known scorers: {', '.join(sorted(SCORERS))}, or "
                              "python:package.module:function for your own.")
    known = _options(factory)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise CrossrouteError(f"scorer {name!r} has no option {unknown[0]!r}; its options: "
                              f"{', '.join(known) or 'none'}.")
    kwargs = dict(options)
    if "judge" in inspect.signature(factory).parameters:
        kwargs["judge"] = judge
    try:
        scorer = factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise CrossrouteError(f"scorer {name!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}.") from None
    if not scorer.name:
        scorer.name = name
    return scorer


# ----------------------------------------------------------------------------- built-in scorers


@register_scorer("exact")
class ExactScorer(Scorer):
    """1.0 when the completion equals the answer after `normalise` (trim, single spaces, lower case)."""

    name = "exact"

    def score(self, example: Example, text: str) -> float:
        return 1.0 if normalise(text) == normalise(example.answer) else 0.0

    def check(self, example: Example) -> None:
        if not example.answer.strip():
            raise CrossrouteError(f"{_at(example)}field 'answer' is empty; the exact scorer compares the "
                                  "completion with it.")


@register_scorer("qa")
class QAScorer(Scorer):
    """1.0 when the completion matches an alias (SQuAD-normalised): equal ("exact") or holding it ("contains")."""

    name = "qa"

    def __init__(self, match: str = "exact") -> None:
        if match not in ("exact", "contains"):
            raise CrossrouteError(f"scorer 'qa' option match must be 'exact' or 'contains', got {match!r}.")
        self.match = match

    @staticmethod
    def aliases(example: Example) -> tuple[str, ...]:
        return example.answers or ((example.answer,) if example.answer else ())

    def score(self, example: Example, text: str) -> float:
        return 1.0 if qa_match(self.aliases(example), text, self.match) else 0.0  # type: ignore[arg-type]

    def check(self, example: Example) -> None:
        if not any(squad_normalize(a) for a in self.aliases(example)):
            got = f" (only {list(self.aliases(example))!r}, empty once normalised)" if self.aliases(example) else ""
            raise CrossrouteError(f"{_at(example)}field 'answers' (or 'answer') gives no answer to match{got}; "
                                  "give at least one non-empty alias.")


@register_scorer("math")
class MathScorer(Scorer):
    """1.0 when the completion's final answer (boxed, ####, "the answer is", last number) equals the gold one."""

    name = "math"

    def score(self, example: Example, text: str) -> float:
        pred = extract_math_answer(text)
        return 1.0 if pred is not None and math_equal(math_gold(example.answer), pred) else 0.0

    def check(self, example: Example) -> None:
        if not parses_as_math(example.answer):
            raise CrossrouteError(f"{_at(example)}field 'answer' {example.answer!r} is not an answer math-verify "
                                  "can parse; give a number or LaTeX (e.g. 72, \\frac{1}{2}), or use the qa "
                                  "scorer for text answers.")


@register_scorer("code")
class CodeScorer(Scorer):
    """1.0 when the completion's last Python block passes the example's tests in the sandbox."""

    name = "code"
    max_workers = 4

    def __init__(self, wall_seconds: float = 5.0, cpu_seconds: int = 4, memory_mb: int = 512) -> None:
        if not (wall_seconds > 0 and cpu_seconds > 0 and memory_mb > 0):
            raise CrossrouteError("scorer 'code' options wall_seconds, cpu_seconds and memory_mb must be > 0.")
        self.limits = SandboxLimits(wall_seconds=float(wall_seconds), cpu_seconds=int(cpu_seconds),
                                    memory_bytes=int(memory_mb) * 1024 * 1024)
        self.last_reasons: list[str] = []

    @staticmethod
    def tests(example: Example) -> str:
        """The example's tests (older code rows keep them in rubric['tests'])."""
        return example.tests or str((example.rubric or {}).get("tests", "") or "")

    def _run(self, example: Example, text: str) -> tuple[float, str]:
        return score_code(text, self.tests(example), self.limits, example.prompt, example.entry_point)

    def score(self, example: Example, text: str) -> float:
        s, reason = self._run(example, text)
        self.last_reasons = [reason]
        return s

    def score_batch(self, examples: list[Example], texts: list[str]) -> list[float]:
        if len(examples) != len(texts):
            raise CrossrouteError(f"scorer 'code' got {len(examples)} examples but {len(texts)} completions.")
        if not examples:
            return []
        workers = max(1, min(len(examples), os.cpu_count() or 1, self.max_workers))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            scored = list(pool.map(self._run, examples, texts))
        self.last_reasons = [r for _, r in scored]
        return [s for s, _ in scored]

    def check(self, example: Example) -> None:
        tests = self.tests(example)
        if not tests.strip():
            raise CrossrouteError(f"{_at(example)}field 'tests' is empty; code scoring needs tests, else any "
                                  "code would pass.")
        try:
            compile(tests, f"{example.where or 'tests'}", "exec")
        except (SyntaxError, ValueError) as e:
            raise CrossrouteError(f"{_at(example)}field 'tests' is not valid Python ({getattr(e, 'msg', e)}, line "
                                  f"{getattr(e, 'lineno', '?')}).") from None
        if not example.entry_point and re.search(r"^def[ \t]+check[ \t]*\(", tests, re.MULTILINE) \
                and not re.search(r"^check[ \t]*\(", tests, re.MULTILINE):
            raise CrossrouteError(f"{_at(example)}field 'entry_point' is empty but 'tests' defines check(candidate) "
                                  "without calling it; name the function under test in 'entry_point'.")


@register_scorer("rubric")
class RubricScorer(Scorer):
    """The fraction of the example's rubric checks (word counts, must_include, ...) the completion meets."""

    name = "rubric"

    def score(self, example: Example, text: str) -> float:
        return score_rubric(example.rubric or {}, text)

    def check(self, example: Example) -> None:
        rubric = example.rubric or {}
        checks = [k for k in rubric if k in RUBRIC_KEYS]
        unknown = sorted(set(rubric) - RUBRIC_KEYS)
        if unknown:
            raise CrossrouteError(f"{_at(example)}field 'rubric' has unknown check {unknown[0]!r}; known: "
                                  f"{', '.join(sorted(RUBRIC_KEYS))}.")
        if not checks:
            raise CrossrouteError(f"{_at(example)}field 'rubric' is missing or has no checks; the rubric scorer "
                                  f"needs at least one of {', '.join(sorted(RUBRIC_KEYS))}.")


@register_scorer("judge")
class JudgeScorer(Scorer):
    """The judge model's 0-10 rating of (prompt, post-thinking completion), mapped to [0, 1]."""

    name = "judge"

    def __init__(self, judge: JudgeConfig | None = None) -> None:
        if judge is None:
            raise CrossrouteError("scorer 'judge' needs a `judge:` section (base_url, model).")
        self.config = judge
        self._reward = judge_reward(judge, "judge")  # resolves the API key now: a missing one fails early
        self.last_results: list[JudgeResult] = []

    def score(self, example: Example, text: str) -> float:
        return self.score_batch([example], [text])[0]

    def score_batch(self, examples: list[Example], texts: list[str]) -> list[float]:
        if len(examples) != len(texts):
            raise CrossrouteError(f"scorer 'judge' got {len(examples)} examples but {len(texts)} completions.")
        if not examples:
            return []
        out = self._reward([e.prompt for e in examples], list(texts))  # a pool of config.max_concurrency
        self.last_results = list(self._reward.last_results)  # type: ignore[attr-defined]
        return out


# ----------------------------------------------------------------------------- python:module:function


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class PythonScorer(Scorer):
    """A user's TRL-shaped reward `fn(prompts, completions, **columns) -> list[float]`, named
    "python:package.module:function". Columns: answer, answers (a list per example), tests, entry_point,
    rubric (a dict or None), each a list with one entry per completion."""

    def __init__(self, spec: str) -> None:
        self.name = spec
        target = spec[len("python:"):]
        module, _, func = target.rpartition(":")
        if not module or not func:
            raise CrossrouteError(f"scorer {spec!r} must be python:package.module:function.")
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 (any import failure is the user's to fix)
            raise CrossrouteError(f"scorer {spec}: cannot import {module} ({_first_line(e)}).") from None
        fn = getattr(mod, func, None)
        if not callable(fn):
            raise CrossrouteError(f"scorer {spec}: module {module} has no function {func!r}.")
        self.fn: Callable[..., Sequence[Any]] = fn

    def score(self, example: Example, text: str) -> float:
        return self.score_batch([example], [text])[0]

    def score_batch(self, examples: list[Example], texts: list[str]) -> list[float]:
        if len(examples) != len(texts):
            raise CrossrouteError(f"scorer {self.name} got {len(examples)} examples but {len(texts)} completions.")
        if not examples:
            return []
        try:
            got = self.fn(prompts=[e.prompt for e in examples], completions=list(texts),
                          answer=[e.answer for e in examples], answers=[list(e.answers) for e in examples],
                          tests=[e.tests for e in examples], entry_point=[e.entry_point for e in examples],
                          rubric=[e.rubric for e in examples])
        except CrossrouteError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CrossrouteError(f"scorer {self.name} raised {_first_line(e)}.") from None
        try:
            values = list(got)
        except TypeError:
            raise CrossrouteError(f"scorer {self.name} returned {type(got).__name__}, not a list of floats.") from None
        if len(values) != len(examples):
            raise CrossrouteError(f"scorer {self.name} returned {len(values)} scores for {len(examples)} "
                                  "completions; return one float per completion.")
        out: list[float] = []
        for i, v in enumerate(values):
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise CrossrouteError(f"scorer {self.name} returned {v!r} at position {i}, not a float.") from None
            if not math.isfinite(f):
                raise CrossrouteError(f"scorer {self.name} returned {f} at position {i}; scores must be finite.")
            out.append(f)
        return out
