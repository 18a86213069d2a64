"""Domains: deterministic prompt generators, TRL-shaped rewards and per-example scoring.

Built in (the embedded default's synthetic world, DESIGN.md section 4): `math`, `code`, `qa`, `cw`.
They share skills on purpose: math and code both compute, qa and cw both spell words from one lexicon.
Real domains load from local JSONL files (prompt + answer, or prompt + rubric).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CrossrouteError

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


# ----------------------------------------------------------------------------- rubric scoring

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


# ----------------------------------------------------------------------------- domain type

ScoreFn = Callable[[Example, str], float]


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


# ----------------------------------------------------------------------------- built-in world

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
    "math": Domain("math", "multi-step integer arithmetic (+/-), exact match", _gen_math, max_new_tokens=6),
    "code": Domain("code", "output of a tiny straight-line program, exact match", _gen_code, max_new_tokens=6),
    "qa": Domain("qa", "questions over a synthetic knowledge base of made-up entities", _gen_qa,
                 max_new_tokens=10),
    "cw": Domain("cw", "constrained writing (count, first letter, required word), rubric in [0,1]", _gen_cw,
                 max_new_tokens=24, kind="rubric"),
}
DEFAULT_DOMAINS = ("math", "code", "qa", "cw")


# ----------------------------------------------------------------------------- JSONL domains

def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CrossrouteError(f"{path}: not UTF-8 text; a JSONL domain is one JSON object per line.") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CrossrouteError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}).") from None
        if not isinstance(obj, dict):
            raise CrossrouteError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field.")
        yield lineno, obj


def _validate_row(path: Path, lineno: int, obj: dict[str, Any]) -> Example:
    where = f"{path}:{lineno}"
    unknown = set(obj) - {"prompt", "answer", "rubric", "split", "id"}
    if unknown:
        raise CrossrouteError(f"{where}: unknown field {sorted(unknown)[0]!r}; allowed: prompt, answer, rubric, "
                              "split, id.")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise CrossrouteError(f"{where}: field 'prompt' must be a non-empty string.")
    has_answer, has_rubric = "answer" in obj, "rubric" in obj
    if has_answer == has_rubric:
        raise CrossrouteError(f"{where}: give exactly one of field 'answer' (string) or 'rubric' (object).")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise CrossrouteError(f"{where}: field 'split' must be 'train' or 'eval', got {split!r}.")
    if has_answer:
        if not isinstance(obj["answer"], str | int | float) or isinstance(obj["answer"], bool):
            raise CrossrouteError(f"{where}: field 'answer' must be a string.")
        return Example(prompt, str(obj["answer"]), None, split)
    rubric = obj["rubric"]
    if not isinstance(rubric, dict) or not rubric:
        raise CrossrouteError(f"{where}: field 'rubric' must be a non-empty object of rules "
                              f"({', '.join(sorted(RUBRIC_KEYS))}).")
    bad = set(rubric) - RUBRIC_KEYS
    if bad:
        raise CrossrouteError(f"{where}: field 'rubric.{sorted(bad)[0]}' unknown; rules: "
                              f"{', '.join(sorted(RUBRIC_KEYS))}.")
    for key in ("n_words", "min_words", "max_words"):
        if key in rubric and (not isinstance(rubric[key], int) or isinstance(rubric[key], bool) or rubric[key] < 0):
            raise CrossrouteError(f"{where}: field 'rubric.{key}' must be a non-negative integer.")
    for key in ("must_include", "must_exclude"):
        if key in rubric and not (isinstance(rubric[key], list) and all(isinstance(w, str) for w in rubric[key])):
            raise CrossrouteError(f"{where}: field 'rubric.{key}' must be a list of strings.")
    if "starts_with" in rubric and not (isinstance(rubric["starts_with"], str) and rubric["starts_with"]):
        raise CrossrouteError(f"{where}: field 'rubric.starts_with' must be a non-empty string.")
    if "lexicon" in rubric and not (rubric["lexicon"] is True or isinstance(rubric["lexicon"], list)):
        raise CrossrouteError(f"{where}: field 'rubric.lexicon' must be true or a list of words.")
    return Example(prompt, str(obj.get("id", "")), rubric, split)


def load_jsonl_domain(path: str | Path, name: str | None = None) -> Domain:
    """A domain from a local JSONL file; every line is validated, errors name file, line and field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CrossrouteError(f"{path}: no such JSONL file; give a domain name ({', '.join(BUILTIN)}) or a path.")
    rows = [_validate_row(path, lineno, obj) for lineno, obj in _iter_jsonl(path)]
    if not rows:
        raise CrossrouteError(f"{path}: empty; a JSONL domain needs at least one line with a 'prompt'.")
    kinds = {e.rubric is not None for e in rows}
    if len(kinds) > 1:
        raise CrossrouteError(f"{path}: mixes 'answer' and 'rubric' lines; use one kind per domain file.")
    seen: dict[str, int] = {}
    for i, e in enumerate(rows):
        if e.prompt in seen:
            raise CrossrouteError(f"{path}: line {i + 1} repeats the prompt of line {seen[e.prompt] + 1}; "
                                  "prompts must be unique so train and eval never share one.")
        seen[e.prompt] = i
    kind = "rubric" if kinds.pop() else "exact"
    longest = max(len(e.answer) for e in rows) if kind == "exact" else 64
    return Domain(name or path.stem, f"JSONL domain from {path}", fixed=rows, kind=kind,
                  max_new_tokens=max(8, min(512, 2 * longest)), source=str(path))


def _is_code_jsonl(path: Path) -> bool:
    """A JSONL whose first object has a 'tests' field is a code domain (executed in the sandbox)."""
    try:
        for _, obj in _iter_jsonl(path):
            return "tests" in obj
    except (CrossrouteError, OSError):
        return False  # the regular loader reports the error with file and line
    return False


def load_domain_file(path: str | Path, name: str | None = None) -> Domain:
    """A JSONL domain: code (prompt + tests, sandboxed) or prompt + answer / prompt + rubric."""
    path = Path(path).expanduser()
    if path.is_file() and _is_code_jsonl(path):
        from .sandbox import load_code_domain

        return load_code_domain(path, name)
    return load_jsonl_domain(path, name)


def get_domain(spec: str) -> Domain:
    """Resolve a domain spec: a built-in name, a JSONL path, or NAME=PATH."""
    spec = spec.strip()
    if spec in BUILTIN:
        return BUILTIN[spec]
    if "=" in spec:
        name, path = spec.split("=", 1)
        return load_domain_file(path, name.strip())
    if spec.endswith(".jsonl") or "/" in spec:
        return load_domain_file(spec)
    raise CrossrouteError(f"unknown domain {spec!r}; use one of {', '.join(BUILTIN)}, a .jsonl path, or NAME=PATH.")


def parse_domains(specs: str | list[str]) -> list[Domain]:
    """Parse a comma-separated list (or list) of domain specs, refusing empties and duplicates."""
    items = [s for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise CrossrouteError("no domains given; pass e.g. --domains math,code,qa,cw.")
    doms = [get_domain(s) for s in items]
    names = [d.name for d in doms]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise CrossrouteError(f"domain {dup!r} given twice in --domains.")
    return doms
