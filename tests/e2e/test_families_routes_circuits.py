"""Routes and circuits on every zoo family: hook sites and head layout come from the unit table only.

Each family's checkpoint is planted through the unit table's weight side (UnitMap.select): in layer 0 one
neuron's input rows (gate/up, c_fc, dense_h_to_4h, + biases) are scaled x100, in layer 1 KV group 0 (k and v
rows + biases) is zeroed, and for MoE the layer-1 router is zeroed. Measured through the hook side, that
neuron must be the most active of its layer, the heads reading KV group 0 must output exactly 0 (softmax . 0),
and the zeroed router must route uniformly (mean probability 1/E for every expert).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossroute.analyze.circuits import run_circuits  # noqa: E402
from crossroute.analyze.routes import run_routes  # noqa: E402
from crossroute.model.units import UnitMap  # noqa: E402
from zoo import FAMILIES, zoo_checkpoint, zoo_tokenizer  # noqa: E402

torch.set_num_threads(1)

PLANT_LAYER, PLANT_NEURON, ZERO_LAYER = 0, 5, 1
INPUT_MODULES = {"gate", "up", "gate_up"}  # the table's module labels of a neuron's input rows


def expected(cfg: dict) -> dict[str, list[int]]:
    """Per layer: neurons, heads, experts (sparse layers) straight from config.json."""
    layers = cfg.get("num_hidden_layers") or cfg["n_layer"]
    heads = cfg.get("num_attention_heads") or cfg["n_head"]
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * cfg["n_embd"]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    only = set(cfg.get("mlp_only_layers") or [])
    sparse = [experts > 0 and ly not in only for ly in range(layers)]
    return {"neuron": [0 if s else inter for s in sparse], "head": [heads] * layers,
            "router": [experts if s else 0 for s in sparse]}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """family -> (planted checkpoint dir, its UnitMap)."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, tuple[Path, UnitMap]] = {}

    def get(family: str) -> tuple[Path, UnitMap]:
        if family not in cache:
            model = AutoModelForCausalLM.from_pretrained(zoo_checkpoint(family, tmp_path_factory))
            umap = UnitMap.of_model(model)
            params = dict(model.named_parameters())
            units = [f"L{PLANT_LAYER}.mlp.{PLANT_NEURON}"]
            zero = [f"L{ZERO_LAYER}.kv.0"] + [f"L{ZERO_LAYER}.router.{e}" for e in range(umap.counts["router"][1])]
            with torch.no_grad():
                for name, sel in umap.select(units).items():
                    if umap.module_of(name)[1] in INPUT_MODULES:
                        sel.put(params[name], sel.take(params[name]) * 100.0)
                for name, sel in umap.select(zero).items():
                    sel.put(params[name], 0.0)
            path = tmp_path_factory.mktemp(f"planted_{family}") / "ckpt"
            model.save_pretrained(path, safe_serialization=True)
            zoo_tokenizer().save_pretrained(path)
            cache[family] = (path, umap)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_routes_every_family(planted, family, tmp_path):
    path, umap = planted(family)
    cfg = json.loads((path / "config.json").read_text())
    want = expected(cfg)
    res = run_routes(path, "math,qa", n=4, q=25.0, batch_size=4, device="cpu", run_dir=tmp_path)
    assert res.units["arch"] == umap.arch and res.units["counts"]["head"]["per_layer"] == want["head"]
    zero_heads = [h for h in range(want["head"][0]) if umap.kv_of_head(h) == 0]
    for dom in ("math", "qa"):
        act = res.activity[dom]
        for ly in range(len(want["head"])):
            kinds = [k for k in ("neuron", "head", "router") if want[k][ly]]
            assert res.measured[f"L{ly}"] == kinds, (family, ly)
            assert len(act[f"L{ly}.head"]) == want["head"][ly]
            if want["neuron"][ly]:
                assert len(act[f"L{ly}.mlp"]) == want["neuron"][ly]
            else:  # sparse MoE layer: no per-neuron activity, per-expert routing probability instead
                assert f"L{ly}.mlp" not in act
                assert act[f"L{ly}.router"] == pytest.approx([1 / want["router"][ly]] * want["router"][ly])
        mlp = torch.tensor(act[f"L{PLANT_LAYER}.mlp"])
        assert int(mlp.argmax()) == PLANT_NEURON, family
        assert float(mlp[PLANT_NEURON]) > 20 * float(mlp.topk(2).values[1]), family
        heads = torch.tensor(act[f"L{ZERO_LAYER}.head"])
        assert all(float(heads[h]) == 0.0 for h in zero_heads), family
        assert all(float(heads[h]) > 0.0 for h in range(len(heads)) if h not in zero_heads), family
        assert res.active[dom]["kv"]  # kv groups of the active heads, from the unit map
    assert f"L{PLANT_LAYER}.mlp.{PLANT_NEURON}" in res.active["math"]["neuron"]
    kinds = ["neuron", "head", "kv"] + (["router"] if sum(want["router"]) else [])
    assert res.kinds == kinds and list(res.jaccard) == kinds and list(res.layer_jaccard) == kinds
    if sum(want["router"]):
        assert res.notes and "no per-neuron activity" in res.notes[0]
        assert res.layer_jaccard["neuron"]["math|qa"][1] is None  # not measured in the sparse layer
    from crossroute.report.sections.routes import render_routes_section

    page = render_routes_section(json.loads((tmp_path / "results" / "routes.json").read_text()))
    assert page.count("<img") == 2 * len(kinds)


