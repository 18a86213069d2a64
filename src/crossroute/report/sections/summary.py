"""Report section: the seeds' claims, crossroute's measurement of each on this run with its 95 % interval, and a
verdict that follows the interval strictly (VERDICT_RULES); the page opens with it.

`summary_rows(run)` gives the same rows as JSON-ready dicts (for tests and the CLI). Claims whose results the run
lacks are listed as NOT_MEASURED, never hidden.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from crossroute.analyze.circuits import SEED_REFERENCE
from crossroute.analyze.routes import top_count
from crossroute.core.rundir import RunDir
from crossroute.measure.stats import across_seeds
from crossroute.report.html import anchor
from crossroute.report.registry import register_section, result_files

REPRODUCED, NOT_REPRODUCED, UNDECIDED = "reproduced", "not reproduced", "undecided at this size"
NOT_MEASURED = "not measured in this run"
MARK = {REPRODUCED: "✓", NOT_REPRODUCED: "✗", UNDECIDED: "?"}

SEED_STORAGE_DTYPE = "bfloat16"  # the seed's sparsity census is of bf16 checkpoints
SPARSITY_TAU, SPARSITY_MIN = 1e-7, 77.0  # seed: 77–89 % of entries change by < 1e-7; the claim tested: >= 77 %
REL_CHANGE_MAX = 1e-3
JACCARD_MAX = 0.19
OTHERS_MAX = 1.0  # points: "the others move < 1 point"
SUBSPACE_R = 5  # "small r" of the conflict-subspace comparison
ROLLBACK_SEED = (("mlp", 2.0, "20.4 %"), ("joint", 32.0, "73.6 %"))  # variant, % of the pool, seed's recovery
REASONING = ("math", "code", "qa")  # the seed's heavy-overlap domains
CPIFT_BASELINES = {"mixed_sft": "mixed SFT", "sequential_sft": "sequential SFT"}

VERDICT_RULES = (
    "<b>Verdicts follow the 95 % intervals strictly.</b> A claim of a positive effect (forgetting, a gain, a "
    "recovery, a difference, a slope &gt; 0) is <i>reproduced</i> when the interval's lower bound is &gt; 0, "
    "<i>not reproduced</i> when its upper bound is &lt; 0, else <i>undecided at this size</i>. A claim of a bound "
    "is reproduced when the whole interval lies inside the bound, not reproduced when it lies wholly outside, else "
    "undecided. Figures without a sampling interval (censuses of the checkpoints: <i>exact count</i>; figures "
    "computed once on the pinned examples: <i>no CI</i>) are decided on their value. A row over several domains, "
    "stages or tasks is reproduced when every part is, not reproduced when any part is not, else undecided (✓ ✗ ? "
    "mark each part). Figures from forgetting.json use the t-interval across training seeds when the run has "
    "several, else the paired CI over the prompts of the one run. The seed's sparsity range (77–89 % of entries "
    f"below 1e-7 over its experts) is tested at its lower end, ≥ {SPARSITY_MIN:g} %, on every stage; it is a census of "
    f"{SEED_STORAGE_DTYPE} checkpoints (whose storage rounds updates below its resolution to exactly 0), so a run "
    "stored in another dtype that misses the bound is undecided, not a contradiction.")


@dataclass(frozen=True)
class Rule:
    """A claim's test on an interval: an effect > 0 (`positive`), else the open bound (low, high)."""

    positive: bool = False
    low: float | None = None
    high: float | None = None

    def __call__(self, lo: float | None, hi: float | None) -> str:
        return verdict_positive(lo, hi) if self.positive else verdict_bound(lo, hi, self.low, self.high)


POSITIVE = Rule(positive=True)


@dataclass(frozen=True)
class Estimate:
    """One figure of this run: value and 95 % interval in the row's unit (lo = hi = value for an exact figure),
    how the interval was obtained, and what the figure is of (a domain, a stage, a pair)."""

    label: str
    value: float | None
    lo: float | None
    hi: float | None
    how: str
    verdict: str = UNDECIDED
    exact: bool = False  # no sampling interval: lo = hi = value
    rule: Rule | None = None  # how the verdict follows from [lo, hi] (re-applied to across-seed intervals)
    per_seed: list[float | None] | None = None  # an across-seed figure: its value in each seed


def _ok(*xs: float | None) -> bool:
    return all(x is not None and not math.isnan(float(x)) for x in xs)


def verdict_positive(lo: float | None, hi: float | None) -> str:
    """A claim of an effect > 0: reproduced when lo > 0, not reproduced when hi < 0, else undecided."""
    if not _ok(lo, hi):
        return UNDECIDED
    return REPRODUCED if lo > 0 else NOT_REPRODUCED if hi < 0 else UNDECIDED


def verdict_bound(lo: float | None, hi: float | None, low: float | None = None, high: float | None = None) -> str:
    """A claim that a figure lies in the open bound (low, high): reproduced when [lo, hi] is wholly inside, not
    reproduced when wholly outside, else undecided. An exact figure has lo = hi, so it is always decided."""
    if not _ok(lo, hi):
        return UNDECIDED
    if (low is None or lo > low) and (high is None or hi < high):
        return REPRODUCED
    if (low is not None and hi <= low) or (high is not None and lo >= high):
        return NOT_REPRODUCED
    return UNDECIDED


def combine(verdicts: Sequence[str]) -> str:
    """The verdict of a row over parts: reproduced when all are, not reproduced when any is, else undecided."""
    if not verdicts:
        return NOT_MEASURED
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    return REPRODUCED if all(v == REPRODUCED for v in verdicts) else UNDECIDED


def section_href(title: str) -> str:
    """A link to the section titled `title`: its id (report.html.anchor, which every section gets)."""
    return f"#{anchor(title)}"


def _row(key: str, claim: str, seed: str, unit: str, section: str, estimates: Sequence[Estimate], note: str = "",
         verdict: str | None = None, soften: bool = False) -> dict[str, Any]:
    """A summary row. `soften`: a 'not reproduced' becomes 'undecided' (a census in another storage dtype than the
    seed's cannot contradict it)."""
    ests = [asdict(e) for e in estimates]
    v = verdict or combine([e.verdict for e in estimates])
    if soften and v == NOT_REPRODUCED:
        v = UNDECIDED
    return {"key": key, "claim": claim, "seed": seed, "unit": unit, "section": section,
            "anchor": section_href(section), "estimates": ests, "note": note, "verdict": v, "soften": soften}


