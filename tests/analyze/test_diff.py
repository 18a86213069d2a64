"""Streaming checkpoint diff: planted sparse updates on a tiny Qwen3 must come back exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import Qwen3Config, Qwen3ForCausalLM

from conftest import assert_close
from crossroute.analyze import diff as diff_mod
from crossroute.analyze.diff import diff_checkpoints, diff_sequence, jaccard, write_diff_results
from crossroute.core.errors import CrossrouteError
from crossroute.report.sections.diff import render_diff_section

HIDDEN, INTER, LAYERS, HEADS, KV, HEAD_DIM, VOCAB = 16, 24, 2, 4, 2, 4, 32
P = "model.layers.{}.{}.weight"


def _config(**over: int) -> Qwen3Config:
    kw = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM,
              vocab_size=VOCAB, tie_word_embeddings=False)
    kw.update(over)
    return Qwen3Config(**kw)


def _model(seed: int = 0, **over: int) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(_config(**over)).eval()


def _params(model: Qwen3ForCausalLM) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def _plant_stage1(model: Qwen3ForCausalLM) -> None:
    """Neuron L1.mlp.5, head L0.head.2 (5 entries), kv L1.kv.0 (3 entries), 4 + 2 tiny entries."""
    p = _params(model)
    with torch.no_grad():
        p[P.format(1, "mlp.gate_proj")][5, :] += 0.01
        p[P.format(1, "mlp.up_proj")][5, :] += 0.02
        p[P.format(1, "mlp.down_proj")][:, 5] += 0.03
        p[P.format(0, "self_attn.q_proj")][2 * HEAD_DIM + 1, :5] += 1e-3
        p[P.format(1, "self_attn.v_proj")][0:3, 7] += 1e-4
        p["model.embed_tokens.weight"][3, 0:4] += 3e-7
        p["lm_head.weight"][7, 0:2] += 3e-9


def _plant_stage2(model: Qwen3ForCausalLM) -> None:
    """Neuron L0.mlp.3 (gate row only) and head L0.head.2 via its o_proj columns."""
    p = _params(model)
    with torch.no_grad():
        p[P.format(0, "mlp.gate_proj")][3, :] += 0.05
        p[P.format(0, "self_attn.o_proj")][:, 2 * HEAD_DIM:3 * HEAD_DIM] += 0.002


CHANGED_STAGE1 = 16 * 3 + 5 + 3 + 4 + 2


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    model = _model()
    out = {"base": root / "base"}
    model.save_pretrained(out["base"])
    model.save_pretrained(root / "base_sharded", max_shard_size="6KB")
    _plant_stage1(model)
    out["s1"] = root / "s1"
    model.save_pretrained(out["s1"])
    model.save_pretrained(root / "s1_sharded", max_shard_size="6KB")
    _plant_stage2(model)
    out["s2"] = root / "s2"
    model.save_pretrained(out["s2"])
    out["base_sharded"], out["s1_sharded"] = root / "base_sharded", root / "s1_sharded"
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_threshold_fractions_are_exact(ckpts: dict[str, Path]) -> None:
    res = diff_checkpoints(ckpts["base"], ckpts["s1"])
    n = sum(t.numel() for t in _tensors(ckpts["base"]).values())
    assert res.numel == n
    c = CHANGED_STAGE1
    # 2 entries in (1e-9, 1e-8), 4 in (1e-7, 1e-6), the rest >= 1e-5
    expect = [n - c, n - c + 2, n - c + 2, n - c + 6, n - c + 6]
    assert res.below_fraction() == pytest.approx([e / n for e in expect], abs=0)
    js = res.to_json()
    assert js["zero_fraction"] == (n - c) / n
    hist = js["histogram"]
    assert hist["zero"] == n - c
    assert hist["zero"] + hist["underflow"] + sum(hist["counts"]) + hist["overflow"] == n
    assert js["dtype"] == "float32"
    q = next(t for t in res.tensors if t.name == P.format(0, "self_attn.q_proj"))
    assert q.numel - q.below[-1] == 5


def test_unit_scores_and_top_sets(ckpts: dict[str, Path]) -> None:
    res = diff_checkpoints(ckpts["base"], ckpts["s1"])
    a, b = _tensors(ckpts["base"]), _tensors(ckpts["s1"])
    d = {k: b[k] - a[k] for k in a}
    neuron = math.sqrt(sum(float(x.square().sum()) for x in (
        d[P.format(1, "mlp.gate_proj")][5], d[P.format(1, "mlp.up_proj")][5],
        d[P.format(1, "mlp.down_proj")][:, 5])))
    neurons = res.unit_scores["neuron"]
    assert len(neurons) == LAYERS and len(neurons[1]) == INTER
    assert neurons[1][5] == pytest.approx(neuron, rel=1e-6)
    assert max(max(row) for row in neurons) == neurons[1][5]
    assert neuron == pytest.approx(math.sqrt(16 * (0.01**2 + 0.02**2 + 0.03**2)), rel=1e-3)
    head = float(d[P.format(0, "self_attn.q_proj")][8:12].norm())
    assert res.unit_scores["head"][0][2] == pytest.approx(head, rel=1e-6)
    assert sum(res.unit_scores["head"][0]) == res.unit_scores["head"][0][2]
    kv = float(d[P.format(1, "self_attn.v_proj")][0:4].norm())
    assert res.unit_scores["kv"][1] == pytest.approx([kv, 0.0], rel=1e-6)
    assert res.top_units == {"neuron": ["L1.mlp.5"], "head": ["L0.head.2"], "kv": ["L1.kv.0"]}
    js = res.to_json()
    assert js["units"]["arch"] == "qwen3" and js["units"]["warning"] is None
    assert js["units"]["counts"]["neuron"]["per_layer"] == [INTER] * LAYERS
    assert js["layout"] == {"num_attention_heads": HEADS, "num_key_value_heads": KV, "head_dim": HEAD_DIM}
    wide = diff_checkpoints(ckpts["base"], ckpts["s1"], top_k_percent=50)
    assert wide.top_sets() == {"neuron": {"L1.mlp.5"}, "head": {"L0.head.2"}, "kv": {"L1.kv.0"}}


def test_relative_change_matches_direct_norms(ckpts: dict[str, Path]) -> None:
    res = diff_checkpoints(ckpts["base"], ckpts["s1"])
    a, b = _tensors(ckpts["base"]), _tensors(ckpts["s1"])
    name = P.format(1, "mlp.down_proj")
    t = next(t for t in res.tensors if t.name == name)
    assert t.rel_change == pytest.approx(float((b[name] - a[name]).norm() / a[name].norm()),
                                         rel=1e-6)
    gates = [P.format(i, "mlp.gate_proj") for i in range(LAYERS)]
    num = sum(float((b[g] - a[g]).square().sum()) for g in gates)
    den = sum(float(a[g].square().sum()) for g in gates)
    mods = res.module_rel_change()
    assert mods["gate_proj"] == pytest.approx(math.sqrt(num / den), rel=1e-6)
    assert mods["k_proj"] == 0.0 and mods["norm"] == 0.0
    assert set(mods) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj", "embed", "norm", "lm_head"}


def test_sequence_jaccard_and_results(ckpts: dict[str, Path], tmp_path: Path) -> None:
    seq = diff_sequence([ckpts["base"], ckpts["s1"], ckpts["s2"]])
    assert seq.stages[1].top_units == {"neuron": ["L0.mlp.3"], "head": ["L0.head.2"], "kv": []}
    assert seq.jaccard["neuron"] == [[1.0, 0.0], [0.0, 1.0]]
    assert seq.jaccard["head"] == [[1.0, 1.0], [1.0, 1.0]]
    assert seq.jaccard["kv"] == [[1.0, 0.0], [0.0, 0.0]]
    path = write_diff_results(seq, tmp_path)
    assert path == tmp_path / "results" / "diff.json"
    data = json.loads(path.read_text())
    assert data["stage_names"] == ["s1", "s2"] and data["jaccard"] == seq.jaccard
    html = render_diff_section(data)
    assert html.startswith("<section") and "<h2>" in html and html.rstrip().endswith("</section>")
    assert html.count("data:image/png;base64,") == 4  # histogram + 3 heat maps
    assert "gate_proj" in html


def test_sharded_chunked_and_split_equal_unsharded(ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(list(ckpts["s1_sharded"].glob("*.safetensors"))) > 1
    ref = diff_checkpoints(ckpts["base"], ckpts["s1"]).to_json()
    others = [diff_checkpoints(ckpts["base_sharded"], ckpts["s1_sharded"]),
              diff_checkpoints(ckpts["base"], ckpts["s1_sharded"], chunk_elems=7)]
    monkeypatch.setattr(diff_mod, "PIECE_ELEMS", 40)  # every tensor split into pieces over 3 worker threads
    others.append(diff_checkpoints(ckpts["base"], ckpts["s1"], chunk_elems=7, workers=3))
    others.append(diff_checkpoints(ckpts["base"], ckpts["s1_sharded"], chunk_elems=7, workers=3, kernel="torch"))
    for other in others:
        js = other.to_json()
        for key in ("base", "ckpt", "kernel"):
            js[key] = ref[key]
        _assert_close(js, ref)


def _assert_close(a: object, b: object) -> None:
    assert_close(a, b, rel=1e-5, abs_=1e-12)


def test_bf16_thresholds_below_resolution(tmp_path: Path) -> None:
    model = _model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "a")
    with torch.no_grad():
        _params(model)[P.format(0, "mlp.up_proj")][0, 0] += 0.25
    model.save_pretrained(tmp_path / "b")
    js = diff_checkpoints(tmp_path / "a", tmp_path / "b").to_json()
    assert js["dtype"] == "bfloat16"
    assert js["below_resolution"] == [True] * 5
    one = diff_checkpoints(tmp_path / "a", tmp_path / "b", thresholds=(1e-5,))
    assert one.to_json()["below_fraction"] == [1 - 1 / one.numel]


def test_shape_and_name_mismatch_name_the_tensor(ckpts: dict[str, Path], tmp_path: Path) -> None:
    _model(intermediate_size=32).save_pretrained(tmp_path / "wide")
    with pytest.raises(CrossrouteError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has "
                       r"shape \(16, 24\) in A but \(16, 32\) in B"):
        diff_checkpoints(ckpts["base"], tmp_path / "wide")
    _model(num_hidden_layers=3).save_pretrained(tmp_path / "deep")
    with pytest.raises(CrossrouteError, match=r"'model\.layers\.2\.input_layernorm\.weight' is "
                       r"in B but not in A"):
        diff_checkpoints(ckpts["base"], tmp_path / "deep")


def test_missing_empty_and_pickle_only_checkpoints(ckpts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CrossrouteError, match="does not exist"):
        diff_checkpoints(ckpts["base"], tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CrossrouteError, match="no model.safetensors"):
        diff_checkpoints(tmp_path / "empty", ckpts["base"])
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CrossrouteError, match="pickle.*safe_serialization=True"):
        diff_checkpoints(ckpts["base"], pickled)
    with pytest.raises(CrossrouteError, match="at least two"):
        diff_sequence([ckpts["base"]])


@given(st.sets(st.integers(0, 20)), st.sets(st.integers(0, 20)))
def test_jaccard_properties(a: set[int], b: set[int]) -> None:
    j = jaccard(a, b)
    assert j == jaccard(b, a)
    assert 0.0 <= j <= 1.0
    if a:
        assert jaccard(a, set(a)) == 1.0
    if not a and not b:
        assert j == 0.0
    assert (j == 1.0) == (bool(a) and a == b)


def test_threshold_counts_exact_at_the_boundary(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    tau = torch.tensor(1e-7, dtype=torch.float32)
    below = torch.nextafter(tau, torch.tensor(0.0))
    above = torch.nextafter(tau, torch.tensor(1.0))
    delta = torch.stack([tau, below, below, above, tau * 0.999, tau * 1.001, torch.tensor(0.0)])
    base = torch.full((3, 7), 0.0)
    for sub, value in (("a", base), ("b", base + delta)):
        (tmp_path / sub).mkdir()
        save_file({"model.norm.weight": value}, str(tmp_path / sub / "model.safetensors"))
    res = diff_checkpoints(tmp_path / "a", tmp_path / "b", thresholds=(1e-7,), chunk_elems=7)
    assert res.tensors[0].below == [3 * 4]  # below, below, 0.999 τ, 0 in each of 3 rows
    assert res.histogram.zero == 3


@given(st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_sparse_and_dense_binning_agree(zero_share: float, seed: int) -> None:
    """The sparse path (scatter only changed entries) gives the dense path's exact counts."""
    gen = torch.Generator().manual_seed(seed)
    absd = (torch.randn(4096, generator=gen) * 10 ** torch.empty(4096).uniform_(-11, -1, generator=gen)).abs()
    absd[torch.rand(4096, generator=gen) < zero_share] = 0.0
    absd[:3] = torch.tensor([1e-7, 1e-6, 1e-8])  # entries exactly at thresholds
    out = []
    for share in (0.25, -1.0):  # -1: never sparse
        binner = diff_mod._Binner(diff_mod.THRESHOLDS)
        counts, fixes = torch.zeros(diff_mod._N_KEYS, dtype=torch.int64), [0] * len(diff_mod.THRESHOLDS)
        old, diff_mod._SPARSE_SHARE = diff_mod._SPARSE_SHARE, share
        try:
            binner.block(absd.clone(), torch.empty(4096, dtype=torch.int32), torch.ones(4096, dtype=torch.int64),
                         counts, fixes)
        finally:
            diff_mod._SPARSE_SHARE = old
        out.append((binner.below(counts, fixes), binner.histogram(counts)))
    assert out[0] == out[1]
    assert out[0][0] == [int((absd < t).sum()) for t in diff_mod.THRESHOLDS]


@given(st.lists(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.25]), max_size=6), min_size=1, max_size=4),
       st.floats(0.0, 100.0))
def test_top_units_order(per_layer: list[list[float]], pct: float) -> None:
    """Top units = a plain sort by (-score, layer, index), zeros dropped (ties broken the same way)."""
    flat = sorted(((s, layer, j) for layer, row in enumerate(per_layer) for j, s in enumerate(row)),
                  key=lambda t: (-t[0], t[1], t[2]))
    k = math.ceil(len(flat) * pct / 100.0) if flat and pct > 0 else 0
    want = [f"L{layer}.mlp.{j}" for s, layer, j in flat[:k] if s > 0]
    assert diff_mod._top_units({"neuron": per_layer}, pct) == {"neuron": want}
