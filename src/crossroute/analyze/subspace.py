"""Conflict subspace (DESIGN.md §2.5): extreme eigenpairs of H_A restricted to shared-route units.

Restricted to the parameter entries of the units active for both A and a later domain B, with
δ = θ_later − θ_A there and H = H_A's block there (matvec = one HVP, `crossroute.measure.hvp`):

* Eigenpairs: the `k_top` largest (algebraic) and the `k_bottom` smallest eigenpairs of H, by
  thick-restart Lanczos from a seeded random start that does not depend on δ, run until every
  requested pair has ‖Hv − λv‖ / |λ| ≤ tol or the HVP budget is spent (each pair's residual and flag
  are reported). Both ends, not the top by |λ|: positive curvature adds damage and negative
  curvature removes it, and at a trained point the positive outliers dominate |λ|, so a top-|λ|
  list would hide the negative end.
* Projected second-order share of an orthonormal basis U_r (r columns), P_r = U_r U_rᵀ:
  share(U_r) = (P_rδ)ᵀH(P_rδ) / δᵀHδ, for r = 1..k, with U_r = the top-r eigenvectors
  (`share_eig`; for exact eigenvectors it equals Σ_{i≤r} λ_i (v_iᵀδ)² / δᵀHδ), r random Gaussian
  directions orthonormalised (`share_random`, seeded; ≈ r/n for H = I) and the r coordinates of
  largest |δ| (`share_top_abs_delta`: δ masked to them). δᵀHδ is exact (one HVP).
* Parts of the spectrum: δᵀH₊δ and δᵀH₋δ (H₊, H₋: H's positive and negative parts, sum H) are
  estimated by Gauss–Lanczos quadrature from δ (`quad_steps` steps; the two sum to δᵀHδ exactly);
  `pos_share` = Σ_{i≤r} max(λ_i, 0)(v_iᵀδ)² / δᵀH₊δ over the top list, `neg_share` =
  Σ_{i≤r} min(μ_i, 0)(v_iᵀδ)² / δᵀH₋δ over the bottom list (most negative first).
* r90: the smallest r at which `share_eig` reaches 0.9, searched only over the leading run of
  converged top pairs; otherwise None with the reason. It is not bounded by k by construction.

HVPs per later domain (defaults): ≤ `max_hvp` = 150 for the eigenpairs, `quad_steps` = 20 for the
quadrature (its first gives δᵀHδ), and `n_baseline` = k_top = 20 per baseline: ≤ 210 in all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.analyze.routes import active_sets, measure_activity
from crossroute.core.errors import CrossrouteError
from crossroute.domains.domain import Domain
from crossroute.measure.hvp import grad_and_hvp
from crossroute.measure.proxy import Batch
from crossroute.model.units import PARTITION_KINDS, UnitMap

Matvec = Callable[[torch.Tensor], torch.Tensor]
R90_LEVEL = 0.9


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


# ----------------------------------------------------------------------------- plain Lanczos


@dataclass
class Lanczos:
    """Ritz values (decreasing), Ritz vectors as columns (n × m), and the tridiagonal."""

    eigenvalues: torch.Tensor
    vectors: torch.Tensor
    alphas: list[float]
    betas: list[float]


def _tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> torch.Tensor:
    """The symmetric tridiagonal matrix with diagonal `alphas` and off-diagonal `betas`."""
    t = torch.diag(torch.tensor(list(alphas), dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(list(betas[: len(alphas) - 1]), dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def lanczos(matvec: Matvec, v0: torch.Tensor, k: int = 20, tol: float = 1e-10) -> Lanczos:
    """k steps of Lanczos with full reorthogonalisation (twice) on a symmetric operator.

    Stops early when the Krylov space becomes invariant (β < tol·max|α|, or the space is full).
    Vectors are float64 on v0's device. The Krylov space contains v0, so its Ritz pairs are a
    quadrature rule for v0's spectral measure, not converged eigenpairs (see `extreme_eigenpairs`).
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
    evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    V = torch.stack(Q[:m], 1) @ evecs.to(Q[0].device)
    return Lanczos(evals, V, alphas, betas[: m - 1])


