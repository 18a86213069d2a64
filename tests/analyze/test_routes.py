"""Active routes: hook-measured activity is exact, active sets are the top-q % per layer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from conftest import TINY, make_tiny
from crossroute.analyze.diff import jaccard
from crossroute.analyze.routes import (
    active_sets,
    changed_vs_active,
    measure_activity,
    route_overlap,
    run_routes,
    top_count,
)
from crossroute.domains.builtin import BUILTIN
from crossroute.measure.proxy import make_batches
from crossroute.model.default import build_default_model
from crossroute.report.sections.routes import render_routes_section


def _tiny(seed: int = 0, **over: int):
    model, tok = build_default_model(seed, **{**TINY, **over})
    return model.eval(), tok


def test_mlp_activity_equals_mlp_run_by_hand() -> None:
    model, tok = _tiny(1)
    examples = BUILTIN["math"].examples("eval", 12, seed=0)
    got = measure_activity(model, tok, BUILTIN["math"], n=12, batch_size=5)
    # capture each MLP's input hidden states, then run gate/up/act by hand
    captured: dict[int, list[torch.Tensor]] = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda mod, args, i=i: captured.setdefault(i, []).append(args[0].detach()))
        for i, layer in enumerate(model.model.layers)]
    batches = make_batches(tok, examples, 5)
    with torch.no_grad():
        for b in batches:
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        total, count = torch.zeros(TINY["intermediate_size"], dtype=torch.float64), 0
        for x, b in zip(captured[i], batches, strict=True):
            act = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
            keep = b["attention_mask"].bool()
            total += act[keep].abs().double().sum(0)
            count += int(keep.sum())
        torch.testing.assert_close(got[f"L{i}.mlp"], (total / count).float(), rtol=1e-5, atol=1e-7)
        assert got[f"L{i}.head"].shape == (TINY["num_attention_heads"],)


def test_planted_units_zero_and_top() -> None:
    model, tok = _tiny(2, num_key_value_heads=2)  # one KV group per head
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[3].zero_()  # act(0)·up = 0 exactly
            layer.mlp.gate_proj.weight[7] *= 8.0
            layer.mlp.up_proj.weight[7] *= 8.0
            hd = TINY["head_dim"]
            layer.self_attn.v_proj.weight[hd:2 * hd].zero_()  # head 1 outputs softmax·0 = 0
    act = measure_activity(model, tok, "code", n=10, batch_size=4)
    for i in range(TINY["num_hidden_layers"]):
        assert act[f"L{i}.mlp"][3].item() == 0.0
        assert int(act[f"L{i}.mlp"].argmax()) == 7
        assert act[f"L{i}.head"][1].item() == 0.0
        assert act[f"L{i}.head"][0].item() > 0.0
    sets = active_sets(act, q=5.0)  # 2 of 32 neurons, 1 of 2 heads per layer
    assert {"L0.mlp.7", "L1.mlp.7"} <= sets["neuron"]
    assert sets["head"] == {"L0.head.0", "L1.head.0"}


def test_padding_does_not_change_activity() -> None:
    model, tok = _tiny(3)
    a = measure_activity(model, tok, "qa", n=9, batch_size=9)
    b = measure_activity(model, tok, "qa", n=9, batch_size=1)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_active_sets_pick_top_q_per_layer() -> None:
    activity = {
        "L0.mlp": torch.arange(10.0),  # top 20 %: indices 9, 8
        "L1.mlp": torch.tensor([5.0, 1.0, 7.0, 7.0, 0.0, 2.0, 9.0, 3.0, 4.0, 6.0] * 2),  # 4 of 20
        "L0.head": torch.tensor([0.1, 0.4, 0.2, 0.3]),  # ceil(0.8) = 1
        "L1.head": torch.tensor([1.0, 1.0]),  # tie: lower index
    }
    sets = active_sets(activity, q=20.0)
    assert sets["neuron"] == {"L0.mlp.9", "L0.mlp.8", "L1.mlp.6", "L1.mlp.16", "L1.mlp.2",
                              "L1.mlp.3"}
    assert sets["head"] == {"L0.head.1", "L1.head.0"}
    assert active_sets(activity, q=0.1)["head"] == {"L0.head.1", "L1.head.0"}  # >= 1 per layer
    assert top_count(10, 10.0) == 1 and top_count(100, 10.0) == 10 and top_count(3, 100.0) == 3
    assert top_count(32, 10.0) == math.ceil(3.2)


def test_route_overlap_and_changed_vs_active() -> None:
    a = {"L0.mlp": torch.tensor([3.0, 2.0, 1.0, 0.0]), "L0.head": torch.tensor([1.0, 0.0])}
    b = {"L0.mlp": torch.tensor([3.0, 0.0, 1.0, 2.0]), "L0.head": torch.tensor([0.0, 1.0])}
    m = route_overlap({"a": a, "b": b, "c": a}, q=50.0)
    for kind in ("neuron", "head"):
        assert [m[kind][i][i] for i in range(3)] == [1.0, 1.0, 1.0]
        assert m[kind][0][2] == 1.0
    assert m["neuron"][0][1] == jaccard({0, 1}, {0, 3}) == 1 / 3
    assert m["head"][0][1] == 0.0
    ov = changed_vs_active({"L0.mlp.0", "L0.mlp.5", "L1.mlp.2"},
                           {"L0.mlp.0", "L1.mlp.2", "L1.mlp.3"})
    assert ov.intersection == 2 and ov.share_of_changed == 2 / 3 and ov.jaccard == 0.5
    assert changed_vs_active(set(), {"L0.mlp.0"}).share_of_changed is None


def test_run_routes_writes_json_and_renders(tmp_path: Path) -> None:
    ckpt = make_tiny(tmp_path / "ckpt", seed=4)
    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    diff = {"checkpoints": ["base", "01_math"], "stage_names": ["01_math"],
            "stages": [{"ckpt": "01_math", "top_units": {"neuron": ["L0.mlp.1", "L1.mlp.2"],
                                                           "head": ["L0.head.0"], "kv": []}}]}
    (run / "results" / "diff.json").write_text(json.dumps(diff))
    res = run_routes(ckpt, "math,code", n=8, q=10.0, run_dir=run, batch_size=4, device="cpu")
    data = json.loads((run / "results" / "routes.json").read_text())
    assert data["domains"] == ["math", "code"]
    assert data["layout"]["num_layers"] == TINY["num_hidden_layers"]
    assert len(data["active"]["math"]["neuron"]) == TINY["num_hidden_layers"] * 4  # ceil(3.2)
    assert [data["jaccard"]["neuron"][i][i] for i in range(2)] == [1.0, 1.0]
    assert res.active_sets()["code"]["head"] == set(data["active"]["code"]["head"])
    rows = data["changed_vs_active"]
    assert {(r["stage"], r["domain"], r["kind"]) for r in rows} == {
        ("01_math", d, k) for d in ("math", "code") for k in ("neuron", "head", "kv")}
    # kv groups come from the unit map: TINY has one KV group for its 2 heads
    assert data["kinds"] == ["neuron", "head", "kv"] and set(data["jaccard"]) == {"neuron", "head", "kv"}
    assert data["active"]["math"]["kv"] == [f"L{i}.kv.0" for i in range(TINY["num_hidden_layers"])]
    assert data["measured"] == {f"L{i}": ["neuron", "head"] for i in range(TINY["num_hidden_layers"])}
    assert data["units"]["arch"] == "qwen3" and data["units"]["head_layout"]["head_dim"] == TINY["head_dim"]
    assert data["layout"]["num_heads"] == TINY["num_attention_heads"] and data["notes"] == []
    assert all(r["own"] == (r["domain"] == "math") for r in rows)
    page = render_routes_section(data)
    assert page.startswith("<section") and "<h2>Active routes</h2>" in page
    assert page.count("<img") >= 4 and "Top-changed units vs active routes" in page
