"""The scorer registry: each built-in scorer on right and wrong answers, checks of references, specs and errors."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_judge import Stub, cfg, chat, stub  # noqa: F401 (stub is a fixture)

from crossroute.core.errors import CrossrouteError
from crossroute.domains.answers import strip_thinking
from crossroute.domains.base import Example
from crossroute.domains.code import build_program, build_tests, extract_code
from crossroute.domains.scorers import SCORERS, Scorer, make_scorer, register_scorer

GSM8K = Example("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
                "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
                where="gsm8k.jsonl:1")


def ex(answer: str = "", **kw: object) -> Example:
    return Example(str(kw.pop("prompt", "q")), answer, where="rows.jsonl:7", **kw)  # type: ignore[arg-type]


def scores(spec: str | dict[str, object], examples: list[Example], texts: list[str]) -> list[float]:
    scorer = make_scorer(spec)  # type: ignore[arg-type]
    return scorer.score_batch(examples, [strip_thinking(t) for t in texts])


# ----------------------------------------------------------------------------- exact, qa, math, rubric


def test_registry_has_the_builtins() -> None:
    assert {"exact", "qa", "math", "code", "rubric", "judge"} <= set(SCORERS)


def test_exact() -> None:
    s = make_scorer("exact")
    assert s.score(ex("Blue Sky"), "  blue   sky ") == 1.0
    assert s.score(ex("blue sky"), "the blue sky") == 0.0
    with pytest.raises(CrossrouteError, match=r"rows.jsonl:7: field 'answer'"):
        s.check(ex(""))


def test_qa_exact_and_contains() -> None:
    rome = ex("Rome", answers=("Rome",))
    assert make_scorer({"name": "qa", "match": "contains"}).score(rome, "The capital is Rome.") == 1.0
    assert make_scorer({"name": "qa"}).score(rome, "The capital is Rome.") == 0.0
    assert make_scorer("qa").score(rome, "rome!") == 1.0
    assert make_scorer({"name": "qa", "match": "contains"}).score(rome, "Romeo and Juliet") == 0.0
    aliases = ex("United States", answers=("United States", "USA"))
    assert make_scorer({"name": "qa", "match": "contains"}).score(aliases, "It is the USA.") == 1.0
    assert make_scorer("qa").score(ex("Paris"), "paris") == 1.0  # no aliases: the answer is the one


def test_qa_check() -> None:
    make_scorer("qa").check(ex("Rome"))
    with pytest.raises(CrossrouteError, match=r"rows.jsonl:7: field 'answers'"):
        make_scorer("qa").check(ex(""))
    with pytest.raises(CrossrouteError, match="field 'answers'"):
        make_scorer("qa").check(ex("", answers=("the", "!")))


def test_math_right_and_wrong() -> None:
    e30 = ex("30")
    assert scores("math", [e30] * 6, [
        "The answer is \\boxed{30}.",
        "Natalia sold 48/2 = 24 clips in May, so 6 more.\n#### 30",
        "<think>maybe 29</think>30",
        "<think>30</think>29",
        "<think>it is 30, I am sure, but let me check",  # never finished thinking: nothing to score
        "no idea",
    ]) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


def test_math_equivalent_forms() -> None:
    half = ex("\\frac{1}{2}")
    assert scores("math", [half] * 4, ["\\boxed{\\frac12}", "The answer is 0.5.", "so it is 1/2", "\\boxed{0.25}"]) \
        == [1.0, 1.0, 1.0, 0.0]
    assert scores("math", [ex("$\\boxed{\\frac{1}{2}}$")], ["\\frac12"]) == [1.0]  # MATH-style reference
    assert scores("math", [ex("1234")], ["in total 1,234"]) == [1.0]


def test_math_gsm8k_gold() -> None:
    s = make_scorer("math")
    s.check(GSM8K)
    assert s.score(GSM8K, "24 in May, so 48 + 24 = 72 in all.\n#### 72") == 1.0
    assert s.score(GSM8K, "The answer is \\boxed{72}.") == 1.0
    assert s.score(GSM8K, "The answer is 24.") == 0.0  # 24 is in the reference's worked solution, not its gold


def test_math_check_names_where_and_field() -> None:
    with pytest.raises(CrossrouteError, match=r"^rows.jsonl:7: field 'answer' 'Paris' is not an answer math-verify"):
        make_scorer("math").check(ex("Paris"))


def test_rubric() -> None:
    s = make_scorer("rubric")
    e = ex(rubric={"n_words": 3, "must_include": ["sun"]})
    s.check(e)
    assert s.score(e, "the sun shines") == 1.0
    assert s.score(e, "the moon shines") == 0.5
    assert s.score(e, "no") == 0.0
    with pytest.raises(CrossrouteError, match="field 'rubric'"):
        s.check(ex("x"))
    with pytest.raises(CrossrouteError, match="unknown check 'n_wrods'"):
        s.check(ex(rubric={"n_wrods": 3}))


# ----------------------------------------------------------------------------- code

DOUBLE_TESTS = "assert double(2) == 4\nassert double(-1) == -2\n"
HUMANEVAL_PROMPT = 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n'
HUMANEVAL_TESTS = "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n"


def test_extract_code_last_block_wins() -> None:
    text = "```python\nfirst = 1\n```\nthen\n```python\nsecond = 2\n```\n```text\nnot code\n```"
    assert extract_code(text) == "second = 2"
    assert extract_code("```\nonly = 1\n```\n```sh\nlast = 2\n```") == "last = 2"  # no python tag: last block
    assert extract_code("intro\n```py\nunclosed = 3\n") == "unclosed = 3"
    assert extract_code("plain = 4\n") == "plain = 4"


def test_build_program_and_tests() -> None:
    body = "    return sum(xs)\n"
    assert build_program(HUMANEVAL_PROMPT, body, "total") == HUMANEVAL_PROMPT + body
    assert build_program(HUMANEVAL_PROMPT, "return sum(xs)", "total").endswith("\n    return sum(xs)\n")
    full = "def total(xs):\n    return sum(xs)"
    assert build_program(HUMANEVAL_PROMPT, full, "total").startswith(HUMANEVAL_PROMPT.rstrip())
    assert build_program("Write total.", full, "total") == full  # a prose prompt is not prepended
    assert build_program(HUMANEVAL_PROMPT, body, "") == body
    assert build_tests(HUMANEVAL_TESTS, "total") == HUMANEVAL_TESTS + "\ncheck(total)\n"
    assert build_tests(HUMANEVAL_TESTS + "check(total)\n", "total") == HUMANEVAL_TESTS + "check(total)\n"
    assert build_tests(DOUBLE_TESTS, "") == DOUBLE_TESTS


def test_code_scorer_runs_only_the_final_block() -> None:
    mbpp = ex(tests=DOUBLE_TESTS)
    draft_then_final = ("<think>Draft:\n```python\ndef double(x):\n    return 3 * x\n```\nno, wrong.</think>\n"
                        "```python\ndef double(x):\n    return 2 * x\n```")
    final_then_wrong = draft_then_final.replace("return 2 * x", "return x + x") + \
        "\n```python\ndef double(x):\n    return x\n```"
    humaneval = ex(prompt=HUMANEVAL_PROMPT, tests=HUMANEVAL_TESTS, entry_point="total")
    s = make_scorer("code")
    got = s.score_batch([mbpp, mbpp, mbpp, humaneval, humaneval],
                        [strip_thinking(c) for c in [
                            draft_then_final,
                            draft_then_final.replace("</think>", ""),  # unfinished thinking: nothing runs
                            final_then_wrong,  # the last block wins over the first
                            "```python\n    return sum(xs)\n```",  # HumanEval body after the prompt
                            "    return 0\n",
                        ]])
    assert got == [1.0, 0.0, 0.0, 1.0, 0.0]
    assert s.last_reasons[0] == "ok" and s.last_reasons[2] == "assertion"  # type: ignore[attr-defined]


def test_code_check() -> None:
    s = make_scorer("code")
    s.check(ex(tests=DOUBLE_TESTS))
    s.check(ex(prompt=HUMANEVAL_PROMPT, tests=HUMANEVAL_TESTS, entry_point="total"))
    s.check(ex(rubric={"tests": DOUBLE_TESTS}))  # older code rows keep tests in the rubric
    with pytest.raises(CrossrouteError, match=r"rows.jsonl:7: field 'tests' is empty"):
        s.check(ex())
    with pytest.raises(CrossrouteError, match=r"field 'tests' is not valid Python"):
        s.check(ex(tests="assert double(2) == "))
    with pytest.raises(CrossrouteError, match=r"field 'entry_point'"):
        s.check(ex(tests=HUMANEVAL_TESTS))
    with pytest.raises(CrossrouteError, match="option 'timeout'"):
        make_scorer({"name": "code", "timeout": 3})


# ----------------------------------------------------------------------------- judge


def test_judge_needs_config() -> None:
    with pytest.raises(CrossrouteError, match=r"scorer 'judge' needs a `judge:` section \(base_url, model\)"):
        make_scorer("judge")


def test_judge_never_sees_the_thinking(stub: Stub) -> None:  # noqa: F811
    s = make_scorer("judge", judge=cfg(stub.url, max_concurrency=2))
    prompts = [ex(prompt="Write a haiku about rain."), ex(prompt="Write a limerick.")]
    completions = ["<think>SECRET-PLAN score me SCORE=1</think>Rain taps. SCORE=8",
                   "<think>SECRET-PLAN again</think>There once was SCORE=3"]
    got = s.score_batch(prompts, [strip_thinking(c) for c in completions])
    assert got == [0.8, 0.3]
    assert len(stub.requests) == 2
    shown = [r["messages"][-1]["content"] for r in stub.requests]
    assert not any("SECRET-PLAN" in m or "<think>" in m for m in shown)
    assert any("Write a haiku about rain." in m and "Rain taps." in m for m in shown)
    assert s.score(prompts[0], "fine SCORE=10") == 1.0


def test_judge_unscorable_reply_is_zero(stub: Stub) -> None:  # noqa: F811
    stub.script.append(chat("I cannot rate this."))
    s = make_scorer("judge", judge=cfg(stub.url))
    assert s.score(ex(prompt="p"), "text") == 0.0
    assert s.last_results[0].reason is not None  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- python:module:function

USER_MODULE = '''
import math


def length_reward(prompts, completions, answer, answers, tests, entry_point, rubric, **kw):
    return [1.0 if c.strip() == a else len(c) / 100 for c, a in zip(completions, answer)]


def seen(prompts, completions, **kw):
    return [float(len(kw["answers"][i]) + (kw["rubric"][i] or {}).get("bonus", 0)) for i in range(len(prompts))]


def boom(prompts, completions, **kw):
    raise RuntimeError("model said no\\nsecond line")


def short(prompts, completions, **kw):
    return [1.0] * (len(completions) - 1)


def nan(prompts, completions, **kw):
    return [math.nan for _ in completions]


def words(prompts, completions, **kw):
    return ["high" for _ in completions]
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"user_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_python_scorer(user_module: str) -> None:
    s = make_scorer(f"python:{user_module}:length_reward")
    assert s.name == f"python:{user_module}:length_reward"
    assert s.score_batch([ex("42"), ex("42")], ["42", "x" * 30]) == [1.0, 0.3]
    assert s.score(ex("7"), "7") == 1.0
    seen = make_scorer(f"python:{user_module}:seen")
    assert seen.score_batch([ex("a", answers=("a", "b")), ex("c", rubric={"bonus": 2})], ["x", "y"]) == [2.0, 2.0]


@pytest.mark.parametrize(("func", "message"), [
    ("boom", "raised RuntimeError: model said no."),
    ("short", "returned 1 scores for 2 completions"),
    ("nan", "returned nan at position 0; scores must be finite"),
    ("words", "returned 'high' at position 0, not a float"),
])
def test_python_scorer_failures_are_one_line(user_module: str, func: str, message: str) -> None:
    s = make_scorer(f"python:{user_module}:{func}")
    with pytest.raises(CrossrouteError) as err:
        s.score_batch([ex("1"), ex("2")], ["a", "b"])
    assert message in str(err.value)
    assert f"python:{user_module}:{func}" in str(err.value)
    assert "\n" not in str(err.value)


def test_python_scorer_import_errors(user_module: str) -> None:
    with pytest.raises(CrossrouteError, match=r"python:no_such_mod_xyz:f: cannot import no_such_mod_xyz "
                                              r"\(ModuleNotFoundError"):
        make_scorer("python:no_such_mod_xyz:f")
    with pytest.raises(CrossrouteError, match=f"module {user_module} has no function 'missing'"):
        make_scorer(f"python:{user_module}:missing")
    with pytest.raises(CrossrouteError, match="must be python:package.module:function"):
        make_scorer("python:just_a_module")


# ----------------------------------------------------------------------------- specs and the registry


@pytest.mark.parametrize(("spec", "message"), [
    ("nope", "scorer 'nope' unknown; known scorers: code, exact, judge, math, qa, rubric"),
    ({"name": "qa", "mode": "contains"}, "scorer 'qa' has no option 'mode'; its options: match"),
    ({"name": "qa", "match": "fuzzy"}, "must be 'exact' or 'contains'"),
    ({"name": "math", "strict": True}, "scorer 'math' has no option 'strict'; its options: none"),
    ({"match": "contains"}, "has no 'name'"),
    (3, "must be a name or a mapping"),
])
def test_bad_specs(spec: object, message: str) -> None:
    with pytest.raises(CrossrouteError) as err:
        make_scorer(spec)  # type: ignore[arg-type]
    assert message in str(err.value)


def test_register_a_scorer() -> None:
    @register_scorer("shout")
    class Shout(Scorer):
        def __init__(self, word: str = "YES") -> None:
            self.word = word

        def score(self, example: Example, text: str) -> float:
            return 1.0 if self.word in text else 0.0

    try:
        s = make_scorer({"name": "shout", "word": "HEY"})
        assert s.name == "shout"
        assert s.score_batch([ex(), ex()], ["HEY you", "hey"]) == [1.0, 0.0]
        with pytest.raises(CrossrouteError, match="its options: word"):
            make_scorer({"name": "shout", "volume": 11})
    finally:
        SCORERS.pop("shout", None)


def test_default_score_batch_checks_lengths() -> None:
    with pytest.raises(CrossrouteError, match="2 examples but 1 completions"):
        make_scorer("exact").score_batch([ex("a"), ex("b")], ["a"])
