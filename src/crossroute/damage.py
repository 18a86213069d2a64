"""Local perturbation / damage of an earlier domain A by a later update δ (DESIGN.md §2.5).

With θ_A = the checkpoint after A's stage ("before"), δ = θ_later − θ_A (fp32) and L_A the proxy
loss of crossroute.gradients (mean NLL of A's reference answer tokens):

    L_A(θ_A + δ) − L_A(θ_A) ≈ g_Aᵀδ + ½ δᵀH_Aδ          (one HVP H_Aδ at θ_A, crossroute.hvp)

Per unit u (MLP neuron, attention head, KV group, or one "other" tensor such as a norm or the
embedding) damage_u = δ_uᵀ(g_A + ½ H_Aδ)_u; the units partition the parameters, so the
attributions sum to the first + second order total.

Conflict subspace: k steps of Lanczos (full reorthogonalisation) on H_A restricted to the
parameter entries of the units active for both A and a later domain B (routes measured at θ_A;
a KV group counts as active when one of its query heads is), started from δ restricted there.
Share of the restricted damage carried by the top-r Ritz directions:
Σ_{i≤r} λ_i (v_iᵀδ)² / δᵀHδ (eigenvalues in decreasing order), and the smallest r reaching 90 %.
Since the Krylov space contains δ, the shares over all k directions sum to 1.
"""

from __future__ import annotations

import contextlib
import html
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .diff import UNIT_KINDS, _Layout, _unit_role
from .domains import Domain, get_domain
from .errors import CrossrouteError
from .gradients import Batch, domain_examples, make_batches, mean_proxy_loss
from .hvp import grad_and_hvp
from .model import Loaded, default_device, load_model, params_in_layers
from .routes import active_sets, head_dim_of, measure_activity
from .rundir import RunDir, result_name

TOP_PERCENTS: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0)
_TAG = {"neuron": "mlp", "head": "head", "kv": "kv"}
_KIND_OF_TAG = {v: k for k, v in _TAG.items()}
_ID_RE = re.compile(r"^L(\d+)\.(mlp|head|kv)\.(\d+)$")


# ----------------------------------------------------------------------------- units


def model_layout(model: torch.nn.Module) -> _Layout:
    """Head layout (heads, KV heads, head_dim) from the model's (text) config."""
    cfg = getattr(model.config, "text_config", None) or model.config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    return _Layout(heads, kv, head_dim_of(cfg))


