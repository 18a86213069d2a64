"""Local perturbation / damage of an earlier domain A by a later update δ (DESIGN.md §2.5).

With θ_A = the checkpoint after A's stage ("before"), δ = θ_later − θ_A (fp32) and L_A the proxy
loss of crossroute.gradients (mean NLL of A's reference answer tokens):

    L_A(θ_A + δ) − L_A(θ_A) ≈ g_Aᵀδ + ½ δᵀH_Aδ          (one HVP H_Aδ at θ_A, crossroute.hvp)

Per unit u (MLP neuron, attention head, KV group, or one "other" tensor such as a norm or the
embedding) damage_u = δ_uᵀ(g_A + ½ H_Aδ)_u; the units partition the parameters, so the
attributions sum to the first + second order total.

Conflict subspace (crossroute.analyze.subspace): on the parameter entries of the units active for
both A and a later domain B (routes measured at θ_A; a KV group counts as active when one of its
query heads is), the k largest and k // 2 smallest eigenpairs of H_A's block there, by
thick-restart Lanczos from a seeded random start (not from δ), each with its residual; the
projected share (P_rδ)ᵀH(P_rδ) / δᵀHδ of the top-r eigendirections against r random directions
and δ's r largest-|δ| entries, and r90 only where that share reaches 0.9 among converged pairs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from crossroute.analyze.subspace import ConflictSubspace, conflict_subspace, shared_units
from crossroute.core.errors import CrossrouteError
from crossroute.core.rundir import RunDir, result_name
from crossroute.core.threads import torch_threads
from crossroute.domains.domain import Domain
from crossroute.domains.files import as_domains, get_domain
from crossroute.measure.hvp import grad_and_hvp
from crossroute.measure.proxy import Batch, domain_examples, make_batches, mean_proxy_loss
from crossroute.model.load import Loaded, default_device, load_model, params_in_layers
from crossroute.model.units import PARTITION_KINDS, TAG, UnitMap, parse_unit_id

TOP_PERCENTS: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)


# ----------------------------------------------------------------------------- units










# ----------------------------------------------------------------------------- damage




@dataclass
class DamageResult:
    """The decomposition of A's loss change; `to_json()` is results/damage_{A}.json."""

    domain: str
    before: str
    after: str
    n: int
    batch_size: int
    split: str
    seed: int
    method: str
    loss_before: float
    loss_after: float
    measured: float
    first_order: float
    second_order: float
    units: dict[str, list[list[float]]]  # partition kind -> [layer][unit] attribution (experts: see meta)
    other: dict[str, float]  # tensor -> attribution
    conflict: list[ConflictSubspace] = field(default_factory=list)
    delta_norm: float = 0.0
    runtime_s: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def predicted(self) -> float:
        return self.first_order + self.second_order

    @property
    def error(self) -> float:
        return self.measured - self.predicted

    def flat(self) -> tuple[list[str], list[str], torch.Tensor]:
        """(unit ids, kinds, attributions) over every unit, others included."""
        ids, kinds, vals = [], [], []
        for kind, per in self.units.items():
            for layer, row in enumerate(per):
                for j, v in enumerate(row):
                    ids.append(f"L{layer}.{TAG[kind]}.{j}")
                    kinds.append(kind)
                    vals.append(v)
        for name, v in self.other.items():
            ids.append(name)
            kinds.append("other")
            vals.append(v)
        return ids, kinds, torch.tensor(vals, dtype=torch.float64)

    def attribution_sum(self) -> float:
        return float(self.flat()[2].sum())

    def top_share(self, percents: Sequence[float] = TOP_PERCENTS) -> dict[str, float | None]:
        """Share of the first + second order total carried by the top p % of units."""
        vals = torch.sort(self.flat()[2], descending=True).values
        total = self.predicted
        out: dict[str, float | None] = {}
        for p in percents:
            k = min(len(vals), max(1, math.ceil(round(len(vals) * p / 100.0, 9))))
            out[f"{p:g}"] = float(vals[:k].sum()) / total if total else None
        return out

    def kind_totals(self) -> dict[str, float]:
        out = {k: float(sum(sum(r) for r in v)) for k, v in self.units.items()}
        out["other"] = float(sum(self.other.values()))
        return out

    def to_json(self, include_units: bool = True, top: int = 20) -> dict[str, Any]:
        ids, kinds, vals = self.flat()
        order = torch.argsort(vals, descending=True)[:top].tolist()
        rel = abs(self.error) / abs(self.measured) if self.measured else None
        out: dict[str, Any] = {
            "domain": self.domain, "before": self.before, "after": self.after, "n": self.n,
            "batch_size": self.batch_size, "split": self.split, "seed": self.seed,
            "method": self.method, "attn_implementation": "eager", "dtype": "float32",
            "loss": "mean NLL of reference answer tokens (+eos)",
            "loss_before": self.loss_before, "loss_after": self.loss_after,
            "delta_norm": self.delta_norm,
            "measured": self.measured, "first_order": self.first_order,
            "second_order": self.second_order, "predicted": self.predicted,
            "error": self.error, "rel_error": rel,
            "attribution_sum": float(vals.sum()), "n_units": len(ids),
            "n_units_by_kind": {k: kinds.count(k) for k in dict.fromkeys(kinds)},
            "kind_totals": self.kind_totals(), "top_share": self.top_share(),
            "top_units": [{"unit": ids[i], "kind": kinds[i], "damage": float(vals[i])}
                          for i in order],
            "layer_totals": {k: [float(sum(r)) for r in v] for k, v in self.units.items()},
            "other": self.other,
            "conflict": [asdict(c) for c in self.conflict],
            "runtime_s": self.runtime_s,
        }
        if include_units:
            out["units"] = self.units
        if self.meta:
            out["meta"] = self.meta
        return out


