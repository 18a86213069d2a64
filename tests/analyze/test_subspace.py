"""Conflict subspace: extreme eigenpairs to convergence, projected shares and baselines, checked against eigh."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from conftest import make_tiny
from crossroute.analyze import subspace
from crossroute.analyze.subspace import (
    conflict_subspace,
    extreme_eigenpairs,
    first_reaching,
    lanczos,
    random_basis,
    subspace_analysis,
    top_abs_indices,
)
from crossroute.core.errors import CrossrouteError
from crossroute.domains.files import get_domain
from crossroute.measure.hvp import grad_and_hvp
from crossroute.measure.proxy import domain_examples, make_batches
from crossroute.model.load import load_model
from crossroute.model.units import UnitMap

F64 = torch.float64


def _rotate(eig: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, V): H = V diag(eig) Vᵀ with a seeded random orthogonal V."""
    g = torch.Generator().manual_seed(seed)
    v = torch.linalg.qr(torch.randn(len(eig), len(eig), generator=g, dtype=F64)).Q
    return v @ torch.diag(eig.to(F64)) @ v.T, v


def _truth(h: torch.Tensor, d: torch.Tensor) -> dict:
    """eigh's answer: eigenvalues decreasing, cumulative share Σ_{i≤r} λ_i c_i² / δᵀHδ, parts δᵀH±δ."""
    lam, v = torch.linalg.eigh(h)
    lam, v = lam.flip(0), v.flip(1)
    c2 = (v.T @ d).square()
    dhd = float(d @ h @ d)
    return {"lam": lam, "v": v, "c2": c2, "dhd": dhd, "cum": (torch.cumsum(lam * c2, 0) / dhd).tolist(),
            "pos": float((lam.clamp_min(0) * c2).sum()), "neg": float((lam.clamp_max(0) * c2).sum())}


def _matvec(h: torch.Tensor):
    return lambda v: h @ v


def test_planted_low_rank_psd_hessian_gives_r90_at_most_3_and_eigh_shares() -> None:
    n = 300
    eig = torch.cat([torch.tensor([100.0, 30.0, 10.0]), torch.zeros(n - 3)]).to(F64)
    h, v = _rotate(eig, 1)
    noise = torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=F64)
    h = h + 1e-6 * (noise + noise.T) / 2
    d = v[:, :3] @ torch.tensor([0.3, 1.0, 2.0], dtype=F64)  # in the range of the planted part
    t = _truth(h, d)
    out = subspace_analysis(_matvec(h), d, k_top=5, k_bottom=2, tol=1e-8, max_hvp=150)
    assert out["converged_top"][:3] == [True, True, True]
    assert out["eigenvalues_top"][:3] == pytest.approx(t["lam"][:3].tolist(), rel=1e-9)
    assert t["cum"][2] >= 0.9 and out["r90"] is not None and out["r90"] <= 3
    assert out["r90"] == first_reaching(t["cum"])
    assert out["share_eig"][:3] == pytest.approx(t["cum"][:3], abs=1e-8)
    assert out["dHd"] == pytest.approx(t["dhd"], rel=1e-12)


def test_full_rank_random_hessian_r90_is_not_bounded_by_k() -> None:
    """Marchenko–Pastur H, random δ: the truth needs hundreds of directions; k = 5 or 20 must say None."""
    n = 500
    g = torch.randn(n, n, generator=torch.Generator().manual_seed(3), dtype=F64)
    h = g @ g.T / n
    d = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=F64)
    t = _truth(h, d)
    truth_r90 = first_reaching(t["cum"])
    assert truth_r90 is not None and truth_r90 > 100
    old = lanczos(_matvec(h), d, k=5)  # the old recipe: Ritz pairs from δ sum to 1 by construction
    old_cum = torch.cumsum(old.eigenvalues * (old.vectors.T @ d).square(), 0) / t["dhd"]
    assert first_reaching(old_cum.tolist()) is not None and first_reaching(old_cum.tolist()) <= 5
    for k in (5, 20):
        out = subspace_analysis(_matvec(h), d, k_top=k, k_bottom=2, tol=1e-8, max_hvp=150)
        n_ok = sum(out["converged_top"])
        truth_within = first_reaching(t["cum"][:n_ok])
        assert out["r90"] == truth_within is None
        assert out["r90_reason"].startswith("not reached within k =")
        assert out["share_eig"][:n_ok] == pytest.approx(t["cum"][:n_ok], abs=1e-8)
        assert max(out["share_eig"]) < 0.5  # far from 0.9: k directions of 500 carry little


