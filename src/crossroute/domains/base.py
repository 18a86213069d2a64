"""A domain: prompts, a verifiable reward and an evaluator (DESIGN.md §1); examples, rubric scoring."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crossroute.core.errors import CrossrouteError

SPLITS = ("train", "eval")


EVAL_SHARE = 0.2  # share of the prompt space held out for evaluation


@dataclass(frozen=True)
class Example:
    """One prompt with its reference completion (or a rubric when there is no single answer)."""

    prompt: str
    answer: str
    rubric: dict[str, Any] | None = None
    split: str | None = None  # a JSONL line may pin its split; otherwise the prompt's hash decides

    def row(self) -> dict[str, Any]:
        """The dataset row TRL sees; extra columns reach reward functions as keyword arguments."""
        return {"prompt": self.prompt, "answer": self.answer, "rubric": json.dumps(self.rubric or {})}


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


@dataclass
class Domain:
    """A named task: a deterministic example generator per split and a per-example score in [0, 1]."""

    name: str
    description: str
    generate: Callable[[random.Random], Example] | None = None
    fixed: list[Example] | None = None
    max_new_tokens: int = 16
    kind: str = "exact"  # "exact" (exact-match answer) or "rubric"
    source: str = "builtin"
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """Up to `n` distinct examples of `split`, deterministic given (split, n, seed)."""
        if split not in SPLITS:
            raise CrossrouteError(f"split {split!r} unknown; use one of {', '.join(SPLITS)}.")
        if self.fixed is not None:
            pool = [e for e in self.fixed if self._split(e) == split]
            rng = random.Random(f"{self.name}:{split}:{seed}")
            pool = pool[:]
            rng.shuffle(pool)
            return pool if n is None else pool[:n]
        assert self.generate is not None
        n = 200 if n is None else n
        rng = random.Random(f"{self.name}:{split}:{seed}")
        seen: set[str] = set()
        out: list[Example] = []
        tries = 0
        while len(out) < n and tries < 200 * n + 10_000:
            tries += 1
            ex = self.generate(rng)
            if ex.prompt in seen or split_of(ex.prompt) != split:
                continue
            seen.add(ex.prompt)
            out.append(ex)
        return out

    @staticmethod
    def _split(ex: Example) -> str:
        return ex.split or split_of(ex.prompt)

    def score(self, example: Example, completion: str) -> float:
        """Score one completion in [0, 1]: exact match of the answer, or the rubric's fraction."""
        if self.kind == "rubric":
            return score_rubric(example.rubric or {}, completion)
        return 1.0 if normalise(completion) == normalise(example.answer) else 0.0

    def reward(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        """TRL GRPOTrainer reward: `answer`/`rubric` columns arrive as keyword lists, one per completion."""
        answers = kwargs.get("answer") or [""] * len(completions)
        rubrics = kwargs.get("rubric") or ["{}"] * len(completions)
        out = []
        for prompt, completion, answer, rubric in zip(prompts, completions, answers, rubrics, strict=True):
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            p = prompt if isinstance(prompt, str) else prompt[-1]["content"]
            r = json.loads(rubric) if isinstance(rubric, str) else rubric
            out.append(self.score(Example(p, answer, r or None), text))
        return out

    def reward_func(self) -> Callable[..., list[float]]:
        """The reward as a plain function named after the domain (TRL logs rewards by __name__)."""

        def f(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
            return self.reward(prompts, completions, **kwargs)

        f.__name__ = f"reward_{re.sub(r'[^a-zA-Z0-9_]', '_', self.name)}"
        return f


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
