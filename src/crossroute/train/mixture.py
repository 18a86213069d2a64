"""Mixed multi-domain RL: one GRPO stage on a weighted mixture of domains (the baseline every multi-domain paper
compares a sequence with), each prompt rewarded by its own domain's scorer.

Rows carry their domain in DOMAIN_COLUMN; there is one TRL reward function per domain, named after it (TRL logs
`rewards/reward_<domain>/mean` per function), which scores its own rows and returns None for the others, so TRL
sums only the reward that applies to each prompt and averages each function over its own prompts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from crossroute.core.errors import CrossrouteError
from crossroute.domains.domain import Domain
from crossroute.domains.strata import allocate

DOMAIN_COLUMN = "crossroute_domain"


def mixture_counts(weights: dict[str, float], n: int) -> dict[str, int]:
    """Train prompts per domain: `n` split by `weights` (largest remainder, so they sum to n)."""
    return allocate(weights, n)


def mixture_rows(domains: Sequence[Domain], weights: dict[str, float], n: int, seed: int,
                 tokenizer: Any) -> list[dict[str, Any]]:
    """`n` train rows drawn from the domains by weight, each tagged with its domain, shuffled with `seed`."""
    chat = {d.name: d.uses_chat(tokenizer) for d in domains}
    if len(set(chat.values())) > 1:
        raise CrossrouteError(f"mixed stage {'+'.join(chat)}: some domains use the chat template and some do not "
                              f"({chat}); TRL trains one prompt format per stage, so set chat_template alike")
    rows: list[dict[str, Any]] = []
    for d in domains:
        k = mixture_counts(weights, n)[d.name]
        if k:
            rows += [{**r, DOMAIN_COLUMN: d.name} for r in d.train_rows(d.examples("train", k, seed=seed), tokenizer)]
    random.Random(seed).shuffle(rows)
    return rows


def mixture_rewards(domains: Sequence[Domain]) -> list[Callable[..., list[float | None]]]:
    """One TRL reward function per domain: its scorer on its own rows, None on the others."""
    return [_own_rows_only(d) for d in domains]


def _own_rows_only(domain: Domain) -> Callable[..., list[float | None]]:
    inner = domain.reward_func()

    def f(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        n = len(prompts)
        tags = kwargs.get(DOMAIN_COLUMN) or [None] * n
        idx = [i for i, t in enumerate(tags) if t == domain.name]
        out: list[float | None] = [None] * n
        if not idx:
            return out
        per_row = {k: [v[i] for i in idx] for k, v in kwargs.items() if isinstance(v, list) and len(v) == n}
        shared = {k: v for k, v in kwargs.items() if k not in per_row}
        scores = inner([prompts[i] for i in idx], [completions[i] for i in idx], **per_row, **shared)
        for i, s in zip(idx, scores, strict=True):
            out[i] = s
        return out

    f.__name__ = inner.__name__
    return f