@dataclass
class UnitMap:
    """Partition of a model's parameters into units, as crossroute.diff names them.

    `roles[name] = (layer, kind, axis, group)` for unit-structured tensors (gate/up rows and down
    columns per neuron; q rows and o columns per head; k/v rows per KV group); every other
    tensor is one "other" unit named by the tensor.
    """

    roles: dict[str, tuple[int, str, int, int]]
    others: list[str]
    counts: dict[str, int]  # units per layer, per kind
    num_layers: int
    layout: _Layout
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: torch.nn.Module) -> UnitMap:
        layout = model_layout(model)
        roles: dict[str, tuple[int, str, int, int]] = {}
        others: list[str] = []
        counts: dict[str, int] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        layers = 0
        for name, p in model.named_parameters():
            shapes[name] = tuple(p.shape)
            role = _unit_role(name, list(p.shape), layout)
            if role is None or p.dim() == 0:
                others.append(name)
                continue
            roles[name] = (role.layer, role.kind, role.axis, role.group)
            n_units = p.shape[role.axis] // role.group
            if counts.setdefault(role.kind, n_units) != n_units:
                raise CrossrouteError(f"{name}: {n_units} {role.kind} units, other tensors have "
                                      f"{counts[role.kind]}; unsupported layout.")
            layers = max(layers, role.layer + 1)
        return cls(roles, others, counts, layers, layout, shapes)

    @property
    def kinds(self) -> list[str]:
        return [k for k in UNIT_KINDS if k in self.counts]

    def n_units(self, kind: str | None = None) -> int:
        if kind == "other":
            return len(self.others)
        if kind is not None:
            return self.num_layers * self.counts.get(kind, 0)
        return sum(self.n_units(k) for k in self.kinds) + len(self.others)

    def ids(self, kind: str) -> list[str]:
        """Unit ids of a kind, layer-major: L{l}.{tag}.{j} (the tensor name for "other")."""
        if kind == "other":
            return list(self.others)
        return [f"L{layer}.{_TAG[kind]}.{j}" for layer in range(self.num_layers)
                for j in range(self.counts[kind])]

    def reduce(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-unit sums of entries: {kind: float64 [layers, units]} and {"other": [tensors]}."""
        out = {k: torch.zeros(self.num_layers, self.counts[k], dtype=torch.float64)
               for k in self.kinds}
        other = torch.zeros(len(self.others), dtype=torch.float64)
        pos = {n: i for i, n in enumerate(self.others)}
        for name, t in tensors.items():
            t = t.detach().to("cpu", torch.float64)
            if name in self.roles:
                layer, kind, axis, group = self.roles[name]
                if t.dim() == 1:
                    per = t
                else:
                    per = t.sum(dim=1 - axis) if t.dim() == 2 else t.flatten(1).sum(1)
                out[kind][layer] += per.view(-1, group).sum(1)
            elif name in pos:
                other[pos[name]] += t.sum()
        return {**out, "other": other}

    def slices(self, units: Sequence[str]) -> dict[str, tuple[int, torch.Tensor] | None]:
        """Per parameter, (axis, row/column indices) covered by `units`; None = the whole tensor."""
        want: dict[tuple[int, str], list[int]] = {}
        whole: set[str] = set()
        for u in units:
            m = _ID_RE.match(u)
            if m is None:
                if u not in self.shapes:
                    raise CrossrouteError(f"unknown unit {u!r}")
                whole.add(u)
                continue
            layer, kind, j = int(m.group(1)), _KIND_OF_TAG[m.group(2)], int(m.group(3))
            if layer >= self.num_layers or j >= self.counts.get(kind, 0):
                raise CrossrouteError(f"unit {u!r} is outside the model "
                                      f"({self.num_layers} layers, {self.counts.get(kind, 0)} {kind}s)")
            want.setdefault((layer, kind), []).append(j)
        out: dict[str, tuple[int, torch.Tensor] | None] = {n: None for n in whole}
        for name, (layer, kind, axis, group) in self.roles.items():
            js = want.get((layer, kind))
            if not js:
                continue
            j = torch.tensor(sorted(set(js)), dtype=torch.long)
            idx = (j[:, None] * group + torch.arange(group)[None, :]).flatten()
            out[name] = (axis, idx)
        return out

    def mask(self, units: Sequence[str]) -> dict[str, torch.Tensor]:
        """Boolean masks (per touched parameter) of the entries belonging to `units`."""
        masks = {}
        for name, sl in self.slices(units).items():
            m = torch.zeros(self.shapes[name], dtype=torch.bool)
            if sl is None:
                m[...] = True
            else:
                axis, idx = sl
                if axis == 0:
                    m[idx] = True
                else:
                    m[:, idx] = True
            masks[name] = m
        return masks


def with_kv_groups(active: dict[str, set[str]], layout: _Layout) -> dict[str, set[str]]:
    """Add "kv" to route sets: a KV group is active when one of its query heads is."""
    per = layout.num_heads // max(layout.num_kv_heads, 1)
    kv = set()
    for u in active.get("head", set()):
        m = _ID_RE.match(u)
        if m:
            kv.add(f"L{m.group(1)}.kv.{int(m.group(3)) // per}")
    return {**active, "kv": kv}


def shared_units(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 domain_a: Domain, others: Sequence[Domain], n: int = 64, q: float = 10.0,
                 batch_size: int = 16, seed: int = 0) -> dict[str, dict[str, set[str]]]:
    """Per later domain B, units active for both A and B at this model: {B: {kind: ids}}."""
    layout = model_layout(model)

    def sets(d: Domain) -> dict[str, set[str]]:
        act = measure_activity(model, tokenizer, d, n=n, batch_size=batch_size, seed=seed)
        return with_kv_groups(active_sets(act, q), layout)

    sa = sets(domain_a)
    out = {}
    for d in others:
        sb = sets(d)
        out[d.name] = {k: sa[k] & sb.get(k, set()) for k in sa}
    return out


# ----------------------------------------------------------------------------- Lanczos


@dataclass
class Lanczos:
    """Ritz values (decreasing), Ritz vectors as columns (n × m), and the tridiagonal."""

    eigenvalues: torch.Tensor
    vectors: torch.Tensor
    alphas: list[float]
    betas: list[float]


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, k: int = 20,
            tol: float = 1e-10) -> Lanczos:
    """k steps of Lanczos with full reorthogonalisation (twice) on a symmetric operator.

    Stops early when the Krylov space becomes invariant (β < tol·max|α|, or the space is full).
    Vectors are float64 on v0's device.
    """
    n = v0.numel()
    q = v0.detach().to(torch.float64).flatten()
    nrm = float(q.norm())
    if nrm == 0 or k < 1:
        raise CrossrouteError("Lanczos needs a non-zero start vector and k >= 1.")
    Q = [q / nrm]
    alphas: list[float] = []
    betas: list[float] = []
    for i in range(min(k, n)):
        w = matvec(Q[i]).to(torch.float64).flatten()
        a = float(Q[i] @ w)
        alphas.append(a)
        B = torch.stack(Q, 1)
        for _ in range(2):
            w = w - B @ (B.T @ w)
        b = float(w.norm())
        if i == min(k, n) - 1 or b < tol * max(1.0, max(abs(x) for x in alphas)):
            break
        betas.append(b)
        Q.append(w / b)
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(T)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    V = torch.stack(Q[:m], 1) @ evecs.to(Q[0].device)
    return Lanczos(evals, V, alphas, betas[: m - 1])


# ----------------------------------------------------------------------------- damage


@dataclass
class ConflictSubspace:
    """Lanczos on H_A restricted to the units active for both A and `domain_b`."""

    domain_b: str
    n_shared: dict[str, int]
    n_params: int
    k: int
    delta_norm: float
    first_order: float  # g_Aᵀδ_r
    second_order: float  # ½ δ_rᵀ H_r δ_r
    eigenvalues: list[float]
    shares: list[float]  # λ_i (v_iᵀδ_r)² / δ_rᵀH_rδ_r, eigenvalues decreasing
    cumulative: list[float]
    r90: int | None
    shared_units: dict[str, list[str]] = field(default_factory=dict)


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
    units: dict[str, list[list[float]]]  # kind -> [layer][unit] attribution
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
                    ids.append(f"L{layer}.{_TAG[kind]}.{j}")
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


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the body with `threads` torch intra-op threads (None: unchanged), then restore."""
    if threads is None:
        yield
        return
    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def _load(spec: str | Path | Loaded, device: str) -> Loaded:
    if isinstance(spec, Loaded):
        return spec
    return load_model(spec, dtype=torch.float32, attn_implementation="eager", device=device)


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
    """damage_u = δ_uᵀ(g + ½ H δ)_u per unit ({kind: [layers, units]}, "other": [tensors])."""
    contrib = {n: delta[n].double().cpu() * (g[n].double().cpu() + 0.5 * hd[n].double().cpu())
               for n in g}
    return umap.reduce(contrib)


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double().cpu() * b[k].double().cpu()).sum() for k in a if k in b))


