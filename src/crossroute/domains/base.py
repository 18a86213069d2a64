"""What a domain is made of: examples, splits, answer normalisation and rubric checks (DESIGN.md §1)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

SPLITS = ("train", "eval")


EVAL_SHARE = 0.2  # share of the prompt space held out for evaluation


@dataclass(frozen=True)
class Example:
    """One prompt with what its completions are scored against.

    `prompt` is the user turn's text (for a conversational row, the last user message); `messages`, when set,
    is the whole conversation up to the assistant turn. `answer` is the reference (for qa the first alias),
    `answers` every accepted alias, `tests` Python test code and `entry_point` the function a HumanEval-style
    `check(candidate)` test is called on. `rubric` holds rule checks for writing rows. `stratum` names the
    stratum an eval set keeps in fixed proportion (a file's level column, a generator's number of steps).
    """

    prompt: str
    answer: str
    rubric: dict[str, Any] | None = None
    split: str | None = None  # a line may pin its split; otherwise the prompt's hash decides
    answers: tuple[str, ...] = ()
    tests: str = ""
    entry_point: str = ""
    messages: tuple[dict[str, str], ...] | None = None
    id: str = ""
    where: str = ""  # file:line of the row, for error messages
    stratum: str = ""  # the difficulty/kind stratum eval sets are stratified by ("" when the domain has none)

    def row(self) -> dict[str, Any]:
        """The dataset row TRL sees; extra columns reach reward functions as keyword arguments."""
        return {"prompt": self.prompt, "answer": self.answer, "rubric": json.dumps(self.rubric or {}),
                "answers": json.dumps(list(self.answers)), "tests": self.tests, "entry_point": self.entry_point}

    @staticmethod
    def from_row(prompt: Any, row: dict[str, Any], i: int) -> Example:
        """The Example behind the i-th completion of a TRL reward call (columns arrive as keyword lists)."""

        def col(key: str, default: Any) -> Any:
            vals = row.get(key)
            return vals[i] if vals is not None and i < len(vals) else default

        text = prompt if isinstance(prompt, str) else next(
            (m["content"] for m in reversed(prompt) if m.get("role") == "user"), prompt[-1]["content"])
        rubric = col("rubric", "{}")
        rubric = json.loads(rubric) if isinstance(rubric, str) else rubric
        answers = col("answers", "[]")
        answers = json.loads(answers) if isinstance(answers, str) else answers
        return Example(text, str(col("answer", "")), rubric or None, None, tuple(answers or ()),
                       str(col("tests", "") or ""), str(col("entry_point", "") or ""))


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, from a stable hash: train and eval never share a prompt."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big")
    return "eval" if (h % 10_000) < EVAL_SHARE * 10_000 else "train"


def normalise(text: str) -> str:
    """Canonical form for exact-match comparison: trimmed, single-spaced, lower-case."""
    return " ".join(text.strip().split()).lower()


RUBRIC_KEYS = {"n_words", "min_words", "max_words", "starts_with", "must_include", "must_exclude", "lexicon"}


def score_rubric(rubric: dict[str, Any], completion: str) -> float:
    """Fraction in [0, 1] of the rubric's rule checks that `completion` satisfies (partial credit)."""
    words = normalise(completion).split()
    checks: list[float] = []
    if "n_words" in rubric:
        checks.append(1.0 if len(words) == int(rubric["n_words"]) else 0.0)
    if "min_words" in rubric:
        checks.append(1.0 if len(words) >= int(rubric["min_words"]) else 0.0)
    if "max_words" in rubric:
        checks.append(1.0 if len(words) <= int(rubric["max_words"]) else 0.0)
    if "starts_with" in rubric:
        letter = str(rubric["starts_with"]).lower()
        checks.append(sum(w.startswith(letter) for w in words) / len(words) if words else 0.0)
    if "lexicon" in rubric:
        lex = set(rubric["lexicon"]) if isinstance(rubric["lexicon"], list) else LEXICON_SET
        ok = [w in lex for w in words]
        distinct = len(set(words)) == len(words)
        checks.append((sum(ok) / len(words) if words else 0.0) * (1.0 if distinct else 0.5))
    for w in rubric.get("must_include", []):
        checks.append(1.0 if normalise(w) in words else 0.0)
    for w in rubric.get("must_exclude", []):
        checks.append(0.0 if normalise(w) in words else 1.0)
    return sum(checks) / len(checks) if checks else 0.0


# One lexicon shared by qa (attribute values) and cw (constrained writing): the shared "word" routes.
LEXICON = """
ant ape arm art ash axe bag bat bay bed bee bell big bird boat bog bow box bud bus
cab cake calm cap car cat cave cod cow cup dam day den dew dig dog doll dot dove duck
ear egg elf elk elm emu end eve eye fan far fig fin fir fish fog fox frog fun gap gas
gem gift goat gold gum hat hay hen hill hog hop hut ice ink inn ion ivy jam jar jay jet
jog joy jug kelp key kid kin kit kite lab lake lamp leaf leg lid lime lion log lot map
mat mint mist mole moon mud mug nap net newt nest nut oak oar oat owl ox pan pea pen pet
pig pin pod pot ram rat ray red rib rock rod rope rug sap sea seal ship sky sun
tan tap tea tin toe top toy tub van vat vet vine wax web wig wind wolf yak yam yarn
""".split()


LEXICON_SET = frozenset(LEXICON)