def _absent(key: str, claim: str, seed: str, section: str, why: str) -> dict[str, Any]:
    return _row(key, claim, seed, "", section, [], note=why, verdict=NOT_MEASURED)


def _g(d: Any, *keys: Any) -> Any:
    """d[k1][k2]... through dicts and lists, or None where any level is missing."""
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return None
        if d is None:
            return None
    return d


# ----------------------------------------------------------------------------- forgetting.json


SEQ = "seed 000/001 (Qwen3-4B)"
SEED_FORGETTING = {"math": "Math 66.49 → 57.66 (−8.83)", "code": "Code 52.67 → 50.47 (−2.20)"}
FORGETTING_TITLE = "Sequential RL: forgetting matrix"


def _paired_estimate(v: dict | None, label: str, scale: float = 1.0) -> Estimate | None:
    """A paired_diff JSON (value, lo, hi, n) as an Estimate, value and interval times `scale`."""
    if not v or v.get("value") is None:
        return None
    lo, hi = v.get("lo"), v.get("hi")
    return Estimate(label, scale * v["value"], None if lo is None else scale * lo, None if hi is None else scale * hi,
                    f"paired 95 % CI over {v.get('n', '?')} prompts, 1 seed")


def seed_or_paired(res: dict, single: dict | None, agg_key: str, label: str) -> Estimate | None:
    """A forgetting.json figure: the t-interval across training seeds when the run has several, else the one run's
    paired CI over prompts."""
    if "seeds" in res:
        a = _g(res, "seeds", "aggregate", agg_key)
        if not a or a.get("mean") is None:
            return None
        return Estimate(label, a["mean"], a.get("lo"), a.get("hi"), f"95 % t-interval across {a.get('n')} seeds")
    return _paired_estimate(single, label)


def last_stage_domains(res: dict) -> list[str]:
    """The domains of the sequence's last stage (from the own-gain keys: 'NN_label' or 'NN_label:domain')."""
    keys = list(res.get("own_stage_gain") or {})
    if not keys:
        return []
    row = keys[-1].split(":")[0]
    mixed = [k.split(":", 1)[1] for k in keys if k.startswith(row + ":")]
    return mixed or row.split("_", 1)[-1].split("+")


def _judged(ests: Sequence[Estimate | None], rule: Rule) -> list[Estimate]:
    """The estimates that exist, each with its verdict under `rule` (kept with it)."""
    return [replace(e, verdict=rule(e.lo, e.hi), rule=rule) for e in ests if e is not None]


def _with(est: Estimate | None, rule: Rule) -> list[Estimate]:
    return _judged([est], rule)


C_FORGET = "Sequential RL forgets {d} (score after its own stage − at the end > 0)"
C_GAIN = "Each RL stage raises its own domain (its row − the row before > 0)"
C_REFRESH = "A short refresh RL stage recovers the forgotten domain (refresh − end of sequence > 0)"
C_OTHERS = f"The other domains move < {OTHERS_MAX:g} point in the refresh (|refresh − end| < {OTHERS_MAX:g})"
C_MIXED = "Mixed RL (one stage on the mixture) keeps the earlier domains better than the sequence (mixed − seq. > 0)"
C_KL = "Forward KL(before ‖ after) on the new task predicts forgetting: slope of drop on KL > 0"
S_GAIN = f"{SEQ}: Math 59.63 → 66.49 in its own stage; CW up to 86.52 as the last one"
S_REFRESH, S_OTHERS = f"{SEQ}: Math 57.66 → 66.04 (+8.38)", f"{SEQ}: Code +0.58, QA +0.15, CW −0.56"
S_MIXED = "no seed figure: crossroute's baseline for the forgetting rows"
S_KL = "RL's Razor (Shenfeld et al. 2025, cited by seed 004): R² ≈ 0.96"


def forgetting_rows(res: dict | None) -> list[dict[str, Any]]:
    """Forgetting of every earlier domain, each stage's own gain, the refresh, mixed vs sequential RL, KL slope."""
    t = FORGETTING_TITLE
    if res is None:
        why = "no results/forgetting.json (crossroute train)"
        return [_absent(k, c, s, t, why) for k, c, s in (
            ("forgetting", C_FORGET.format(d="every earlier domain"), SEQ), ("own_gain", C_GAIN, S_GAIN),
            ("refresh_recovery", C_REFRESH, S_REFRESH), ("refresh_others", C_OTHERS, S_OTHERS),
            ("mixed_vs_sequential", C_MIXED, S_MIXED), ("kl_slope", C_KL, S_KL))]
    last = last_stage_domains(res)
    rows = [_forgetting_row(res, d) for d in res.get("domains", []) if d not in last]
    gains = _judged([seed_or_paired(res, _g(res, "paired", "own_stage_gain", k), f"own_stage_gain:{k}", k)
                     for k in res.get("own_stage_gain") or {}], POSITIVE)
    rows.append(_row("own_gain", C_GAIN, S_GAIN, "points", t, gains) if gains
                else _absent("own_gain", C_GAIN, S_GAIN, t, "forgetting.json has no paired own-stage gains"))
    return [*rows, *_refresh_rows(res), _mixed_row(res, last), _kl_row(res)]


def _forgetting_row(res: dict, d: str) -> dict[str, Any]:
    v = _g(res, "paired", "forgetting", d)
    est = seed_or_paired(res, v, f"forgetting:{d}", d + (f" ({v['from']} → {v['to']})" if v and "from" in v else ""))
    seed = f"{SEQ}: " + SEED_FORGETTING.get(d, "earlier domains lose points by the end of the sequence")
    claim = C_FORGET.format(d=d)
    return (_row(f"forgetting:{d}", claim, seed, "points", FORGETTING_TITLE, _with(est, POSITIVE)) if est
            else _absent(f"forgetting:{d}", claim, seed, FORGETTING_TITLE,
                         "forgetting.json has no paired CIs (written before them); rerun"))


