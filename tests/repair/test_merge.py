"""SLERP/linear/transplant math, mergekit-style t schedules, exact global top-p % core masks, streaming merges."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import make_tiny
from crossroute.core.errors import CrossrouteError
from crossroute.model.load import load_model
from crossroute.repair.merge import (
    core_masks,
    evaluate_t,
    layer_position,
    linear,
    load_index_masks,
    load_t_schedule,
    mask_jaccard,
    merge_checkpoints,
    run_merge,
    save_index_masks,
    slerp,
    slerp_flagged,
    t_for,
    transplant,
    transplant_cores,
)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_slerp_orthogonal_unit_vectors_by_hand() -> None:
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.allclose(out, torch.tensor([1 / math.sqrt(2), 1 / math.sqrt(2)]), atol=1e-7)
    # t = 1/3 of a right angle: (cos 30°, sin 30°)
    out = slerp(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 1 / 3)
    assert torch.allclose(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]), atol=1e-6)


def test_slerp_colinear_falls_back_to_linear() -> None:
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])
    out, lin = slerp_flagged(a, b, 0.25)
    assert lin and torch.allclose(out, torch.tensor([1.5, 0.0]))
    assert torch.allclose(slerp(a, -b, 0.5), linear(a, -b, 0.5))  # antipodal: linear too
    assert slerp_flagged(torch.zeros(2), b, 0.5)[1]  # zero norm: linear
    assert not slerp_flagged(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.1]), 0.5)[1]


vec = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=2, max_size=8)


@settings(max_examples=60, deadline=None)
@given(vec, vec)
def test_slerp_endpoints(xa: list[float], xb: list[float]) -> None:
    n = min(len(xa), len(xb))
    a, b = torch.tensor(xa[:n]), torch.tensor(xb[:n])
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-4, rtol=1e-4)


@settings(max_examples=60, deadline=None)
@given(vec, vec, st.floats(0, 1))
def test_slerp_keeps_unit_norm(xa: list[float], xb: list[float], t: float) -> None:
    n = min(len(xa), len(xb))
    a, b = torch.tensor(xa[:n]), torch.tensor(xb[:n])
    if a.norm() < 1e-3 or b.norm() < 1e-3:
        return
    a, b = a / a.norm(), b / b.norm()
    out, lin = slerp_flagged(a, b, t)
    if not lin:
        assert abs(float(out.norm()) - 1.0) < 1e-4
    else:  # colinear: linear interpolation never leaves the unit ball
        assert float(out.norm()) <= 1.0 + 1e-5


def test_t_schedule_gradient_like_mergekit() -> None:
    grad = [0, 0.5, 0.3, 0.7, 1]
    # 3 layers sit at x = 0, 0.5, 1 -> anchors 0, 2, 4
    assert [evaluate_t(grad, "", layer_position(f"model.layers.{i}.mlp.up_proj.weight", 3)) for i in range(3)] == [
        0.0, 0.3, 1.0]
    # 9 layers: layer 1 at x = 1/8 -> halfway between anchors 0 and 1
    assert evaluate_t(grad, "", layer_position("model.layers.1.x", 9)) == pytest.approx(0.25)
    sched = load_t_schedule("t: [{filter: self_attn, value: [0, 1]}, {filter: mlp, value: 0.2}, {value: 0.5}]")
    assert t_for(sched, "model.layers.0.self_attn.q_proj.weight", 3) == 0.0
    assert t_for(sched, "model.layers.1.self_attn.q_proj.weight", 3) == pytest.approx(0.5)
    assert t_for(sched, "model.layers.2.mlp.down_proj.weight", 3) == pytest.approx(0.2)
    assert t_for(sched, "model.norm.weight", 3) == 0.5
    assert layer_position("model.embed_tokens.weight", 3) == 0.0 and layer_position("lm_head.weight", 3) == 1.0
    full = load_t_schedule({"merge_method": "slerp", "parameters": {"t": [{"filter": "mlp", "value": 0.1}]}})
    with pytest.raises(CrossrouteError, match="no entry matches"):
        t_for(full, "model.norm.weight", 3)
    with pytest.raises(CrossrouteError, match="t\\[0\\]"):
        load_t_schedule([{"filtr": "mlp", "value": 1}])


def test_transplant_and_collision_rule() -> None:
    base = torch.zeros(4)
    assert torch.equal(transplant(base, torch.ones(4), torch.tensor([1, 3])), torch.tensor([0.0, 1, 0, 1]))
    assert torch.equal(transplant(base, torch.ones(4), torch.tensor([True, False, False, False])),
                       torch.tensor([1.0, 0, 0, 0]))
    d1, d2 = torch.tensor([1.0, 0, 3, 5]), torch.tensor([-2.0, 7, -1, 5])
    out, collisions, moved = transplant_cores(base, [d1, d2], [torch.tensor([0, 2, 3]), torch.tensor([0, 1, 2, 3])])
    # entry 0: |-2| > |1| -> d2; entry 2: |3| > |-1| -> d1; entry 3: tie -> the earlier donor (d1)
    assert torch.equal(out, torch.tensor([-2.0, 7, 3, 5]))
    assert (collisions, moved) == (3, 4)


def _ckpt(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    return path


def test_core_mask_exact_top_p_with_deterministic_ties(tmp_path: Path) -> None:
    zero = {"a": torch.zeros(10), "b": torch.zeros(2, 5)}
    base = _ckpt(tmp_path / "base", zero)
    da = torch.tensor([5.0, -4, 3, 3, -3, 0, 0, 0, 0, 0])
    db = torch.zeros(2, 5)
    db[0, 0] = 3.0
    other = _ckpt(tmp_path / "other", {"a": da, "b": db})
    masks, stats = core_masks(base, other, 25.0)  # k = ceil(20 * 0.25) = 5: 5, 4 and three of four 3s
    assert stats["k"] == 5 and stats["numel"] == 20
    assert masks["a"].tolist() == [0, 1, 2, 3, 4] and masks["b"].numel() == 0
    masks, _ = core_masks(base, other, 30.0)  # k = 6: every 3 is in
    assert masks["a"].tolist() == [0, 1, 2, 3, 4] and masks["b"].tolist() == [0]
    path = save_index_masks(masks, tmp_path / "m.safetensors")
    back = load_index_masks(path)
    assert back["a"].dtype == torch.int64 and mask_jaccard(back, masks) == 1.0
    assert mask_jaccard(back, {"a": torch.tensor([0, 9])}) == pytest.approx(1 / 7)


def test_core_mask_matches_topk_on_random_update(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base_t = {"x": torch.randn(40, 30, generator=g), "y": torch.randn(500, generator=g)}
    other_t = {k: v + torch.randn(v.shape, generator=g) * 0.01 for k, v in base_t.items()}
    base, other = _ckpt(tmp_path / "b", base_t), _ckpt(tmp_path / "o", other_t)
    masks, stats = core_masks(base, other, 2.0)
    delta = torch.cat([(other_t[k] - base_t[k]).reshape(-1) for k in ("x", "y")]).abs()
    k = math.ceil(delta.numel() * 0.02)
    picked = torch.cat([masks["x"], masks["y"] + 1200])
    assert picked.numel() == k == stats["k"]
    assert set(picked.tolist()) == set(torch.topk(delta, k).indices.tolist())


def test_streaming_merges_on_tiny_checkpoints(tmp_path: Path) -> None:
    a, b = make_tiny(tmp_path / "a", 0), make_tiny(tmp_path / "b", 1)
    out = run_merge("slerp", a, [b], tmp_path / "s0", t=0.0)
    sa, s0 = load_model(a).model.state_dict(), load_model(out).model.state_dict()
    assert all(torch.equal(sa[k], s0[k]) for k in sa)  # t = 0 is the base, bit for bit
    sched = tmp_path / "t.yaml"
    sched.write_text("parameters:\n  t:\n    - {filter: self_attn, value: [0, 1]}\n    - {value: 0.5}\n")
    out = run_merge("linear", a, [b], tmp_path / "lin", t_schedule_yaml=sched)
    sb, sl = load_model(b).model.state_dict(), load_model(out).model.state_dict()
    q1 = "model.layers.1.self_attn.q_proj.weight"
    up = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(sl[q1], sb[q1]) and torch.allclose(sl[up], 0.5 * (sa[up] + sb[up]))
    assert (out / "tokenizer.json").exists() and json.loads((out / "merge.json").read_text())["method"] == "linear"
    stats = merge_checkpoints("transplant", a, [b], tmp_path / "tr", top_percent=1.0)
    assert stats["transplanted"] > 0 and stats["collisions"] == 0
    with pytest.raises(CrossrouteError, match="exactly one"):
        merge_checkpoints("slerp", a, [b, b], tmp_path / "x")
