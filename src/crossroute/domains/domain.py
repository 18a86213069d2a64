"""A domain: examples per split, one scorer (the GRPO reward and the eval metric), and how prompts are shown.

The scorer sees only what follows the thinking (`think_end`); the prompt is rendered through the tokenizer's
chat template when the domain asks for it (`chat_template`: auto, true or false), identically in GRPO (TRL applies
the template to message-list prompts) and in eval (`prompt_ids`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from crossroute.core.errors import CrossrouteError
from crossroute.domains.answers import strip_thinking
from crossroute.domains.base import SPLITS, Example, split_of
from crossroute.domains.scorers import Scorer, make_scorer
from crossroute.domains.strata import stratified_fixed, stratified_generated

CHAT_MODES = ("auto", "true", "false")


@dataclass
class Domain:
    """A named task: a deterministic example generator (or fixed rows) per split and a per-example score in [0, 1]."""

    name: str
    description: str
    generate: Callable[[random.Random], Example] | None = None
    fixed: list[Example] | None = None
    max_new_tokens: int = 16
    kind: str = "exact"  # the scorer's name: exact, qa, math, code, rubric, judge or python:...
    source: str = "builtin"
    scorer: Scorer | None = None  # built from `kind` when not given
    think_end: str | None = "</think>"
    chat_template: str = "false"  # auto | true | false
    system_prompt: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    stratum: Callable[[Example], str] | None = None  # a generator's strata (eval sets keep their shares)
    eval_fixed: list[Example] | None = None  # the eval set pinned in a run directory (domains/evalset.py)
    _cache: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.chat_template not in CHAT_MODES:
            raise CrossrouteError(f"domain {self.name!r}: chat_template {self.chat_template!r} unknown; use "
                                  f"{', '.join(CHAT_MODES)}.")

    # ------------------------------------------------------------------ examples

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """Up to `n` distinct examples of `split`, deterministic given (split, n, seed).

        Eval sets are stratified (domains/strata.py): a stratum's share never depends on n. A pinned eval set
        (`eval_fixed`) is returned as it is, its first n."""
        if split not in SPLITS:
            raise CrossrouteError(f"split {split!r} unknown; use one of {', '.join(SPLITS)}.")
        if split == "eval" and self.eval_fixed is not None:
            return list(self.eval_fixed if n is None else self.eval_fixed[:n])
        key = f"{split}:{n}:{seed}"
        if key not in self._cache:
            self._cache[key] = self._draw(split, n, seed)
        return list(self._cache[key])

    def _draw(self, split: str, n: int | None, seed: int) -> list[Example]:
        """The examples of `split` without the cache (see `examples`)."""
        rng = random.Random(f"{self.name}:{split}:{seed}")
        if self.fixed is not None:
            pool = [e for e in self.fixed if (e.split or split_of(e.prompt)) == split]
            if split == "eval":
                return stratified_fixed(pool, n, rng)
            rng.shuffle(pool)
            return pool if n is None else pool[:n]
        assert self.generate is not None
        n = 200 if n is None else n
        max_draws = 200 * n + 10_000
        if split == "eval" and self.stratum is not None:
            return stratified_generated(self.generate, lambda e: split_of(e.prompt) == split, self.stratum, n, rng,
                                        max_draws)
        seen: set[str] = set()
        out: list[Example] = []
        tries = last_new = 0
        while len(out) < n and tries < max_draws:
            tries += 1
            ex = self.generate(rng)
            if ex.prompt in seen or split_of(ex.prompt) != split:
                if tries - last_new > max(20_000, 50 * len(out)):
                    break  # the split's distinct prompts are exhausted
                continue
            seen.add(ex.prompt)
            out.append(ex)
            last_new = tries
        return out

    # ------------------------------------------------------------------ scoring

    def get_scorer(self) -> Scorer:
        """The domain's scorer (built once from `kind` when none was given)."""
        if self.scorer is None:
            self.scorer = make_scorer(self.kind)
        return self.scorer

    def answer_part(self, completion: str) -> str:
        """What the scorer sees of a completion: the text after the thinking."""
        return strip_thinking(completion, self.think_end)

    def score(self, example: Example, completion: str) -> float:
        """Score one completion in [0, 1] (thinking removed first)."""
        return self.get_scorer().score(example, self.answer_part(completion))

    def score_batch(self, examples: list[Example], completions: list[str]) -> list[float]:
        """Scores of many completions at once (code runs its sandboxes in parallel, a judge its requests)."""
        return self.get_scorer().score_batch(examples, [self.answer_part(c) for c in completions])

    def reward(self, prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        """TRL GRPOTrainer reward: the example's columns arrive as keyword lists, one per completion."""
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        examples = [Example.from_row(p, kwargs, i) for i, p in enumerate(prompts)]
        return self.score_batch(examples, texts)

    def reward_func(self) -> Callable[..., list[float]]:
        """The reward as a plain function named after the domain (TRL logs rewards by __name__)."""

        def f(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
            return self.reward(prompts, completions, **kwargs)

        f.__name__ = f"reward_{re.sub(r'[^a-zA-Z0-9_]', '_', self.name)}"
        return f

    # ------------------------------------------------------------------ prompts

    def uses_chat(self, tokenizer: Any) -> bool:
        """Whether prompts go through the tokenizer's chat template (auto: when the tokenizer has one)."""
        if self.chat_template == "auto":
            return bool(getattr(tokenizer, "chat_template", None))
        if self.chat_template == "true" and not getattr(tokenizer, "chat_template", None):
            raise CrossrouteError(f"domain {self.name!r}: chat_template is true but the tokenizer has no chat "
                                  "template; set chat_template: false or use a chat model.")
        return self.chat_template == "true"

    def messages(self, example: Example) -> list[dict[str, str]]:
        """The conversation up to the assistant's turn: the system prompt, then the row's messages or its prompt."""
        msgs = ([dict(m) for m in example.messages] if example.messages
                else [{"role": "user", "content": example.prompt}])
        if self.system_prompt and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        return msgs

    def plain_prompt(self, example: Example) -> str:
        """The prompt as raw text (no chat template): the system prompt, if any, above the prompt."""
        return f"{self.system_prompt}\n\n{example.prompt}" if self.system_prompt else example.prompt

    def train_prompt(self, example: Example, tokenizer: Any) -> str | list[dict[str, str]]:
        """The `prompt` column TRL sees: a message list (TRL applies the chat template) or raw text."""
        return self.messages(example) if self.uses_chat(tokenizer) else self.plain_prompt(example)

    def prompt_ids(self, example: Example, tokenizer: Any) -> list[int]:
        """Token ids of the prompt exactly as TRL's GRPOTrainer builds them (same template, same specials)."""
        if self.uses_chat(tokenizer):
            enc = tokenizer.apply_chat_template([self.messages(example)], add_generation_prompt=True, tokenize=True,
                                                return_dict=True, **self.chat_template_kwargs)
            return list(enc["input_ids"][0])
        return list(tokenizer(text=self.plain_prompt(example))["input_ids"])

    def train_rows(self, examples: list[Example], tokenizer: Any) -> list[dict[str, Any]]:
        """Dataset rows for TRL: the prompt as this domain renders it plus the columns its scorer reads."""
        return [{**e.row(), "prompt": self.train_prompt(e, tokenizer)} for e in examples]