def test_decaying_spectrum_r90_matches_eigh_inside_k() -> None:
    n = 500
    eig = torch.cat([100 * 0.7 ** torch.arange(12.0), 0.01 * torch.rand(n - 12, generator=torch.Generator()
                                                                       .manual_seed(5))]).to(F64)
    h, v = _rotate(eig, 6)
    d = v @ (torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=F64))
    t = _truth(h, d)
    truth_r90 = first_reaching(t["cum"])
    assert truth_r90 is not None and 3 < truth_r90 <= 12
    out = subspace_analysis(_matvec(h), d, k_top=15, k_bottom=3, tol=1e-8, max_hvp=150)
    assert out["r90"] == truth_r90 and out["r90_reason"] == ""
    n_ok = sum(out["converged_top"])
    assert n_ok >= 12
    assert out["share_eig"][:n_ok] == pytest.approx(t["cum"][:n_ok], abs=1e-8)


def test_indefinite_hessian_positive_and_negative_parts_match_eigh() -> None:
    n = 400
    bulk = 2 * torch.rand(n - 9, generator=torch.Generator().manual_seed(8), dtype=F64) - 1
    eig = torch.cat([torch.tensor([50.0, 30, 20, 12, 8], dtype=F64), -torch.tensor([40.0, 25, 15, 9], dtype=F64),
                     bulk])
    h, _ = _rotate(eig, 9)
    d = torch.randn(n, generator=torch.Generator().manual_seed(10), dtype=F64)
    t = _truth(h, d)
    out = subspace_analysis(_matvec(h), d, k_top=5, k_bottom=4, tol=1e-8, max_hvp=150, quad_steps=80)
    assert out["converged"]
    assert out["eigenvalues_top"] == pytest.approx([50.0, 30, 20, 12, 8], rel=1e-9)
    assert out["eigenvalues_bottom"] == pytest.approx([-40.0, -25, -15, -9], rel=1e-9)
    assert out["dHd_pos_est"] + out["dHd_neg_est"] == pytest.approx(t["dhd"], rel=1e-10)
    assert out["dHd_pos_est"] == pytest.approx(t["pos"], rel=2e-3)  # quadrature, 80 steps
    assert out["dHd_neg_est"] == pytest.approx(t["neg"], rel=2e-3)
    pos_num = torch.cumsum(t["lam"][:5].clamp_min(0) * t["c2"][:5], 0)
    neg_num = torch.cumsum(t["lam"].flip(0)[:4].clamp_max(0) * t["c2"].flip(0)[:4], 0)
    assert [s * out["dHd_pos_est"] for s in out["pos_share"]] == pytest.approx(pos_num.tolist(), rel=1e-8)
    assert [s * out["dHd_neg_est"] for s in out["neg_share"]] == pytest.approx(neg_num.tolist(), rel=1e-8)
    assert all(0 <= s <= 1 for s in out["pos_share"] + out["neg_share"])
    coarse = subspace_analysis(_matvec(h), d, k_top=5, k_bottom=4, tol=1e-8, max_hvp=150)  # 20 steps
    assert coarse["dHd_pos_est"] == pytest.approx(t["pos"], rel=0.05)


