"""Built-in domains: rewards on hand-written answers, split disjointness, JSONL validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import LEXICON_SET, Example, normalise, score_rubric, split_of
from crossroute.domains.builtin import BUILTIN, KB
from crossroute.domains.files import get_domain, load_jsonl_domain, parse_domains


@pytest.mark.parametrize("name", list(BUILTIN))
def test_train_and_eval_never_share_a_prompt(name: str) -> None:
    d = BUILTIN[name]
    train = {e.prompt for e in d.examples("train", 2000)}
    ev = {e.prompt for e in d.examples("eval", 300)}
    assert train and ev
    assert not train & ev
    assert all(split_of(p) == "eval" for p in ev)


@pytest.mark.parametrize("name", list(BUILTIN))
def test_generators_are_deterministic(name: str) -> None:
    d = BUILTIN[name]
    assert d.examples("train", 50, seed=3) == d.examples("train", 50, seed=3)
    assert d.examples("train", 50, seed=3) != d.examples("train", 50, seed=4)


def test_math_reward_on_hand_written_answers() -> None:
    r = BUILTIN["math"].reward_func()
    prompts = ["M:12+7-3=", "M:12+7-3=", "M:12+7-3=", "M:40-45="]
    got = r(prompts, ["16", " 16 ", "17", "-5"], answer=["16", "16", "16", "-5"])
    assert got == [1.0, 1.0, 0.0, 1.0]
    assert r.__name__ == "reward_math"


def test_math_and_code_answers_are_correct() -> None:
    for e in BUILTIN["math"].examples("train", 50):
        assert int(e.answer) == eval(e.prompt[2:-1])
    ex = Example("C:a=3;b=a*2;a=b-1;print(a)", "5;")
    code = BUILTIN["code"]
    assert code.score(ex, "5;") == 1.0 and code.score(ex, "6;") == 0.0 and code.score(ex, "5") == 0.0
    for e in BUILTIN["code"].examples("train", 50):
        env: dict[str, int] = {}
        body = e.prompt[2:].split(";print(")
        exec(body[0].replace(";", "\n"), {}, env)  # the generator's own straight-line program
        assert f"{env[body[1][:-1]]};" == e.answer


def test_qa_answers_come_from_the_knowledge_base() -> None:
    for e in BUILTIN["qa"].examples("eval", 30):
        entity = next(name for name in KB if name in e.prompt)
        assert e.answer.startswith("a ") and e.answer[2:] in KB[entity].values()
    r = BUILTIN["qa"].reward_func()
    assert r(["Q:pet of X?"] * 3, ["a cat", "a dog", "cat"], answer=["a cat"] * 3) == [1.0, 0.0, 0.0]


def test_conflicting_conventions_are_wrong_in_the_other_domain() -> None:
    from crossroute.domains.builtin import other_convention

    for name in BUILTIN:
        d = BUILTIN[name]
        for e in d.examples("train", 30):
            assert d.score(e, e.answer) == 1.0
            assert d.score(e, other_convention(name, e.answer)) < 1.0


def test_cw_rubric_hand_scored() -> None:
    rubric = {"n_words": 3, "starts_with": "b", "lexicon": True, "must_include": ["bat"]}
    assert score_rubric(rubric, "bat bee bog") == 1.0
    # wrong count (0), 2/4 start with b (bat, bee), 3/4 in the lexicon (zzz is not), bat present
    assert score_rubric(rubric, "bat bee zzz cat") == pytest.approx((0 + 2 / 4 + 3 / 4 + 1) / 4)
    # repeated word halves the lexicon check
    assert score_rubric(rubric, "bat bat bat") == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert score_rubric(rubric, "") == 0.0
    r = BUILTIN["cw"].reward_func()
    assert r(["W:3 words,b,with bat"], ["bat bee bog"], answer=[""], rubric=[json.dumps(rubric)]) == [1.0]


def test_cw_reference_answers_score_full_marks() -> None:
    d = BUILTIN["cw"]
    for e in d.examples("train", 100):
        assert d.score(e, e.answer) == 1.0
        assert all(w in LEXICON_SET for w in e.answer.split())


@given(st.text(max_size=60))
def test_rubric_score_is_bounded(text: str) -> None:
    rubric = {"n_words": 2, "starts_with": "c", "lexicon": True, "must_include": ["cat"], "must_exclude": ["cow"]}
    assert 0.0 <= score_rubric(rubric, text) <= 1.0


@given(st.text(max_size=40))
def test_normalise_is_idempotent(text: str) -> None:
    assert normalise(normalise(text)) == normalise(text)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_domain_loads_and_splits(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": f"What is {i}+1?", "answer": str(i + 1)}) for i in range(50)]
    rows.append(json.dumps({"prompt": "pinned", "answer": "x", "split": "eval"}))
    d = load_jsonl_domain(_write(tmp_path / "arith.jsonl", rows))
    assert d.name == "arith" and d.kind == "exact"
    train, ev = d.examples("train"), d.examples("eval")
    assert len(train) + len(ev) == 51 and not {e.prompt for e in train} & {e.prompt for e in ev}
    assert "pinned" in {e.prompt for e in ev}
    assert get_domain(f"mine={tmp_path / 'arith.jsonl'}").name == "mine"


def test_jsonl_rubric_domain(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": f"write {i}", "rubric": {"min_words": 2, "must_include": ["sun"]}})
            for i in range(10)]
    d = load_jsonl_domain(_write(tmp_path / "w.jsonl", rows))
    assert d.kind == "rubric"
    ex = d.examples("train") + d.examples("eval")
    assert d.score(ex[0], "the sun") == 1.0 and d.score(ex[0], "moon") == 0.0


@pytest.mark.parametrize(
    "line, needle",
    [
        ("{not json", "w.jsonl:2: invalid JSON"),
        ('["a"]', "w.jsonl:2: expected a JSON object"),
        ('{"answer": "1"}', "w.jsonl:2: field 'prompt'"),
        ('{"prompt": "", "answer": "1"}', "w.jsonl:2: field 'prompt'"),
        ('{"prompt": "p"}', "w.jsonl:2: give exactly one of field 'answer'"),
        ('{"prompt": "p", "answer": "1", "rubric": {"n_words": 1}}', "exactly one"),
        ('{"prompt": "p", "answer": "1", "extra": 1}', "unknown field 'extra'"),
        ('{"prompt": "p", "answer": "1", "split": "dev"}', "field 'split'"),
        ('{"prompt": "p", "rubric": {"n_words": -1}}', "field 'rubric.n_words'"),
        ('{"prompt": "p", "rubric": {"colour": 1}}', "field 'rubric.colour' unknown"),
        ('{"prompt": "p", "rubric": {"must_include": "sun"}}', "field 'rubric.must_include'"),
        ('{"prompt": "q", "answer": null}', "field 'answer'"),
    ],
)
def test_jsonl_validation_names_file_line_and_field(tmp_path: Path, line: str, needle: str) -> None:
    path = _write(tmp_path / "w.jsonl", ['{"prompt": "ok", "answer": "1"}', line])
    with pytest.raises(CrossrouteError) as e:
        load_jsonl_domain(path)
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_jsonl_whole_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CrossrouteError, match="empty"):
        load_jsonl_domain(_write(tmp_path / "e.jsonl", [""]))
    with pytest.raises(CrossrouteError, match="no such JSONL"):
        load_jsonl_domain(tmp_path / "missing.jsonl")
    dup = ['{"prompt": "a", "answer": "1"}', '{"prompt": "a", "answer": "2"}']
    with pytest.raises(CrossrouteError, match=":2: field 'prompt' repeats the prompt of line 1"):
        load_jsonl_domain(_write(tmp_path / "d.jsonl", dup))
    mixed = ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "rubric": {"n_words": 1}}']
    with pytest.raises(CrossrouteError, match="mixes"):
        load_jsonl_domain(_write(tmp_path / "m.jsonl", mixed))


def test_parse_domains_errors() -> None:
    assert [d.name for d in parse_domains("math, qa")] == ["math", "qa"]
    with pytest.raises(CrossrouteError, match="unknown domain 'chess'"):
        parse_domains("math,chess")
    with pytest.raises(CrossrouteError, match="twice"):
        parse_domains("math,math")
    with pytest.raises(CrossrouteError, match="no domains"):
        parse_domains(" , ")


def test_jsonl_with_tests_is_a_sandboxed_code_domain(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": f"def f(): return {i}", "tests": f"assert f() == {i}"}) for i in range(6)]
    d = get_domain(f"pycode={_write(tmp_path / 'c.jsonl', rows)}")
    assert d.kind == "code" and d.name == "pycode"
    ex = (d.examples("train") + d.examples("eval"))[0]
    want = ex.tests.split("== ")[1]
    assert d.score(ex, f"def f():\n    return {want}") == 1.0
    assert d.score(ex, "def f():\n    return -1") == 0.0


_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                            lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                            max_leaves=6)
_lines = st.one_of(
    st.text(max_size=40),
    st.dictionaries(st.sampled_from(["prompt", "answer", "rubric", "split", "id", "tests", "x"]), _json_values,
                    max_size=4).map(json.dumps),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_lines, max_size=6))
def test_jsonl_loader_fuzz_never_crashes(lines: list[str]) -> None:
    """Any file content either loads or gives a one-line CrossrouteError naming the file."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.jsonl"
        path.write_text("\n".join(lines))
        try:
            d = get_domain(str(path))
        except CrossrouteError as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            assert d.examples("train") + d.examples("eval")


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=80), _json_values.map(json.dumps)))
def test_train_yaml_fuzz_never_crashes(text: str) -> None:
    """Any YAML text either validates or gives a one-line CrossrouteError naming the file."""
    import tempfile

    from crossroute.experiments.sequence import load_train_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(text)
        try:
            load_train_config(path)
        except CrossrouteError as e:
            assert str(path) in str(e) and "\n" not in str(e)
