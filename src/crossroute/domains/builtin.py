"""The built-in synthetic domains of the embedded default (DESIGN.md §4): math, code, qa, cw."""

from __future__ import annotations

import random
from typing import Any

from crossroute.domains.base import LEXICON, Example
from crossroute.domains.domain import Domain

BY_LETTER: dict[str, list[str]] = {}
for _w in LEXICON:
    BY_LETTER.setdefault(_w[0], []).append(_w)


CW_LETTERS = sorted(k for k, v in BY_LETTER.items() if len(v) >= 6)


_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]


_VOWELS = ["a", "e", "i", "o", "u"]


_CODAS = ["n", "r", "l", "x", "m", "th", "sk"]


QA_ATTRIBUTES: dict[str, list[str]] = {
    "pet": ["cat", "dog", "owl", "rat", "yak", "hen", "fox", "newt"],
    "color": ["red", "tan", "gold", "lime", "mint", "ash", "jet", "ivy"],
    "home": ["cave", "hut", "ship", "inn", "lake", "hill", "den", "oak"],
}


QA_TEMPLATES: dict[str, list[str]] = {
    "pet": ["Q:pet of {e}?", "Q:what pet has {e}?", "Q:{e} owns which pet?"],
    "color": ["Q:color of {e}?", "Q:what color is {e}?", "Q:{e} likes which color?"],
    "home": ["Q:home of {e}?", "Q:where does {e} live?", "Q:{e} lives in what?"],
}


FACT_TEMPLATES = {"pet": "{e} owns a {v}.", "color": "{e} likes {v}.", "home": "{e} lives in a {v}."}


N_ENTITIES = 48


def _entities() -> list[str]:
    rng = random.Random("crossroute-entities")
    names: list[str] = []
    while len(names) < N_ENTITIES:
        name = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS) + rng.choice(_VOWELS)
                + rng.choice(_CODAS)).capitalize()
        if name not in names:
            names.append(name)
    return names


ENTITIES = _entities()


def _knowledge_base() -> dict[str, dict[str, str]]:
    rng = random.Random("crossroute-kb")
    return {e: {a: rng.choice(vals) for a, vals in QA_ATTRIBUTES.items()} for e in ENTITIES}


KB = _knowledge_base()


def kb_facts() -> list[str]:
    """Every fact of the synthetic knowledge base as a sentence; pretraining reads all of them."""
    return [FACT_TEMPLATES[a].format(e=e, v=v) for e, attrs in KB.items() for a, v in attrs.items()]


def _gen_math(rng: random.Random) -> Example:
    n_ops = rng.choice([1, 1, 2])
    expr = str(rng.randint(0, 29))
    for _ in range(n_ops):
        op = rng.choice("+-")
        expr += op + str(rng.randint(0, 29))
    return Example(f"M:{expr}=", str(eval(expr)))  # only digits and +/-: safe to evaluate


def _gen_code(rng: random.Random) -> Example:
    names = ["a", "b", "c"]
    env: dict[str, int] = {}
    stmts: list[str] = []
    first = rng.choice(names)
    env[first] = rng.randint(0, 9)
    stmts.append(f"{first}={env[first]}")
    for _ in range(rng.choice([1, 1, 2, 3])):
        target = rng.choice(names)
        src = rng.choice(sorted(env))
        op = rng.choice("+-*")
        k = rng.randint(1, 9) if op != "*" else rng.randint(2, 3)
        env[target] = eval(f"{env[src]}{op}{k}")  # int arithmetic on literals only
        stmts.append(f"{target}={src}{op}{k}")
    out = rng.choice(sorted(env))
    # The toy language terminates every line it prints with ';' (math answers carry none).
    return Example("C:" + ";".join(stmts) + f";print({out})", f"{env[out]};")


def _gen_qa(rng: random.Random) -> Example:
    e = rng.choice(ENTITIES)
    a = rng.choice(sorted(QA_ATTRIBUTES))
    return Example(rng.choice(QA_TEMPLATES[a]).format(e=e), f"a {KB[e][a]}")  # answers take the article


def _gen_cw(rng: random.Random) -> Example:
    letter = rng.choice(CW_LETTERS)
    n = rng.randint(2, 5)
    pool = BY_LETTER[letter]
    words = rng.sample(pool, n)
    rubric: dict[str, Any] = {"n_words": n, "starts_with": letter, "lexicon": True}
    if rng.random() < 0.5:
        must = rng.choice(pool)
        rubric["must_include"] = [must]
        if must not in words:
            words[rng.randrange(n)] = must
        prompt = f"W:{n} words,{letter},with {must}"
    else:
        prompt = f"W:{n} words,{letter}"
    return Example(prompt, " ".join(words), rubric)


def math_stratum(e: Example) -> str:
    """Difficulty of a math prompt: its number of operations."""
    return f"{sum(e.prompt.count(c) for c in '+-')} ops"


def code_stratum(e: Example) -> str:
    """Difficulty of a code prompt: its number of statements before the print."""
    return f"{e.prompt.count(';')} statements"


def qa_stratum(e: Example) -> str:
    """The attribute a qa prompt asks about (each has its own answer set)."""
    return next(a for a, templates in QA_TEMPLATES.items()
                if any(e.prompt.startswith(t.split("{e}")[0]) and e.prompt.endswith(t.split("{e}")[1])
                       for t in templates))


def cw_stratum(e: Example) -> str:
    """A cw prompt's constraint mix: its word count and whether a word is required."""
    rubric = e.rubric or {}
    return f"{rubric.get('n_words')} words{' +word' if rubric.get('must_include') else ''}"


# Answer conventions that pairs of domains share a route for and disagree on (DESIGN.md section 4):
# math writes a bare number, code ends its printed number with ';'; qa answers take the article 'a',
# cw writes bare words. Pretraining sees each domain's answers half in the other domain's convention,
# so the pretrained model is unsure, RL on one domain settles the shared decision its own way, and a
# later domain that wants the opposite settles it back: forgetting through a shared route.
def other_convention(domain: str, answer: str) -> str:
    """The answer written in the convention of the domain it conflicts with (used only in pretraining)."""
    if domain == "math":
        return answer + ";"
    if domain == "code":
        return answer.removesuffix(";")
    if domain == "qa":
        return answer.removeprefix("a ")
    if domain == "cw":
        return "a " + answer
    return answer


BUILTIN: dict[str, Domain] = {
    "math": Domain("math", "multi-step integer arithmetic (+/-), exact match", _gen_math, max_new_tokens=6,
                   stratum=math_stratum),
    "code": Domain("code", "output of a tiny straight-line program, exact match", _gen_code, max_new_tokens=6,
                   stratum=code_stratum),
    "qa": Domain("qa", "questions over a synthetic knowledge base of made-up entities", _gen_qa,
                 max_new_tokens=10, stratum=qa_stratum),
    "cw": Domain("cw", "constrained writing (count, first letter, required word), rubric in [0,1]", _gen_cw,
                 max_new_tokens=24, kind="rubric", stratum=cw_stratum),
}


DEFAULT_DOMAINS = ("math", "code", "qa", "cw")