def test_residuals_are_true_residuals_and_below_tol_when_flagged() -> None:
    n = 200
    eig = torch.cat([torch.linspace(10, 5, 6), torch.linspace(-0.5, 0.5, n - 12), -torch.linspace(3, 8, 6)])
    h, _ = _rotate(eig, 11)
    ep = extreme_eigenpairs(_matvec(h), n, k_top=6, k_bottom=6, tol=1e-9, max_matvec=150, basis_size=16)
    assert ep.converged and ep.n_restarts >= 2
    for vals, vecs, res in ((ep.top_values, ep.top_vectors, ep.top_residuals),
                            (ep.bottom_values, ep.bottom_vectors, ep.bottom_residuals)):
        explicit = (h @ vecs - vecs * vals).norm(dim=0) / vals.abs()
        assert torch.allclose(res, explicit, rtol=1e-3, atol=1e-13)
        assert bool((explicit <= 1e-9).all())
        assert torch.allclose(vecs.T @ vecs, torch.eye(6, dtype=F64), atol=1e-10)
    assert ep.top_values.tolist() == pytest.approx(torch.linspace(10, 5, 6).tolist(), rel=1e-9)
    starved = extreme_eigenpairs(_matvec(h), n, k_top=6, k_bottom=6, tol=1e-9, max_matvec=14)
    assert not starved.converged and starved.n_matvec == 14
    assert [bool(r <= 1e-9) for r in starved.top_residuals] == starved.top_converged
    d = torch.randn(n, generator=torch.Generator().manual_seed(12), dtype=F64)
    out = subspace_analysis(_matvec(h), d, k_top=6, k_bottom=6, tol=1e-9, max_hvp=14)
    assert out["converged"] is False and out["n_hvp"]["eigen"] == 14
    with pytest.raises(CrossrouteError, match="k_top"):
        extreme_eigenpairs(_matvec(h), n, k_top=0, k_bottom=0)


def test_random_baseline_is_r_over_n_on_identity_and_top_abs_delta_is_hand_computed() -> None:
    n, r = 400, 20
    d = torch.randn(n, generator=torch.Generator().manual_seed(13), dtype=F64)
    at_r = [subspace_analysis(lambda v: v, d, k_top=r, k_bottom=0, tol=1e-8, max_hvp=5, quad_steps=2,
                              seed=s)["share_random"] for s in range(30)]
    mean, expected = torch.tensor(at_r).mean(0), torch.arange(1, r + 1, dtype=F64) / n
    sd_of_mean = expected * torch.sqrt(2 / torch.arange(1, r + 1, dtype=F64) / len(at_r))  # χ²_r / n, 30 draws
    assert bool(((mean - expected).abs() <= 4 * sd_of_mean).all())
    u = random_basis(n, r, 1)  # seed + 1, as subspace_analysis draws it
    assert at_r[0] == pytest.approx(torch.cumsum((u.T @ d).square(), 0).div(d @ d).tolist(), rel=1e-10)
    h, _ = _rotate(torch.linspace(-1, 5, n), 14)
    out = subspace_analysis(_matvec(h), d, k_top=r, k_bottom=0, tol=1e-8, max_hvp=5, quad_steps=2)
    order = torch.argsort(d.abs(), descending=True)
    for k in (1, 5, 20):
        masked = torch.zeros_like(d)
        masked[order[:k]] = d[order[:k]]
        assert out["share_top_abs_delta"][k - 1] == pytest.approx(float(masked @ h @ masked) / float(d @ h @ d),
                                                                  rel=1e-10)
    assert len(out["share_random"]) == len(out["share_top_abs_delta"]) == r
    assert out["n_hvp"] == {"quadrature": 2, "eigen": 5, "random": r, "top_abs_delta": r, "total": 2 + 5 + 2 * r}


def test_non_positive_dhd_gives_no_r90() -> None:
    h, _ = _rotate(-torch.linspace(1, 4, 50), 15)
    d = torch.randn(50, generator=torch.Generator().manual_seed(16), dtype=F64)
    out = subspace_analysis(_matvec(h), d, k_top=3, k_bottom=3, tol=1e-8, max_hvp=60)
    assert out["r90"] is None and "δᵀHδ ≤ 0" in out["r90_reason"]
    with pytest.raises(CrossrouteError, match="δ ≠ 0"):
        subspace_analysis(_matvec(h), torch.zeros(50, dtype=F64))