def _refresh_rows(res: dict) -> list[dict[str, Any]]:
    t, a = FORGETTING_TITLE, _g(res, "refresh", "domain")
    if a is None:
        why = "the sequence had no refresh stage (refresh: in the train YAML)"
        return [_absent("refresh_recovery", C_REFRESH, S_REFRESH, t, why),
                _absent("refresh_others", C_OTHERS, S_OTHERS, t, why)]
    est = seed_or_paired(res, _g(res, "paired", "refresh", a), f"refresh_change:{a}", a)
    others = _judged([seed_or_paired(res, _g(res, "paired", "refresh", d), f"refresh_change:{d}", d)
                      for d in res.get("domains", []) if d != a],
                     Rule(low=-OTHERS_MAX, high=OTHERS_MAX))
    why = "forgetting.json has no paired refresh figures"
    return [_row("refresh_recovery", C_REFRESH, S_REFRESH, "points", t, _with(est, POSITIVE)) if est
            else _absent("refresh_recovery", C_REFRESH, S_REFRESH, t, why),
            _row("refresh_others", C_OTHERS, S_OTHERS, "points", t, others) if others
            else _absent("refresh_others", C_OTHERS, S_OTHERS, t, why)]


def _mixed_row(res: dict, last: list[str]) -> dict[str, Any]:
    diff = _g(res, "mixed_vs_sequential", "difference") or {}
    agg = {k.split(":", 1)[1] for k in _g(res, "seeds", "aggregate") or {} if k.startswith("mixed_minus_sequential:")}
    ests = _judged([seed_or_paired(res, diff.get(d), f"mixed_minus_sequential:{d}", d)
                    for d in res.get("domains", []) if d not in last and (d in diff or d in agg)], POSITIVE)
    if not ests:
        return _absent("mixed_vs_sequential", C_MIXED, S_MIXED, FORGETTING_TITLE,
                       "no mixed RL baseline (mixed: in the train YAML)")
    return _row("mixed_vs_sequential", C_MIXED, S_MIXED, "points", FORGETTING_TITLE, ests)


def _kl_row(res: dict) -> dict[str, Any]:
    fit = _g(res, "forgetting_vs_kl", "fit_new_task")
    if not fit or fit.get("slope") is None:
        return _absent("kl_slope", C_KL, S_KL, FORGETTING_TITLE,
                       "no forgetting_vs_kl fit (kl_n: in the train YAML, and at least 3 points)")
    lo, hi = (fit.get("slope_ci") or [None, None])[:2]
    pooled = f", pooled over {len(_g(res, 'seeds', 'seeds') or [])} seeds" if "seeds" in res else ", 1 seed"
    r2 = "" if fit.get("r2") is None else f"; R² {fit['r2']:.2f}"
    est = Estimate("slope", fit["slope"], lo, hi, f"pairs-bootstrap 95 % CI over {fit.get('n')} points{pooled}")
    return _row("kl_slope", C_KL, S_KL, "points per nat/token", FORGETTING_TITLE, _with(est, POSITIVE),
                note=f"n {fit.get('n')}{r2}")


# ----------------------------------------------------------------------------- diff.json, routes.json


ANAT = "seed 001 (what each single-domain RL stage changes)"
DIFF_TITLE, ROUTES_TITLE = "Update anatomy", "Active routes"


def _sci(x: float) -> str:
    """1e-07 as '1e-7'."""
    return re.sub(r"e\+?(-?)0*(\d)", r"e\1\2", f"{x:g}")


def _stage_names(diff: dict) -> list[str]:
    stages = diff.get("stages", [diff])
    return diff.get("stage_names") or [str(s.get("ckpt", i)).rsplit("/", 1)[-1] for i, s in enumerate(stages)]


def _exact(label: str, v: float, how: str = "exact count") -> Estimate:
    return Estimate(label, v, v, v, how, exact=True)


def diff_rows(diff: dict | None, as_bf16: dict | None = None) -> list[dict[str, Any]]:
    """Sparse updates (share below 1e-7, in the seed's bf16 storage when `as_bf16`, the same updates rounded to
    bf16, is given), how much of that is storage, small relative change, disjoint top-changed units."""
    c_sp = f"Updates are sparse: ≥ {SPARSITY_MIN:g} % of entries change by < {_sci(SPARSITY_TAU)} in every stage"
    c_rel = f"Updates are small: ‖δ‖/‖θ‖ < {_sci(REL_CHANGE_MAX)} in every stage"
    c_jac = f"Different domains edit different units: Jaccard of top-changed neurons < {JACCARD_MAX:g} for any pair"
    s_sp = f"{ANAT}: 77–89 % of entries below 1e-7 ({SEED_STORAGE_DTYPE} storage)"
    s_rel, s_jac = f"{ANAT}: relative changes below 1e-3", f"{ANAT}: top-changed neurons overlap < 0.19"
    if diff is None:
        why = "no results/diff.json (crossroute diff)"
        return [_absent("sparsity", c_sp, s_sp, DIFF_TITLE, why), _absent("rel_change", c_rel, s_rel, DIFF_TITLE, why),
                _absent("changed_jaccard", c_jac, s_jac, DIFF_TITLE, why)]
    stages, names = diff.get("stages", [diff]), _stage_names(diff)
    cast = (as_bf16 or {}).get("stages")
    rows = [_sparsity_row(cast or stages, names, c_sp, s_sp, stored=stages if cast else None)]
    if cast:
        rows.append(_storage_row(stages, cast, names))
    return [*rows, _rel_row(stages, names, c_rel, s_rel), _jaccard_row(diff, names, c_jac, s_jac)]


def _below(stage: dict, tau: float = SPARSITY_TAU) -> float | None:
    """% of a stage's entries with |δ| < tau (None when the diff lacks that threshold)."""
    taus = stage.get("thresholds") or []
    j = next((i for i, t in enumerate(taus) if math.isclose(t, tau, rel_tol=1e-6)), None)
    return None if j is None else 100 * stage["below_fraction"][j]


