"""Gradient conflict: exact proxy-loss gradients (batching-invariant, finite differences)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, make_tiny
from crossroute.analyze.conflict import module_cosines, run_conflict
from crossroute.core.errors import CrossrouteError
from crossroute.domains.base import Example
from crossroute.domains.builtin import BUILTIN
from crossroute.measure.proxy import domain_gradient, make_batches, mean_proxy_loss, proxy_loss
from crossroute.model.default import build_default_model
from crossroute.model.units import UnitMap
from crossroute.report.sections.conflict import render_conflict_section


def _tiny64(seed: int = 0):
    model, tok = build_default_model(seed, **TINY)
    return model.double().eval(), tok


def test_make_batches_labels_only_answers() -> None:
    _, tok = build_default_model(0, **TINY)
    batches = make_batches(tok, [Example("M:1+2=", "3"), Example("M:10+20=", "30")], 2)
    (b,) = batches
    ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
    assert mask[0].tolist() == [1] * 8 + [0] * 3  # right padded: 6 prompt + "3" + eos
    assert labels[0].tolist() == [-100] * 6 + [ids[0, 6].item(), tok.eos_token_id] + [-100] * 3
    assert labels[1].tolist()[-3:] == [ids[1, 8].item(), ids[1, 9].item(), tok.eos_token_id]
    assert (labels[1, :8] == -100).all()


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool(torch.linalg.vector_norm(a - b) <= rel * torch.linalg.vector_norm(b) + 1e-15)


def test_microbatching_does_not_change_gradient() -> None:
    model, tok = _tiny64(1)
    g1 = domain_gradient(model, tok, "math", n=6, batch_size=1)
    g6 = domain_gradient(model, tok, "math", n=6, batch_size=6)
    g4 = domain_gradient(model, tok, "math", n=6, batch_size=4)
    names = [k for k, _ in model.named_parameters()]
    assert set(g1) == set(names)
    # autograd of the proxy loss on one un-batched pass over all six examples
    (batch,) = make_batches(tok, BUILTIN["math"].examples("train", 6, seed=0), 6)
    ref = torch.autograd.grad(proxy_loss(model, batch), list(model.parameters()))
    for k, r in zip(names, ref, strict=True):
        assert _close(g1[k], g6[k], 1e-6) and _close(g4[k], g6[k], 1e-6)
        assert _close(g4[k], r.float(), 1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_matches_finite_difference() -> None:
    """Central difference along a random unit direction v: (L(θ+hv) − L(θ−hv)) / 2h ≈ gᵀv.

    Qwen3's RMSNorm and rotary embedding compute in fp32 even in a float64 model, so the loss is
    only ~1e-8 exact: a large h along a whole direction keeps the estimate to ~1e-4.
    """
    model, tok = _tiny64(2)
    g = domain_gradient(model, tok, "code", n=5, batch_size=2)
    batches = make_batches(tok, BUILTIN["code"].examples("train", 5, seed=0), 3)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}
    norm = torch.sqrt(sum((x * x).sum() for x in v.values()))
    old = {k: p.detach().clone() for k, p in params.items()}

    def loss_at(t: float) -> float:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(old[k] + t * v[k] / norm)
            out = mean_proxy_loss(model, batches)
            for k, p in params.items():
                p.copy_(old[k])
        return out

    h = 1e-2
    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    gv = float(sum((g[k].double() * v[k]).sum() for k in g) / norm)
    assert gv == pytest.approx(fd, rel=1e-3)
    # one coordinate too (coarser: a single entry's derivative is small next to the noise)
    name, idx = "model.layers.0.mlp.up_proj.weight", (3, 5)
    p, x0 = params[name], old[name][idx].item()
    with torch.no_grad():
        p[idx] = x0 + 1e-3
        up = mean_proxy_loss(model, batches)
        p[idx] = x0 - 1e-3
        down = mean_proxy_loss(model, batches)
        p[idx] = x0
    assert g[name][idx].item() == pytest.approx((up - down) / 2e-3, rel=2e-2)


def _fake(values: dict[str, list[float]]) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v) for k, v in values.items()}


def test_cosine_with_itself_and_negation() -> None:
    model, tok = build_default_model(3, **TINY)
    g = domain_gradient(model.eval(), tok, "qa", n=4, batch_size=4)
    module_of = UnitMap.of_model(model).module_of
    same = module_cosines(g, g, module_of)
    neg = module_cosines(g, {k: -v for k, v in g.items()}, module_of)
    assert same.global_cosine == pytest.approx(1.0) and neg.global_cosine == pytest.approx(-1.0)
    assert len(same.modules) == 7 * TINY["num_hidden_layers"]
    for m in same.modules:
        assert m.cosine == pytest.approx(1.0, abs=1e-9)
    for m in neg.modules:
        assert m.cosine == pytest.approx(-1.0, abs=1e-9)
    assert {o.kind for o in same.other} == {"other"}  # norms, embeddings
    assert all(v == pytest.approx(1.0) for row in same.matrix() for v in row)


def test_named_conflict_and_synergy_cancel_globally() -> None:
    q, up = "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
    down = "model.layers.0.mlp.down_proj.weight"
    ga = _fake({q: [1.0, 2.0], up: [2.0, 1.0], down: [1.0, 0.0], "model.norm.weight": [0.0]})
    gb = _fake({q: [-1.0, -2.0], up: [2.0, 1.0], down: [0.0, 1.0], "model.norm.weight": [0.0]})
    where = {q: (1, "q"), up: (0, "up"), down: (0, "down"), "model.norm.weight": None}
    res = module_cosines(ga, gb, where.get)
    assert res.most_conflicting == "model.layers.1.self_attn.q_proj"
    assert res.most_synergistic == "model.layers.0.mlp.up_proj"
    assert res.global_cosine == pytest.approx(0.0, abs=1e-12)
    assert res.module_kinds == ["q", "up", "down"]  # the kinds present, in MODULE_KINDS order
    matrix = res.matrix()
    assert matrix[1][0] == pytest.approx(-1.0) and matrix[0][1] == pytest.approx(1.0)
    assert matrix[0][2] == pytest.approx(0.0) and matrix[0][0] is None
    out = res.to_json()
    assert out["dot_split"] == {"positive": 5.0, "negative": -5.0}
    assert out["most_conflicting"]["layer"] == 1 and out["most_conflicting"]["kind"] == "q"
    assert res.other[0].cosine is None  # zero gradient: undefined, not a number
    json.dumps(out)


def test_run_conflict_writes_json_and_renders(tmp_path: Path) -> None:
    ckpt = make_tiny(tmp_path / "ckpt", seed=5)
    res = run_conflict(ckpt, "math", "code", n=6, batch_size=3, run_dir=tmp_path / "run",
                       device="cpu")
    data = json.loads((tmp_path / "run" / "results" / "conflict_math_code.json").read_text())
    assert data["domain_a"] == "math" and data["domain_b"] == "code"
    assert len(data["matrix"]) == TINY["num_hidden_layers"]
    assert data["module_kinds"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert data["global_cosine"] == pytest.approx(res.global_cosine)
    assert data["loss_a"] > 0 and data["loss_b"] > 0
    page = render_conflict_section([data])
    assert page.startswith("<section") and "<img" in page and "most conflicting" in page
    sub = run_conflict(ckpt, "math", "code", n=6, batch_size=3, device="cpu", layers=[1]).to_json()
    assert sub["matrix"][1] == pytest.approx(data["matrix"][1])  # layer 1's per-module cosines are unchanged
    assert all(c is None for c in sub["matrix"][0])  # layer 0 was not differentiated
    assert sub["meta"]["layers"] == [1] and sub["global_cosine"] != pytest.approx(res.global_cosine)


def test_rubric_only_domain_refused(tmp_path: Path) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"write {i}", "rubric": {"n_words": 2},
                                       "split": "train"}) for i in range(3)))
    model, tok = build_default_model(0, **TINY)
    with pytest.raises(CrossrouteError, match="no reference answers"):
        domain_gradient(model, tok, f"r={f}", n=3)
