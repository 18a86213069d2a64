"""The pure answer functions: strip_thinking, math extraction and equivalence (math-verify), SQuAD QA matching."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossroute.domains.answers import (
    extract_math_answer,
    math_equal,
    math_gold,
    parses_as_math,
    qa_match,
    squad_normalize,
    strip_thinking,
)

GSM8K_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")

# ----------------------------------------------------------------------------- strip_thinking


@pytest.mark.parametrize(("text", "want"), [
    ("<think>maybe 29</think>30", "30"),
    ("<think>30</think>29", "29"),
    ("<think>unfinished 30", ""),
    ("no tags at all 30", "no tags at all 30"),
    ("<think>a</think>b<think>c</think>d", "d"),  # the last end tag wins
    ("stray </think> tail", " tail"),
])
def test_strip_thinking(text: str, want: str) -> None:
    assert strip_thinking(text) == want


def test_strip_thinking_disabled_and_custom_tags() -> None:
    assert strip_thinking("<think>x</think>y", None) == "<think>x</think>y"
    assert strip_thinking("[R]draft[/R]final", "[/R]", "[R]") == "final"
    assert strip_thinking("[R]never finished", "[/R]", "[R]") == ""


_tagless = st.text(max_size=60).filter(lambda s: "<think>" not in s and "</think>" not in s)


@given(st.lists(st.sampled_from(["<think>", "</think>", "a", "30", " ", "<", ">", "/think"]), max_size=12))
def test_strip_thinking_never_leaves_think_end(parts: list[str]) -> None:
    assert "</think>" not in strip_thinking("".join(parts))


@given(_tagless)
def test_strip_thinking_is_identity_without_tags(text: str) -> None:
    assert strip_thinking(text) == text


# ----------------------------------------------------------------------------- math extraction


@pytest.mark.parametrize(("text", "want"), [
    ("The answer is \\boxed{30}.", "30"),
    ("first \\boxed{1}, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box
    ("nested \\boxed{\\frac{a}{\\sqrt{2}}}", "\\frac{a}{\\sqrt{2}}"),  # balanced braces
    ("\\fbox{7} done", "7"),
    ("closed \\boxed{4} then unclosed \\boxed{5", "4"),
    ("Natalia sold 48/2 = 24 clips.\n#### 30", "30"),
    ("work 12\n#### 1,234", "1,234"),
    ("So the answer is 3.5.", "3.5"),
    ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("**Final Answer:** 42", "42"),
    ("The final answer is $30$. I hope it is correct.", "30"),
    ("x = 5-3 = 2", "2"),
    ("it drops to -7", "-7"),
    ("we counted 1,234 birds", "1,234"),
    ("three quarters: 3/4 of the cake", "3/4"),
    ("So the probability is $\\frac{1}{2}$.", "\\frac{1}{2}"),  # the formula, not its last digit
    ("\\frac12", "\\frac12"),  # a bare LaTeX completion
    ("She pays $5 and gets $3 back", "3"),  # dollars, not a formula
    ("With $x = 2$ we get 7 apples", "7"),  # a number after the last formula
    ("no numbers here", None),
])
def test_extract_math_answer(text: str, want: str | None) -> None:
    assert extract_math_answer(text) == want


@given(st.integers(min_value=-10**12, max_value=10**12), st.text(max_size=30).filter(lambda s: "\\" not in s))
def test_extract_boxed_integer(n: int, before: str) -> None:
    assert extract_math_answer(f"{before} \\boxed{{{n}}}") == str(n)


def test_math_gold() -> None:
    assert math_gold(GSM8K_ANSWER) == "72"
    assert math_gold("so the probability is $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert math_gold("72") == "72"
    assert math_gold(" \\frac{3}{4} ") == "\\frac{3}{4}"


# ----------------------------------------------------------------------------- math equivalence


@pytest.mark.parametrize(("gold", "pred", "want"), [
    ("\\frac{1}{2}", "\\frac12", True),
    ("\\frac{1}{2}", "0.5", True),
    ("0.5", "1/2", True),
    ("30", "30.", True),
    ("1234", "1,234", True),
    ("30", "30", True),
    ("30", "29", False),
    ("3\\sqrt{2}", "3", False),  # a raw parse would read only the 3
    ("3\\sqrt{2}", "3\\sqrt2", True),
    ("1024", "2^{10}", True),
    ("x^2+1", "1+x^2", True),
    ("18", "18 dollars", True),
    ("30", "", False),
])
def test_math_equal(gold: str, pred: str, want: bool) -> None:
    assert math_equal(gold, pred) is want


@pytest.mark.parametrize("pred", ["9^{9^{9^{9}}}", "100!!", "(10^{10})!"])
def test_explosive_predictions_are_refused_quickly(pred: str) -> None:
    got: list[bool] = []
    worker = threading.Thread(target=lambda: got.append(math_equal("5", pred)), daemon=True)
    worker.start()  # no signal timeout off the main thread: the size guard must stop these
    worker.join(timeout=20)
    assert got == [False]


def test_math_equal_works_in_worker_threads() -> None:
    got: list[bool] = []
    worker = threading.Thread(target=lambda: got.extend([math_equal("\\frac{1}{2}", "0.5"), math_equal("2", "3")]))
    worker.start()
    worker.join(timeout=30)
    assert got == [True, False]


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=-10**9, max_value=10**9))
def test_math_equal_on_stated_integers(n: int) -> None:
    assert math_equal(str(n), f"The answer is {n}.")
    assert math_equal(str(n), extract_math_answer(f"The answer is {n}.") or "")
    assert not math_equal(str(n), str(n + 1))


def test_parses_as_math() -> None:
    assert parses_as_math("72")
    assert parses_as_math(GSM8K_ANSWER)
    assert parses_as_math("\\frac12")
    assert not parses_as_math("Paris")
    assert not parses_as_math("")


# ----------------------------------------------------------------------------- QA


def test_squad_normalize() -> None:
    assert squad_normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert squad_normalize("An apple, a pear and THE plum.") == "apple pear and plum"


def test_qa_match() -> None:
    assert qa_match(["Rome"], "The capital is Rome.", "contains")
    assert not qa_match(["Rome"], "The capital is Rome.", "exact")
    assert qa_match(["Rome"], "rome.", "exact")
    assert not qa_match(["Rome"], "Romeo", "contains")  # whole tokens only
    assert qa_match(["Paris", "New York"], "It is New York, I think", "contains")
    assert not qa_match(["New York"], "York New", "contains")  # contiguous, in order
    assert not qa_match(["the"], "", "exact")  # an alias empty once normalised never matches
    with pytest.raises(ValueError):
        qa_match(["Rome"], "Rome", "fuzzy")  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_squad_normalize_is_idempotent(s: str) -> None:
    assert squad_normalize(squad_normalize(s)) == squad_normalize(s)


@given(st.lists(st.text(max_size=20), min_size=1, max_size=3), st.text(max_size=40))
def test_qa_exact_implies_contains(aliases: list[str], text: str) -> None:
    if qa_match(aliases, text, "exact"):
        assert qa_match(aliases, text, "contains")


@given(st.lists(st.sampled_from(["rome", "the", "capital", "is", "Rome.", "a", "city"]), min_size=1, max_size=6))
def test_qa_exact_implies_contains_on_likely_words(words: list[str]) -> None:
    text = " ".join(words)
    assert qa_match([text], text, "exact") == bool(squad_normalize(text))
    assert qa_match([text], f"Well, {text} indeed", "contains") == bool(squad_normalize(text))