@pytest.mark.parametrize("family", FAMILIES)
def test_circuits_every_family(family, tmp_path_factory):
    path = zoo_checkpoint(family, tmp_path_factory)
    cfg = json.loads((path / "config.json").read_text())
    want = expected(cfg)
    res = run_circuits(path, {}, "code", n=3, batch_size=8, confirm_top=2, device="cpu")
    base = res.models["base"]
    assert len(base["score"]) == len(want["head"]) and all(len(r) == want["head"][0] for r in base["score"])
    assert res.layout["num_heads"] == want["head"][0] and res.units["arch"] is not None
    assert base["curve_faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)  # every head kept = the clean run
    assert not any(v != v for r in base["attribution"] for v in r)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "crossroute", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_routes_known_and_unknown_architecture(tmp_path_factory, tmp_path):
    ok = _cli("routes", str(zoo_checkpoint("phi3", tmp_path_factory)), "--domains", "math,qa", "--n", "4",
              "--batch-size", "4", "--out", str(tmp_path / "run"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    data = json.loads((tmp_path / "run" / "results" / "routes.json").read_text())
    assert data["units"]["arch"] == "phi3" and len(data["activity"]["math"]["L0.head"]) == 4
    # a llama checkpoint relabelled as Granite: transformers loads it (same tensor names), the table does not
    # know it -> one error line naming the architecture and how to add it, exit 2
    unknown = tmp_path / "granite"
    shutil.copytree(zoo_checkpoint("llama", tmp_path_factory), unknown)
    cfg = json.loads((unknown / "config.json").read_text())
    cfg.update(model_type="granite", architectures=["GraniteForCausalLM"])
    (unknown / "config.json").write_text(json.dumps(cfg))
    bad = _cli("routes", str(unknown), "--domains", "math,qa", "--n", "4", "--out", str(tmp_path / "run2"))
    assert bad.returncode == 2, bad.stderr[-2000:]
    errors = [ln for ln in bad.stderr.splitlines() if "crossroute: error:" in ln]
    assert len(errors) == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "'granite'" in errors[0] and "GraniteForCausalLM" in errors[0] and "register_architecture" in errors[0]
    assert not (tmp_path / "run2" / "results" / "routes.json").exists()
