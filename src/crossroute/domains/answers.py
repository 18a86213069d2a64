"""Pure text functions behind the scorers: strip thinking, extract and compare final answers (math, QA).

Math equivalence uses math-verify. Its timeouts rely on SIGALRM, which only works in the main thread, so they
are enabled there and disabled in worker threads; expressions whose evaluation would explode (towers of powers,
huge factorials) are refused before comparison so that worker threads cannot hang on them.
"""

from __future__ import annotations

import logging
import re
import string
import threading
from collections.abc import Sequence
from typing import Any, Literal

MATH_TIMEOUT_S = 5  # math-verify timeout per parse/compare (main thread only)
MAX_MATH_CHARS = 1000  # longer candidates are not compared (no real final answer is this long)
_HUGE = 10_000  # numeric exponents / factorial arguments beyond this are refused




class _QuietTimeoutNotice(logging.Filter):
    """Drops math-verify's "Timeout is disabled" notice: off-main-thread we disable it on purpose (see _too_big)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_QuietTimeoutNotice())


# ----------------------------------------------------------------------------- thinking


def strip_thinking(text: str, think_end: str | None = "</think>", think_start: str = "<think>") -> str:
    """The part of a completion a scorer sees: the text after the last `think_end`.

    Unfinished thinking (a `think_start` without any `think_end`) gives ""; no tags leave the text unchanged."""
    if think_end is None or not think_end:
        return text
    pos = text.rfind(think_end)
    if pos >= 0:
        return text[pos + len(think_end):]
    if think_start and think_start in text:
        return ""
    return text


# ----------------------------------------------------------------------------- math: extraction


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_BARE = re.compile(r"\\boxed\s+([^\s{}$]+)")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b\s*:?|:)\s*(.*)", re.IGNORECASE)
_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")
_SENTENCE_END = re.compile(r"\.(?=\s|$)|\n")
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$([^$]+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)


def _balanced(text: str, start: int) -> str | None:
    """The text from `start` up to the brace closing the `{` just before it; None when never closed."""
    depth = 1
    for i in range(start, len(text)):
        c = text[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last closed `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed 5`) with a non-empty body."""
    found: list[tuple[int, str]] = []
    for m in _BOXED.finditer(text):
        body = _balanced(text, m.end())
        if body is not None and body.strip():
            found.append((m.start(), body.strip()))
    for m in _BOXED_BARE.finditer(text):
        found.append((m.start(), m.group(1)))
    return max(found)[1] if found else None


def _clean(candidate: str) -> str | None:
    """A candidate with surrounding space, `$` delimiters, markdown bold and a trailing period removed."""
    s = candidate.strip().strip("*").strip()
    for _ in range(3):
        prev = s
        s = s.rstrip(".").strip()
        if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s = s.strip("$").strip()
        elif s.endswith("$") and s.count("$") == 1:
            s = s[:-1].strip()
        if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2].strip()
        if s == prev:
            break
    return s or None


def extract_math_answer(text: str) -> str | None:
    """The final answer in a solution: last `\\boxed{}`, else after the last `####`, else "the answer is X" /
    "answer: X", else the last `$...$` formula when no number follows it, else a bare LaTeX completion
    (`\\frac12`), else the last number in the text; None when there is none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    if "####" in text:
        rest = text[text.rfind("####") + 4:].strip()
        got = _clean(rest.splitlines()[0]) if rest else None
        if got:
            return got
    said = list(_ANSWER_IS.finditer(text))
    for m in reversed(said):
        rest = m.group(1)
        end = _SENTENCE_END.search(rest)
        got = _clean(rest[: end.start()] if end else rest)
        if got:
            return got
    spans = list(_MATH_SPAN.finditer(text))
    if spans:
        last = spans[-1]
        body = _clean(next(g for g in last.groups() if g is not None))
        if body and not _has_words(body) and not _NUMBER.search(text, last.end()):
            return body  # "... is $\frac{1}{2}$.": the expression, not its last digit
    bare = text.strip()
    if "\\" in bare and len(bare) <= 200 and not _has_words(bare):
        return _clean(bare)  # the completion is a bare LaTeX answer such as \frac12
    numbers = _NUMBER.findall(text)
    return re.sub(r"\s+", "", numbers[-1]) if numbers else None


def math_gold(answer: str) -> str:
    """The gold part of a reference: after the last `####` (GSM8K), else the last `\\boxed{}` (MATH), else all."""
    if "####" in answer:
        rest = answer[answer.rfind("####") + 4:].strip()
        got = _clean(rest.splitlines()[0]) if rest else None
        if got:
            return got
    boxed = last_boxed(answer)
    if boxed is not None:
        return _clean(boxed) or boxed
    return _clean(answer) or answer.strip()


# ----------------------------------------------------------------------------- math: equivalence


def _timeout() -> int | None:
    """math-verify's timeout: signal-based, so only usable in the main thread; None (off) elsewhere."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


