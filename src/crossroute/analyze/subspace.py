"""Conflict subspace (DESIGN.md §2.5): Lanczos on H_A restricted to shared-route units."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.analyze.routes import active_sets, measure_activity
from crossroute.core.errors import CrossrouteError
from crossroute.domains.domain import Domain
from crossroute.measure.hvp import grad_and_hvp
from crossroute.measure.proxy import Batch
from crossroute.model.units import PARTITION_KINDS, UnitMap


def shared_units(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 domain_a: Domain, others: Sequence[Domain], n: int = 64, q: float = 10.0,
                 batch_size: int = 16, seed: int = 0) -> dict[str, dict[str, set[str]]]:
    """Per later domain B, units active for both A and B at this model: {B: {kind: ids}}."""
    umap = UnitMap.of_model(model)

    def sets(d: Domain) -> dict[str, set[str]]:
        act = measure_activity(model, tokenizer, d, n=n, batch_size=batch_size, seed=seed)
        return umap.with_kv_groups(active_sets(act, q))

    sa = sets(domain_a)
    out = {}
    for d in others:
        sb = sets(d)
        out[d.name] = {k: sa[k] & sb.get(k, set()) for k in sa}
    return out


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


def conflict_subspace(model: PreTrainedModel, batches: list[Batch], umap: UnitMap,
                      delta: dict[str, torch.Tensor], g: dict[str, torch.Tensor],
                      shared: dict[str, set[str]], domain_b: str, k: int = 20,
                      method: str = "double_backward", keep_units: bool = True
                      ) -> ConflictSubspace:
    """Lanczos on H_A restricted to the `shared` units' entries, started from δ restricted there."""
    units = [u for kind in PARTITION_KINDS for u in sorted(shared.get(kind, set()))]
    n_shared = {kind: len(shared.get(kind, set())) for kind in PARTITION_KINDS if kind in umap.kinds}
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
        shared_units={kind: sorted(shared.get(kind, set())) for kind in PARTITION_KINDS if kind in umap.kinds}
        if keep_units else {})