def _sparsity_row(stages: list[dict], names: list[str], claim: str, seed: str,
                  stored: list[dict] | None = None) -> dict[str, Any]:
    """The census in `stages`' storage dtype; `stored`: the as-stored census beside it (then `stages` are the
    updates rounded to the seed's bf16)."""
    if not stages or _below(stages[0]) is None:
        return _absent("sparsity", claim, seed, DIFF_TITLE, f"diff.json has no threshold {_sci(SPARSITY_TAU)}")
    dtypes = sorted({str(s.get("dtype")) for s in stages})
    how = "exact count, the updates rounded to bf16" if stored else None
    ests = _judged([_exact(n, _below(s), how or f"exact count, {s.get('dtype')} storage")
                    for n, s in zip(names, stages, strict=False)], Rule(low=SPARSITY_MIN))
    soften = not stored and any(d != SEED_STORAGE_DTYPE for d in dtypes)
    note = f"storage dtype {', '.join(dtypes)}"
    if stored:
        as_stored = ", ".join(f"{_below(s):.1f} %" for s in stored)
        note = f"the same updates as stored ({stored[0].get('dtype')}): {as_stored}"
    elif soften:
        note += (f": not the seed's {SEED_STORAGE_DTYPE}, whose storage rounds updates below its resolution to "
                 "exactly 0; no contradiction")
    return _row("sparsity", claim, seed, "% of entries", DIFF_TITLE, ests, note=note, soften=soften)


def _storage_row(stored: list[dict], cast: list[dict], names: list[str]) -> dict[str, Any]:
    """The share of entries that are 'unchanged' only because bf16 storage rounds them away: below 1e-7 after
    rounding both checkpoints to bf16, minus below 1e-7 as stored."""
    claim = ("The seed's sparsity is largely bf16 storage: % of entries below 1e-7 in bf16 − as stored > 0 "
             "(crossroute's reading of seed 001)")
    seed = f"{ANAT}: measured on bf16 checkpoints"
    ests = _judged([_exact(n, (_below(c) or 0.0) - (_below(s) or 0.0), "exact count, bf16 − as stored")
                    for n, s, c in zip(names, stored, cast, strict=False)], POSITIVE)
    return _row("sparsity_storage", claim, seed, "% of entries", DIFF_TITLE, ests,
                note=f"stored as {stored[0].get('dtype')}")


def _rel_row(stages: list[dict], names: list[str], claim: str, seed: str) -> dict[str, Any]:
    ests = _judged([_exact(n, s["rel_change"]) for n, s in zip(names, stages, strict=False)
                    if s.get("rel_change") is not None], Rule(high=REL_CHANGE_MAX))
    return (_row("rel_change", claim, seed, "‖δ‖/‖θ‖", DIFF_TITLE, ests) if ests
            else _absent("rel_change", claim, seed, DIFF_TITLE, "diff.json has no rel_change"))


def _jaccard_row(diff: dict, names: list[str], claim: str, seed: str) -> dict[str, Any]:
    m = _g(diff, "jaccard", "neuron")
    if not m or len(names) < 2 or diff.get("steps"):
        return _absent("changed_jaccard", claim, seed, DIFF_TITLE,
                       "diff.json has no neuron Jaccard across two or more domain stages")
    pairs = [(f"{names[i]} / {names[j]}", m[i][j]) for i in range(len(names)) for j in range(i + 1, len(names))]
    label, v = max(pairs, key=lambda p: p[1])
    pct = _g(diff, "stages", 0, "top_k_percent")
    est = _exact(f"max over {len(pairs)} pairs", v)
    return _row("changed_jaccard", claim, seed, "Jaccard", DIFF_TITLE,
                _with(est, Rule(high=JACCARD_MAX)),
                note=f"largest: {label}" + (f"; top-{pct:g} % of neurons per stage" if pct is not None else ""))


def random_jaccard(size: int, q: float) -> float | None:
    """Expected Jaccard of two random top-q % sets of `size` units: p / (2 − p), p = top_count / size."""
    if size <= 0:
        return None
    p = top_count(size, q) / size
    return p / (2 - p)


def routes_row(routes: dict | None) -> dict[str, Any]:
    """Shared active routes: the reasoning domains' active-neuron Jaccard above two random sets of the same size."""
    claim = "Domains share active computation units: active-neuron Jaccard of each reasoning pair > random sets'"
    seed = "seed 001: active neurons overlap heavily for Math, Code and QA"
    if routes is None:
        return _absent("active_overlap", claim, seed, ROUTES_TITLE, "no results/routes.json (crossroute routes)")
    doms, m = routes.get("domains") or [], _g(routes, "jaccard", "neuron")
    base = random_jaccard(int(_g(routes, "layout", "intermediate_size") or 0), float(routes.get("q", 10.0)))
    picked = [d for d in doms if d in REASONING]
    picked = picked if len(picked) >= 2 else doms
    if not m or base is None or len(picked) < 2:
        return _absent("active_overlap", claim, seed, ROUTES_TITLE, "routes.json has no neuron Jaccard over 2+ domains")
    how = f"no CI: exact on {routes.get('n')} pinned probe prompts"
    ests = _judged([_exact(f"{a} / {b}", m[doms.index(a)][doms.index(b)], how)
                    for i, a in enumerate(picked) for b in picked[i + 1:]], Rule(low=base))
    return _row("active_overlap", claim, seed, "Jaccard", ROUTES_TITLE, ests,
                note=f"random sets of the same size: {base:.3f} (top {routes.get('q', 10.0):g} % per layer)")


# ----------------------------------------------------------------------------- conflict, damage, rollback


CONFLICT_TITLE = "Module-level gradient conflict"


