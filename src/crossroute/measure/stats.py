"""Uncertainty for every score and every difference: bootstrap CIs over prompts, paired tests between checkpoints.

A score is the mean of per-example scores in [0, 1], reported in points (x100). Its 95 % CI is the percentile
bootstrap over prompts. A difference between two checkpoints on the same prompts is paired: its CI is the
bootstrap of the per-prompt differences, its p-value McNemar's exact test when both outcomes are 0/1 (the
discordant pairs are Binomial(n, 1/2) under no difference), else a two-sided sign-flip permutation test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
N_PERM = 10000


@dataclass(frozen=True)
class Estimate:
    """A score in points with its CI (`lo`, `hi`) over `n` examples."""

    value: float
    lo: float
    hi: float
    n: int
    method: str = "bootstrap"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """A paired difference `b - a` in points, its CI, its two-sided p-value and the test that gave it."""

    value: float
    lo: float
    hi: float
    p: float
    n: int
    test: str

    @property
    def significant(self) -> bool:
        """Whether the CI excludes 0."""
        return self.lo > 0 or self.hi < 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant}


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _boot_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    idx = _rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    return x[idx].mean(axis=1)


def _percentile(means: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    lo, hi = np.quantile(means, [a, 1 - a])
    return float(lo), float(hi)


def mean_ci(x: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0,
            scale: float = 100.0) -> Estimate:
    """Mean of per-example values times `scale` (scores in [0, 1] as points by default), with a percentile-bootstrap
    CI over examples."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    lo, hi = _percentile(_boot_means(arr, n_boot, seed), level)
    return Estimate(round(scale * float(arr.mean()), 6), round(scale * lo, 6), round(scale * hi, 6), int(arr.size))


def mcnemar_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided McNemar p-value for paired 0/1 outcomes (binomial test on the discordant pairs)."""
    n01 = sum(1 for x, y in zip(a, b, strict=True) if x == 0 and y == 1)
    n10 = sum(1 for x, y in zip(a, b, strict=True) if x == 1 and y == 0)
    n = n01 + n10
    if n == 0:
        return 1.0
    k = min(n01, n10)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def sign_flip_p(d: Sequence[float], n_perm: int = N_PERM, seed: int = 0) -> float:
    """Two-sided p-value of mean(d) = 0 by random sign flips of the paired differences (with the +1 correction)."""
    arr = np.asarray(d, dtype=np.float64)
    if arr.size == 0 or not np.any(arr):
        return 1.0
    obs = abs(arr.mean())
    signs = _rng(seed).choice([-1.0, 1.0], size=(n_perm, arr.size))
    null = np.abs((signs * arr).mean(axis=1))
    return float((1 + np.sum(null >= obs - 1e-12)) / (n_perm + 1))


def _binom_tail_ge(k: int, m: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(m, p), summed in log space."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(m + 1) - math.lgamma(i + 1) - math.lgamma(m - i + 1) + i * lp + (m - i) * lq
             for i in range(k, m + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson(k: int, m: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) CI of a binomial proportion with k successes in m trials, by bisection."""
    a = (1 - level) / 2

    def solve(f: Any) -> float:  # f increasing in p
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < 0 else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else solve(lambda p: _binom_tail_ge(k, m, p) - a)
    upper = 1.0 if k == m else solve(lambda p: a - (1.0 - _binom_tail_ge(k + 1, m, p)))
    return lower, upper


