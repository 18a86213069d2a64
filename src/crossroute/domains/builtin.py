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


# Question forms per attribute, each asked with every lead-in: 8 x 5 = 40 phrasings per attribute, so the 48
# entities x 3 attributes give about 5,800 prompts and an eval pool of about 1,150 (the same 144 facts).
QA_FORMS: dict[str, list[str]] = {
    "pet": ["pet of {e}?", "what pet has {e}?", "{e} owns which pet?", "which pet does {e} own?",
            "what pet does {e} keep?", "{e} has what pet?", "name the pet of {e}?", "the pet {e} owns?"],
    "color": ["color of {e}?", "what color is {e}?", "{e} likes which color?", "which color does {e} like?",
              "what color does {e} love?", "{e} prefers what color?", "name the color of {e}?",
              "the color {e} likes?"],
    "home": ["home of {e}?", "where does {e} live?", "{e} lives in what?", "what does {e} live in?",
             "where is {e}'s home?", "{e} dwells in what?", "name the home of {e}?", "the home {e} has?"],
}


QA_LEADS = ["", "tell me,", "quick,", "say,", "now,"]


QA_TEMPLATES: dict[str, list[str]] = {a: [f"Q:{lead}{form}" for lead in QA_LEADS for form in forms]
                                      for a, forms in QA_FORMS.items()}


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
    """One (2/3) or two (1/3) +/- operations on 0-29. The one-operation eval pool holds about 360 prompts, so
    above n of about 550 the eval set's mix leans to two operations (the eval-set manifest shows it)."""
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


CW_MUSTS = [0, 1, 2, 3]  # required words per prompt (at most n)
# About each stratum's share of the prompt space, so every stratum's eval pool holds its share of a 1,000-prompt
# eval set (a larger share of the small strata would run out of distinct prompts and change the mix with n).
CW_MUST_WEIGHTS = [1.5, 12.0, 43.0, 43.5]


def _gen_cw(rng: random.Random) -> Example:
    """n words (2-6) starting with one letter, from the lexicon, including 0-3 required words: about 9,300
    prompts, an eval pool of about 1,850."""
    letter = rng.choice(CW_LETTERS)
    n = rng.randint(2, 6)
    pool = BY_LETTER[letter]
    k = min(n, rng.choices(CW_MUSTS, CW_MUST_WEIGHTS)[0])
    musts = sorted(rng.sample(pool, k))
    words = musts + rng.sample([w for w in pool if w not in musts], n - k)
    rng.shuffle(words)
    rubric: dict[str, Any] = {"n_words": n, "starts_with": letter, "lexicon": True}
    prompt = f"W:{n} words,{letter}"
    if musts:
        rubric["must_include"] = musts
        prompt += ",with " + ",".join(musts)
    return Example(prompt, " ".join(words), rubric)


def math_stratum(e: Example) -> str:
    """Difficulty of a math prompt: its number of operations."""
    return f"{sum(e.prompt.count(c) for c in '+-')} ops"


def code_stratum(e: Example) -> str:
    """Difficulty of a code prompt: its number of statements before the print."""
    return f"{e.prompt.count(';')} statements"


_QA_ATTRIBUTE_OF = {t: a for a, ts in QA_TEMPLATES.items() for t in ts}


def qa_stratum(e: Example) -> str:
    """The attribute a qa prompt asks about (each has its own answer set)."""
    name = next((w for w in ENTITIES if w in e.prompt), "")
    return _QA_ATTRIBUTE_OF.get(e.prompt.replace(name, "{e}", 1), "other")


def cw_stratum(e: Example) -> str:
    """A cw prompt's constraint mix: how many words it requires."""
    return f"{len((e.rubric or {}).get('must_include') or [])} required"


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
    "cw": Domain("cw", "constrained writing (count, first letter, required words), rubric in [0,1]", _gen_cw,
                 max_new_tokens=40, kind="rubric", stratum=cw_stratum),
}


DEFAULT_DOMAINS = ("math", "code", "qa", "cw")