def conflict_rows(results: list[dict]) -> list[dict[str, Any]]:
    """Global cosine ≈ 0 while modules conflict: |global cos| below both the most conflicting module's |cos| and
    the most synergistic one's cos (no conflict or no synergy: not reproduced)."""
    claim = ("Per-module conflict and synergy cancel: |global cos| < |cos| of the most conflicting and of the most "
             "synergistic module")
    seed = "seed 001, Fig. 1: Math/QA global gradient cosine ≈ 0, while modules conflict and synergise"
    if not results:
        return [_absent("conflict", claim, seed, CONFLICT_TITLE, "no results/conflict_*.json (crossroute conflict)")]
    rows = []
    for r in results:
        g, lo_c, hi_c = r.get("global_cosine"), _g(r, "most_conflicting", "cosine"), _g(r, "most_synergistic", "cosine")
        pair = f"{r.get('domain_a')} / {r.get('domain_b')}"
        if not _ok(g, lo_c, hi_c):
            rows.append(_absent(f"conflict:{pair}", claim, seed, CONFLICT_TITLE, "conflict result has no cosines"))
            continue
        margin = min(-lo_c, hi_c) - abs(g)  # > 0: |global cos| below both extremes
        est = _exact(f"{pair}: min(−cos conflicting, cos synergistic) − |global cos|", margin,
                     f"no CI: one gradient each on {r.get('n')} examples")
        rows.append(_row(f"conflict:{pair}", claim, seed, "cosine", CONFLICT_TITLE, _with(est, POSITIVE),
                         note=f"global {g:+.3f}, most conflicting {lo_c:+.3f}, most synergistic {hi_c:+.3f}"))
    return rows


def damage_rows(results: list[dict]) -> list[dict[str, Any]]:
    """The second-order term dominates the first-order one; it concentrates in the top eigendirections of the
    shared-route Hessian beyond random and top-|δ| baselines at r = SUBSPACE_R."""
    c2 = "The damage is mainly second order: ½δᵀHδ > |gᵀδ| (first-order term small)"
    cs = (f"The second-order damage is low-dimensional: the top-{SUBSPACE_R} eigendirections of H on the shared "
          f"units carry more of δᵀHδ than {SUBSPACE_R} random directions and the {SUBSPACE_R} largest-|δ| entries")
    seed = "seed 000/001: local perturbation model, damage concentrated in a shared conflict subspace"
    if not results:
        why = "no results/damage_*.json (crossroute damage)"
        return [_absent("second_order", c2, seed, "Damage to A: second-order decomposition", why),
                _absent("subspace", cs, seed, "Damage to A: second-order decomposition", why)]
    rows = []
    for r in results:
        a = str(r.get("domain", ""))
        title = f"Damage to {a}: second-order decomposition"
        f1, f2 = r.get("first_order"), r.get("second_order")
        if _ok(f1, f2) and f1 != 0:
            ratio = f2 / abs(f1)
            est = _exact(f"{a}: ½δᵀHδ / |gᵀδ|", ratio, f"no CI: exact on {r.get('n')} examples")
            rows.append(_row(f"second_order:{a}", c2, seed, "ratio", title,
                             _with(est, Rule(low=1.0)),
                             note=f"gᵀδ {f1:.3g}, ½δᵀHδ {f2:.3g}"))
        else:
            rows.append(_absent(f"second_order:{a}", c2, seed, title, "damage result has no first/second-order terms"))
        rows += [_subspace_row(c, a, title, cs, seed) for c in r.get("conflict") or []]
        if not r.get("conflict"):
            rows.append(_absent(f"subspace:{a}", cs, seed, title, "damage result has no conflict subspace (--b)"))
    return rows


def _subspace_row(c: dict, a: str, title: str, claim: str, seed: str) -> dict[str, Any]:
    b = str(c.get("domain_b", ""))
    eig, rnd, top = (c.get(k) or [] for k in ("share_eig", "share_random", "share_top_abs_delta"))
    r = min(SUBSPACE_R, len(eig), len(rnd), len(top))
    if r == 0:
        return _absent(f"subspace:{a}/{b}", claim, seed, title, "conflict subspace has no shares")
    base = max(rnd[r - 1], top[r - 1])
    est = _exact(f"{a} / {b}: share of top-{r} eigendirections − the larger baseline's", eig[r - 1] - base,
                 "no CI: exact on the pinned examples")
    conv = "" if c.get("converged", True) else "; not every eigenpair converged"
    r90 = c.get("r90")
    return _row(f"subspace:{a}/{b}", claim, seed, "share", title, _with(est, POSITIVE),
                note=f"eigen {eig[r - 1]:.3g}, random {rnd[r - 1]:.3g}, top-|δ| {top[r - 1]:.3g}; r for 90 %: "
                     f"{'not reached' if r90 is None else r90}{conv}")


def _nearest(points: list[dict], variant: str, fraction: float, selector: str = "conflict") -> dict | None:
    """The swept point of `variant` and `selector` whose fraction is nearest `fraction` (on a log scale)."""
    mine = [p for p in points if p.get("variant") == variant and p.get("selector") == selector
            and p.get("fraction")]
    return min(mine, key=lambda p: abs(math.log(p["fraction"] / fraction)), default=None)


def _rollback_change(p: dict, d: str) -> tuple[dict | None, str]:
    """A point's paired change on domain d: the greedy one where the point was fully evaluated, else its P(ref)
    screen, and which."""
    if p.get("full_eval", True) and _g(p, "change", d):
        return p["change"][d], "greedy"
    return _g(p, "screen_change", d), "P(ref) screen"


def rollback_rows(results: list[dict]) -> list[dict[str, Any]]:
    """The seed's two rollback budgets: A's change (direction and CI; recovery beside it) and the collateral."""
    seed = "seed 001: rollback of conflict units for Math/QA"
    claims = {"mlp": "Rolling back 2 % of MLP neurons (conflict-selected) recovers part of A (Δ A > 0)",
              "joint": "Rolling back 32 % of MLP + attention units (conflict-selected) recovers A (Δ A > 0)"}
    c_col = f"The 2 % MLP rollback leaves the others within {OTHERS_MAX:g} point (|Δ| < {OTHERS_MAX:g})"
    if not results:
        why = "no results/rollback_*.json (crossroute rollback)"
        title = "Training-free rollback for A"
        return [*[_absent(f"rollback:{v}", claims[v], f"{seed}: {s}", title, why) for v, _, s in ROLLBACK_SEED],
                _absent("rollback_collateral", c_col, f"{seed}: QA −0.06", title, why)]
    rows = []
    for r in results:
        a, title = str(r.get("domain", "")), f"Training-free rollback for {r.get('domain', '')}"
        points = r.get("points") or []
        for variant, frac, seed_rec in ROLLBACK_SEED:
            rows.append(_rollback_row(r, _nearest(points, variant, frac), a, variant, frac, title, claims[variant],
                                      f"{seed}: {seed_rec} of the lost score recovered"))
        p = _nearest(points, "mlp", 2.0)
        ests = []
        for d in (r.get("others") or []) if p else []:
            ch, kind = _rollback_change(p, d)
            ests += _with(_paired_estimate(ch, f"{d} ({kind})"),
                          Rule(low=-OTHERS_MAX, high=OTHERS_MAX))
        rows.append(_baseline_row(r, points, a, title))
        rows.append(_row(f"rollback_collateral:{a}", c_col, f"{seed}: QA −0.06", "points", title, ests,
                         note=f"at {p['fraction']:g} % of the MLP pool" if p else "") if ests
                    else _absent(f"rollback_collateral:{a}", c_col, f"{seed}: QA −0.06", title,
                                 "no 2 % MLP conflict point with its collateral"))
    return rows