def _tiny_problem(tmp_path: Path, dtype: torch.dtype, shared: dict[str, set[str]], sym_rtol: float = 1e-9) -> dict:
    """A tiny model in `dtype`, δ, g, and H on the `shared` units' entries built column by column in float64
    through the full-size per-tensor path (grad_and_hvp on a float64 copy, one unit vector per column).

    Qwen3 keeps RMSNorm and softmax in fp32 even in float64, so through attention H is symmetric to ~1e-7 only."""
    loaded = load_model(make_tiny(tmp_path / "a"), dtype=torch.float32, double_backward=True)
    model = loaded.model.to(dtype)
    ref = copy.deepcopy(model).double()
    dom = get_domain("math")
    batches = make_batches(loaded.tokenizer, domain_examples(dom, 8, 0, "eval"), 8, dom)
    umap = UnitMap.of_model(model)
    masks = umap.mask([u for kind in sorted(shared) for u in sorted(shared[kind])])
    names = list(masks)
    params = dict(ref.named_parameters())
    gen = torch.Generator().manual_seed(17)
    delta = {k: 1e-2 * torch.randn(p.shape, generator=gen, dtype=F64) for k, p in params.items()}
    _, g, _ = grad_and_hvp(ref, batches, delta)

    def pack(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([t[k].double()[masks[k]] for k in names])

    n = int(sum(int(m.sum()) for m in masks.values()))
    cols = []
    for i in range(n):
        e = torch.zeros(n, dtype=F64)
        e[i] = 1.0
        vec, off = {}, 0
        for k in names:
            t = torch.zeros(params[k].shape, dtype=F64)
            s = int(masks[k].sum())
            t[masks[k]] = e[off: off + s]
            vec[k] = t
            off += s
        cols.append(pack(grad_and_hvp(ref, batches, vec, params=names)[2]))
    h = torch.stack(cols, 1)
    assert torch.allclose(h, h.T, atol=sym_rtol * float(h.abs().max()))
    h = 0.5 * (h + h.T)
    d = pack(delta)
    return dict(model=model, batches=batches, umap=umap, delta=delta, g=g, h=h, d=d, n=n, pack=pack,
                truth=_truth(h, d), shared=shared)


def test_conflict_subspace_on_a_tiny_model_matches_the_explicit_hessian(tmp_path: Path) -> None:
    """Through the model's HVPs on 3 neurons (144 entries): eigenpairs vs eigh of the Hessian built column by column."""
    shared = {"neuron": {"L0.mlp.1", "L1.mlp.3", "L1.mlp.7"}}
    pb = _tiny_problem(tmp_path, F64, shared)
    n, t, d, g = pb["n"], pb["truth"], pb["d"], pb["g"]
    assert n == 144
    c = conflict_subspace(pb["model"], pb["batches"], pb["umap"], pb["delta"], g, shared, "qa", k=4, k_bottom=3,
                          tol=1e-9, max_hvp=200)
    assert c.n_params == n and c.converged
    assert c.eigenvalues_top == pytest.approx(t["lam"][:4].tolist(), rel=1e-6, abs=1e-9)
    assert c.eigenvalues_bottom == pytest.approx(t["lam"].flip(0)[:3].tolist(), rel=1e-6, abs=1e-9)
    assert c.delta_weight_top == pytest.approx((t["c2"][:4] / (d @ d)).tolist(), rel=1e-6, abs=1e-12)
    assert c.dHd == pytest.approx(t["dhd"], rel=1e-6)
    assert c.share_eig == pytest.approx(t["cum"][:4], rel=1e-6, abs=1e-9)
    assert c.first_order == pytest.approx(float(pb["pack"](g) @ d), rel=1e-9)
    assert c.n_hvp["total"] <= 20 + 200 + 2 * 4
    assert sorted(c.shared_units["neuron"]) == sorted(shared["neuron"])


def test_fp32_packed_path_on_a_neuron_and_a_head_matches_the_float64_explicit_hessian(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fp32 model: every matvec gets one flat fp32 vector over the 304 selected entries, and the eigenpairs
    agree with eigh of the float64 Hessian (built through the full-size path) to fp32 accuracy."""
    shared = {"neuron": {"L1.mlp.3"}, "head": {"L1.head.1"}}
    pb = _tiny_problem(tmp_path, torch.float32, shared, sym_rtol=1e-6)
    n, t, d = pb["n"], pb["truth"], pb["d"]
    assert n == 48 + 2 * 128
    seen: list[tuple[torch.dtype, tuple[int, ...]]] = []
    real = subspace.packed_hvp

    def spy(model, batches, packing, v, method="double_backward", loss_fn=None):  # type: ignore[no-untyped-def]
        seen.append((v.dtype, tuple(v.shape)))
        return real(model, batches, packing, v, method, loss_fn)

    monkeypatch.setattr(subspace, "packed_hvp", spy)
    c = conflict_subspace(pb["model"], pb["batches"], pb["umap"], pb["delta"], pb["g"], shared, "qa", k=4,
                          k_bottom=3, tol=1e-4, max_hvp=200)
    assert set(seen) == {(torch.float32, (n,))} and len(seen) == c.n_hvp["total"]
    assert c.converged
    assert c.eigenvalues_top == pytest.approx(t["lam"][:4].tolist(), rel=1e-4)
    assert c.eigenvalues_bottom == pytest.approx(t["lam"].flip(0)[:3].tolist(), rel=1e-4)
    assert c.delta_weight_top == pytest.approx((t["c2"][:4] / (d @ d)).tolist(), rel=1e-2, abs=1e-7)
    assert c.dHd == pytest.approx(t["dhd"], rel=1e-4)
    assert c.first_order == pytest.approx(float(pb["pack"](pb["g"]) @ d), rel=1e-5)


def test_memory_estimate_is_printed_and_refuses_a_tiny_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A tiny injected limit refuses before any HVP with one error naming the figures and the knob of the larger
    part (here the HVP pass; the subspace rank when the basis dominates); a run that fits prints the estimate
    line, with the basis' bytes, before it starts."""
    loaded = load_model(make_tiny(tmp_path / "a"), dtype=torch.float32, double_backward=True)
    model = loaded.model
    dom = get_domain("math")
    batches = make_batches(loaded.tokenizer, domain_examples(dom, 4, 0, "eval"), 4, dom)
    umap = UnitMap.of_model(model)
    shared = {"neuron": {"L0.mlp.1", "L1.mlp.3", "L1.mlp.7"}}
    gen = torch.Generator().manual_seed(3)
    delta = {k: torch.randn(p.shape, generator=gen) for k, p in model.named_parameters()}
    calls = {"n": 0}
    real = subspace.packed_hvp

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return real(*a, **kw)

    rows = max(subspace.basis_rows(144, 4, 3)[1], 20 + 1)  # eigen buffer 18 rows, quadrature 21: the larger
    basis = f"basis {rows} x 144 x 4 B = {rows * 144 * 4 / 2**20:.3g} MiB"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(subspace, "packed_hvp", counting)
        with pytest.raises(CrossrouteError, match="but 0.00391 MiB is available") as err:
            conflict_subspace(model, batches, umap, delta, delta, shared, "qa", k=4, k_bottom=3, memory_limit=4096)
    assert basis in str(err.value) and "lower the HVP batch size" in str(err.value)
    assert calls["n"] == 0 and capsys.readouterr().err == ""
    plan = subspace.memory_plan(model, batches, subspace.Packing(model, umap.mask(sorted(shared["neuron"]))), 4, 3,
                                20, None, available=10**12)
    resident = [*model.parameters(), *model.buffers()]
    assert plan.basis == rows * 144 * 4 and plan.model == sum(t.numel() * t.element_size() for t in resident)
    assert plan.need == plan.basis + plan.vectors + plan.touched + plan.activations and plan.activations > 0
    plan.check()  # fits
    big_basis = dataclasses.replace(plan, n=10**9, available=10**9)
    with pytest.raises(CrossrouteError, match=r"lower k / k_bottom \(the subspace rank"):
        big_basis.check()
    out = conflict_subspace(model, batches, umap, delta, delta, shared, "qa", k=4, k_bottom=3, max_hvp=30,
                            memory_limit=10**12)
    assert out.n_params == 144 and out.n_hvp["total"] > 0
    line = capsys.readouterr().err
    assert line.startswith("conflict subspace memory on cpu: ") and line.count("\n") == 1  # one line, not wrapped
    assert basis in line and "931 GiB available" in line


def test_basis_is_one_buffer_allocated_once_and_never_stacked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across restarts every matvec input is a row of one [rows, n] buffer, the Ritz vectors and H·v are views of
    it, and no basis-sized tensor is allocated, stacked or concatenated during the run."""
    n = 300
    eig = torch.cat([torch.linspace(10, 5, 6), torch.linspace(-0.5, 0.5, n - 12), -torch.linspace(3, 8, 6)])
    h, _ = _rotate(eig, 21)
    storages: set[int] = set()

    def mv(v: torch.Tensor) -> torch.Tensor:
        storages.add(v.untyped_storage().data_ptr())
        return h @ v

    big: list[str] = []
    for name in ("empty", "zeros", "ones", "stack", "cat", "empty_like", "zeros_like", "randn"):
        real = getattr(torch, name)

        def wrapped(*a, _real=real, _name=name, **kw):  # type: ignore[no-untyped-def]
            out = _real(*a, **kw)
            if isinstance(out, torch.Tensor) and out.numel() >= 2 * n:  # two vectors or more
                big.append(f"{_name}{tuple(out.shape)}")
            return out

        monkeypatch.setattr(torch, name, wrapped)
    ep = extreme_eigenpairs(mv, n, k_top=6, k_bottom=6, tol=1e-9, max_matvec=150, basis_size=16)
    monkeypatch.undo()
    m, rows = subspace.basis_rows(n, 6, 6, 16)
    assert ep.converged and ep.n_restarts >= 2 and ep.n_matvec > m
    assert big == [f"empty({rows}, {n})"]  # the buffer, once
    assert len(storages) == 1
    buffer = next(iter(storages))
    for t in (ep.top_vectors, ep.top_hv, ep.bottom_vectors, ep.bottom_hv):
        assert t.untyped_storage().data_ptr() == buffer and t.untyped_storage().nbytes() == rows * n * 8
    assert torch.allclose(h @ ep.top_vectors, ep.top_hv, atol=1e-8)  # H·v from the Lanczos relation is the product
    starved = extreme_eigenpairs(lambda v: h @ v, n, k_top=6, k_bottom=6, tol=1e-9, max_matvec=20, basis_size=16)
    assert starved.n_restarts >= 1 and not starved.converged  # not converged: the residual term matters
    for vecs, hv in ((starved.top_vectors, starved.top_hv), (starved.bottom_vectors, starved.bottom_hv)):
        assert torch.allclose(h @ vecs, hv, atol=1e-12)


def test_blocked_products_and_in_place_restarts_give_the_unblocked_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """With blocks of 64 entries (the path a 10⁸-entry restriction takes) the run equals the one-block run."""
    n = 257
    h, _ = _rotate(torch.cat([torch.tensor([9.0, 7, 6]), torch.linspace(-1, 1, n - 5), torch.tensor([-4.0, -6])]), 22)
    d = torch.randn(n, generator=torch.Generator().manual_seed(23), dtype=F64)
    whole = subspace_analysis(_matvec(h.float()), d.float(), k_top=3, k_bottom=2, tol=1e-5, max_hvp=60,
                              quad_steps=10, n_baseline=4)
    monkeypatch.setattr(subspace, "BLOCK_ELEMS", 64)
    blocked = subspace_analysis(_matvec(h.float()), d.float(), k_top=3, k_bottom=2, tol=1e-5, max_hvp=60,
                                quad_steps=10, n_baseline=4)
    assert blocked["n_hvp"] == whole["n_hvp"]
    for key in ("eigenvalues_top", "eigenvalues_bottom", "share_eig", "share_random", "share_top_abs_delta",
                "dHd_pos_est", "delta_weight_top"):
        assert blocked[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-6), key
    t = _truth(h, d)
    assert blocked["eigenvalues_top"] == pytest.approx(t["lam"][:3].tolist(), rel=1e-5)


def test_top_abs_indices_is_a_stable_descending_argsort_prefix() -> None:
    gen = torch.Generator().manual_seed(24)
    d = torch.randint(-3, 4, (500,), generator=gen).double()  # many ties, zeros included
    for r in (1, 7, 80, 400, 500):
        expected = torch.argsort(d.abs(), descending=True, stable=True)[:r]
        assert torch.equal(top_abs_indices(d, r), expected)