def mcnemar_ci(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """CI of mean(b - a) for paired 0/1 outcomes, exact conditional on the m discordant pairs: the Clopper-Pearson
    interval of the share pi of (0 -> 1) pairs, mapped to (m / n)(2 pi - 1). It excludes 0 exactly when the exact
    McNemar test rejects at 1 - level, so the CI and the p-value never disagree (a bootstrap CI can)."""
    n01 = sum(1 for x, y in zip(a, b, strict=True) if x == 0 and y == 1)
    m = n01 + sum(1 for x, y in zip(a, b, strict=True) if x == 1 and y == 0)
    if m == 0:
        return 0.0, 0.0
    lo, hi = clopper_pearson(n01, m, level)
    scale = m / len(a)
    return scale * (2 * lo - 1), scale * (2 * hi - 1)


def _binary(x: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in x)


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                seed: int = 0) -> Difference:
    """`b - a` in points over paired examples. 0/1 scores: exact McNemar p and its conditional exact CI
    (mcnemar_ci); other scores: percentile-bootstrap CI of the mean difference and a sign-flip p."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    if len(a) == 0:
        return Difference(float("nan"), float("nan"), float("nan"), float("nan"), 0, "none")
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if _binary(a) and _binary(b):
        (lo, hi), p, test = mcnemar_ci(a, b, level), mcnemar_p(a, b), "mcnemar_exact"
    else:
        lo, hi = _percentile(_boot_means(d, n_boot, seed), level)
        p, test = sign_flip_p(d, seed=seed), "sign_flip"
    return Difference(round(100 * float(d.mean()), 4), round(100 * lo, 4), round(100 * hi, 4), round(p, 6),
                      int(d.size), test)


def paired_by_key(a: dict[str, float], b: dict[str, float]) -> tuple[list[float], list[float]]:
    """Two checkpoints' per-example scores aligned on the examples both scored (by prompt key)."""
    keys = [k for k in a if k in b]
    return [a[k] for k in keys], [b[k] for k in keys]


# Two-sided 97.5 % quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def across_seeds(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample SD and a 95 % t-interval of one figure over training seeds (the seed-to-seed spread)."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    n = int(arr.size)
    if n == 0:
        return {"mean": None, "sd": None, "lo": None, "hi": None, "n": 0}
    mean = float(arr.mean())
    if n == 1:
        return {"mean": round(mean, 4), "sd": None, "lo": None, "hi": None, "n": 1}
    sd = float(arr.std(ddof=1))
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.959964
    half = t * sd / math.sqrt(n)
    return {"mean": round(mean, 4), "sd": round(sd, 4), "lo": round(mean - half, 4), "hi": round(mean + half, 4),
            "n": n}


def linear_fit(x: Sequence[float], y: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
               n_perm: int = N_PERM, seed: int = 0) -> dict[str, Any]:
    """Least-squares y = intercept + slope x with R², a pairs-bootstrap CI of slope and R², and a two-sided
    permutation p-value of the slope (y shuffled against x); None where fewer than 3 points or x is constant."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = int(xs.size)
    empty = {"slope": None, "intercept": None, "r2": None, "slope_ci": [None, None], "r2_ci": [None, None],
             "p": None, "n": n}
    if n < 3 or float(np.ptp(xs)) == 0.0:
        return empty

    def fit(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
        da, db = a - a.mean(), b - b.mean()
        sxx, syy = float(da @ da), float(db @ db)
        slope = float(da @ db) / sxx if sxx > 0 else float("nan")
        r2 = (float(da @ db) ** 2 / (sxx * syy)) if sxx > 0 and syy > 0 else float("nan")
        return slope, float(b.mean() - slope * a.mean()), r2

    slope, intercept, r2 = fit(xs, ys)
    rng = _rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boots = np.array([fit(xs[i], ys[i]) for i in idx])
    ok = ~np.isnan(boots[:, 0])
    s_lo, s_hi = _percentile(boots[ok, 0], level) if ok.any() else (float("nan"),) * 2
    r_ok = ~np.isnan(boots[:, 2])
    r_lo, r_hi = _percentile(boots[r_ok, 2], level) if r_ok.any() else (float("nan"),) * 2
    perm = np.array([fit(xs, rng.permutation(ys))[0] for _ in range(n_perm)])
    p = float((np.sum(np.abs(perm) >= abs(slope) - 1e-12) + 1) / (n_perm + 1))

    def r(v: float) -> float | None:
        return None if math.isnan(v) else round(v, 6)

    return {"slope": r(slope), "intercept": r(intercept), "r2": r(r2), "slope_ci": [r(s_lo), r(s_hi)],
            "r2_ci": [r(r_lo), r(r_hi)], "p": round(p, 6), "n": n}