NO_CI = "one seed: no interval (the across-seed summary gives one)"


def _baseline_row(r: dict, points: list[dict], a: str, title: str) -> dict[str, Any]:
    """Conflict selection against the random and magnitude baselines at the seed's budgets: Δ A(conflict) −
    Δ A(baseline) in the P(ref) screen, which every point has (greedy evaluations differ by point and seed)."""
    claim = ("Conflict-selected rollback recovers more of A than random and magnitude selection at the same budget "
             "(Δ conflict − Δ baseline > 0)")
    seed, key = "seed 001: conflict scores pick the units to roll back", f"rollback_baselines:{a}"
    ests = []
    for variant, frac, _ in ROLLBACK_SEED:
        c = _nearest(points, variant, frac)
        if c is None:
            continue
        for sel in ("random", "magnitude"):
            b = _nearest(points, variant, c["fraction"], sel)
            if b is None or b["fraction"] != c["fraction"]:  # the same budget only
                continue
            vc, vb = _g(c, "screen_change", a, "value"), _g(b, "screen_change", a, "value")
            if _ok(vc, vb):  # every point has its P(ref) screen: one kind of figure in every seed
                ests.append(Estimate(f"{variant} {c['fraction']:g} % vs {sel} (P(ref))", vc - vb, None, None, NO_CI))
    if not ests:
        return _absent(key, claim, seed, title, "the sweep has no random/magnitude points at the seed's budgets")
    return _row(key, claim, seed, "points", title, _judged(ests, POSITIVE))


def _rollback_row(r: dict, p: dict | None, a: str, variant: str, frac: float, title: str, claim: str,
                  seed: str) -> dict[str, Any]:
    key = f"rollback:{variant}:{a}"
    if p is None:
        return _absent(key, claim, seed, title, f"the sweep has no {variant} conflict points")
    ch, kind = _rollback_change(p, a)
    est = _paired_estimate(ch, f"{a} at {p['fraction']:g} % ({kind})")
    if est is None:
        return _absent(key, claim, seed, title, f"the {variant} {p['fraction']:g} % point has no paired change on {a}")
    rec = p.get("recovery") if kind == "greedy" else p.get("screen_recovery")
    gap = float(r.get("score_peak", float("nan"))) - float(_g(r, "score_now", a) or float("nan"))
    note = (f"recovery {100 * rec:.1f} %" if rec is not None else "recovery undefined") + f" of a {gap:.2f}-point gap"
    if frac != p["fraction"]:
        note += f"; nearest swept fraction to {frac:g} %"
    return _row(key, claim, seed, "points", title, _with(est, POSITIVE), note=note)


# ----------------------------------------------------------------------------- cpift, rl vs sft


CPIFT_TITLE = "CPI-FT: core parameter isolation vs mixed and sequential SFT"


def cpift_rows(res: dict | None) -> list[dict[str, Any]]:
    """CPI-FT minus each SFT baseline, on every task (> 0)."""
    seed = "seed 002 (CPI-FT): consistently above mixed SFT (the lowest) and sequential SFT"
    claims = {b: f"CPI-FT scores above {name} on every task (CPI-FT − baseline > 0)"
              for b, name in CPIFT_BASELINES.items()}
    rows = []
    for b in CPIFT_BASELINES:
        per = _g(res, "cpift_vs", b) if res else None
        ests = [e for t, v in (per or {}).items() for e in _with(_paired_estimate(v, t), POSITIVE)]
        rows.append(_row(f"cpift_vs:{b}", claims[b], seed, "points", CPIFT_TITLE, ests) if ests else
                    _absent(f"cpift_vs:{b}", claims[b], seed, CPIFT_TITLE,
                            "no results/cpift.json (crossroute cpift)" if res is None else f"cpift.json has no {b}"))
    return rows


def circuit_row(rl_vs_sft: dict | None, circuits: list[dict]) -> dict[str, Any]:
    """Retention of the base circuit, RL minus SFT on the RL domain (> 0), from rl_vs_sft.json or circuits_*.json."""
    ref = (rl_vs_sft or {}).get("seed_reference") or SEED_REFERENCE
    claim = "RL retains more of the base circuit than SFT (retention RL − SFT > 0, on the trained domain)"
    seed = (f"seed 003/004 ({ref['model']}, {ref['task']}): RL ~{100 * ref['rl_retained']:.0f} %, SFT "
            f"~{100 * ref['sft_retained']:.0f} % of the base circuit retained")
    if rl_vs_sft is not None:
        dom = str(rl_vs_sft.get("domain", ""))
        v, title = _g(rl_vs_sft, "retention_difference", dom), f"RL vs SFT on {dom}"
    else:
        c = next((c for c in circuits if _g(c, "retention_difference", "value") is not None), None)
        dom, v = str((c or {}).get("domain", "")), (c or {}).get("retention_difference")
        title = f"Circuits: {dom}"
    est = _paired_estimate(v, dom, scale=100.0)
    if est is None:
        return _absent("circuit_retention", claim, seed, title if dom else "RL vs SFT on A",
                       "no retention difference (crossroute rl-vs-sft, or circuits with --rl and --sft)")
    return _row("circuit_retention", claim, seed, "points of retention", title, _with(est, POSITIVE))


PROTECT_TITLE = "Prevention: protected sequence vs unprotected"