def _load(spec: str | Path | Loaded, device: str) -> Loaded:
    if isinstance(spec, Loaded):
        return spec
    return load_model(spec, dtype=torch.float32, double_backward=True, device=device)


def param_delta(before: torch.nn.Module, after: torch.nn.Module,
                names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """δ = after − before per parameter (only `names` when given), fp32 (or wider), on `before`'s device."""
    pa = dict(after.named_parameters())
    out = {}
    keep = None if names is None else set(names)
    for name, p in before.named_parameters():
        if keep is not None and name not in keep:
            continue
        if name not in pa or pa[name].shape != p.shape:
            raise CrossrouteError(f"checkpoints differ in parameter {name!r}; damage needs two "
                                  "checkpoints of the same architecture.")
        dt = torch.promote_types(p.dtype, torch.float32)
        out[name] = pa[name].detach().to(p.device, dt) - p.detach().to(dt)
    return out


def attribution(umap: UnitMap, delta: dict[str, torch.Tensor], g: dict[str, torch.Tensor],
                hd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """damage_u = δ_uᵀ(g + ½ H δ)_u per unit ({kind: [per-layer tensors]}, "other": [tensors])."""
    contrib = {n: delta[n].double().cpu() * (g[n].double().cpu() + 0.5 * hd[n].double().cpu())
               for n in g}
    return umap.reduce(contrib)


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double().cpu() * b[k].double().cpu()).sum() for k in a if k in b))




