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

Memory (issue 19): vectors are flat over the restricted entries (`crossroute.measure.hvp.Packing`),
fp32 (or the model's dtype if wider) on the model's device; each Lanczos run keeps its basis in one
[rows, n] buffer allocated once (`KrylovBasis`; `basis_rows`: rows = max(m + 1, 2·want) for the basis
size m, default max(2·want, want + 10), want = k_top + k_bottom; quad_steps + 1 for the quadrature),
with the projected operator (small, fp64) instead of stored products, so residuals, Ritz vectors and
H·v come from it; the baselines hold n_baseline rows at most. The random baseline's directions are
drawn one row at a time (`random_rows`), so its draws differ from the n × r matrix drawn before.
`conflict_subspace` checks the estimate (basis + model + HVP activations) before it starts, refusing
with the knob to lower when it exceeds what is free, and prints it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from crossroute.analyze.routes import active_sets, measure_activity
from crossroute.core.console import console
from crossroute.core.errors import CrossrouteError
from crossroute.domains.domain import Domain
from crossroute.measure.hvp import Packing, hvp_pass_bytes, packed_hvp
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


# ----------------------------------------------------------------------------- the Krylov basis

# Columns per block of the blocked inner products and in-place row combinations: a block of the basis is at
# most BLOCK_ELEMS entries, so no temporary of the basis' size is ever made.
BLOCK_ELEMS = 1 << 24


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The solver's vector dtype for an input of `dtype`: fp32, or the input's dtype when wider."""
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float32


def _blocks(n: int, rows: int) -> Iterator[slice]:
    step = max(1, BLOCK_ELEMS // max(1, rows))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ bᵀ for row blocks a [p, n], b [q, n] as float64 (products per column block, summed in fp64)."""
    if a.dtype == torch.float64 or a.shape[1] <= BLOCK_ELEMS // max(1, a.shape[0] + b.shape[0]):
        return (a @ b.T).double()
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for blk in _blocks(a.shape[1], a.shape[0] + b.shape[0]):
        out += (a[:, blk] @ b[:, blk].T).double()
    return out


def _norm(w: torch.Tensor) -> float:
    return math.sqrt(max(float(inner(w[None], w[None])), 0.0))


def _orthogonalise(w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """w −= its projection on the orthonormal `rows` in place (classical Gram–Schmidt, twice); fp64 coefficients."""
    total = torch.zeros(rows.shape[0], dtype=torch.float64)
    if rows.shape[0] == 0:
        return total
    for _ in range(2):
        c = inner(rows, w[None])[:, 0]
        w.addmv_(rows.T, c.to(w.dtype), alpha=-1.0)
        total += c.cpu()
    return total


def _combine_rows(src: torch.Tensor, coef: torch.Tensor, out: torch.Tensor) -> None:
    """out = coefᵀ src (src [j, n], coef [j, r], out [r, n]) column block by block, so `out` may overlap `src`."""
    c = coef.to(device=src.device, dtype=src.dtype)
    for blk in _blocks(src.shape[1], src.shape[0] + out.shape[0]):
        out[:, blk] = c.T @ src[:, blk].clone()


class KrylovBasis:
    """Orthonormal rows of one [rows, n] buffer, allocated once, and the projected operator G (fp64, rows × rows).

    After `step` with j vectors: H Qⱼᵀ = Qⱼᵀ G[:j, :j] + w G[j, :j] exactly up to rounding, Qⱼ = buf[:j] and
    w = buf[j] the (unnormalised) orthogonalised product; `normalise_next` makes w the next basis vector.
    """

    def __init__(self, n: int, rows: int, dtype: torch.dtype, device: torch.device | str) -> None:
        self.buf = torch.empty(rows, n, dtype=dtype, device=device)
        self.g = torch.zeros(rows, rows, dtype=torch.float64)
        self.j = 0
        self.pending = False  # buf[j] holds an unnormalised product (right after `step`)

    def start(self, v: torch.Tensor) -> float:
        """q₀ = v / ‖v‖; returns ‖v‖ (0: nothing is started)."""
        self.buf[0].copy_(v.detach().reshape(-1))
        nrm = _norm(self.buf[0])
        if nrm > 0:
            self.buf[0].div_(nrm)
        return nrm

    def step(self, matvec: Matvec) -> float:
        """w = H q_j into row j + 1, orthogonalised against rows 0..j; records G[:j+2, j]; returns β = ‖w‖."""
        j = self.j
        w = self.buf[j + 1]
        w.copy_(matvec(self.buf[j]).reshape(-1))
        c = _orthogonalise(w, self.buf[: j + 1])
        beta = _norm(w)
        self.g[: j + 1, j] = c
        self.g[j + 1, j] = beta
        self.j = j + 1
        self.pending = True
        return beta

    def normalise_next(self, beta: float, floor: float = 0.0, gen: torch.Generator | None = None) -> None:
        """w / β becomes basis vector j; below `floor` (invariant space) a fresh random direction does."""
        w = self.buf[self.j]
        if beta <= floor and gen is not None:
            w.copy_(torch.randn(w.numel(), generator=gen, dtype=torch.float64))
            _orthogonalise(w, self.buf[: self.j])
            self.g[self.j, self.j - 1] = 0.0  # H q_{j-1} is in the span (up to `floor`): the new direction is not
            beta = _norm(w)
        w.div_(beta)
        self.pending = False

    def restart(self, s: torch.Tensor) -> None:
        """Keep the Ritz vectors Qⱼᵀ s (s: j × l, orthonormal columns) and the next direction (thick restart)."""
        j, keep = self.j, s.shape[1]
        g, row = self.g[:j, :j].clone(), self.g[j, :j].clone()
        _combine_rows(self.buf[:j], s, self.buf[:keep])
        self.buf[keep].copy_(self.buf[j])
        self.g.zero_()
        self.g[:keep, :keep] = s.T @ g @ s
        self.g[keep, :keep] = row @ s
        self.j = keep
        c = _orthogonalise(self.buf[keep], self.buf[:keep])  # rounding only; G follows it exactly
        nu = _norm(self.buf[keep])
        self.buf[keep].div_(nu)
        self.g[:keep, :keep] += torch.outer(c, self.g[keep, :keep])
        self.g[keep, :keep] *= nu

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ritz values (ascending) and coefficient vectors of the symmetrised G[:j, :j]."""
        g = self.g[: self.j, : self.j]
        return torch.linalg.eigh(0.5 * (g + g.T))

    def residuals(self, theta: torch.Tensor, s: torch.Tensor, idx: list[int]) -> torch.Tensor:
        """‖Hy − θy‖ / max(|θ|, 1e-12·max|θ|) for the Ritz pairs `idx`, from G (no vector touched)."""
        j = self.j
        g = self.g[:j, :j]
        si, th = s[:, idx], theta[idx]
        inside = (g @ si - si * th).norm(dim=0)
        outside = self.g[j, :j] @ si
        floor = 1e-12 * max(float(theta.abs().max()), 1e-300)
        return torch.sqrt(inside.square() + outside.square()) / th.abs().clamp_min(floor)

    def ritz_rows(self, s: torch.Tensor, with_products: bool) -> torch.Tensor:
        """Rows Y = sᵀQⱼ and, with products, then HY = (G s)ᵀQⱼ + w ⊗ (w's coefficient), over the buffer's first rows.

        A view of the buffer (its basis is spent): no new [r, n] tensor. Call right after `step` or
        `normalise_next`; w's coefficient is s[j−1] while w is unnormalised (‖w‖ = β), else G[j, :j] s.
        """
        j, r = self.j, s.shape[1]
        coef = torch.zeros(j + 1, 2 * r if with_products else r, dtype=torch.float64)
        coef[:j, :r] = s
        if with_products:
            coef[:j, r:] = self.g[:j, :j] @ s
            coef[j, r:] = s[j - 1] if self.pending else self.g[j, :j] @ s
        if coef.shape[1] > self.buf.shape[0]:
            raise CrossrouteError(f"the Krylov buffer has {self.buf.shape[0]} rows; {coef.shape[1]} Ritz rows "
                                  "need more: allocate it with more rows.")
        out = self.buf[: coef.shape[1]]
        _combine_rows(self.buf[: j + 1], coef, out)
        return out


# ----------------------------------------------------------------------------- plain Lanczos


@dataclass
class Lanczos:
    """Ritz values (decreasing), Ritz vectors as columns (n × m; None when not asked for), and the tridiagonal."""

    eigenvalues: torch.Tensor
    vectors: torch.Tensor | None
    alphas: list[float]
    betas: list[float]


def _tridiagonal(alphas: Sequence[float], betas: Sequence[float]) -> torch.Tensor:
    """The symmetric tridiagonal matrix with diagonal `alphas` and off-diagonal `betas`."""
    t = torch.diag(torch.tensor(list(alphas), dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(list(betas[: len(alphas) - 1]), dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def lanczos(matvec: Matvec, v0: torch.Tensor, k: int = 20, tol: float = 1e-10, vectors: bool = True) -> Lanczos:
    """k steps of Lanczos with full reorthogonalisation (twice) on a symmetric operator.

    Stops early when the Krylov space becomes invariant (β < tol·max|α|, or the space is full).
    The basis is one [k + 1, n] buffer on v0's device in `work_dtype(v0.dtype)`; the Ritz vectors
    (`vectors`) are views over it. The Krylov space contains v0, so its Ritz pairs are a quadrature
    rule for v0's spectral measure, not converged eigenpairs (see `extreme_eigenpairs`).
    """
    n = v0.numel()
    if k < 1 or n == 0:
        raise CrossrouteError("Lanczos needs a non-zero start vector and k >= 1.")
    steps = min(k, n)
    kb = KrylovBasis(n, steps + 1, work_dtype(v0.dtype), v0.device)
    if kb.start(v0) == 0:
        raise CrossrouteError("Lanczos needs a non-zero start vector and k >= 1.")
    alphas: list[float] = []
    betas: list[float] = []
    for i in range(steps):
        b = kb.step(matvec)
        alphas.append(float(kb.g[i, i]))
        if i == steps - 1 or b < tol * max(1.0, max(abs(x) for x in alphas)):
            break
        betas.append(b)
        kb.normalise_next(b)
    m = len(alphas)
    evals, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order], evecs[:, order]
    vecs = kb.ritz_rows(evecs, with_products=False).T if vectors else None
    return Lanczos(evals, vecs, alphas, betas[: m - 1])


def lanczos_quadrature(alphas: Sequence[float], betas: Sequence[float], norm2: float,
                       f: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Gauss–Lanczos estimate of v0ᵀ f(H) v0 from Lanczos' tridiagonal (exact for polynomials of degree < 2m)."""
    theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
    return float(norm2 * (s[0].square() * f(theta)).sum())


# ----------------------------------------------------------------------------- thick-restart Lanczos


@dataclass
class Eigenpairs:
    """Extreme eigenpairs: top decreasing, bottom increasing, with H·v and residuals.

    Vectors are columns (n × k) in the solver's dtype on its device, views over its basis buffer.
    """

    top_values: torch.Tensor
    top_vectors: torch.Tensor
    top_hv: torch.Tensor  # H · top_vectors, from the Lanczos relation (no extra HVP)
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


def _ends(j: int, k_top: int, k_bottom: int) -> tuple[list[int], list[int]]:
    """Indices (into j ascending Ritz values) of the k_top largest, decreasing, and k_bottom smallest."""
    return list(range(j - 1, j - 1 - k_top, -1)), list(range(k_bottom))


def basis_rows(n: int, k_top: int, k_bottom: int, basis_size: int | None = None) -> tuple[int, int]:
    """(m, rows): `extreme_eigenpairs`' basis size m and its buffer's rows, max(m + 1, 2·want) (Ritz rows and H·v)."""
    k_top = min(k_top, n)
    want = k_top + min(k_bottom, n - k_top)
    m = min(n, basis_size or max(2 * want, want + 10))
    return m, max(m + 1, 2 * want)


def extreme_eigenpairs(matvec: Matvec, n: int, k_top: int = 20, k_bottom: int = 10, tol: float = 1e-3,
                       max_matvec: int = 150, basis_size: int | None = None, seed: int = 0,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> Eigenpairs:
    """The k_top largest and k_bottom smallest eigenpairs of a symmetric operator on Rⁿ.

    Thick-restart Lanczos (Wu & Simon 2000) with full reorthogonalisation (twice) and Rayleigh–Ritz on
    the projected operator G = QᵀHQ, kept with the Lanczos relation HQᵀ = QᵀG + w gᵀ (exact up to
    rounding), so residuals are true ones at no extra HVP; seeded Gaussian start; restarts keep the
    wanted Ritz vectors plus half the spare room. Stops when every wanted pair has ‖Hv − λv‖/|λ| ≤ tol,
    the space is exhausted (exact), or after `max_matvec` products. Memory: one buffer of
    `basis_rows(...)[1]` vectors of length n in `dtype` on `device` (default basis
    max(2·want, want + 10), want = k_top + k_bottom), allocated once.
    """
    if n < 1 or k_top < 0 or k_bottom < 0 or k_top + k_bottom < 1 or max_matvec < 1 or tol <= 0:
        raise CrossrouteError(f"extreme_eigenpairs needs n >= 1, k_top + k_bottom >= 1, max_matvec >= 1 and "
                              f"tol > 0 (got n={n}, k_top={k_top}, k_bottom={k_bottom}, "
                              f"max_matvec={max_matvec}, tol={tol}).")
    k_top = min(k_top, n)
    k_bottom = min(k_bottom, n - k_top)
    want = k_top + k_bottom
    m, rows = basis_rows(n, k_top, k_bottom, basis_size)
    if m < min(n, want + 1):
        raise CrossrouteError(f"basis_size {basis_size} must exceed k_top + k_bottom = {want}.")
    gen = torch.Generator().manual_seed(seed)
    kb = KrylovBasis(n, rows, dtype, device)
    kb.start(torch.randn(n, generator=gen, dtype=torch.float64))
    used, restarts = 0, 0
    while True:
        beta = kb.step(matvec)
        used, j = used + 1, kb.j
        theta, s = kb.ritz()
        top, bottom = _ends(j, min(k_top, j), min(k_bottom, j - min(k_top, j)))
        res = kb.residuals(theta, s, top + bottom)
        if j == n or (j >= want and bool((res <= tol).all())) or used >= max_matvec:
            break
        kb.normalise_next(beta, 1e-10 * max(float(theta.abs().max()), 1e-300), gen)  # invariant: new direction
        if j == m:
            kb.restart(s[:, _keep(j, k_top, k_bottom, m)])
            restarts += 1
    top, bottom = _ends(j, k_top if j >= want else min(k_top, j), k_bottom if j >= want else 0)
    res = kb.residuals(theta, s, top + bottom)
    rows_out = kb.ritz_rows(s[:, top + bottom], with_products=True)
    r, kt = len(top) + len(bottom), len(top)
    y, hy = rows_out[:r], rows_out[r:]
    return Eigenpairs(theta[top], y[:kt].T, hy[:kt].T, res[:kt], theta[bottom], y[kt:].T, hy[kt:].T, res[kt:],
                      tol, used, restarts)


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


def nested_shares(a: torch.Tensor, g: torch.Tensor, dhd: float) -> list[float]:
    """(P_rδ)ᵀH(P_rδ) / δᵀHδ for the nested bases U_r (r = 1..len(a)) from a = Uᵀδ and g = UᵀHU (U orthonormal)."""
    if a.numel() == 0 or dhd == 0:
        return []
    g = 0.5 * (g + g.T)
    return [float(a[:r] @ g[:r, :r] @ a[:r]) / dhd for r in range(1, a.numel() + 1)]


def random_rows(n: int, r: int, seed: int = 0, dtype: torch.dtype = torch.float64,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """r orthonormal rows in Rⁿ [r, n]: float64 Gaussian draws, one row at a time, Gram–Schmidt (twice).

    The generator's seed is `seed` mixed (a bijection of uint32), so a row is never the plain `torch.randn(n)` of
    a small seed (a δ or start vector drawn that way would otherwise be one of the directions).
    """
    gen = torch.Generator().manual_seed((seed * 0x9E3779B1 + 0x7F4A7C15) % 2**32)
    u = torch.empty(r, n, dtype=dtype, device=device)
    for i in range(r):
        u[i].copy_(torch.randn(n, generator=gen, dtype=torch.float64))
        _orthogonalise(u[i], u[:i])
        u[i].div_(_norm(u[i]))
    return u


def random_basis(n: int, r: int, seed: int = 0) -> torch.Tensor:
    """The random baseline's r orthonormal directions as float64 columns (n × r): `random_rows` transposed."""
    return random_rows(n, r, seed).T


def top_abs_indices(delta: torch.Tensor, r: int) -> torch.Tensor:
    """Indices of δ's r largest |δ|, largest first, ties by index (a stable descending argsort's first r).

    By topk and a threshold, so nothing of size n is sorted.
    """
    a = delta.detach().reshape(-1).abs()
    r = min(r, a.numel())
    if r == 0:
        return torch.zeros(0, dtype=torch.long, device=a.device)
    t = torch.topk(a, r).values.min()
    above = torch.nonzero(a > t).flatten()
    tied = torch.nonzero(a == t).flatten()[: r - above.numel()]
    sel = torch.sort(torch.cat([above, tied])).values
    return sel[torch.argsort(a[sel], descending=True, stable=True)]


def spectral_shares(values: torch.Tensor, coef: torch.Tensor, part: float, sign: int) -> list[float]:
    """Σ_{i≤r} clip(λ_i)(v_iᵀδ)² / part for coef = Vᵀδ; clip = max(·, 0) for sign +1 and min(·, 0) for sign −1."""
    if part == 0 or values.numel() == 0:
        return []
    lam = values.clamp_min(0.0) if sign > 0 else values.clamp_max(0.0)
    return (torch.cumsum(lam * coef.to(lam).square(), 0) / part).tolist()


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
    """ConflictSubspace's measured fields for an operator on Rⁿ and a vector δ (see the module docstring).

    Vectors stay on δ's device in `work_dtype(δ.dtype)`; the phases run one after another, so the memory is
    the largest of their buffers (module docstring), and small projected quantities are fp64.
    """
    d = delta.detach().reshape(-1)
    d = d.to(work_dtype(d.dtype))
    n = d.numel()
    nrm2 = float(inner(d[None], d[None])) if n else 0.0
    if n == 0 or nrm2 == 0:
        raise CrossrouteError("the conflict subspace needs a non-empty restriction with δ ≠ 0 there.")
    counts: dict[str, int] = {}
    secs: dict[str, float] = {}

    def counted(tag: str) -> Matvec:
        def mv(v: torch.Tensor) -> torch.Tensor:
            counts[tag] = counts.get(tag, 0) + 1
            return matvec(v).reshape(-1)
        return mv

    t = time.perf_counter()
    lz = lanczos(counted("quadrature"), d, max(1, quad_steps), vectors=False)
    dhd = nrm2 * lz.alphas[0]  # q1 = δ/‖δ‖: α_1 = q1ᵀHq1
    pos = lanczos_quadrature(lz.alphas, lz.betas, nrm2, lambda x: x.clamp_min(0.0))
    half = max(1, len(lz.alphas) // 2)
    pos_half = lanczos_quadrature(lz.alphas[:half], lz.betas[: half - 1], nrm2, lambda x: x.clamp_min(0.0))
    secs["quadrature"] = time.perf_counter() - t
    t = time.perf_counter()
    ep = extreme_eigenpairs(counted("eigen"), n, k_top, k_bottom, tol, max_hvp, seed=seed, device=d.device,
                            dtype=d.dtype)
    secs["eigen"] = time.perf_counter() - t
    a_top, a_bottom = inner(ep.top_vectors.T, d[None])[:, 0].cpu(), inner(ep.bottom_vectors.T, d[None])[:, 0].cpu()
    share_eig = nested_shares(a_top, inner(ep.top_vectors.T, ep.top_hv.T).cpu(), dhd)
    eig = dict(eigenvalues_top=ep.top_values.tolist(), residuals_top=ep.top_residuals.tolist(),
               converged_top=ep.top_converged, eigenvalues_bottom=ep.bottom_values.tolist(),
               residuals_bottom=ep.bottom_residuals.tolist(), converged_bottom=ep.bottom_converged,
               converged=ep.converged,
               delta_weight_top=(a_top.square() / nrm2).tolist(),
               delta_weight_bottom=(a_bottom.square() / nrm2).tolist(),
               pos_share=spectral_shares(ep.top_values, a_top, pos, +1),
               neg_share=spectral_shares(ep.bottom_values, a_bottom, dhd - pos, -1))
    r90, reason = r90_of(share_eig, ep.top_converged, dhd)
    del ep  # its vectors are views of the eigen buffer: free it before the baselines
    r_base = min(n, k_top if n_baseline is None else n_baseline)
    t = time.perf_counter()
    share_random = _random_shares(counted("random"), d, r_base, seed + 1, dhd)
    secs["random"] = time.perf_counter() - t
    t = time.perf_counter()
    share_abs = _top_abs_shares(counted("top_abs_delta"), d, r_base, dhd)
    secs["top_abs_delta"] = time.perf_counter() - t
    return dict(
        dHd=dhd, dHd_pos_est=pos, dHd_neg_est=dhd - pos, dHd_pos_est_half=pos_half, quad_steps=len(lz.alphas),
        k_top=k_top, k_bottom=k_bottom, tol=tol, **eig,
        share_eig=share_eig, share_random=share_random, share_top_abs_delta=share_abs,
        r90=r90, r90_reason=reason, n_hvp={**counts, "total": sum(counts.values())},
        seconds={**secs, "total": sum(secs.values())}, seed=seed)


def _random_shares(matvec: Matvec, d: torch.Tensor, r: int, seed: int, dhd: float) -> list[float]:
    """Projected shares of `random_rows(n, r, seed)`: UᵀHU column by column (one matvec each, H U never stored)."""
    u = random_rows(d.numel(), r, seed, d.dtype, d.device)
    g = torch.zeros(r, r, dtype=torch.float64)
    for i in range(r):
        g[:, i] = inner(u, matvec(u[i]).reshape(1, -1).to(u))[:, 0].cpu()
    return nested_shares(inner(u, d[None])[:, 0].cpu(), g, dhd)


def _top_abs_shares(matvec: Matvec, d: torch.Tensor, r: int, dhd: float) -> list[float]:
    """Projected shares of δ masked to its r largest |δ| (coordinate basis: UᵀHU = H's entries there)."""
    idx = top_abs_indices(d, r)
    g = torch.zeros(len(idx), len(idx), dtype=torch.float64)
    e = torch.zeros_like(d)
    for i, ix in enumerate(idx.tolist()):
        e[ix] = 1.0
        g[:, i] = matvec(e).reshape(-1)[idx].double().cpu()
        e[ix] = 0.0
    return nested_shares(d[idx].double().cpu(), g, dhd)


# ----------------------------------------------------------------------------- memory


def available_bytes(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on `device`: CUDA free + allocator cache, or MemAvailable (CPU); None: unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if dev.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _gib(b: float) -> str:
    return f"{b / 2**30:.3g} GiB" if b >= 2**27 else f"{b / 2**20:.3g} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """What `conflict_subspace` will hold on its device, in bytes, by part (the model is already resident)."""

    device: str
    n: int
    itemsize: int
    rows: int  # vectors in the largest buffer (eigen basis, quadrature basis or random baseline)
    vectors: int  # δ, one matvec result, block scratch
    touched: int  # one HVP pass: v, ∇L and H v over the touched tensors, and their masks
    activations: int | None  # one HVP pass: the double-backward graph of the largest micro-batch (estimate)
    model: int
    available: int | None

    @property
    def basis(self) -> int:
        return self.rows * self.n * self.itemsize

    @property
    def need(self) -> int:
        """Bytes beyond the resident model."""
        return self.basis + self.vectors + self.touched + (self.activations or 0)

    def line(self) -> str:
        act = "unknown" if self.activations is None else "~" + _gib(self.activations)
        avail = "unknown" if self.available is None else _gib(self.available)
        return (f"conflict subspace memory on {self.device}: basis {self.rows} x {self.n:,} x {self.itemsize} B = "
                f"{_gib(self.basis)}, model {_gib(self.model)} (resident), HVP activations {act} + touched tensors "
                f"{_gib(self.touched)}, vectors {_gib(self.vectors)}; needs {_gib(self.need)} beyond the model, "
                f"{avail} available")

    def check(self) -> None:
        """CrossrouteError naming the knob when `need` exceeds `available`."""
        if self.available is None or self.need <= self.available:
            return
        knob = ("lower k / k_bottom (the subspace rank: the basis holds max(2·want, want + 10) + 1 vectors, want = "
                "k + k_bottom) or quad_steps / n_baseline, or share fewer units" if self.basis >= self.need / 2 else
                "lower the HVP batch size (micro-batches of the proxy batches) or restrict to fewer layers")
        raise CrossrouteError(f"the conflict subspace needs ~{_gib(self.need)} on {self.device} beyond the loaded "
                              f"model ({_gib(self.model)}) but {_gib(self.available)} is available (basis "
                              f"{self.rows} x {self.n:,} x {self.itemsize} B = {_gib(self.basis)}, HVP "
                              f"{_gib(self.touched + (self.activations or 0))}); {knob}.")


def memory_plan(model: torch.nn.Module, batches: list[Batch], packing: Packing, k_top: int, k_bottom: int,
                quad_steps: int, n_baseline: int | None, available: int | None = None) -> MemoryPlan:
    """The estimate `conflict_subspace` prints and checks; `available` overrides what the device reports."""
    n, itemsize = packing.n, torch.empty(0, dtype=packing.dtype).element_size()
    _, eigen_rows = basis_rows(n, k_top, k_bottom)
    rows = max(eigen_rows, min(max(1, quad_steps), n) + 1, min(n, k_top if n_baseline is None else n_baseline))
    touched, act = hvp_pass_bytes(model, batches, packing)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    scratch = 2 * min(BLOCK_ELEMS, 2 * rows * n) * 8  # one block of the basis and its product, at most fp64
    return MemoryPlan(str(packing.device), n, itemsize, rows, 3 * n * itemsize + scratch, touched, act, model_bytes,
                      available_bytes(packing.device) if available is None else available)


def conflict_subspace(model: PreTrainedModel, batches: list[Batch], umap: UnitMap,
                      delta: dict[str, torch.Tensor], g: dict[str, torch.Tensor],
                      shared: dict[str, set[str]], domain_b: str, k: int = 20,
                      method: str = "double_backward", keep_units: bool = True, *,
                      k_bottom: int | None = None, tol: float = 1e-3, max_hvp: int = 150,
                      quad_steps: int = 20, n_baseline: int | None = None, seed: int = 0,
                      memory_limit: int | None = None) -> ConflictSubspace:
    """Extreme eigenpairs of H_A on the `shared` units' entries and δ's shares there (module docstring).

    k: top eigenpairs (and baseline sizes); k_bottom: bottom ones (default k // 2). Vectors are packed over the
    entries (fp32 or the model's dtype if wider, on its device). Before any HVP the memory estimate is checked
    (CrossrouteError, with the figures, when it exceeds `memory_limit` bytes; default: what the device has
    free) and printed on the console.
    """
    units = [u for kind in PARTITION_KINDS for u in sorted(shared.get(kind, set()))]
    n_shared = {kind: len(shared.get(kind, set())) for kind in PARTITION_KINDS if kind in umap.kinds}
    packing = Packing(model, umap.mask(units))
    n_params = packing.n
    d_r = packing.pack(delta)
    units_json = {kind: sorted(shared.get(kind, set())) for kind in PARTITION_KINDS if kind in umap.kinds} \
        if keep_units else {}
    d_norm = math.sqrt(float(inner(d_r[None], d_r[None]))) if n_params else 0.0
    base = dict(domain_b=domain_b, n_shared=n_shared, n_params=n_params, delta_norm=d_norm, shared_units=units_json)
    if n_params == 0 or d_norm == 0.0:
        return ConflictSubspace(**base, first_order=0.0, second_order=0.0, seed=seed,
                                r90_reason="no shared units" if n_params == 0 else "δ = 0 on the shared units")
    kb = k // 2 if k_bottom is None else k_bottom
    plan = memory_plan(model, batches, packing, k, kb, quad_steps, n_baseline, memory_limit)
    plan.check()  # refuses first: bad input is one line on stderr (crossroute.core.errors), the error itself
    console.print(plan.line(), markup=False, highlight=False, soft_wrap=True)
    first_order = float(inner(packing.pack(g)[None], d_r[None]))

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return packed_hvp(model, batches, packing, v, method=method)

    fields = subspace_analysis(matvec, d_r, k_top=k, k_bottom=kb, tol=tol, max_hvp=max_hvp, quad_steps=quad_steps,
                               n_baseline=n_baseline, seed=seed)
    return ConflictSubspace(**base, first_order=first_order, second_order=0.5 * fields["dHd"], **fields)