def protected_row(res: dict | None, target: str | None) -> dict[str, Any]:
    """Protection vs none: the protected domain's score at the end of the sequence, protected − unprotected (> 0),
    paired over the same prompts."""
    claim = "Freezing A's conflict units in the later stages keeps A (protected − unprotected at the end > 0)"
    seed = "seed 001 (prevention): protect the shared routes' conflict units"
    rows = list((res or {}).get("rows") or [])
    end = next((r for r in reversed(rows) if not r.startswith("refresh_")), None)
    v = _g(res, "vs_unprotected", end, target) if res and end and target else None
    est = _paired_estimate(v, f"{target} at {end}") if v else None
    if est is None:
        return _absent("protected", claim, seed, PROTECT_TITLE, "no results/forgetting_protected.json with its "
                       "comparison (crossroute demo, or a protected train run beside an unprotected one)")
    return _row("protected", claim, seed, "points", PROTECT_TITLE, _with(est, POSITIVE))


def rl_vs_sft_rows(res: dict | None) -> list[dict[str, Any]]:
    """RL vs SFT at a matched score on A: SFT's mean forgetting of the other domains − RL's, and SFT's forward KL to
    the base − RL's (RL's Razor: RL moves less), one value per seed."""
    c_f = "RL forgets the other domains less than SFT at a matched score on A (SFT's mean drop − RL's > 0)"
    c_k = "RL stays closer to the base than SFT: forward KL(base ‖ model) per token, SFT − RL > 0"
    s_f = "seed 003/004: RL forgets less than SFT"
    s_k = "RL's Razor (Shenfeld et al. 2025, cited by seed 004): RL's KL to the base is smaller"
    dom = str((res or {}).get("domain", ""))
    title = f"RL vs SFT on {dom}" if dom else "RL vs SFT on A"
    by = {r.get("model"): r for r in (res or {}).get("rows") or []}
    if "rl" not in by or "sft" not in by:
        why = "no results/rl_vs_sft.json (crossroute rl-vs-sft)"
        return [_absent("rl_vs_sft_forgetting", c_f, s_f, title, why), _absent("rl_vs_sft_kl", c_k, s_k, title, why)]
    rl, sft = by["rl"], by["sft"]
    note = f"own score: RL {rl.get('own')}, SFT {sft.get('own')}"
    out = []
    for key, claim, seed, unit, field in (("rl_vs_sft_forgetting", c_f, s_f, "points", "forgetting_mean"),
                                          ("rl_vs_sft_kl", c_k, s_k, "nats per token", "kl_token")):
        a, b = sft.get(field), rl.get(field)
        if not _ok(a, b):
            out.append(_absent(key, claim, seed, title, f"rl_vs_sft.json has no {field}"))
            continue
        out.append(_row(key, claim, seed, unit, title, _with(Estimate(dom, a - b, None, None, NO_CI), POSITIVE),
                        note=note))
    return out


# ----------------------------------------------------------------------------- the rows, the section


def _results(run: RunDir, prefix: str) -> list[dict]:
    return [r for p in result_files(run, prefix) if (r := run.read_result(p.stem)) is not None]


def summary_rows(run: RunDir) -> list[dict[str, Any]]:
    """Every seed claim as a row: claim, seed figure, this run's estimates with intervals, verdict, section link."""
    diffs = run.read_result("diff"), run.read_result("diff_bfloat16")
    return [*forgetting_rows(run.read_result("forgetting")), *diff_rows(*diffs),
            routes_row(run.read_result("routes")), *conflict_rows(_results(run, "conflict")),
            *damage_rows(_results(run, "damage")), *rollback_rows(_results(run, "rollback")),
            *cpift_rows(run.read_result("cpift")),
            protected_row(run.read_result("forgetting_protected"), _refresh_domain(run.read_result("forgetting"))),
            *rl_vs_sft_rows(run.read_result("rl_vs_sft")),
            circuit_row(run.read_result("rl_vs_sft"), _results(run, "circuits"))]


def _refresh_domain(res: dict | None) -> str | None:
    """The domain the run repairs and protects: its refresh's."""
    return _g(res, "refresh", "domain")


# ----------------------------------------------------------------------------- across training seeds


def _rule_of(e: dict[str, Any]) -> Rule | None:
    r = e.get("rule")
    return Rule(**r) if isinstance(r, dict) else r


def _seed_estimate(group: list[dict[str, Any]], seeds: list[int]) -> Estimate:
    """One figure over seeds: mean and 95 % t-interval of its per-seed values, judged by its row's rule."""
    values = [e["value"] for e in group]
    a = across_seeds([v for v in values if v is not None])
    labels = list(dict.fromkeys(e["label"] for e in group))
    label = labels[0] if len(labels) == 1 else f"{labels[0].split(' (')[0]} (varies by seed)"
    rule = _rule_of(group[0])
    how = f"95 % t-interval across {a['n']} seeds ({', '.join(map(str, seeds))})"
    verdict = rule(a["lo"], a["hi"]) if rule is not None else UNDECIDED
    return Estimate(label, a["mean"], a["lo"], a["hi"], how, verdict=verdict, rule=rule, per_seed=values)


def aggregate_rows(per_seed: list[list[dict[str, Any]]], seeds: list[int]) -> list[dict[str, Any]]:
    """The summary over training seeds: each row's figures as mean and t-interval of their per-seed values (matched
    by position where every seed has the same figures, else by label), verdicts by the same rules; a row no seed
    measured stays NOT_MEASURED."""
    keys = list(dict.fromkeys(r["key"] for rows in per_seed for r in rows))
    out = []
    for key in keys:
        got = [(k, r) for k, rows in zip(seeds, per_seed, strict=True) for r in rows if r["key"] == key]
        measured = [(k, r) for k, r in got if r["verdict"] != NOT_MEASURED]
        first = got[0][1]
        if not measured:
            out.append(first)
            continue
        ks = [k for k, _ in measured]
        n_est = {len(r["estimates"]) for _, r in measured}
        if len(n_est) == 1:
            groups = [[r["estimates"][i] for _, r in measured] for i in range(n_est.pop())]
        else:
            labels = list(dict.fromkeys(e["label"] for _, r in measured for e in r["estimates"]))
            groups = [[e for _, r in measured for e in r["estimates"] if e["label"] == lab] for lab in labels]
        ests = [_seed_estimate(g, ks) for g in groups]
        row = {**measured[0][1], "estimates": [asdict(e) for e in ests]}
        v = combine([e.verdict for e in ests])
        row["verdict"] = UNDECIDED if row.get("soften") and v == NOT_REPRODUCED else v
        per = "; ".join(f"seed {k}: {MARK.get(r['verdict'], '–')}" for k, r in measured)
        row["note"] = f"per seed: {per}" + (f". Seed {ks[0]}: {row['note']}" if row.get("note") else "")
        row["seeds"] = ks
        out.append(row)
    return out


