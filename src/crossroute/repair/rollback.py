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
evaluates A and the others (greedy, crossroute.evaluate), and swaps the saved θ_now slices back
(bit-identical): the model is loaded once. recovery = (score_rb − score_now) / (score_peak −
score_now) on A, with score_peak = A's score at θ_A; collateral = score change on each other
domain.
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
from crossroute.domains.domain import Domain
from crossroute.domains.evalset import pin_eval_sets
from crossroute.domains.files import as_domains, get_domain
from crossroute.measure.evaluate import EVAL_SEED, evaluate_domain
from crossroute.measure.hvp import grad_and_hvp
from crossroute.measure.proxy import domain_examples, make_batches
from crossroute.measure.stats import paired_by_key, paired_diff
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


# ----------------------------------------------------------------------------- sweep


@dataclass
class RollbackPoint:
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
    best: dict[str, Any] | None = None
    damage: dict[str, float] = field(default_factory=dict)
    runtime_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

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
) -> RollbackResult:
    """Sweep rollback fractions × selectors (× variants) on θ_now, swapping θ_A slices in place.

    Scores come from greedy evaluation of `eval_n` held-out prompts per domain; the damage
    attribution from `n` examples of A (`split`), batches of `batch_size`; routes from
    `routes_n` prompts, top-`q` % per layer. `save_best`: write the checkpoint of the point with
    the highest recovery (ties: fewer units) there.
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

    doms = [da, *dos]
    # Eval prompts are fixed (EVAL_SEED), independent of the analysis seed, so every point pairs with theta_now.
    score_peak = evaluate_domain(lt.model, lt.tokenizer, da, n=eval_n, seed=EVAL_SEED).score
    score_to = {d.name: (score_peak if d is da else
                         evaluate_domain(lt.model, lt.tokenizer, d, n=eval_n, seed=EVAL_SEED).score)
                for d in doms}
    swapper = Swapper(ln.model, dict(lt.model.named_parameters()), umap)
    del lt

    def evaluate() -> tuple[dict[str, float], PerExample]:
        """Each domain's score, and every eval example's score (for the paired change vs theta_now)."""
        res = [evaluate_domain(ln.model, ln.tokenizer, d, n=eval_n, seed=EVAL_SEED) for d in doms]
        return {r.domain: r.score for r in res}, per_example_scores([x for r in res for x in r.records])

    score_now, per_now = evaluate()
    variants = ["mlp", "joint"] if joint else ["mlp"]
    points: list[RollbackPoint] = []
    chosen: dict[int, list[str]] = {}
    for variant in variants:
        ranks = rankings(umap, attr, magnitude, shared, VARIANT_KINDS[variant], seed)
        pool = len(ranks["conflict"][0])
        for sel in selectors:
            order, sh = ranks[sel]
            for frac in fractions:
                k = budget(pool, frac)
                units = order[:k]
                with swapper.rolled_back(units):
                    s, per = evaluate()
                change = {}
                for d in doms:
                    a, b = paired_by_key(per_now.get(d.name, {}), per.get(d.name, {}))
                    change[d.name] = paired_diff(a, b).to_json()
                chosen[len(points)] = units
                points.append(RollbackPoint(
                    variant=variant, selector=sel, fraction=float(frac), n_units=k,
                    n_shared=int(sum(sh[:k])), scores=s,
                    recovery=_recovery(s[da.name], score_now[da.name], score_peak),
                    collateral={d.name: s[d.name] - score_now[d.name] for d in dos}, change=change))
    best = None
    if points:
        i = max(range(len(points)), key=lambda j: (points[j].scores[da.name], -points[j].n_units))
        best = {"index": i, **asdict(points[i]), "saved_to": None}
        if save_best is not None:
            orig = _storage_dtype(Path(ln.path))
            with swapper.rolled_back(chosen[i]):
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
              "(routes at θ_A); KV group active with one of its query heads"})


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
) -> RollbackResult:
    """`crossroute rollback`: the sweep; writes RUN_DIR/results/rollback_{A}.json.

    `threads`: torch CPU threads for the duration (None: leave as is; see run_damage).
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
                             save_best=save_best, device=device)
    if run_dir is not None:
        RunDir(Path(run_dir)).write_result(rollback_result_name(res.domain), res.to_json())
    return res


# ----------------------------------------------------------------------------- render