def lanczos_quadrature(alphas: Sequence[float], betas: Sequence[float], norm2: float,
                       f: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Gauss–Lanczos estimate of v0ᵀ f(H) v0 from Lanczos' tridiagonal (exact for polynomials of degree < 2m)."""
    theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
    return float(norm2 * (s[0].square() * f(theta)).sum())


# ----------------------------------------------------------------------------- thick-restart Lanczos


@dataclass
class Eigenpairs:
    """Extreme eigenpairs (float64 columns): top decreasing, bottom increasing, with H·v and residuals."""

    top_values: torch.Tensor
    top_vectors: torch.Tensor
    top_hv: torch.Tensor  # H · top_vectors, from the stored products (no extra HVP)
    top_residuals: torch.Tensor  # ‖Hv − λv‖ / |λ|
    bottom_values: torch.Tensor
    bottom_vectors: torch.Tensor
    bottom_hv: torch.Tensor
    bottom_residuals: torch.Tensor
    tol: float
    n_matvec: int
    n_restarts: int

    @property
    def top_converged(self) -> list[bool]:
        return [bool(r <= self.tol) for r in self.top_residuals]

    @property
    def bottom_converged(self) -> list[bool]:
        return [bool(r <= self.tol) for r in self.bottom_residuals]

    @property
    def converged(self) -> bool:
        return all(self.top_converged) and all(self.bottom_converged)


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """w minus its projection on the orthonormal columns of `basis` (classical Gram–Schmidt, twice)."""
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return w


def _ends(j: int, k_top: int, k_bottom: int) -> tuple[list[int], list[int]]:
    """Indices (into j ascending Ritz values) of the k_top largest, decreasing, and k_bottom smallest."""
    return list(range(j - 1, j - 1 - k_top, -1)), list(range(k_bottom))


def _relative_residuals(q: torch.Tensor, w: torch.Tensor, theta: torch.Tensor, s: torch.Tensor,
                        idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ritz vectors Y = QS, HY = WS and ‖HY − Yθ‖ / max(|θ|, 1e-12·max|θ|) for the columns `idx`."""
    y, hy, th = q @ s[:, idx], w @ s[:, idx], theta[idx]
    floor = 1e-12 * max(float(theta.abs().max()), 1e-300)
    res = (hy - y * th).norm(dim=0) / th.abs().clamp_min(floor)
    return y, hy, res


def extreme_eigenpairs(matvec: Matvec, n: int, k_top: int = 20, k_bottom: int = 10, tol: float = 1e-3,
                       max_matvec: int = 150, basis_size: int | None = None, seed: int = 0,
                       device: torch.device | str = "cpu") -> Eigenpairs:
    """The k_top largest and k_bottom smallest eigenpairs of a symmetric operator on Rⁿ.

    Thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalisation and an explicit
    Rayleigh–Ritz on the stored products W = HQ (so residuals are true ones, from W, at no extra
    HVP); seeded Gaussian start; restarts keep the wanted Ritz vectors plus half the spare room.
    Stops when every wanted pair has ‖Hv − λv‖/|λ| ≤ tol, the space is exhausted (exact), or after
    `max_matvec` products. Memory: 2 × basis_size float64 vectors of length n (default basis
    max(2·want, want + 10), want = k_top + k_bottom).
    """
    if n < 1 or k_top < 0 or k_bottom < 0 or k_top + k_bottom < 1 or max_matvec < 1 or tol <= 0:
        raise CrossrouteError(f"extreme_eigenpairs needs n >= 1, k_top + k_bottom >= 1, max_matvec >= 1 and "
                              f"tol > 0 (got n={n}, k_top={k_top}, k_bottom={k_bottom}, "
                              f"max_matvec={max_matvec}, tol={tol}).")
    k_top = min(k_top, n)
    k_bottom = min(k_bottom, n - k_top)
    want = k_top + k_bottom
    m = min(n, basis_size or max(2 * want, want + 10))
    if m < min(n, want + 1):
        raise CrossrouteError(f"basis_size {basis_size} must exceed k_top + k_bottom = {want}.")
    gen = torch.Generator().manual_seed(seed)
    qb = torch.zeros(n, m, dtype=torch.float64, device=device)
    wb = torch.zeros_like(qb)
    start = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    qb[:, 0] = start / start.norm()
    j, used, restarts = 0, 0, 0
    while True:
        wb[:, j] = matvec(qb[:, j]).to(device=device, dtype=torch.float64).flatten()
        used, j = used + 1, j + 1
        g = qb[:, :j].T @ wb[:, :j]
        theta, s = torch.linalg.eigh(0.5 * (g + g.T))
        top, bottom = _ends(j, min(k_top, j), min(k_bottom, j - min(k_top, j)))
        _, _, res = _relative_residuals(qb[:, :j], wb[:, :j], theta, s, top + bottom)
        if j == n or (j >= want and bool((res <= tol).all())) or used >= max_matvec:
            break
        r = _orthogonalise(wb[:, j - 1], qb[:, :j])
        if float(r.norm()) <= 1e-10 * max(float(theta.abs().max()), 1e-300):  # invariant subspace: new direction
            r = _orthogonalise(torch.randn(n, generator=gen, dtype=torch.float64).to(device), qb[:, :j])
        if j == m:
            keep = _keep(j, k_top, k_bottom, m)
            qb[:, : len(keep)], wb[:, : len(keep)] = qb[:, :j] @ s[:, keep], wb[:, :j] @ s[:, keep]
            j, restarts = len(keep), restarts + 1
            r = _orthogonalise(r, qb[:, :j])
        qb[:, j] = r / r.norm()
    top, bottom = _ends(j, k_top if j >= want else min(k_top, j), k_bottom if j >= want else 0)
    yt, hyt, rt = _relative_residuals(qb[:, :j], wb[:, :j], theta, s, top)
    yb, hyb, rb = _relative_residuals(qb[:, :j], wb[:, :j], theta, s, bottom)
    return Eigenpairs(theta[top], yt, hyt, rt, theta[bottom], yb, hyb, rb, tol, used, restarts)


def _keep(j: int, k_top: int, k_bottom: int, m: int) -> list[int]:
    """Ritz indices (ascending order) a restart keeps: the wanted ends plus half the spare room, split by end."""
    want = k_top + k_bottom
    extra = max(0, min(m - 1, (want + m) // 2) - want)
    if k_bottom == 0:
        kt, kb = k_top + extra, 0
    elif k_top == 0:
        kt, kb = 0, k_bottom + extra
    else:
        kt = k_top + math.ceil(extra * k_top / want)
        kb = k_bottom + extra - (kt - k_top)
    return list(range(kb)) + list(range(j - kt, j))


# ----------------------------------------------------------------------------- shares


def projected_shares(u: torch.Tensor, hu: torch.Tensor, delta: torch.Tensor, dhd: float) -> list[float]:
    """(P_rδ)ᵀH(P_rδ) / δᵀHδ for the nested bases U_r = u[:, :r], r = 1..u.shape[1] (u orthonormal, hu = H u)."""
    if u.shape[1] == 0 or dhd == 0:
        return []
    a = u.T @ delta
    g = u.T @ hu
    g = 0.5 * (g + g.T)
    return [float(a[:r] @ g[:r, :r] @ a[:r]) / dhd for r in range(1, u.shape[1] + 1)]


def random_basis(n: int, r: int, seed: int = 0) -> torch.Tensor:
    """r orthonormal columns in Rⁿ from a seeded Gaussian matrix (QR)."""
    g = torch.randn(n, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.linalg.qr(g).Q


def top_abs_basis(delta: torch.Tensor, r: int) -> torch.Tensor:
    """The unit coordinate vectors of δ's r largest-|δ| entries, largest first (n × r)."""
    idx = torch.argsort(delta.abs(), descending=True, stable=True)[:r]
    u = torch.zeros(delta.numel(), len(idx), dtype=torch.float64)
    u[idx, torch.arange(len(idx))] = 1.0
    return u


def apply_columns(matvec: Matvec, u: torch.Tensor) -> torch.Tensor:
    """H·u column by column (one matvec each)."""
    cols = [matvec(u[:, i]).to(torch.float64).flatten() for i in range(u.shape[1])]
    return torch.stack(cols, 1) if cols else torch.zeros_like(u)


def spectral_shares(values: torch.Tensor, vectors: torch.Tensor, delta: torch.Tensor, part: float,
                    sign: int) -> list[float]:
    """Σ_{i≤r} clip(λ_i)(v_iᵀδ)² / part, clip = max(·, 0) for sign +1 and min(·, 0) for sign −1."""
    if part == 0 or values.numel() == 0:
        return []
    lam = values.clamp_min(0.0) if sign > 0 else values.clamp_max(0.0)
    return (torch.cumsum(lam * (vectors.T @ delta).square(), 0) / part).tolist()


def first_reaching(shares: Sequence[float], level: float = R90_LEVEL) -> int | None:
    """The smallest r (1-based) with shares[r-1] ≥ level, or None."""
    return next((i + 1 for i, s in enumerate(shares) if s >= level), None)


def leading_true(flags: Sequence[bool]) -> int:
    """Length of the leading run of True in `flags`."""
    return next((i for i, f in enumerate(flags) if not f), len(flags))


# ----------------------------------------------------------------------------- result


@dataclass
class ConflictSubspace:
    """H_A restricted to the units active for both A and `domain_b`: extreme eigenpairs and damage shares.

    Definitions in the module docstring. Lists over r are indexed r − 1; eigen lists follow the
    eigenvalue order (top: decreasing; bottom: increasing, most negative first).
    """

    domain_b: str
    n_shared: dict[str, int]
    n_params: int
    delta_norm: float
    first_order: float  # g_Aᵀδ_r
    second_order: float  # ½ δ_rᵀ H_r δ_r (exact, one HVP)
    dHd: float = 0.0  # δ_rᵀ H_r δ_r
    dHd_pos_est: float = 0.0  # quadrature estimate of δᵀH₊δ (≥ 0)
    dHd_neg_est: float = 0.0  # quadrature estimate of δᵀH₋δ (≤ 0); pos + neg = dHd
    dHd_pos_est_half: float = 0.0  # the same with half the steps: the drift, not a bound
    quad_steps: int = 0
    k_top: int = 0
    k_bottom: int = 0
    tol: float = 0.0
    eigenvalues_top: list[float] = field(default_factory=list)
    residuals_top: list[float] = field(default_factory=list)  # ‖Hv − λv‖ / |λ|
    converged_top: list[bool] = field(default_factory=list)
    eigenvalues_bottom: list[float] = field(default_factory=list)
    residuals_bottom: list[float] = field(default_factory=list)
    converged_bottom: list[bool] = field(default_factory=list)
    converged: bool = False  # every requested pair within tol
    delta_weight_top: list[float] = field(default_factory=list)  # (v_iᵀδ)² / ‖δ‖²
    delta_weight_bottom: list[float] = field(default_factory=list)
    share_eig: list[float] = field(default_factory=list)  # projected share, top-r eigenvectors
    share_random: list[float] = field(default_factory=list)  # projected share, r random directions
    share_top_abs_delta: list[float] = field(default_factory=list)  # δ masked to its r largest-|δ| entries
    pos_share: list[float] = field(default_factory=list)  # Σ_{i≤r} max(λ_i,0)(v_iᵀδ)² / dHd_pos_est
    neg_share: list[float] = field(default_factory=list)  # Σ_{i≤r} min(μ_i,0)(v_iᵀδ)² / dHd_neg_est
    r90: int | None = None
    r90_reason: str = ""
    n_hvp: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    shared_units: dict[str, list[str]] = field(default_factory=dict)

    def share_at(self, r: int) -> dict[str, float | None]:
        """The three projected shares at r (None where r is beyond a list)."""
        def pick(xs: list[float]) -> float | None:
            return xs[r - 1] if 0 < r <= len(xs) else None
        return {"eig": pick(self.share_eig), "random": pick(self.share_random),
                "top_abs_delta": pick(self.share_top_abs_delta)}


def r90_of(share_eig: Sequence[float], converged_top: Sequence[bool], dhd: float) -> tuple[int | None, str]:
    """(r90, reason): the first r over the leading converged top pairs with share_eig ≥ 0.9, else None and why."""
    if dhd <= 0:
        return None, "δᵀHδ ≤ 0: no positive second-order term to concentrate"
    n_ok = leading_true(converged_top)
    r = first_reaching(share_eig[:n_ok])
    if r is not None:
        return r, ""
    return None, f"not reached within k = {n_ok} converged eigenpairs"


def subspace_analysis(matvec: Matvec, delta: torch.Tensor, k_top: int = 20, k_bottom: int = 10,
                      tol: float = 1e-3, max_hvp: int = 150, quad_steps: int = 20,
                      n_baseline: int | None = None, seed: int = 0) -> dict[str, Any]:
    """ConflictSubspace's measured fields for an operator on Rⁿ and a vector δ (see the module docstring)."""
    d = delta.detach().to(torch.float64).flatten().cpu()
    n, nrm2 = d.numel(), float(d @ d)
    if n == 0 or nrm2 == 0:
        raise CrossrouteError("the conflict subspace needs a non-empty restriction with δ ≠ 0 there.")
    counts: dict[str, int] = {}
    secs: dict[str, float] = {}

    def counted(tag: str) -> Matvec:
        def mv(v: torch.Tensor) -> torch.Tensor:
            counts[tag] = counts.get(tag, 0) + 1
            return matvec(v).to(torch.float64).flatten().cpu()
        return mv

    t = time.perf_counter()
    lz = lanczos(counted("quadrature"), d, max(1, quad_steps))
    dhd = nrm2 * lz.alphas[0]  # q1 = δ/‖δ‖: α_1 = q1ᵀHq1
    pos = lanczos_quadrature(lz.alphas, lz.betas, nrm2, lambda x: x.clamp_min(0.0))
    half = max(1, len(lz.alphas) // 2)
    pos_half = lanczos_quadrature(lz.alphas[:half], lz.betas[: half - 1], nrm2, lambda x: x.clamp_min(0.0))
    secs["quadrature"] = time.perf_counter() - t
    t = time.perf_counter()
    ep = extreme_eigenpairs(counted("eigen"), n, k_top, k_bottom, tol, max_hvp, seed=seed)
    secs["eigen"] = time.perf_counter() - t
    r_base = min(n, k_top if n_baseline is None else n_baseline)
    t = time.perf_counter()
    u_rand = random_basis(n, r_base, seed + 1)
    share_random = projected_shares(u_rand, apply_columns(counted("random"), u_rand), d, dhd)
    secs["random"] = time.perf_counter() - t
    t = time.perf_counter()
    u_abs = top_abs_basis(d, r_base)
    share_abs = projected_shares(u_abs, apply_columns(counted("top_abs_delta"), u_abs), d, dhd)
    secs["top_abs_delta"] = time.perf_counter() - t
    share_eig = projected_shares(ep.top_vectors, ep.top_hv, d, dhd)
    r90, reason = r90_of(share_eig, ep.top_converged, dhd)
    return dict(
        dHd=dhd, dHd_pos_est=pos, dHd_neg_est=dhd - pos, dHd_pos_est_half=pos_half, quad_steps=len(lz.alphas),
        k_top=k_top, k_bottom=k_bottom, tol=tol,
        eigenvalues_top=ep.top_values.tolist(), residuals_top=ep.top_residuals.tolist(),
        converged_top=ep.top_converged, eigenvalues_bottom=ep.bottom_values.tolist(),
        residuals_bottom=ep.bottom_residuals.tolist(), converged_bottom=ep.bottom_converged,
        converged=ep.converged,
        delta_weight_top=((ep.top_vectors.T @ d).square() / nrm2).tolist(),
        delta_weight_bottom=((ep.bottom_vectors.T @ d).square() / nrm2).tolist(),
        share_eig=share_eig, share_random=share_random, share_top_abs_delta=share_abs,
        pos_share=spectral_shares(ep.top_values, ep.top_vectors, d, pos, +1),
        neg_share=spectral_shares(ep.bottom_values, ep.bottom_vectors, d, dhd - pos, -1),
        r90=r90, r90_reason=reason, n_hvp={**counts, "total": sum(counts.values())},
        seconds={**secs, "total": sum(secs.values())}, seed=seed)


def conflict_subspace(model: PreTrainedModel, batches: list[Batch], umap: UnitMap,
                      delta: dict[str, torch.Tensor], g: dict[str, torch.Tensor],
                      shared: dict[str, set[str]], domain_b: str, k: int = 20,
                      method: str = "double_backward", keep_units: bool = True, *,
                      k_bottom: int | None = None, tol: float = 1e-3, max_hvp: int = 150,
                      quad_steps: int = 20, n_baseline: int | None = None, seed: int = 0) -> ConflictSubspace:
    """Extreme eigenpairs of H_A on the `shared` units' entries and δ's shares there (module docstring).

    k: top eigenpairs (and baseline sizes); k_bottom: bottom ones (default k // 2).
    """
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
    units_json = {kind: sorted(shared.get(kind, set())) for kind in PARTITION_KINDS if kind in umap.kinds} \
        if keep_units else {}
    base = dict(domain_b=domain_b, n_shared=n_shared, n_params=n_params,
                delta_norm=float(d_r.norm()) if n_params else 0.0, shared_units=units_json)
    if n_params == 0 or float(d_r.norm()) == 0.0:
        return ConflictSubspace(**base, first_order=0.0, second_order=0.0, seed=seed,
                                r90_reason="no shared units" if n_params == 0 else "δ = 0 on the shared units")

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return pack(grad_and_hvp(model, batches, unpack(v), params=names, method=method, with_grad=False)[2])

    fields = subspace_analysis(matvec, d_r, k_top=k, k_bottom=k // 2 if k_bottom is None else k_bottom, tol=tol,
                               max_hvp=max_hvp, quad_steps=quad_steps, n_baseline=n_baseline, seed=seed)
    return ConflictSubspace(**base, first_order=float(pack(g) @ d_r), second_order=0.5 * fields["dHd"], **fields)
