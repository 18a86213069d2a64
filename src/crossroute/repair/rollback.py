"""Training-free rollback of route-conflict units (DESIGN.md §3.2).

The route-conflict score of a unit is its damage attribution to A, δ_uᵀ(g_A + ½H_Aδ)_u at θ_A
(crossroute.damage, δ = θ_now − θ_A), restricted to the units active for both A and at least one
later domain (routes measured at θ_A; a KV group is active with one of its query heads). The
"conflict" selector takes shared units with positive score first (largest first); when the
budget is larger than that pool it continues with the remaining units by attribution. Baselines
at the same budget: "random" (seeded, nested across fractions) and "magnitude" (largest ‖δ_u‖).

Variants: "mlp" (MLP neurons only; budget = fraction of all neurons) and "joint" (neurons,
attention heads, KV groups, router rows and every other tensor as one unit each, so that 100 % of the
joint pool is θ_A bitwise; budget = fraction of all of those units). Each result names what its pools
exclude (`pool_excludes`).

Each sweep point writes θ_A's slices of the selected units into the loaded θ_now model in place,
evaluates it, and swaps the saved θ_now slices back (bit-identical): the model is loaded once. Every
point is screened cheaply: the teacher-forced P(ref) of the pinned eval prompts' reference answers
(one forward per batch), paired vs θ_now. The greedy evaluation (crossroute.evaluate) runs only at
θ_now, θ_A and the points the screen picks (best per selector, or the points asked for): at most
k/4 + 4 full evaluations for k points (`full_all`: every point, as before). recovery = (score_rb −
score_now) / (score_peak − score_now) on A, with score_peak = A's score at θ_A; collateral = score
change on each other domain.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from crossroute.analyze.damage import attribution, param_delta, torch_threads
from crossroute.analyze.forgetting import PerExample, per_example_scores
from crossroute.analyze.subspace import shared_units
from crossroute.core.atomic import check_output_dir
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir, result_name
from crossroute.domains.base import Example
from crossroute.domains.domain import Domain
from crossroute.domains.evalset import pin_eval_sets
from crossroute.domains.files import as_domains, get_domain
from crossroute.measure.evaluate import EVAL_SEED, evaluate_domain
from crossroute.measure.hvp import grad_and_hvp
from crossroute.measure.proxy import Batch, answer_log_probs, domain_examples, make_batches
from crossroute.measure.stats import mean_ci, paired_by_key, paired_diff
from crossroute.model.load import default_device, load_model, save_model
from crossroute.model.units import UnitMap, parse_unit_id

FRACTIONS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
SELECTORS: tuple[str, ...] = ("conflict", "random", "magnitude")
VARIANT_KINDS: dict[str, tuple[str, ...]] = {"mlp": ("neuron",),
                                             "joint": ("neuron", "head", "kv", "router", "other")}
# What each variant's pool leaves at θ_now, named in the result: 100 % of the joint pool is θ_A exactly.
VARIANT_EXCLUDES: dict[str, str] = {
    "mlp": "attention heads, KV groups, MoE router rows and every tensor outside units (embeddings, norms, "
           "q/k norms, lm_head, biases)",
    "joint": "nothing: whole tensors outside units (embeddings, norms, lm_head, ...) are units of their own"}


# ----------------------------------------------------------------------------- in-place swap


class Swapper:
    """Writes a source state's slices of chosen units into a model in place, and swaps back.

    `source` maps parameter names to tensors (θ_A) of the model's shapes; they are moved once to
    the model's device and dtype (exact when the model is fp32 and the source fp32 or narrower).
    """

    def __init__(self, model: torch.nn.Module, source: dict[str, torch.Tensor],
                 umap: UnitMap | None = None) -> None:
        self.model = model
        self.umap = umap or UnitMap.of_model(model)
        self.params = dict(model.named_parameters())
        self.source = {n: source[n].detach().to(p.device, p.dtype) for n, p in self.params.items()}

    @contextlib.contextmanager
    def rolled_back(self, units: Sequence[str]) -> Iterator[None]:
        """Within the body, `units` hold the source's values; afterwards the originals again."""
        selections = self.umap.select(units)
        saved: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                for name, sel in selections.items():
                    p, src = self.params[name], self.source[name]
                    if sel is None:
                        saved[name] = p.detach().clone()
                        p.copy_(src)
                    else:
                        saved[name] = sel.take(p).clone()
                        sel.put(p, sel.take(src))
            yield
        finally:
            with torch.no_grad():
                for name, orig in saved.items():
                    p, sel = self.params[name], selections[name]
                    if sel is None:
                        p.copy_(orig)
                    else:
                        sel.put(p, orig)