def conflict_subspace(model: PreTrainedModel, batches: list[Batch], umap: UnitMap,
                      delta: dict[str, torch.Tensor], g: dict[str, torch.Tensor],
                      shared: dict[str, set[str]], domain_b: str, k: int = 20,
                      method: str = "double_backward", keep_units: bool = True
                      ) -> ConflictSubspace:
    """Lanczos on H_A restricted to the `shared` units' entries, started from δ restricted there."""
    units = [u for kind in ("neuron", "head", "kv") for u in sorted(shared.get(kind, set()))]
    n_shared = {kind: len(shared.get(kind, set())) for kind in ("neuron", "head", "kv")}
    masks = umap.mask(units)
    names = list(masks)
    sizes = [int(masks[n].sum()) for n in names]
    n_params = sum(sizes)

    def pack(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t[n].detach().cpu().double()[masks[n]] for n in names]) if names \
            else torch.zeros(0, dtype=torch.float64)

    def unpack(v: torch.Tensor) -> dict[str, torch.Tensor]:
        out, off = {}, 0
        for n, s in zip(names, sizes, strict=True):
            t = torch.zeros(umap.shapes[n], dtype=torch.float64)
            t[masks[n]] = v[off: off + s]
            out[n] = t
            off += s
        return out

    d_r = pack(delta)
    empty = ConflictSubspace(domain_b, n_shared, n_params, 0, float(d_r.norm()) if n_params else 0.0,
                             0.0, 0.0, [], [], [], None)
    if n_params == 0 or float(d_r.norm()) == 0.0:
        return empty

    def matvec(v: torch.Tensor) -> torch.Tensor:
        hv = grad_and_hvp(model, batches, unpack(v), params=names, method=method)[2]
        return pack(hv)

    first_hd: dict[str, torch.Tensor] = {}

    def counting(v: torch.Tensor) -> torch.Tensor:
        out = matvec(v)
        if not first_hd:
            first_hd["v"] = out
        return out

    lz = lanczos(counting, d_r, k)
    dhd = float(d_r @ first_hd["v"]) * float(d_r.norm())  # Q1 = δ_r/|δ_r|
    proj = lz.vectors.T @ d_r
    contrib = lz.eigenvalues * proj.square()
    shares = (contrib / dhd).tolist() if dhd else [0.0] * len(contrib)
    cum, acc = [], 0.0
    for s in shares:
        acc += s
        cum.append(acc)
    r90 = next((i + 1 for i, c in enumerate(cum) if c >= 0.9), None) if dhd > 0 else None
    return ConflictSubspace(
        domain_b=domain_b, n_shared=n_shared, n_params=n_params, k=len(lz.alphas),
        delta_norm=float(d_r.norm()), first_order=float(pack(g) @ d_r), second_order=0.5 * dhd,
        eigenvalues=lz.eigenvalues.tolist(), shares=shares, cumulative=cum, r90=r90,
        shared_units={kind: sorted(shared.get(kind, set())) for kind in ("neuron", "head", "kv")}
        if keep_units else {})


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

    `later`: domains B whose shared routes with A bound the conflict subspace (none: skipped).
    Models are loaded in fp32 with eager attention (twice differentiable).
    `layers`: restrict δ to these decoder layers (S): the measured change is then L(θ_A + δ_S) − L(θ_A),
    gradients and HVPs cover S only (the memory of a large model's analysis), and so do the units.
    """
    t0 = time.perf_counter()
    dev = default_device(device)
    da = get_domain(domain) if isinstance(domain, str) else domain
    laters = _domains(later)
    lb, la = _load(before, dev), _load(after, dev)
    model, tok = lb.model, lb.tokenizer
    names = params_in_layers(model, layers) if layers is not None else None
    delta = param_delta(model, la.model, names)
    batches = make_batches(tok, domain_examples(da, n, seed, split), batch_size)
    loss_after = (mean_proxy_loss(la.model, batches) if names is None
                  else _loss_moved(model, batches, delta))  # L(θ_A + δ_S)
    after_path = str(la.path)
    del la
    loss_before, g, hd = grad_and_hvp(model, batches, delta, params=names, method=method)
    umap = UnitMap.of(model)
    attr = attribution(umap, delta, g, hd)
    conflicts = []
    if laters:
        shared = shared_units(model, tok, da, laters, n=routes_n, q=q, seed=seed)
        for b in laters:
            units = shared[b.name] if layers is None else _in_layers(shared[b.name], layers)
            conflicts.append(conflict_subspace(model, batches, umap, delta, g, units, b.name, k, method))
    return DamageResult(
        domain=da.name, before=str(lb.path), after=after_path,
        n=n, batch_size=batch_size, split=split, seed=seed, method=method,
        loss_before=loss_before, loss_after=loss_after, measured=loss_after - loss_before,
        first_order=_dot(g, delta), second_order=0.5 * _dot(delta, hd),
        units={kind: attr[kind].tolist() for kind in umap.kinds},
        other={name: float(v) for name, v in zip(umap.others, attr["other"], strict=True)},
        conflict=conflicts, delta_norm=math.sqrt(_dot(delta, delta)),
        runtime_s=time.perf_counter() - t0,
        meta={"q": q, "routes_n": routes_n, "routes_split": "eval", "k": k,
              "layout": umap.layout.to_json(), "device": dev,
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
    return {kind: {u for u in ids if (m := _ID_RE.match(u)) and int(m.group(1)) in keep}
            for kind, ids in units.items()}


def _domains(spec: Sequence[Domain | str] | Domain | str | None) -> list[Domain]:
    if spec is None:
        return []
    if isinstance(spec, Domain):
        return [spec]
    if isinstance(spec, str):
        spec = [s for s in spec.split(",") if s.strip()]
    return [get_domain(s) if isinstance(s, str) else s for s in spec]


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


def _f(v: Any, fmt: str = ".4g") -> str:
    return "–" if v is None else format(float(v), fmt)


def render_damage_section(result: dict) -> str:
    """HTML <section>: decomposition bars, Lanczos eigenvalues + cumulative share, top-unit table."""
    from matplotlib.figure import Figure

    from .plots import fig_to_img_tag
    from .report import table

    a = html.escape(str(result.get("domain", "")))
    parts = [f"<section class=\"damage\"><h2>Damage to {a}: second-order decomposition</h2>",
             f"<p>Loss change of {a}'s proxy loss (mean answer NLL over {result.get('n')} "
             f"{html.escape(str(result.get('split', '')))} examples) from "
             f"<code>{html.escape(str(result.get('before', '')))}</code> to "
             f"<code>{html.escape(str(result.get('after', '')))}</code>: measured vs "
             "g<sub>A</sub>ᵀδ + ½ δᵀH<sub>A</sub>δ (one Hessian-vector product, eager attention, "
             f"fp32). |δ| = {_f(result.get('delta_norm'))}.</p>"]
    labels = ["measured", "first order", "second order", "error"]
    vals = [result.get("measured"), result.get("first_order"), result.get("second_order"),
            result.get("error")]
    fig = Figure(figsize=(5.5, 3.0))
    ax = fig.add_subplot()
    ys = [0.0 if v is None else float(v) for v in vals]
    ax.bar(labels, ys, color=["#444", "#4c72b0", "#dd8452", "#999"])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_ylabel("Δ loss")
    ax.set_title(f"{result.get('domain')}: L(after) − L(before)")
    parts.append(fig_to_img_tag(fig, "damage decomposition"))
    parts.append(table(["term", "value"], [[lab, _f(v)] for lab, v in zip(labels, vals,
                                                                            strict=True)]
                       + [["attribution sum", _f(result.get("attribution_sum"))],
                          ["|error| / |measured|", _f(result.get("rel_error"), ".3f")]]))
    share = result.get("top_share") or {}
    totals = result.get("kind_totals") or {}
    parts.append("<h3>How concentrated is the damage?</h3><p>Per-unit attribution δ<sub>u</sub>ᵀ"
                 "(g + ½Hδ)<sub>u</sub> over " + str(result.get("n_units", "")) + " units "
                 "(neurons, heads, KV groups, other tensors); share of the first + second order "
                 "total carried by the top p % (ranked by attribution). Per kind: "
                 + ", ".join(f"{html.escape(k)} {_f(v)}" for k, v in totals.items()) + ".</p>")
    parts.append(table(["top units", "share of total"],
                       [[f"{p} %", _f(v, ".3f")] for p, v in share.items()]))
    top = result.get("top_units") or []
    if top:
        parts.append(table(["unit", "kind", "damage"],
                           [[u["unit"], u["kind"], _f(u["damage"])] for u in top[:10]]))
    for c in result.get("conflict") or []:
        ev = c.get("eigenvalues") or []
        b = html.escape(str(c.get("domain_b", "")))
        ns = c.get("n_shared") or {}
        parts.append(f"<h3>Conflict subspace {a} / {b}</h3><p>Lanczos ({c.get('k')} steps, full "
                     f"reorthogonalisation) on H<sub>{a}</sub> restricted to the units active for "
                     f"both {a} and {b} (" + ", ".join(f"{v} {k}" for k, v in ns.items())
                     + f"; {c.get('n_params')} parameters), started from δ restricted there. "
                     f"Restricted damage ½δᵀHδ = {_f(c.get('second_order'))}; r for 90 %: "
                     f"<b>{c.get('r90') if c.get('r90') is not None else '–'}</b>.</p>")
        if ev:
            fig = Figure(figsize=(6.5, 3.0))
            ax1 = fig.add_subplot(1, 2, 1)
            ax1.plot(range(1, len(ev) + 1), ev, marker="o")
            ax1.set_xlabel("i")
            ax1.set_ylabel("λ_i (Ritz)")
            ax1.set_title("eigenvalues")
            ax2 = fig.add_subplot(1, 2, 2)
            ax2.plot(range(1, len(ev) + 1), c.get("cumulative") or [], marker="o")
            ax2.axhline(0.9, color="gray", ls="--", lw=0.8)
            ax2.set_xlabel("r")
            ax2.set_title("cumulative share of ½δᵀHδ")
            fig.tight_layout()
            parts.append(fig_to_img_tag(fig, f"conflict subspace {a}/{b}"))
    parts.append("</section>")
    return "\n".join(parts)