def damage(
    before: str | Path | Loaded,
    after: str | Path | Loaded,
    domain: Domain | str,
    n: int = 64,
    batch_size: int = 64,
    later: Sequence[Domain | str] | Domain | str | None = None,
    k: int = 20,
    q: float = 10.0,
    routes_n: int = 64,
    seed: int = 0,
    split: str = "eval",
    method: str = "double_backward",
    device: str | None = None,
    layers: Sequence[int] | None = None,
) -> DamageResult:
    """Decompose A's loss change from `before` (θ_A) to `after` (θ_A + δ); see module docstring.

    `later`: domains B whose shared routes with A bound the conflict subspace (none: skipped);
    `k`: its top eigenpairs (k // 2 bottom ones; ≤ 170 + 2k HVPs per B, see crossroute.analyze.subspace).
    Models are loaded in fp32 with eager attention (twice differentiable).
    `layers`: restrict δ to these decoder layers (S): the measured change is then L(θ_A + δ_S) − L(θ_A),
    gradients and HVPs cover S only (the memory of a large model's analysis), and so do the units.
    """
    t0 = time.perf_counter()
    dev = default_device(device)
    da = get_domain(domain) if isinstance(domain, str) else domain
    laters = as_domains(later)
    lb, la = _load(before, dev), _load(after, dev)
    model, tok = lb.model, lb.tokenizer
    names = params_in_layers(model, layers) if layers is not None else None
    delta = param_delta(model, la.model, names)
    batches = make_batches(tok, domain_examples(da, n, seed, split), batch_size, da)
    loss_after = (mean_proxy_loss(la.model, batches) if names is None
                  else _loss_moved(model, batches, delta))  # L(θ_A + δ_S)
    after_path = str(la.path)
    del la
    loss_before, g, hd = grad_and_hvp(model, batches, delta, params=names, method=method)
    umap = UnitMap.of_model(model).require(("neuron", "head"))
    attr = attribution(umap, delta, g, hd)
    conflicts = []
    if laters:
        shared = shared_units(model, tok, da, laters, n=routes_n, q=q, seed=seed)
        for b in laters:
            units = shared[b.name] if layers is None else _in_layers(shared[b.name], layers)
            conflicts.append(conflict_subspace(model, batches, umap, delta, g, units, b.name, k, method,
                                               seed=seed))
    return DamageResult(
        domain=da.name, before=str(lb.path), after=after_path,
        n=n, batch_size=batch_size, split=split, seed=seed, method=method,
        loss_before=loss_before, loss_after=loss_after, measured=loss_after - loss_before,
        first_order=_dot(g, delta), second_order=0.5 * _dot(delta, hd),
        units={kind: [t.tolist() for t in attr[kind]] for kind in PARTITION_KINDS if kind in umap.kinds},
        other={name: float(v) for name, v in zip(umap.others, attr["other"], strict=True)},
        conflict=conflicts, delta_norm=math.sqrt(_dot(delta, delta)),
        runtime_s=time.perf_counter() - t0,
        meta={"q": q, "routes_n": routes_n, "routes_split": "eval", "k": k,
              "units": umap.to_json(), "layout": umap.head_layout.to_json() if umap.head_layout else {},
              "expert_attribution": [t.tolist() for t in attr["expert"]] if "expert" in umap.kinds else None,
              "device": dev,
              "layers": list(layers) if layers is not None else "all"})


def _loss_moved(model: torch.nn.Module, batches: list[Batch], delta: dict[str, torch.Tensor]) -> float:
    """The proxy loss with `delta` added to its parameters for the pass (restored after)."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in delta}
    try:
        with torch.no_grad():
            for n, d in delta.items():
                params[n].add_(d.to(params[n].dtype))
        return mean_proxy_loss(model, batches)
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


def _in_layers(units: dict[str, set[str]], layers: Sequence[int]) -> dict[str, set[str]]:
    """The units (ids like L3.mlp.17) of these decoder layers."""
    keep = set(layers)
    return {kind: {u for u in ids if (p := parse_unit_id(u)) is not None and p[0] in keep}
            for kind, ids in units.items()}


def damage_result_name(domain: str) -> str:
    return result_name("damage", domain)


def run_damage(
    before: str | Path,
    after: str | Path,
    domain: str,
    later: Sequence[str] | str | None = None,
    n: int = 64,
    batch_size: int = 64,
    run_dir: str | Path | None = None,
    k: int = 20,
    q: float = 10.0,
    seed: int = 0,
    split: str = "eval",
    method: str = "double_backward",
    device: str | None = None,
    routes_n: int = 64,
    threads: int | None = None,
    layers: Sequence[int] | None = None,
) -> DamageResult:
    """`crossroute damage`: the decomposition; writes RUN_DIR/results/damage_{A}.json.

    `threads`: torch CPU threads for the duration (None: leave as is). On a shared 2-core
    machine 1 thread was ~30x faster than 2 (OpenMP barriers under contention).
    """
    with torch_threads(threads):
        res = damage(before, after, domain, n=n, batch_size=batch_size, later=later, k=k, q=q,
                     routes_n=routes_n, seed=seed, split=split, method=method, device=device, layers=layers)
    if run_dir is not None:
        RunDir(Path(run_dir)).write_result(damage_result_name(res.domain), res.to_json())
    return res


# ----------------------------------------------------------------------------- render