def all_units(umap: UnitMap) -> list[str]:
    """Every unit of the model: neurons, heads, KV groups, router rows and the other tensors (a partition)."""
    return [u for k in umap.partition_kinds for u in umap.ids(k)] + umap.ids("other")


# ----------------------------------------------------------------------------- selection


def budget(pool_size: int, fraction: float) -> int:
    """Units for `fraction` % of a pool: ceil(pool·fraction/100), at least 1, at most the pool."""
    return min(pool_size, max(1, math.ceil(round(pool_size * fraction / 100.0, 9))))


def rankings(umap: UnitMap, attr: dict[str, torch.Tensor], magnitude: dict[str, torch.Tensor],
             shared: set[str], kinds: Sequence[str], seed: int = 0
             ) -> dict[str, tuple[list[str], list[bool]]]:
    """Per selector, the pool of `kinds` in selection order and whether each unit is shared."""
    ids: list[str] = []
    a_vals: list[torch.Tensor] = []
    m_vals: list[torch.Tensor] = []
    for k in kinds:
        ids += umap.ids(k)
        a_vals.append(umap.flat(attr, k))
        m_vals.append(umap.flat(magnitude, k))
    a = torch.cat(a_vals)
    m = torch.cat(m_vals)
    is_shared = torch.tensor([u in shared for u in ids], dtype=torch.bool)
    first = is_shared & (a > 0)
    # conflict: shared units with positive score (largest first), then the rest by attribution
    key = torch.where(first, a, torch.full_like(a, -math.inf))
    order_first = torch.argsort(key, descending=True, stable=True)[: int(first.sum())]
    rest = torch.argsort(torch.where(first, torch.full_like(a, -math.inf), a), descending=True,
                         stable=True)[: len(ids) - int(first.sum())]
    conflict = torch.cat([order_first, rest]).tolist()
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randperm(len(ids), generator=gen).tolist()
    mag = torch.argsort(m, descending=True, stable=True).tolist()
    sh = is_shared.tolist()
    return {name: ([ids[i] for i in order], [sh[i] for i in order])
            for name, order in (("conflict", conflict), ("random", rand), ("magnitude", mag))}


# ----------------------------------------------------------------------------- screen


SCREEN_METRIC = ("teacher-forced P(ref) of each pinned eval prompt's reference answer + eos (one forward per batch, "
                 "crossroute.measure.proxy.answer_log_probs), mean in points, paired vs θ_now")
FullPoint = tuple[str, str, float]  # (variant, selector, fraction) of a point to evaluate fully
SEED_FULL_AT: tuple[FullPoint, ...] = (("mlp", "conflict", 2.0), ("joint", "conflict", 32.0))  # the seed's budgets