_COMMAND = re.compile(r"\\[A-Za-z]+")
_TEXT_ARG = re.compile(r"\\(?:text|mathrm|textbf|mbox|operatorname)\s*\{[^{}]*\}")
_WORD = re.compile(r"[A-Za-z]{2,}")


def _has_words(s: str) -> bool:
    """Whether `s` holds plain words (runs of letters outside LaTeX commands and \\text{}): prose, not LaTeX."""
    return bool(_WORD.search(_COMMAND.sub(" ", _TEXT_ARG.sub(" ", s))))


def _too_big(expr: Any) -> bool:
    """Whether comparing `expr` could take unbounded time: a huge numeric exponent or factorial argument."""
    import sympy

    def huge(x: Any) -> bool:
        if not getattr(x, "is_number", False):
            return False
        try:
            v = abs(complex(sympy.N(x, 5)))
        except (TypeError, ValueError, OverflowError, ArithmeticError):
            return True
        return not v < _HUGE  # nan and inf count as huge

    if not isinstance(expr, sympy.Basic):
        return False
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, sympy.Pow) and huge(node.exp) and node.base not in (0, 1, -1):
            return True
        if isinstance(node, (sympy.factorial, sympy.factorial2, sympy.subfactorial, sympy.gamma)) and huge(
                node.args[0]):
            return True
    return False


def _parse(s: str) -> list[Any]:
    """math-verify parses of `s` (sympy objects and strings); [] when nothing parses or it is too big.

    Bare LaTeX needs `$...$` for math-verify: text without plain words is parsed wrapped first (a raw parse of
    `3\\sqrt{2}` would give 3), prose is parsed raw (the number in "18 dollars")."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    s = s.strip()
    if not s or len(s) > MAX_MATH_CHARS:
        return []
    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    delimited = "$" in s or "\\(" in s or "\\[" in s
    tries = [s] if delimited else ([s] if _has_words(s) else [f"${s}$", s])
    for t in tries:
        try:
            got = parse(t, config, parsing_timeout=_timeout())
        except Exception:  # noqa: BLE001 (math-verify or sympy failing on odd input is "does not parse")
            got = []
        if any(not isinstance(g, str) for g in got):
            return [] if any(_too_big(g) for g in got) else list(got)
    return []


def math_equal(gold: str, pred: str) -> bool:
    """Whether `pred` is mathematically equivalent to `gold` (math-verify: 1/2 = \\frac12 = 0.5, 1,234 = 1234)."""
    from math_verify import verify

    g, p = _parse(gold), _parse(pred)
    if not g or not p:
        return False
    try:
        return bool(verify(g, p, timeout_seconds=_timeout()))
    except Exception:  # noqa: BLE001
        return False


def parses_as_math(answer: str) -> bool:
    """Whether a reference's gold part (see math_gold) parses to a math expression math-verify can compare."""
    return bool(_parse(math_gold(answer)))


# ----------------------------------------------------------------------------- QA


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def squad_normalize(s: str) -> str:
    """SQuAD's official answer normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _contains(tokens: list[str], sub: list[str]) -> bool:
    n = len(sub)
    return any(tokens[i:i + n] == sub for i in range(len(tokens) - n + 1))


def qa_match(aliases: Sequence[str], text: str, mode: Literal["exact", "contains"] = "exact") -> bool:
    """Whether `text` matches an alias after squad_normalize: equal ("exact"), or holding it as a contiguous run
    of whole tokens ("contains": "The capital is Rome." holds "Rome", "Romeo" does not). Empty aliases never match."""
    if mode not in ("exact", "contains"):
        raise ValueError(f"qa_match mode must be 'exact' or 'contains', got {mode!r}")
    norm = squad_normalize(text)
    tokens = norm.split()
    for alias in aliases:
        a = squad_normalize(alias)
        if not a:
            continue
        if a == norm or (mode == "contains" and _contains(tokens, a.split())):
            return True
    return False
