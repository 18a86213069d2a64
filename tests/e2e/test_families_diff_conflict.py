"""`diff` and `conflict` on every zoo family, through the unit table (crossroute.model.units) only.

Each family: the zoo checkpoint (base) and a copy with a planted δ on one unit of every kind (loaded with
transformers, changed in memory, saved with save_pretrained: Qwen3-MoE's fused in-memory experts go to
per-expert tensors on disk). Expected unit counts come straight from config.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossroute.analyze.conflict import run_conflict  # noqa: E402
from crossroute.analyze.diff import diff_checkpoints  # noqa: E402
from crossroute.core.errors import CrossrouteError  # noqa: E402
from crossroute.model.units import UnitMap  # noqa: E402
from zoo import FAMILIES, zoo_checkpoint  # noqa: E402

torch.set_num_threads(1)

DELTA = {"neuron": 0.05, "head": 0.05, "kv": 0.05, "router": 0.05, "expert": 0.03}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
UNKNOWN = "granite"  # transformers loads a Llama checkpoint under it (same tensor names); crossroute has no entry


def expected_counts(cfg: dict) -> dict[str, list[int]]:
    """Units per layer from config.json alone (not from the table)."""
    if cfg["model_type"] == "gpt2":
        layers, heads, kv = cfg["n_layer"], cfg["n_head"], cfg["n_head"]
        inter = cfg.get("n_inner") or 4 * cfg["n_embd"]
    else:
        layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
        kv, inter = cfg.get("num_key_value_heads") or heads, cfg["intermediate_size"]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    only, step = cfg.get("mlp_only_layers") or [], cfg.get("decoder_sparse_step") or 1
    sparse = [experts > 0 and ly not in only and (ly + 1) % step == 0 for ly in range(layers)]
    return {"neuron": [experts * cfg["moe_intermediate_size"] if s else inter for s in sparse],
            "head": [heads] * layers, "kv": [kv] * layers,
            "router": [experts if s else 0 for s in sparse], "expert": [experts if s else 0 for s in sparse]}


def planted_units(counts: dict[str, list[int]]) -> dict[str, str]:
    """One unit per kind present: dense neuron and head in layer 0, the rest in the last layer that has them."""
    out = {}
    for kind, tag in (("neuron", "mlp"), ("head", "head"), ("kv", "kv"), ("router", "router"), ("expert", "expert")):
        layers = [ly for ly, n in enumerate(counts[kind]) if n]
        if layers:
            ly = layers[0] if kind in ("neuron", "head") else layers[-1]
            j = {"neuron": counts[kind][ly] - 3, "head": 2, "kv": 1, "router": 2, "expert": 1}[kind]
            out[kind] = f"L{ly}.{tag}.{j}"
    return out


def _copy_extras(src: Path, dst: Path) -> None:
    for f in src.iterdir():  # tokenizer files (and anything else save_pretrained did not write)
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)


_PLANTED: dict[str, dict] = {}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """family -> {"base", "ckpt", "cfg", "units": kind -> planted unit id, "norm": kind -> expected ‖δ‖}."""
    from transformers import AutoModelForCausalLM

    def get(family: str) -> dict:
        if family not in _PLANTED:
            base = zoo_checkpoint(family, tmp_path_factory)
            cfg = json.loads((base / "config.json").read_text())
            units = planted_units(expected_counts(cfg))
            model = AutoModelForCausalLM.from_pretrained(base)
            umap = UnitMap.of_model(model)
            params = dict(model.named_parameters())
            norms = {}
            for kind, u in units.items():
                numel = 0
                for name, sel in umap.select([u]).items():
                    sel.put(params[name], sel.take(params[name]) + DELTA[kind])
                    numel += sel.numel
                norms[kind] = DELTA[kind] * math.sqrt(numel)
            ckpt = tmp_path_factory.mktemp(f"planted_{family}") / "ckpt"
            model.save_pretrained(ckpt, safe_serialization=True)
            _copy_extras(base, ckpt)
            _PLANTED[family] = dict(base=base, ckpt=ckpt, cfg=cfg, units=units, norm=norms)
        return _PLANTED[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_diff_unit_scores_find_planted_units(planted, family):
    p = planted(family)
    res = diff_checkpoints(p["base"], p["ckpt"])
    want = {k: v for k, v in expected_counts(p["cfg"]).items() if sum(v)}
    assert res.units["arch"] is not None and res.warning is None
    assert res.units["counts"]["head"]["per_layer"] == want["head"]
    assert set(res.unit_scores) == set(want) == set(p["units"])
    for kind, per_layer in want.items():
        scores = res.unit_scores[kind]
        assert [len(row) for row in scores] == per_layer, kind
        u = p["units"][kind]
        assert res.top_units[kind][0] == u, (kind, res.top_units[kind])
        layer, j = int(u[1:u.index(".")]), int(u.rsplit(".", 1)[1])
        assert scores[layer][j] == pytest.approx(p["norm"][kind], rel=1e-4), kind
        others = sorted((s for ly, row in enumerate(scores) for i, s in enumerate(row) if (ly, i) != (layer, j)))
        assert others[-1] < scores[layer][j], kind
    assert res.to_json()["rel_change"] > 0
    mods = res.module_rel_change()
    assert mods.get("embed", 0.0) == 0.0 and mods.get("lm_head", 0.0) == 0.0  # nothing planted there
    assert not any(m.startswith("L") for m in mods)  # module types, not unit ids


def _check_diff_json(run: Path, p: dict) -> None:
    data = json.loads((run / "results" / "diff.json").read_text())
    (stage,) = data["stages"]
    assert stage["units"]["arch"] is not None and stage["units"]["warning"] is None
    assert stage["units"]["counts"]["neuron"]["per_layer"] == expected_counts(p["cfg"])["neuron"]
    assert {k: v[0] for k, v in stage["top_units"].items()} == p["units"]
    assert set(data["jaccard"]) == set(p["units"])


def test_cli_diff_every_family(planted, tmp_path, monkeypatch):
    """`crossroute diff BASE CKPT --out RUN` per family: in a subprocess for Qwen3-MoE (per-expert tensors on
    disk), in-process (the CLI's main(), same argv) for every family, as imports cost seconds per process."""
    from crossroute.cli.main import main

    moe = planted("qwen3_moe")
    proc = subprocess.Popen([sys.executable, "-m", "crossroute", "diff", str(moe["base"]), str(moe["ckpt"]), "--out",
                             str(tmp_path / "subprocess")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV)
    for family in FAMILIES:
        p = planted(family)
        monkeypatch.setattr(sys, "argv", ["crossroute", "diff", str(p["base"]), str(p["ckpt"]), "--out",
                                          str(tmp_path / family)])
        try:
            main()
        except SystemExit as e:
            assert e.code in (0, None), family
        _check_diff_json(tmp_path / family, p)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)
    _check_diff_json(tmp_path / "subprocess", moe)


@pytest.mark.parametrize("family", FAMILIES)
def test_conflict_modules_cover_layers_and_global_cosine(planted, family):
    from crossroute.measure.proxy import domain_gradient
    from crossroute.model.load import load_model

    p = planted(family)
    res = run_conflict(p["base"], "math", "code", n=2, batch_size=2, device="cpu")
    layers = expected_counts(p["cfg"])["head"]
    assert {m.layer for m in res.modules} == set(range(len(layers)))
    assert res.num_layers == len(layers) and len(res.matrix()) == len(layers)
    assert all(m.kind in res.module_kinds for m in res.modules) and "other" not in res.module_kinds
    assert res.most_conflicting in {m.module for m in res.modules}
    loaded = load_model(p["base"], dtype=torch.float32, device="cpu")
    ga = domain_gradient(loaded.model, loaded.tokenizer, "math", n=2, batch_size=2)
    gb = domain_gradient(loaded.model, loaded.tokenizer, "code", n=2, batch_size=2)
    a = torch.cat([ga[k].double().flatten() for k in sorted(ga)])
    b = torch.cat([gb[k].double().flatten() for k in sorted(ga)])
    assert res.global_cosine == pytest.approx(float(a @ b / (a.norm() * b.norm())), rel=1e-6, abs=1e-9)
    if family in ("llama", "qwen3"):  # Llama-likes keep today's module names and columns
        assert res.module_kinds == ["q", "k", "v", "o", "gate", "up", "down"]
        assert res.modules[0].module == "model.layers.0.self_attn.q_proj"


def _as_unknown(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type=UNKNOWN, architectures=["GraniteForCausalLM"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unknown_architecture(planted, tmp_path, capsys):
    p = planted("llama")
    base, ckpt = _as_unknown(p["base"], tmp_path / "base"), _as_unknown(p["ckpt"], tmp_path / "ckpt")
    proc = subprocess.Popen([sys.executable, "-m", "crossroute", "conflict", str(base), "--domains", "math,code",
                             "--n", "2", "--batch-size", "2", "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    # diff: the anatomy without unit scores, the warning recorded and printed once
    res = diff_checkpoints(base, ckpt)
    assert res.unit_scores == {} and res.top_units == {} and res.units["arch"] is None
    assert UNKNOWN in res.warning and res.to_json()["units"]["warning"] == res.warning
    assert res.to_json()["rel_change"] > 0 and res.numel == sum(t.numel for t in res.tensors)
    diff_checkpoints(base, ckpt)
    assert capsys.readouterr().err.count(f"unknown architecture '{UNKNOWN}'") == 1
    # conflict: refused, one line naming the architecture and how to add it
    with pytest.raises(CrossrouteError, match=f"model_type '{UNKNOWN}'.*register_architecture"):
        run_conflict(base, "math", "code", n=2, batch_size=2, device="cpu")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and UNKNOWN in lines[0] and "register_architecture" in lines[0], err
    assert "Traceback" not in err
