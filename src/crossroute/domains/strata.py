"""Stratified eval sets: each stratum's share of an eval set is the domain's own share, whatever n is.

A generator drawn until it yields n distinct prompts over-represents the strata whose prompt space is small
(one-step sums run out of distinct prompts first, so they fill a small set and are scarce in a large one); a
score then depends on n. Here the strata's shares are estimated once from a fixed number of draws, every
stratum gets its quota of n (largest remainder), and the set is ordered so every prefix is stratified too.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from crossroute.domains.base import Example

SHARE_DRAWS = 10_000  # eval-split draws that estimate a generator's stratum shares (fixed: shares never depend on n)
EXHAUSTED = 10  # a stratum is exhausted after max(2000, 10 x its distinct prompts) draws without a new one


def allocate(shares: dict[str, float], n: int, caps: dict[str, int] | None = None) -> dict[str, int]:
    """Quotas summing to min(n, sum of caps), proportional to `shares` (largest remainder); a stratum never gets
    more than its cap, and what a capped stratum cannot take goes to the others in proportion."""
    caps = caps or {s: n for s in shares}
    quota = {s: 0 for s in shares}
    open_ = {s for s, w in shares.items() if w > 0 and caps.get(s, 0) > 0}
    left = min(n, sum(caps.get(s, 0) for s in open_))
    while left > 0 and open_:
        total = sum(shares[s] for s in open_)
        exact = {s: left * shares[s] / total for s in open_}
        give = {s: math.floor(v) for s, v in exact.items()}
        rest = left - sum(give.values())
        for s in sorted(open_, key=lambda s: (-(exact[s] - give[s]), s))[:rest]:
            give[s] += 1
        full = set()
        for s in sorted(open_):
            room = caps[s] - quota[s]
            take = min(give[s], room)
            quota[s] += take
            left -= take
            if quota[s] >= caps[s]:
                full.add(s)
        if not full:
            break
        open_ -= full
    return quota


def interleave(pools: dict[str, list[Example]], quota: dict[str, int]) -> list[Example]:
    """The first quota[s] examples of each stratum, ordered so that every prefix keeps the proportions
    (systematic order: the i-th of a stratum with quota q sits at (i + 1/2) / q)."""
    keyed = [((i + 0.5) / q, s, i) for s, q in quota.items() for i in range(q)]
    return [pools[s][i] for _, s, i in sorted(keyed)]


def stratified_fixed(pool: Sequence[Example], n: int | None, rng: random.Random) -> list[Example]:
    """A stratified sample of a fixed pool: strata in their pool proportions, each shuffled by `rng`."""
    by: dict[str, list[Example]] = {}
    for e in pool:
        by.setdefault(e.stratum, []).append(e)
    for s in sorted(by):
        rng.shuffle(by[s])
    n = len(pool) if n is None else n
    caps = {s: len(v) for s, v in by.items()}
    return interleave(by, allocate({s: float(c) for s, c in caps.items()}, n, caps))


def _exhausted(draws_since_new: int, distinct: int) -> bool:
    """A stratum's distinct prompts are all found: no new one in max(2000, 10 x distinct) of its draws (a missed
    prompt survives that with probability below e^-10)."""
    return draws_since_new > max(2000, EXHAUSTED * distinct)


def stratified_generated(generate: Callable[[random.Random], Example], keep: Callable[[Example], bool],
                         stratum: Callable[[Example], str], n: int, rng: random.Random,
                         max_draws: int) -> list[Example]:
    """n distinct kept examples of a generator, each stratum in the share it has among the first SHARE_DRAWS
    kept draws (duplicates counted: the generator's own distribution). Strata that run out of distinct prompts
    give their remainder to the others."""
    counts: dict[str, int] = {}
    pools: dict[str, list[Example]] = {}
    drawn: dict[str, int] = {}  # kept draws per stratum
    last_new: dict[str, int] = {}  # the stratum's draw count at its last new prompt
    seen: set[str] = set()
    kept = 0
    for draw in range(max_draws):
        ex = generate(rng)
        if not keep(ex):
            continue
        s = stratum(ex)
        if kept < SHARE_DRAWS:
            counts[s] = counts.get(s, 0) + 1
        kept += 1
        drawn[s] = drawn.get(s, 0) + 1
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            pools.setdefault(s, []).append(ex)
            last_new[s] = drawn[s]
        if kept >= SHARE_DRAWS and draw % 1000 == 0:
            want = allocate({k: float(v) for k, v in counts.items()}, n)
            if all(len(pools.get(k, [])) >= q or _exhausted(drawn.get(k, 0) - last_new.get(k, 0), len(pools.get(k, [])))
                   for k, q in want.items()):
                break
    caps = {s: len(v) for s, v in pools.items()}
    shares = {s: float(counts.get(s, 0)) for s in pools}
    return interleave(pools, allocate(shares, n, caps))
