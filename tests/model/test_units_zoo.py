"""The declarative unit table against real transformers layouts: a zoo of tiny random checkpoints.

Every expected slice here is computed by hand from the HF modeling code (not from the table), and the
functional checks compare weight surgery through `UnitMap.select(...).put` with activation surgery
through forward pre-hooks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from crossroute.model import units as U  # noqa: E402
from crossroute.model.units import CrossrouteError, UnitMap, dims_from_config, parse_unit_id, unit_id  # noqa: E402
from zoo import FAMILIES, zoo_checkpoint  # noqa: E402

torch.set_num_threads(1)

_CACHE: dict[str, dict] = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """family -> {"path", "cfg", "model" (float64, eval), "mem": UnitMap, "disk": UnitMap, "disk_shapes"}."""
    from transformers import AutoModelForCausalLM

    def get(family: str) -> dict:
        if family not in _CACHE:
            path = zoo_checkpoint(family, tmp_path_factory)
            cfg = json.loads((path / "config.json").read_text())
            # float64 for exact comparisons; the default grouped_mm MoE kernel has no float64, so use the eager
            # expert loop there (test_functional_moe_expert_and_disk_names also checks the default kernel)
            kw = {"experts_implementation": "eager"} if family == "qwen3_moe" else {}
            model = AutoModelForCausalLM.from_pretrained(path, **kw).double().eval()
            with safe_open(str(path / "model.safetensors"), "pt") as fh:
                disk = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
            _CACHE[family] = dict(path=path, cfg=cfg, model=model, mem=UnitMap.of_model(model),
                                  disk=UnitMap.build(cfg, disk.items()), disk_shapes=disk)
        return _CACHE[family]

    return get


def expected_counts(cfg: dict) -> dict[str, list[int]]:
    """Units per layer straight from config.json (independent of the table)."""
    if cfg["model_type"] == "gpt2":
        layers, heads, kv = cfg["n_layer"], cfg["n_head"], cfg["n_head"]
        inter = cfg.get("n_inner") or 4 * cfg["n_embd"]
    else:
        layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        kv, inter = cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0  # 5.23 saves num_local_experts
    only, step = cfg.get("mlp_only_layers") or [], cfg.get("decoder_sparse_step") or 1
    sparse = [experts > 0 and ly not in only and (ly + 1) % step == 0 for ly in range(layers)]
    return {"neuron": [experts * cfg["moe_intermediate_size"] if s else inter for s in sparse],
            "head": [heads] * layers, "kv": [kv] * layers,
            "router": [experts if s else 0 for s in sparse], "expert": [experts if s else 0 for s in sparse]}


UNIT_TOKENS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "c_attn", "query_key_value", "gate_up", "experts",
               "dense_h_to_4h", "dense_4h_to_h", "gate_proj", "up_proj", "down_proj", "c_fc", "mlp.gate.",
               "attention.dense", "c_proj")
OUTPUT_BIASES = ("o_proj.bias", "c_proj.bias", "attention.dense.bias", "dense_4h_to_h.bias", "down_proj.bias")


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_memory_and_disk(zoo, family):
    z = zoo(family)
    want = expected_counts(z["cfg"])
    model = z["model"]
    for um, shapes in ((z["mem"], {n: tuple(p.shape) for n, p in model.named_parameters()}),
                       (z["disk"], z["disk_shapes"])):
        assert um.arch is not None and um.warning is None
        assert um.counts == want, family
        leaked = [n for n in um.others if any(t in n for t in UNIT_TOKENS) and not n.endswith(OUTPUT_BIASES)]
        assert leaked == []
        # the partition covers every entry exactly once; "expert" = router row + its neurons
        sums = um.reduce({n: torch.ones(s) for n, s in shapes.items()})
        total = sum(float(torch.cat(sums[k]).sum()) for k in U.PARTITION_KINDS) + float(sums["other"].sum())
        assert total == sum(torch.Size(s).numel() for s in shapes.values())
        if want["expert"][-1]:
            hidden = z["cfg"]["hidden_size"]
            per_expert = hidden * (1 + 3 * z["cfg"]["moe_intermediate_size"])
            assert sums["expert"][1].tolist() == [per_expert] * want["expert"][1]
        assert len(um.ids("head")) == um.n_units("head") == sum(want["head"])
        assert um.to_json()["counts"]["neuron"]["per_layer"] == want["neuron"]
    assert z["mem"].head_layout.num_heads == want["head"][0]


def _plant(shape, index) -> torch.Tensor:
    d = torch.zeros(shape, dtype=torch.float64)
    block = d[index]
    d[index] = torch.rand(block.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    return d


# (family, map, tensor name, index computed by hand from the HF modeling layout, expected units)
_Q = "model.layers.0.self_attn."
PLANTED = [
    # phi3: qkv_proj rows = [q: H*hd | k: KV*hd | v: KV*hd] (modeling_phi3 query_pos slicing)
    ("phi3", "mem", _Q + "qkv_proj.weight", (slice(16, 24),), ["L0.head.2"]),
    ("phi3", "mem", _Q + "qkv_proj.weight", (slice(32 + 8, 32 + 16),), ["L0.kv.1"]),
    ("phi3", "mem", _Q + "qkv_proj.weight", (slice(48, 56),), ["L0.kv.0"]),
    ("phi3", "mem", _Q + "o_proj.weight", (slice(None), slice(8, 16)), ["L0.head.1"]),
    ("phi3", "mem", "model.layers.1.mlp.gate_up_proj.weight", ([48 + 5],), ["L1.mlp.5"]),  # up half, neuron 5
    ("phi3", "mem", "model.layers.1.mlp.down_proj.weight", (slice(None), [7]), ["L1.mlp.7"]),
    # gpt_neox: query_key_value rows viewed as [H, 3*hd] then chunk(3): head h = rows h*24 + [q 0:8 | k 8:16 | v 16:24]
    ("gpt_neox", "mem", "gpt_neox.layers.0.attention.query_key_value.weight", (slice(24, 32),), ["L0.head.1"]),
    ("gpt_neox", "mem", "gpt_neox.layers.0.attention.query_key_value.weight", (slice(48 + 8, 48 + 16),), ["L0.kv.2"]),
    ("gpt_neox", "mem", "gpt_neox.layers.0.attention.query_key_value.bias", (slice(72 + 16, 96),), ["L0.kv.3"]),
    ("gpt_neox", "mem", "gpt_neox.layers.1.attention.dense.weight", (slice(None), slice(0, 8)), ["L1.head.0"]),
    ("gpt_neox", "mem", "gpt_neox.layers.0.mlp.dense_h_to_4h.bias", ([9],), ["L0.mlp.9"]),
    ("gpt_neox", "mem", "gpt_neox.layers.0.mlp.dense_4h_to_h.weight", (slice(None), [9]), ["L0.mlp.9"]),
    # gpt2 Conv1D weight [in, out]: c_attn columns = [q | k | v] (split(split_size, dim=2)), heads contiguous
    ("gpt2", "mem", "transformer.h.0.attn.c_attn.weight", (slice(None), slice(24, 32)), ["L0.head.3"]),
    ("gpt2", "mem", "transformer.h.0.attn.c_attn.weight", (slice(None), slice(40, 48)), ["L0.kv.1"]),
    ("gpt2", "disk", "transformer.h.0.attn.c_attn.bias", (slice(64, 72),), ["L0.kv.0"]),
    ("gpt2", "mem", "transformer.h.1.attn.c_proj.weight", (slice(16, 24), slice(None)), ["L1.head.2"]),
    ("gpt2", "mem", "transformer.h.1.mlp.c_fc.weight", (slice(None), [100]), ["L1.mlp.100"]),
    ("gpt2", "mem", "transformer.h.1.mlp.c_fc.bias", ([100],), ["L1.mlp.100"]),
    ("gpt2", "mem", "transformer.h.1.mlp.c_proj.weight", ([100], slice(None)), ["L1.mlp.100"]),
    # qwen2: q/k/v biases
    ("qwen2", "mem", _Q + "q_proj.bias", (slice(8, 16),), ["L0.head.1"]),
    ("qwen2", "disk", _Q + "v_proj.bias", (slice(8, 16),), ["L0.kv.1"]),
    # qwen3_moe in memory: gate_up_proj [E, 2I, H] (gate = first I rows, .chunk(2, -1)), down_proj [E, H, I]
    ("qwen3_moe", "mem", "model.layers.1.mlp.experts.gate_up_proj", (2, [8 + 3]), ["L1.mlp.19", "L1.expert.2"]),
    ("qwen3_moe", "mem", "model.layers.1.mlp.experts.down_proj", (1, slice(None), [5]), ["L1.mlp.13", "L1.expert.1"]),
    ("qwen3_moe", "mem", "model.layers.1.mlp.gate.weight", ([3],), ["L1.router.3", "L1.expert.3"]),
    ("qwen3_moe", "mem", "model.layers.0.mlp.down_proj.weight", (slice(None), [40]), ["L0.mlp.40"]),
    # qwen3_moe on disk: one 2-D tensor per expert
    ("qwen3_moe", "disk", "model.layers.1.mlp.experts.2.up_proj.weight", ([3],), ["L1.mlp.19", "L1.expert.2"]),
    ("qwen3_moe", "disk", "model.layers.1.mlp.experts.1.down_proj.weight", (slice(None), [5]),
     ["L1.mlp.13", "L1.expert.1"]),
    ("qwen3_moe", "disk", "model.layers.1.mlp.gate.weight", ([3],), ["L1.router.3", "L1.expert.3"]),
    ("llama", "disk", _Q + "k_proj.weight", (slice(8, 16),), ["L0.kv.1"]),
]


@pytest.mark.parametrize(("family", "where", "name", "index", "units"), PLANTED,
                         ids=[f"{p[0]}-{p[1]}-{p[2].split('.', 3)[-1]}-{p[4][0]}" for p in PLANTED])
def test_planted_delta_lands_in_one_unit(zoo, family, where, name, index, units):
    um: UnitMap = zoo(family)[where]
    d2 = _plant(um.shapes[name], index) ** 2
    sums = um.reduce({name: d2})
    total = float(d2.sum())
    hits = {}
    for kind in U.UNIT_KINDS:
        for ly, per in enumerate(sums[kind]):
            for j in per.nonzero().flatten().tolist():
                hits[unit_id(ly, kind, j)] = float(per[j])
    assert float(sums["other"].abs().sum()) == 0
    assert set(hits) == set(units)
    assert all(v == pytest.approx(total, rel=1e-12) for v in hits.values())
    # the streaming primitive agrees, also fed in two row blocks
    for kind, axis, eaxis, uop in um.positions(name):
        if eaxis is None:
            pos = d2.sum(dim=[a for a in range(d2.dim()) if a != axis]) if d2.dim() > 1 else d2
        else:
            pos = d2.movedim((eaxis, axis), (0, 1)).flatten(0, 1).flatten(1).sum(1)
        assert pos.numel() == uop.numel()
        half = pos.numel() // 2
        got = (um.unit_sums_from_positions(name, kind, pos[:half])
               + um.unit_sums_from_positions(name, kind, pos[half:], start=half))
        layer = um.layer_of(name)
        assert torch.equal(got, sums[kind][layer])


# ----------------------------------------------------------------------------- functional checks


def _ids(path: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7? The cat sat."}],
                                  add_generation_prompt=True, return_tensors="pt")
    return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _zero_units(model, um: UnitMap, ids, units, modules=None) -> torch.Tensor:
    """Logits with the entries of `units` zeroed (only in tensors whose module label is in `modules`), restored."""
    params = dict(model.named_parameters())
    sels = um.select(units)
    saved = {}
    for n, s in sels.items():
        if modules is not None and um.module_of(n)[1] not in modules:
            continue
        saved[n] = s.take(params[n]).clone()
        s.put(params[n], torch.zeros_like(saved[n]))
    assert saved, (units, modules)
    out = _logits(model, ids)
    for n, v in saved.items():
        sels[n].put(params[n], v)
    return out


def _zero_input(model, module_name: str, cols, ids) -> torch.Tensor:
    def pre(_mod, args):
        x = args[0].clone()
        x[..., cols] = 0
        return (x, *args[1:])

    handle = model.get_submodule(module_name).register_forward_pre_hook(pre)
    try:
        return _logits(model, ids)
    finally:
        handle.remove()


def _close(a, b) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_functional_head_kv_neuron(zoo, family):
    z = zoo(family)
    model, um, cfg = z["model"], z["mem"], z["cfg"]
    ids = _ids(z["path"])
    base = _logits(model, ids)
    heads = cfg.get("num_attention_heads") or cfg["n_head"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or (cfg.get("hidden_size") or cfg.get("n_embd")) // heads
    o_mod = um.hook_module(0, "head_out")
    # head 2: its o-projection input columns <=> zeroing head 2's slice of the o-proj input
    ref = _zero_input(model, o_mod, slice(2 * hd, 3 * hd), ids)
    assert (ref - base).abs().max() > 1e-6
    assert _close(_zero_units(model, um, ids, ["L0.head.2"], {"o"}), ref)
    if family != "olmo2":  # olmo2's q_norm spans all heads, so cutting head 2's q rows rescales the others
        assert _close(_zero_units(model, um, ids, ["L0.head.2"]), ref)  # q rows too: irrelevant once o is cut
    assert not _close(_zero_units(model, um, ids, ["L0.head.1"], {"o"}), ref)
    # KV group 1: v = 0 makes every query head of the group output exactly 0
    per = heads // kv_heads
    cols = [c for h in range(heads) if h // per == 1 for c in range(h * hd, (h + 1) * hd)]
    ref = _zero_input(model, o_mod, cols, ids)
    # olmo2 normalises k over all KV groups at once (k_norm over KV*hd), so only v is group-local there
    mods = {"v"} if family == "olmo2" else None
    assert _close(_zero_units(model, um, ids, ["L0.kv.1"], mods), ref)
    assert not _close(_zero_units(model, um, ids, ["L0.kv.0"], mods), ref)
    # neuron 5 of layer 0 (dense in every family): its down column, or its gate/up rows (act(0) = 0)
    ref = _zero_input(model, um.hook_module(0, "mlp_act"), [5], ids)
    assert (ref - base).abs().max() > 1e-6
    assert _close(_zero_units(model, um, ids, ["L0.mlp.5"], {"down"}), ref)
    assert _close(_zero_units(model, um, ids, ["L0.mlp.5"], {"gate", "up", "gate_up"}), ref)
    assert _close(_logits(model, ids), base)  # put(take) restored everything


def test_functional_moe_expert_and_disk_names(zoo, tmp_path):
    z = zoo("qwen3_moe")
    model, um, path = z["model"], z["mem"], z["path"]
    ids = _ids(path)
    base = _logits(model, ids)
    p = dict(model.named_parameters())
    gate_up, down = p["model.layers.1.mlp.experts.gate_up_proj"], p["model.layers.1.mlp.experts.down_proj"]
    assert um.hook_module(1, "mlp_act") is None and um.hook_module(1, "head_out").endswith("layers.1.self_attn.o_proj")
    assert um.hook_module(0, "mlp_act") == "model.layers.0.mlp.down_proj" and um.hook_module(0, "router") is None
    seen = []
    h = model.get_submodule(um.hook_module(1, "router")).register_forward_hook(lambda m, a, o: seen.append(o))
    _logits(model, ids)
    h.remove()
    logits, scores, idx = seen[0]
    assert logits.shape == (ids.numel(), 4) and scores.shape == idx.shape == (ids.numel(), 2)

    def by_hand(t, index) -> torch.Tensor:
        old = t.detach()[index].clone()
        with torch.no_grad():
            t[index] = 0
        out = _logits(model, ids)
        with torch.no_grad():
            t[index] = old
        return out

    # expert e whose output is cut: down_proj[e] = 0 by hand
    used = sorted(set(idx.flatten().tolist()))
    e = used[0]
    ref = by_hand(down, (e,))
    assert (ref - base).abs().max() > 1e-6
    assert _close(_zero_units(model, um, ids, [f"L1.expert.{e}"], {"experts_down"}), ref)
    assert _close(_zero_units(model, um, ids, [f"L1.expert.{e}"], {"experts_gate_up"}), ref)
    # one expert neuron (flat index e*8 + 3): its gate+up rows (3 and 8+3) <=> its down column, by hand
    ref = by_hand(down, (e, slice(None), 3))
    assert (ref - base).abs().max() > 1e-8
    assert _close(_zero_units(model, um, ids, [f"L1.mlp.{e * 8 + 3}"], {"experts_gate_up"}), ref)
    assert _close(_zero_units(model, um, ids, [f"L1.mlp.{e * 8 + 3}"], {"experts_down"}), ref)
    assert _close(by_hand(gate_up, (e, [3, 11])), ref)
    # router row: with every other expert weight fixed, the selection is exactly that row
    assert _close(_zero_units(model, um, ids, ["L1.router.2"]), by_hand(p["model.layers.1.mlp.gate.weight"], (2,)))
    # on-disk names: the same surgery through the disk map, saved, reloaded by transformers
    from transformers import AutoModelForCausalLM

    units = [f"L1.expert.{e}", "L1.mlp.30", "L0.head.1", "L0.mlp.7", "model.norm.weight"]
    sd = load_file(str(path / "model.safetensors"))
    for n, s in z["disk"].select(units).items():
        if s is None:
            sd[n].zero_()
        else:
            s.put(sd[n], 0.0)
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(path / "config.json", out / "config.json")
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    m2 = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").double().eval()
    params = dict(model.named_parameters())
    saved = {}
    for n, s in um.select(units).items():
        saved[n] = params[n].detach().clone()
        if s is None:
            with torch.no_grad():
                params[n].zero_()
        else:
            s.put(params[n], 0.0)
    try:
        assert _close(_logits(m2, ids), _logits(model, ids))
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
    assert _close(_logits(model, ids), base)
    # the default (grouped_mm, float32) expert kernel reads the fused tensors the same way
    m32 = AutoModelForCausalLM.from_pretrained(path).eval()
    assert m32.config._experts_implementation != "eager"
    d32 = dict(m32.named_parameters())["model.layers.1.mlp.experts.down_proj"]
    base32 = _logits(m32, ids)
    with torch.no_grad():
        old = d32[e, :, 3].clone()
        d32[e, :, 3] = 0
    ref32 = _logits(m32, ids)
    with torch.no_grad():
        d32[e, :, 3] = old
    assert (ref32 - base32).abs().max() > 1e-5
    got32 = _zero_units(m32, um, ids, [f"L1.mlp.{e * 8 + 3}"], {"experts_gate_up"})
    assert torch.allclose(got32, ref32, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- properties

PROPERTY_FAMILIES = [("phi3", "mem"), ("gpt_neox", "mem"), ("gpt2", "disk"), ("qwen3_moe", "mem"),
                     ("qwen3_moe", "disk")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_take_put_mask_roundtrip(zoo, data):
    family, where = data.draw(st.sampled_from(PROPERTY_FAMILIES))
    um: UnitMap = zoo(family)[where]
    pool = um.ids("other") + [i for k in U.UNIT_KINDS for i in um.ids(k)]
    units = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=6, unique=True))
    sels = um.select(units)
    masks = {}
    for n, s in sels.items():
        shape = um.shapes[n]
        t = torch.arange(1, torch.Size(shape).numel() + 1, dtype=torch.float64).reshape(shape)
        if s is None:
            masks[n] = torch.ones(shape, dtype=torch.bool)
            continue
        m = s.mask(shape)
        taken = s.take(t)
        assert taken.numel() == int(m.sum()) == s.numel
        t2 = torch.zeros_like(t)
        s.put(t2, taken)
        assert torch.equal(t2, t * m)
        t3 = t.clone()
        s.put(t3, torch.zeros_like(taken))
        assert torch.equal(t3, t * ~m)
        masks[n] = m
    # expected membership, expanding experts by hand (router row e + neurons e*I .. (e+1)*I - 1)
    inter = zoo(family)["cfg"].get("moe_intermediate_size", 0)
    want: set[str] = set()
    for u in units:
        p = parse_unit_id(u)
        if p and p[1] == "expert":
            want |= {unit_id(p[0], "router", p[2])} | {unit_id(p[0], "neuron", j)
                                                       for j in range(p[2] * inter, (p[2] + 1) * inter)}
        else:
            want.add(u)
    full = um.reduce({n: torch.ones(s) for n, s in um.shapes.items()})
    got = um.reduce({n: m.double() for n, m in masks.items()})
    for kind in U.PARTITION_KINDS:
        for ly, per in enumerate(got[kind]):
            for j in range(per.numel()):
                uid = unit_id(ly, kind, j)
                assert float(per[j]) == (float(full[kind][ly][j]) if uid in want else 0.0), uid
    for i, n in enumerate(um.others):
        assert float(got["other"][i]) == (float(full["other"][i]) if n in want else 0.0)


# ----------------------------------------------------------------------------- errors and odd configs

_LLAMA_CFG = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48)


def test_unknown_architecture_whole_tensor_units():
    cfg = dict(_LLAMA_CFG, model_type="foo_zoo_test", architectures=["FooForCausalLM"])
    params = [("model.layers.0.self_attn.q_proj.weight", (32, 32)), ("model.norm.weight", (32,))]
    with pytest.warns(UserWarning, match="unknown architecture"):
        um = UnitMap.build(cfg, params)
    assert um.arch is None and um.others == [n for n, _ in params]
    assert um.warning == ("unknown architecture 'foo_zoo_test' (FooForCausalLM): whole-tensor units only; add it "
                          "with crossroute.model.units.register_architecture(...)")
    assert um.n_units("head") == um.n_units("neuron") == 0 and um.n_units() == 2
    assert um.reduce({"model.norm.weight": torch.ones(32)})["other"].tolist() == [0.0, 32.0]
    with pytest.raises(CrossrouteError) as ei:
        um.require()
    msg = str(ei.value)
    assert "\n" not in msg and "foo_zoo_test" in msg and "FooForCausalLM" in msg and "register_architecture" in msg
    with pytest.raises(CrossrouteError):
        um.select(["L0.head.0"])
    assert um.select(["model.norm.weight"]) == {"model.norm.weight": None}


def test_register_architecture_extends_the_table(monkeypatch):
    monkeypatch.setattr(U, "ARCHITECTURES", dict(U.ARCHITECTURES))
    monkeypatch.setattr(U, "_BY_MODEL_TYPE", dict(U._BY_MODEL_TYPE))
    llama = U.ARCHITECTURES["llama"]
    U.register_architecture(U.Arch("bar", ("bar_zoo_test",), r"^blocks\.(\d+)\.", llama.rules, llama.hooks))
    cfg = dict(_LLAMA_CFG, model_type="bar_zoo_test")
    um = UnitMap.build(cfg, [("blocks.0.self_attn.q_proj.weight", (32, 32)), ("blocks.0.mlp.down_proj.weight",
                                                                                (32, 48))])
    assert um.arch == "bar" and um.counts["head"] == [4] and um.counts["neuron"] == [48]
    assert um.require() is um and um.hook_module(0, "head_out") == "blocks.0.self_attn.o_proj"


def test_shape_mismatch_names_the_tensor():
    with pytest.raises(CrossrouteError, match=r"q_proj\.weight.*24.*num_attention_heads"):
        UnitMap.build(_LLAMA_CFG, [("model.layers.0.self_attn.q_proj.weight", (24, 32))])
    with pytest.raises(CrossrouteError, match=r"o_proj\.weight.*40"):
        UnitMap.build(_LLAMA_CFG, [("model.layers.0.self_attn.o_proj.weight", (32, 40))])
    neox = dict(model_type="gpt_neox", hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=48)
    with pytest.raises(CrossrouteError, match="query_key_value"):
        UnitMap.build(neox, [("gpt_neox.layers.0.attention.query_key_value.weight", (64, 32))])
    moe = dict(_LLAMA_CFG, model_type="qwen3_moe", num_experts=4, moe_intermediate_size=8)
    with pytest.raises(CrossrouteError, match="num_experts"):
        UnitMap.build(moe, [("model.layers.0.mlp.experts.gate_up_proj", (3, 16, 32))])
    with pytest.raises(CrossrouteError, match="layer 5"):
        UnitMap.build(_LLAMA_CFG, [("model.layers.5.self_attn.q_proj.weight", (32, 32))])
    with pytest.raises(CrossrouteError, match=r"config\.json.*'hidden_size'"):
        dims_from_config({"model_type": "llama"})


def test_ids_selection_errors_and_kv_groups(zoo):
    um: UnitMap = zoo("llama")["mem"]
    assert parse_unit_id("L3.mlp.7") == (3, "neuron", 7) and unit_id(3, "neuron", 7) == "L3.mlp.7"
    assert parse_unit_id("L1.expert.2") == (1, "expert", 2) and parse_unit_id("L0.foo.1") is None
    assert U.UNIT_ID_RE.match("L0.router.3") and U.TAG["neuron"] == "mlp"
    with pytest.raises(CrossrouteError, match="outside the model"):
        um.select(["L0.head.4"])
    with pytest.raises(CrossrouteError, match="outside the model"):
        um.select(["L0.expert.0"])
    with pytest.raises(CrossrouteError, match="unknown unit"):
        um.select(["L0.mlp.x"])
    assert [um.kv_of_head(h) for h in range(4)] == [0, 0, 1, 1]
    assert um.with_kv_groups({"head": {"L0.head.3", "L1.head.0"}})["kv"] == {"L0.kv.1", "L1.kv.0"}
    assert um.module_of("model.layers.1.mlp.gate_proj.weight") == (1, "gate")
    assert um.module_of("model.layers.0.input_layernorm.weight") == (0, "norm")
    assert um.module_of("lm_head.weight") is None and um.layer_of("model.layers.1.mlp.up_proj.weight") == 1
    js = um.to_json()
    assert js["head_layout"] == {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8}
    assert js["arch"] == "llama" and js["num_experts"] == 0


def test_multimodal_text_config_and_sparse_layers(zoo):
    inner = zoo("gemma3")["cfg"]
    cfg = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": inner}
    shapes = [("model.language_model." + n[len("model."):], s) for n, s in zoo("gemma3")["disk_shapes"].items()]
    shapes.append(("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight", (64, 64)))
    um = UnitMap.build(cfg, shapes)
    assert um.arch == "gemma3" and um.counts["head"] == [4, 4] and um.counts["neuron"] == [48, 48]
    assert "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in um.others
    d = dims_from_config(dict(_LLAMA_CFG, num_hidden_layers=6, num_experts=4, moe_intermediate_size=8,
                              mlp_only_layers=[3], decoder_sparse_step=2))
    assert d.sparse_layers == frozenset({1, 5})
