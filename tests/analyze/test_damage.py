"""Damage decomposition: unit partition, attribution sum, expansion quality, Lanczos."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_tiny
from crossroute.analyze.damage import damage, run_damage
from crossroute.analyze.subspace import lanczos
from crossroute.core.errors import CrossrouteError
from crossroute.measure.hvp import hvp
from crossroute.model.default import build_default_model
from crossroute.model.load import load_model, save_model
from crossroute.model.units import UnitMap
from crossroute.report.sections.damage import render_damage_section


def _perturbed(src: Path, dst: Path, scale: float, seed: int = 5) -> Path:
    loaded = load_model(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    save_model(loaded.model, loaded.tokenizer, dst)
    return dst


def test_units_partition_every_parameter() -> None:
    model, _ = build_default_model(0, **TINY)
    umap = UnitMap.of_model(model)
    params = dict(model.named_parameters())
    red = umap.reduce({k: torch.ones_like(p) for k, p in params.items()})
    counts = {k: torch.stack(red[k]) for k in umap.partition_kinds}
    assert sum(float(v.sum()) for v in counts.values()) + float(red["other"].sum()) == \
        sum(p.numel() for p in params.values())
    h, kv, hd = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["head_dim"]
    d, inter = TINY["hidden_size"], TINY["intermediate_size"]
    assert counts["neuron"].shape == (TINY["num_hidden_layers"], inter)
    assert torch.all(counts["neuron"] == 3 * d)  # gate row + up row + down column
    assert torch.all(counts["head"] == 2 * hd * d)  # q rows + o columns
    assert torch.all(counts["kv"] == 2 * hd * d)  # k rows + v rows
    assert umap.n_units() == TINY["num_hidden_layers"] * (inter + h + kv) + len(umap.others)
    assert any("norm" in o for o in umap.others) and any("embed" in o for o in umap.others)


def test_attribution_sums_to_total_and_expansion_is_good(tmp_path: Path) -> None:
    a = make_tiny(tmp_path / "a", seed=0)
    b = _perturbed(a, tmp_path / "b", 5e-4)
    res = damage(a, b, "math", n=8, batch_size=8, later="qa", k=6, routes_n=8)
    total = res.first_order + res.second_order
    assert res.attribution_sum() == pytest.approx(total, rel=1e-9, abs=1e-12)
    assert abs(res.error) < 0.05 * abs(res.measured)  # a small step: the expansion is close
    # the remainder of a second-order expansion is third order: doubling the step multiplies it by about 8
    big = damage(a, _perturbed(a, tmp_path / "b2", 1e-3), "math", n=8, batch_size=8, later=None, k=6, routes_n=8)
    assert abs(big.error) > 5 * abs(res.error)
    assert res.second_order != 0.0
    out = res.to_json()
    assert out["top_share"]["10"] is not None and len(out["top_units"]) == 20
    (c,) = out["conflict"]
    assert c["domain_b"] == "qa" and c["n_params"] > 0 and c["k_top"] == 6 and c["k_bottom"] == 3
    assert c["eigenvalues_top"] == sorted(c["eigenvalues_top"], reverse=True)
    assert c["eigenvalues_bottom"] == sorted(c["eigenvalues_bottom"])
    assert len(c["residuals_top"]) == len(c["eigenvalues_top"]) == len(c["share_eig"]) == len(c["share_random"])
    assert c["second_order"] == pytest.approx(0.5 * c["dHd"]) and c["n_hvp"]["total"] <= 20 + 150 + 2 * 6
    assert (c["r90"] is None) == (c["r90_reason"] != "")
    html = render_damage_section(json.loads(json.dumps(out)))
    assert "<img" in html and "Conflict subspace" in html
    run = run_damage(a, b, "math", later=None, n=4, batch_size=4, run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results" / "damage_math.json").read_text())
    assert saved["measured"] == pytest.approx(run.measured) and saved["conflict"] == []
    assert saved["attribution_sum"] == pytest.approx(saved["predicted"], rel=1e-9)


class _Quadratic(torch.nn.Module):
    """L(w) = ½ wᵀAw + bᵀw: Hessian A, known eigenvalues."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(a.shape[0], dtype=torch.float64))
        self.register_buffer("a", a)
        self.register_buffer("b", b)

    def loss(self) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + self.b @ self.w


def test_lanczos_recovers_top_eigenvalues_of_a_quadratic() -> None:
    torch.manual_seed(0)
    n = 40
    eig = torch.cat([torch.tensor([50.0, 20.0, 10.0]), torch.linspace(-1.0, 1.0, n - 3)]).double()
    qmat, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    a = qmat @ torch.diag(eig) @ qmat.T
    toy = _Quadratic(a, torch.randn(n, dtype=torch.float64))

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return hvp(toy, [{}], {"w": v}, loss_fn=lambda m, _: m.loss())["w"]

    assert torch.allclose(matvec(torch.eye(n, dtype=torch.float64)[3]), a[3], atol=1e-12)
    lz = lanczos(matvec, torch.randn(n, dtype=torch.float64), k=15)
    assert lz.eigenvalues[:3].tolist() == pytest.approx([50.0, 20.0, 10.0], rel=1e-6)
    full = lanczos(matvec, torch.randn(n, dtype=torch.float64), k=n)
    assert sorted(full.eigenvalues.tolist()) == pytest.approx(sorted(eig.tolist()), abs=1e-8)
    explicit = torch.func.hessian(lambda w: 0.5 * w @ a @ w + toy.b @ w)(toy.w.detach())  # autograd, not `a`
    assert sorted(full.eigenvalues.tolist()) == pytest.approx(torch.linalg.eigvalsh(explicit).tolist(), abs=1e-8)
    v = full.vectors
    assert torch.allclose(v.T @ v, torch.eye(v.shape[1], dtype=torch.float64), atol=1e-8)


def test_layer_restriction_equals_damage_of_the_restricted_update(tmp_path: Path) -> None:
    """damage(a, b, layers=[1]) = the full analysis of a -> a + δ restricted to layer 1 (built by hand)."""
    a = make_tiny(tmp_path / "a", seed=0)
    b = _perturbed(a, tmp_path / "b", 2e-3)
    la, lb = load_model(a), load_model(b)
    pb = dict(lb.model.named_parameters())
    with torch.no_grad():
        for name, p in la.model.named_parameters():
            if ".layers.1." in name:
                p.copy_(pb[name])
    save_model(la.model, la.tokenizer, tmp_path / "b_layer1")
    sub = damage(a, b, "math", n=8, batch_size=8, later="qa", k=4, routes_n=8, layers=[1])
    ref = damage(a, tmp_path / "b_layer1", "math", n=8, batch_size=8, later="qa", k=4, routes_n=8)
    for field in ("measured", "first_order", "second_order", "loss_before"):
        assert getattr(sub, field) == pytest.approx(getattr(ref, field), rel=1e-5, abs=1e-9), field
    units = sub.to_json()["units"]
    assert all(v == 0.0 for kind in units for v in units[kind][0])  # layer 0: untouched, no attribution
    assert any(v != 0.0 for v in units["neuron"][1])
    assert all(u.startswith("L1.") for kind, ids in sub.conflict[0].shared_units.items() for u in ids)
    assert sub.to_json()["meta"]["layers"] == [1]
    with pytest.raises(CrossrouteError, match="--layers: the model has decoder layers 0-1, not 7"):
        damage(a, b, "math", n=4, batch_size=4, layers=[7])