def max_full_points(k: int) -> int:
    """Sweep points a k-point sweep evaluates fully: with θ_now and θ_A at most k/4 + 4 full evaluations."""
    return min(k, k // 4 + 2)


def parse_full_points(spec: str) -> list[FullPoint]:
    """'mlp/conflict/2,joint/conflict/32' as (variant, selector, fraction) points (the CLI's --full-at)."""
    out: list[FullPoint] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        parts = item.split("/")
        try:
            if len(parts) != 3:
                raise ValueError
            out.append((parts[0], parts[1], float(parts[2])))
        except ValueError:
            raise CrossrouteError(f"full-eval point {item!r}: write VARIANT/SELECTOR/FRACTION, e.g. "
                                  "mlp/conflict/2.") from None
    return out


def screen_domains(doms: Sequence[Domain], eval_n: int) -> list[tuple[Domain, list[Example]]]:
    """The domains whose pinned eval prompts all have a reference answer (P(ref) needs one), with those prompts."""
    out = []
    for d in doms:
        examples = d.examples("eval", eval_n, seed=EVAL_SEED)
        if examples and all(e.answer for e in examples):
            out.append((d, examples))
    return out


def screen_p_ref(model: torch.nn.Module, batches: dict[str, list[Batch]]) -> dict[str, list[float]]:
    """Per screened domain, every eval example's P(ref) at the model's current weights, in [0, 1] (in the batches'
    order, the same at every point, so points pair example by example)."""
    return {d: [math.exp(v) for b in bs for v in answer_log_probs(model, b).tolist()] for d, bs in batches.items()}


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def pick_full_points(keys: Sequence[FullPoint], n_units: Sequence[int], screen_a: Sequence[float],
                     requested: Sequence[FullPoint] = (), cap: int | None = None) -> dict[int, str]:
    """Which sweep points get a full evaluation, index -> why: the requested points first, then per selector the
    screen's best (highest mean P(ref) on A; ties: fewer units), then per (variant, selector) the screen's best,
    until `cap` points (default max_full_points)."""
    cap = max_full_points(len(keys)) if cap is None else cap
    index = {(v, s, float(f)): i for i, (v, s, f) in enumerate(keys)}
    picks: dict[int, str] = {}
    for v, s, f in requested:
        i = index.get((v, s, float(f)))
        if i is None:
            raise CrossrouteError(f"full-eval point {v}/{s}/{f:g} is not in the sweep; pick a variant, selector "
                                  "and fraction the sweep runs.")
        picks.setdefault(i, "requested")
    if len(picks) > cap:
        raise CrossrouteError(f"{len(picks)} full-eval points asked for; a sweep of {len(keys)} points evaluates "
                              f"at most {cap} fully; ask for fewer (or full_all=True for the old full sweep).")

    def best(group: list[int]) -> int:
        return max(group, key=lambda j: (screen_a[j], -n_units[j], -j))

    groups: list[tuple[str, list[int]]] = []
    for s in dict.fromkeys(k[1] for k in keys):
        groups.append((f"screen best of {s}", [i for i, k in enumerate(keys) if k[1] == s]))
    for v, s in dict.fromkeys((k[0], k[1]) for k in keys):
        groups.append((f"screen best of {v}/{s}", [i for i, k in enumerate(keys) if k[:2] == (v, s)]))
    for why, group in groups:
        if len(picks) >= cap:
            break
        picks.setdefault(best(group), why)
    return picks


# ----------------------------------------------------------------------------- sweep


@dataclass
class RollbackPoint:
    """One sweep point. Every point has the screen (screen_*); only points with `full_eval` have the greedy
    scores, recovery, collateral and their paired change vs θ_now (else {} / None)."""

    variant: str
    selector: str
    fraction: float
    n_units: int
    n_shared: int  # selected units active for both A and a later domain
    scores: dict[str, float]
    recovery: float | None
    collateral: dict[str, float]
    # Paired over the same eval prompts, per domain: this point minus theta_now (A's gain, the others' collateral),
    # with a bootstrap CI and a McNemar / sign-flip p-value.
    change: dict[str, dict] = field(default_factory=dict)
    full_eval: bool = False
    full_eval_reason: str | None = None  # why this point was evaluated fully
    # Per screened domain: mean P(ref) in points with its bootstrap CI; its paired change vs θ_now (CI, p-value);
    # on A, (P(ref) here - at θ_now) / (at θ_A - at θ_now).
    screen_p_ref: dict[str, dict] = field(default_factory=dict)
    screen_change: dict[str, dict] = field(default_factory=dict)
    screen_recovery: float | None = None


@dataclass
class RollbackResult:
    """A rollback sweep; `to_json()` is results/rollback_{A}.json."""

    domain: str
    now: str
    to: str
    others: list[str]
    fractions: list[float]
    selectors: list[str]
    variants: list[str]
    eval_n: int
    seed: int
    score_peak: float
    score_now: dict[str, float]
    score_to: dict[str, float]
    pool_sizes: dict[str, int]
    pool_excludes: dict[str, str]
    n_shared: dict[str, int]
    points: list[RollbackPoint]
    best: dict[str, Any] | None = None  # the fully evaluated point with the highest score on A (ties: fewer units)
    damage: dict[str, float] = field(default_factory=dict)
    runtime_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    n_full_evals: int = 0  # model states greedily evaluated on every domain (θ_now, θ_A and the fully evaluated points)
    full_evals: list[str] = field(default_factory=list)  # which: "theta_now", "theta_A", "variant/selector/fraction"
    screen_now: dict[str, dict] = field(default_factory=dict)  # mean P(ref) in points with CI, per screened domain
    screen_to: dict[str, dict] = field(default_factory=dict)  # the same at θ_A

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        return out


def _recovery(score: float, now: float, peak: float) -> float | None:
    return (score - now) / (peak - now) if peak != now else None


def _storage_dtype(path: Path) -> torch.dtype | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    dt = getattr(torch, str(name), None) if name else None
    return dt if isinstance(dt, torch.dtype) else None


def _paired_keyed(names: Sequence[str], now: PerExample, at: PerExample) -> dict[str, dict]:
    """Per domain, the paired change `at - now` of greedy scores, aligned on the examples both scored."""
    return {d: paired_diff(*paired_by_key(now.get(d, {}), at.get(d, {}))).to_json() for d in names}


def _paired_lists(now: dict[str, list[float]], at: dict[str, list[float]]) -> dict[str, dict]:
    """Per domain, the paired change `at - now` of per-example values over the same examples, in points."""
    return {d: paired_diff(now[d], b).to_json() for d, b in at.items()}


@dataclass
class _Spec:
    """A sweep point before evaluation: what it rolls back."""

    variant: str
    selector: str
    fraction: float
    units: list[str]
    n_shared: int


def rollback_sweep(
    now: str | Path,
    to: str | Path,
    domain_a: Domain | str,
    others: Sequence[Domain | str] | str,
    fractions: Sequence[float] = FRACTIONS,
    selectors: Sequence[str] = SELECTORS,
    joint: bool = True,
    eval_n: int = 100,
    n: int = 64,
    batch_size: int = 64,
    q: float = 10.0,
    routes_n: int = 64,
    seed: int = 0,
    split: str = "eval",
    save_best: str | Path | None = None,
    device: str | None = None,
    full_at: Sequence[FullPoint] = (),
    full_all: bool = False,
) -> RollbackResult:
    """Sweep rollback fractions × selectors (× variants) on θ_now, swapping θ_A slices in place.

    Every point is screened by the teacher-forced P(ref) of the `eval_n` pinned eval prompts per domain; the greedy
    evaluation runs at θ_now, θ_A and only at the points pick_full_points chooses (`full_at` first, then the
    screen's best per selector): at most k/4 + 4 full evaluations for k points; `full_all`: at every point (the old
    sweep). The damage attribution uses `n` examples of A (`split`); it and the screen run batches of `batch_size`;
    routes `routes_n` prompts, top-`q` % per layer. `save_best`: write the checkpoint of `best` there.
    """
    t0 = time.perf_counter()
    unknown = [s for s in selectors if s not in SELECTORS]
    if unknown:
        raise CrossrouteError(f"unknown selector {unknown[0]!r}; use {', '.join(SELECTORS)}.")
    if not fractions or any(not 0 < f <= 100 for f in fractions):
        raise CrossrouteError("rollback fractions must be percentages in (0, 100].")
    if save_best is not None:
        check_output_dir(save_best)  # a refused output fails now, not after the sweep
    dev = default_device(device)
    da = get_domain(domain_a) if isinstance(domain_a, str) else domain_a
    dos = [d for d in as_domains(others) if d.name != da.name]
    if not dos:
        raise CrossrouteError("rollback needs at least one later domain besides A (--others).")
    doms = [da, *dos]
    screened = screen_domains(doms, eval_n)
    if not full_all and (not screened or screened[0][0] is not da):
        raise CrossrouteError(f"domain {da.name!r} has eval prompts without a reference answer, so the P(ref) "
                              "screen cannot rank rollback points; use a domain with answers or full_all=True.")
    variants = ["mlp", "joint"] if joint else ["mlp"]
    k_points = len(variants) * len(selectors) * len(fractions)
    if not full_all:  # a bad --full-at fails now, not after the attribution
        pick_full_points([(v, s, float(f)) for v in variants for s in selectors for f in fractions],
                         [0] * k_points, [0.0] * k_points, full_at)
    lt = load_model(to, dtype=torch.float32, double_backward=True, device=dev)
    ln = load_model(now, device=dev)  # fp32, default attention: only evaluated
    umap = UnitMap.of_model(lt.model).require(("neuron",))
    delta = param_delta(lt.model, ln.model)
    batches = make_batches(lt.tokenizer, domain_examples(da, n, seed, split), batch_size, da)
    loss_a, g, hd = grad_and_hvp(lt.model, batches, delta)
    attr = attribution(umap, delta, g, hd)
    sq = umap.reduce({k: d.square() for k, d in delta.items()})
    magnitude = {k: [x.sqrt() for x in v] if isinstance(v, list) else v.sqrt() for k, v in sq.items()}
    first = float(sum(float((g[k].double() * delta[k].double().cpu()).sum()) for k in g))
    second = 0.5 * float(sum(float((hd[k].double() * delta[k].double().cpu()).sum()) for k in hd))
    del g, hd
    per_b = shared_units(lt.model, lt.tokenizer, da, dos, n=routes_n, q=q, seed=seed)
    shared = set().union(*(s for sets in per_b.values() for s in sets.values()))

    # Eval prompts are fixed (EVAL_SEED), independent of the analysis seed, so every point pairs with theta_now.
    t_full = time.perf_counter()
    score_peak = evaluate_domain(lt.model, lt.tokenizer, da, n=eval_n, seed=EVAL_SEED).score
    score_to = {d.name: (score_peak if d is da else
                         evaluate_domain(lt.model, lt.tokenizer, d, n=eval_n, seed=EVAL_SEED).score)
                for d in doms}
    full_s = time.perf_counter() - t_full
    swapper = Swapper(ln.model, dict(lt.model.named_parameters()), umap)
    del lt

    def evaluate() -> tuple[dict[str, float], PerExample]:
        """Each domain's score, and every eval example's score (for the paired change vs theta_now)."""
        res = [evaluate_domain(ln.model, ln.tokenizer, d, n=eval_n, seed=EVAL_SEED) for d in doms]
        return {r.domain: r.score for r in res}, per_example_scores([x for r in res for x in r.records])

    t_full = time.perf_counter()
    score_now, per_now = evaluate()
    full_s += time.perf_counter() - t_full
    specs: list[_Spec] = []
    for variant in variants:
        ranks = rankings(umap, attr, magnitude, shared, VARIANT_KINDS[variant], seed)
        pool = len(ranks["conflict"][0])
        for sel in selectors:
            order, sh = ranks[sel]
            for frac in fractions:
                k = budget(pool, frac)
                specs.append(_Spec(variant, sel, float(frac), order[:k], int(sum(sh[:k]))))

    t_screen = time.perf_counter()
    sb = {d.name: make_batches(ln.tokenizer, ex, batch_size, d) for d, ex in screened}  # tokenised once
    scr_now = screen_p_ref(ln.model, sb)
    with swapper.rolled_back(all_units(umap)):  # θ_A exactly, through the same path as every point
        scr_to = screen_p_ref(ln.model, sb)
    a_now, a_to = (_mean(scr_now[da.name]), _mean(scr_to[da.name])) if da.name in scr_now else (0.0, 0.0)
    points: list[RollbackPoint] = []
    screen_a: list[float] = []  # A's mean P(ref) per point, unrounded: what the picks rank
    for sp in specs:
        with swapper.rolled_back(sp.units):
            scr = screen_p_ref(ln.model, sb)
        screen_a.append(_mean(scr.get(da.name, [])))
        points.append(RollbackPoint(
            variant=sp.variant, selector=sp.selector, fraction=sp.fraction, n_units=len(sp.units),
            n_shared=sp.n_shared, scores={}, recovery=None, collateral={}, full_eval=False,
            screen_p_ref={d: mean_ci(v).to_json() for d, v in scr.items()},
            screen_change=_paired_lists(scr_now, scr),
            screen_recovery=_recovery(screen_a[-1], a_now, a_to) if da.name in scr else None))
    screen_s = time.perf_counter() - t_screen
    keys = [(sp.variant, sp.selector, sp.fraction) for sp in specs]
    if full_all:
        picks = dict.fromkeys(range(len(specs)), "every point (full_all)")
    else:
        picks = pick_full_points(keys, [len(sp.units) for sp in specs], screen_a, full_at)

    t_full = time.perf_counter()
    for i, why in sorted(picks.items()):
        pt = points[i]
        with swapper.rolled_back(specs[i].units):
            s, per = evaluate()
        pt.full_eval, pt.full_eval_reason = True, why
        pt.scores, pt.change = s, _paired_keyed([d.name for d in doms], per_now, per)
        pt.recovery = _recovery(s[da.name], score_now[da.name], score_peak)
        pt.collateral = {d.name: s[d.name] - score_now[d.name] for d in dos}
    full_s += time.perf_counter() - t_full

    best = None
    full = [i for i, p in enumerate(points) if p.full_eval]
    if full:
        i = max(full, key=lambda j: (points[j].scores[da.name], -points[j].n_units))
        best = {"index": i, **asdict(points[i]), "saved_to": None}
        if save_best is not None:
            orig = _storage_dtype(Path(ln.path))
            with swapper.rolled_back(specs[i].units):
                if orig is not None and orig != torch.float32 and orig.is_floating_point:
                    ln.model.to(orig)
                    try:
                        save_model(ln.model, ln.tokenizer, save_best)
                    finally:
                        ln.model.to(torch.float32)
                else:
                    save_model(ln.model, ln.tokenizer, save_best)
            best["saved_to"] = str(save_best)
    pool_sizes = {v: sum(umap.n_units(k) for k in VARIANT_KINDS[v]) for v in variants}
    shared_kinds = [p[1] for u in shared if (p := parse_unit_id(u)) is not None]
    n_shared = {k: shared_kinds.count(k) for k in umap.partition_kinds}
    return RollbackResult(
        domain=da.name, now=str(ln.path), to=str(Path(to)), others=[d.name for d in dos],
        fractions=[float(f) for f in fractions], selectors=list(selectors), variants=variants,
        eval_n=eval_n, seed=seed, score_peak=score_peak, score_now=score_now, score_to=score_to,
        pool_sizes=pool_sizes, pool_excludes={v: VARIANT_EXCLUDES[v] for v in variants}, n_shared=n_shared,
        points=points, best=best,
        damage={"loss_a_at_to": loss_a, "first_order": first, "second_order": second},
        runtime_s=time.perf_counter() - t0,
        meta={"n": n, "batch_size": batch_size, "split": split, "q": q, "routes_n": routes_n,
              "device": dev, "shared_rule": "active for A and for at least one other domain "
              "(routes at θ_A); KV group active with one of its query heads",
              "screen": SCREEN_METRIC, "screened_domains": [d.name for d, _ in screened],
              "full_eval_rule": "every point" if full_all else
              "requested points, then the screen's best per selector, then per variant/selector; at most "
              f"{max_full_points(len(specs))} of {len(specs)} points (k/4 + 4 full evaluations with θ_now, θ_A)",
              "screen_s": round(screen_s, 3), "full_eval_s": round(full_s, 3)},
        n_full_evals=2 + len(picks),
        full_evals=["theta_now", "theta_A"] + [f"{k[0]}/{k[1]}/{k[2]:g}" for i, k in enumerate(keys) if i in picks],
        screen_now={d: mean_ci(v).to_json() for d, v in scr_now.items()},
        screen_to={d: mean_ci(v).to_json() for d, v in scr_to.items()})


def rollback_result_name(domain: str) -> str:
    return result_name("rollback", domain)


def run_rollback(
    now: str | Path,
    to: str | Path,
    domain: Domain | str,
    others: Sequence[Domain | str] | str,
    fractions: Sequence[float] = FRACTIONS,
    run_dir: str | Path | None = None,
    save_best: str | Path | None = None,
    selectors: Sequence[str] = SELECTORS,
    joint: bool = True,
    eval_n: int = 100,
    n: int = 64,
    batch_size: int = 64,
    routes_n: int = 64,
    q: float = 10.0,
    seed: int = 0,
    device: str | None = None,
    threads: int | None = None,
    full_at: Sequence[FullPoint] = (),
    full_all: bool = False,
) -> RollbackResult:
    """`crossroute rollback`: the sweep; writes RUN_DIR/results/rollback_{A}.json.

    `threads`: torch CPU threads for the duration (None: leave as is; see run_damage). `full_at`, `full_all`: which
    points get the greedy evaluation besides the screen's picks (see rollback_sweep).
    """
    da: Domain | str = domain
    dos: Sequence[Domain | str] | str = others
    if run_dir is not None:  # the run's pinned eval sets (drawn and written there when it has none)
        pinned = pin_eval_sets(Path(run_dir), [get_domain(domain) if isinstance(domain, str) else domain,
                                                    *as_domains(others)], eval_n)
        da, dos = pinned[0], pinned[1:]
    with torch_threads(threads):
        res = rollback_sweep(now, to, da, dos, fractions, selectors, joint, eval_n=eval_n,
                             n=n, batch_size=batch_size, q=q, routes_n=routes_n, seed=seed,
                             save_best=save_best, device=device, full_at=full_at, full_all=full_all)
    if run_dir is not None:
        RunDir(Path(run_dir)).write_result(rollback_result_name(res.domain), res.to_json())
    return res


# ----------------------------------------------------------------------------- render