DEMO_RESULT = "demo"  # results/demo.json of a multi-seed demo: seeds, parts' costs, per-seed and across-seed rows


def write_demo_summary(out: Path, roots: list[Path], seeds: list[int], costs: list[dict[str, Any]], wall: float,
                       workers: int, parts: list[str]) -> dict[str, Any]:
    """results/demo.json of `crossroute demo`: every seed's summary rows and their across-seed aggregate (the
    report's summary), and the cost of each invocation (a resume adds its own): wall time and each part's seconds,
    with their totals over invocations."""
    runs = [RunDir(Path(r)) for r in roots]
    per_seed = [summary_rows(r) for r in runs]
    before = (RunDir(Path(out)).read_result(DEMO_RESULT) or {}).get("history") or []
    history = [*before, {"wall_seconds": wall, "workers": workers, "costs": costs}]  # a resumed demo adds its own
    spent = [c for h in history for c in h["costs"]]
    data: dict[str, Any] = {"seeds": seeds, "roots": [str(r) for r in roots], "workers": workers, "parts": parts,
                            "wall_seconds": round(sum(h["wall_seconds"] for h in history), 1), "costs": costs,
                            "cost_per_part": {p: round(sum(c["seconds"] for c in spent if c["part"] == p), 1)
                                              for p in parts},
                            "history": history,
                            "per_seed": {str(k): rows for k, rows in zip(seeds, per_seed, strict=True)}}
    if len(runs) > 1:
        data["summary"] = aggregate_rows(per_seed, seeds)
        first = Path(roots[0])
        if first.is_relative_to(out):  # the detail sections live in each seed's report (the first seed's linked)
            for row in data["summary"]:
                if row["section"] != FORGETTING_TITLE:
                    row["anchor"] = f"{first.relative_to(out)}/report.html{row['anchor']}"
    RunDir(Path(out)).write_result(DEMO_RESULT, data)
    return data


def _fmt(v: float | None, unit: str) -> str:
    if v is None or math.isnan(float(v)):
        return "–"
    if unit.startswith("points"):
        return f"{v:+.2f}"
    return f"{v:.3g}" + (" %" if unit.startswith("%") else "")


def _css(verdict: str) -> str:
    return "v-" + verdict.replace(" ", "-")


def _estimate_html(e: dict[str, Any], unit: str) -> str:
    ci = "" if e["exact"] else f" [{_fmt(e['lo'], unit)}, {_fmt(e['hi'], unit)}]"
    return (f"{html.escape(e['label'])} <b>{_fmt(e['value'], unit)}</b>{ci} "
            f"<span class=\"{_css(e['verdict'])}\">{MARK.get(e['verdict'], '')}</span>")


def _row_html(r: dict[str, Any]) -> str:
    ests = "<br>".join(_estimate_html(e, r["unit"]) for e in r["estimates"]) or "–"
    hows = "; ".join(dict.fromkeys(e["how"] for e in r["estimates"])) or "–"
    unit = f" <span class=\"note\">({html.escape(r['unit'])})</span>" if r["unit"] else ""
    note = f"<br><span class=\"note\">{html.escape(r['note'])}</span>" if r["note"] else ""
    link = "–" if r["verdict"] == NOT_MEASURED else f"<a href=\"{html.escape(r['anchor'])}\">details</a>"
    return (f"<tr><td>{html.escape(r['claim'])}<br><span class=\"note\">{html.escape(r['seed'])}</span></td>"
            f"<td>{ests}{unit}{note}</td><td class=\"note\">{html.escape(hows)}</td>"
            f"<td class=\"{_css(r['verdict'])}\">{html.escape(r['verdict'])}</td>"
            f"<td>{link}</td></tr>")


SUMMARY_CSS = (".summary td{font-size:12px;vertical-align:top}.summary .v-reproduced{color:#1a7f37;font-weight:bold}"
               ".summary .v-not-reproduced{color:#b42318;font-weight:bold}.summary .v-undecided-at-this-size"
               "{color:#9a6700}.summary .v-not-measured-in-this-run{color:#777}")


def render_summary_section(rows: list[dict[str, Any]]) -> str:
    """HTML <section id="summary">: the verdict counts, the rules, and one table row per claim."""
    counts = {v: sum(r["verdict"] == v for r in rows) for v in (REPRODUCED, NOT_REPRODUCED, UNDECIDED, NOT_MEASURED)}
    head = "".join(f"<th>{h}</th>" for h in ("claim (seed figure)", "this run", "interval", "verdict", ""))
    return (f"<section id=\"summary\" class=\"summary\"><style>{SUMMARY_CSS}</style><h2>The seeds' claims on this "
            "run</h2><p>" + ", ".join(f"{n} {v}" for v, n in counts.items()) + f".</p><table><thead><tr>{head}</tr>"
            "</thead><tbody>" + "".join(_row_html(r) for r in rows)
            + f"</tbody></table><p class=\"note\">{VERDICT_RULES}</p></section>")


def demo_rows(run: RunDir) -> list[dict[str, Any]] | None:
    """The across-seed summary rows of a multi-seed demo run (results/demo.json), None for any other run."""
    demo = run.read_result(DEMO_RESULT)
    return (demo or {}).get("summary")


@register_section("summary", 0)
def render(run: RunDir) -> str | None:
    rows = demo_rows(run) or summary_rows(run)
    return render_summary_section(rows) if any(r["verdict"] != NOT_MEASURED for r in rows) else None
